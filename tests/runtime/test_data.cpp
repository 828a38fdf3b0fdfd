// The synthetic datasets: every sequence is deterministic, fits its length, and its targets are what
// the task says -- checked by independent solvers (a ListOps evaluator, a key lookup, the needle's
// copy) over many seeds and lengths -- and local_batch takes a rank's rows and the labels.
#include <ringcast/data.hpp>
#include <ringcast/error.hpp>

#include "test_util.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <numeric>
#include <vector>

namespace ringcast {
namespace {

// A recursive-descent evaluator of the token form "[X3[N74]8]".
int eval_listops(const std::vector<std::int32_t>& t, std::size_t& i) {
  if (t[i] >= '0' && t[i] <= '9') return t[i++] - '0';
  EXPECT_EQ(t[i], '[');
  const std::int32_t op = t[i + 1];
  i += 2;
  std::vector<int> v;
  while (t[i] != ']') v.push_back(eval_listops(t, i));
  ++i;
  EXPECT_GE(v.size(), 2u);
  std::sort(v.begin(), v.end());
  if (op == 'X') return v.back();
  if (op == 'N') return v.front();
  if (op == 'D') return v[(v.size() - 1) / 2];
  EXPECT_EQ(op, 'S');
  return std::accumulate(v.begin(), v.end(), 0) % 10;
}

TEST(Data, ListOpsLabelsAreTheExpressionsValues) {
  const ListOpsDataset data(5, 3, 5);
  std::vector<int> seen(10, 0);
  for (const std::int64_t n : {5, 17, 64, 200}) {
    std::vector<std::int32_t> tokens(static_cast<std::size_t>(n)), label(1);
    for (std::uint64_t s = 0; s < 200; ++s) {
      data.sequence(s, tokens, label);
      std::size_t i = 0;
      EXPECT_EQ(eval_listops(tokens, i), label[0]) << "n " << n << " sequence " << s;
      EXPECT_TRUE(std::all_of(tokens.begin() + static_cast<std::ptrdiff_t>(i), tokens.end(), [](auto x) { return x == 0; }));
      ++seen[static_cast<std::size_t>(label[0])];
    }
  }
  for (int c = 0; c < 10; ++c) EXPECT_GT(seen[static_cast<std::size_t>(c)], 0) << "label " << c << " never drawn";
  std::vector<std::int32_t> a(64), b(64), la(1), lb(1);
  data.sequence(7, a, la);
  data.sequence(7, b, lb);
  EXPECT_EQ(a, b);
  EXPECT_EQ(la, lb);
  EXPECT_EQ(data.classes(), 10);
}

TEST(Data, PrefixRecallLabelIsTheValueOfTheAskedKey) {
  const int prefix = 6;
  const PrefixRecallDataset data(3, prefix);
  for (const std::int64_t n : {14, 100, 1000}) {
    std::vector<std::int32_t> tokens(static_cast<std::size_t>(n)), label(1);
    for (std::uint64_t s = 0; s < 100; ++s) {
      data.sequence(s, tokens, label);
      ASSERT_EQ(tokens[0], 3);
      const std::int32_t key = tokens[1];
      int found = 0;
      for (std::int64_t i = prefix; i + 1 < n; ++i)
        if (tokens[i] == key && (i - prefix) % 2 == 0) {
          EXPECT_EQ(tokens[i + 1] - 64, label[0]);
          ++found;
        }
      EXPECT_EQ(found, 1) << "the asked key appears once as a key, n " << n;
      EXPECT_TRUE(std::all_of(tokens.begin() + 2, tokens.begin() + prefix, [](auto x) { return x == 0; }));
    }
  }
  std::vector<std::int32_t> tokens(13), label(1);
  test::expect_error([&] { data.sequence(0, tokens, label); }, "n >= prefix + 8");
}

TEST(Data, NeedleValueIsCopiedAfterTheQuery) {
  const NeedleDataset data(9);
  for (const std::int64_t n : {16, 77, 4096}) {
    std::vector<std::int32_t> tokens(static_cast<std::size_t>(n)), targets(static_cast<std::size_t>(n));
    for (std::uint64_t s = 0; s < 50; ++s) {
      data.sequence(s, tokens, targets);
      const auto needle = std::find(tokens.begin(), tokens.end(), NeedleDataset::kNeedleMarker) - tokens.begin();
      const std::int64_t query = n - NeedleDataset::kDigits - 1;
      ASSERT_LT(needle + NeedleDataset::kDigits, query);
      EXPECT_EQ(tokens[query], NeedleDataset::kQueryMarker);
      EXPECT_EQ(std::count_if(targets.begin(), targets.end(), [](auto t) { return t >= 0; }), NeedleDataset::kDigits);
      for (int i = 0; i < NeedleDataset::kDigits; ++i) {
        EXPECT_EQ(tokens[needle + 1 + i], tokens[query + 1 + i]);
        EXPECT_EQ(targets[query + i], tokens[query + 1 + i]);
      }
    }
  }
}

TEST(Data, LocalBatchTakesTheRanksRowsAndTheLabels) {
  const ListOpsDataset data(1);
  const std::vector<std::int32_t> positions = {4, 5, 6, 7};
  LocalBatch batch;
  local_batch(data, 10, 3, 16, positions, batch);
  ASSERT_EQ(batch.tokens.size(), 12u);
  ASSERT_EQ(batch.targets.size(), 3u);
  std::vector<std::int32_t> tokens(16), label(1);
  for (int b = 0; b < 3; ++b) {
    data.sequence(10 + b, tokens, label);
    EXPECT_EQ(batch.targets[b], label[0]);
    for (int i = 0; i < 4; ++i) EXPECT_EQ(batch.tokens[b * 4 + i], tokens[4 + i]);
  }
}

}  // namespace
}  // namespace ringcast
