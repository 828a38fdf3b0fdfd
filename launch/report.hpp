// Report: the rows a command produces, printed once as an aligned table for people and written as
// CSV or JSON for scripts (`--output csv|json [FILE]`, stdout when FILE is omitted). Columns keep the
// order in which they first appear; units go in the column name (time_us, algbw_GBps).
#pragma once

#include "cli.hpp"

#include <cstdint>
#include <cstdio>
#include <string>
#include <utility>
#include <variant>
#include <vector>

namespace ringcast::launch {

using Value = std::variant<std::int64_t, double, std::string>;

class Report {
 public:
  class Row {
   public:
    Row& set(const std::string& column, Value value);
    const std::vector<std::pair<std::string, Value>>& cells() const { return cells_; }

   private:
    std::vector<std::pair<std::string, Value>> cells_;
  };

  Row& add_row();
  bool empty() const { return rows_.empty(); }
  const std::vector<Row>& rows() const { return rows_; }

  void print_table(std::FILE* out) const;
  std::string to_csv() const;
  std::string to_json() const;  // an array of objects; a single row is written as one object

 private:
  std::vector<std::string> columns() const;
  std::vector<Row> rows_;
};

// Where machine-readable output goes, from `--output FORMAT [FILE]`.
struct OutputSpec {
  enum class Format { kNone, kCsv, kJson } format = Format::kNone;
  std::string path;  // empty: stdout (and the table then goes to stderr)
  static OutputSpec parse(const std::vector<std::string>& tokens);  // throws UsageError
  static OutputSpec from_options(const po::variables_map& vm);       // the --output option, if given
};

// Prints the table (stdout, or stderr when the machine-readable form goes to stdout) and writes the
// requested output. Call on rank 0 only.
void emit(const Report& report, const OutputSpec& output);
// Only the machine-readable part of emit(), for commands whose table and rows differ (`train`: a
// summary table, a row per step).
void write_output(const Report& report, const OutputSpec& output);

std::string format_bytes(double bytes);  // "64 KiB", "1.5 MiB"

}  // namespace ringcast::launch
