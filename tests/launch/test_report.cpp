// Report rendering (table, CSV, JSON), --output parsing and size parsing.
#include "cli.hpp"
#include "report.hpp"

#include <gtest/gtest.h>

#include <cmath>

namespace ringcast::launch {
namespace {

TEST(LaunchReport, CsvKeepsColumnOrderAndQuotes) {
  Report r;
  r.add_row().set("name", std::string("a,b")).set("n", std::int64_t{3});
  r.add_row().set("name", std::string("say \"hi\"")).set("x", 0.5);
  EXPECT_EQ(r.to_csv(), "name,n,x\n\"a,b\",3,\n\"say \"\"hi\"\"\",,0.5\n");
}

TEST(LaunchReport, JsonTypesAndNonFinite) {
  Report r;
  r.add_row().set("s", std::string("q\"")).set("i", std::int64_t{-7}).set("d", 1.25).set("bad", std::nan(""));
  EXPECT_EQ(r.to_json(), "{\"s\": \"q\\\"\", \"i\": -7, \"d\": 1.25, \"bad\": null}\n");
  r.add_row().set("i", std::int64_t{1});
  EXPECT_EQ(r.to_json().front(), '[');
}

TEST(LaunchReport, SetOverwritesACell) {
  Report r;
  r.add_row().set("a", std::int64_t{1}).set("a", std::int64_t{2});
  EXPECT_EQ(r.to_csv(), "a\n2\n");
}

TEST(LaunchCli, ParseSize) {
  EXPECT_EQ(parse_size("4096"), 4096u);
  EXPECT_EQ(parse_size("1K"), 1024u);
  EXPECT_EQ(parse_size("16m"), 16u << 20);
  EXPECT_EQ(parse_size("2GiB"), 2ull << 30);
  EXPECT_THROW(parse_size("12Q"), UsageError);
  EXPECT_THROW(parse_size("K"), UsageError);
}

TEST(LaunchCli, OutputSpec) {
  EXPECT_EQ(OutputSpec::parse({}).format, OutputSpec::Format::kNone);
  auto j = OutputSpec::parse({"json"});
  EXPECT_EQ(j.format, OutputSpec::Format::kJson);
  EXPECT_TRUE(j.path.empty());
  auto c = OutputSpec::parse({"csv", "x.csv"});
  EXPECT_EQ(c.format, OutputSpec::Format::kCsv);
  EXPECT_EQ(c.path, "x.csv");
  EXPECT_THROW(OutputSpec::parse({"yaml"}), UsageError);
  EXPECT_THROW(OutputSpec::parse({"csv", "a", "b"}), UsageError);
}

}  // namespace
}  // namespace ringcast::launch
