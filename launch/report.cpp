// Report rendering: aligned table, CSV (RFC 4180 quoting), JSON (objects with typed values).
#include "report.hpp"

#include "cli.hpp"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <fstream>

namespace ringcast::launch {
namespace {

std::string to_text(const Value& v) {
  if (auto* i = std::get_if<std::int64_t>(&v)) return fmt::format("{}", *i);
  if (auto* d = std::get_if<double>(&v)) {
    if (!std::isfinite(*d)) return fmt::format("{}", *d);
    const double a = std::fabs(*d);
    if (a != 0 && (a < 1e-3 || a >= 1e7)) return fmt::format("{:.3e}", *d);
    return fmt::format("{:.4g}", *d);
  }
  return std::get<std::string>(v);
}

std::string json_escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\t': out += "\\t"; break;
      default:
        if (static_cast<unsigned char>(c) < 0x20) out += fmt::format("\\u{:04x}", static_cast<int>(c));
        else out += c;
    }
  }
  return out;
}

std::string to_json_value(const Value& v) {
  if (auto* i = std::get_if<std::int64_t>(&v)) return fmt::format("{}", *i);
  if (auto* d = std::get_if<double>(&v)) return std::isfinite(*d) ? fmt::format("{:.9g}", *d) : "null";
  return fmt::format("\"{}\"", json_escape(std::get<std::string>(v)));
}

std::string csv_field(const std::string& s) {
  if (s.find_first_of(",\"\n") == std::string::npos) return s;
  std::string out = "\"";
  for (char c : s) {
    if (c == '"') out += '"';
    out += c;
  }
  return out + "\"";
}

// Full precision for numbers (unlike the table), "nan" for non-finite values.
std::string csv_value(const Value& v) {
  if (auto* str = std::get_if<std::string>(&v)) return *str;
  if (auto* d = std::get_if<double>(&v); d && !std::isfinite(*d)) return fmt::format("{}", *d);
  return to_json_value(v);
}

const Value* find(const Report::Row& row, const std::string& column) {
  for (const auto& [name, value] : row.cells())
    if (name == column) return &value;
  return nullptr;
}

}  // namespace

Report::Row& Report::Row::set(const std::string& column, Value value) {
  for (auto& [name, v] : cells_) {
    if (name == column) {
      v = std::move(value);
      return *this;
    }
  }
  cells_.emplace_back(column, std::move(value));
  return *this;
}

Report::Row& Report::add_row() { return rows_.emplace_back(); }

std::vector<std::string> Report::columns() const {
  std::vector<std::string> cols;
  for (const auto& row : rows_)
    for (const auto& [name, value] : row.cells())
      if (std::find(cols.begin(), cols.end(), name) == cols.end()) cols.push_back(name);
  return cols;
}

void Report::print_table(std::FILE* out) const {
  const auto cols = columns();
  std::vector<std::size_t> width(cols.size());
  std::vector<std::vector<std::string>> text(rows_.size(), std::vector<std::string>(cols.size()));
  for (std::size_t c = 0; c < cols.size(); ++c) {
    width[c] = cols[c].size();
    for (std::size_t r = 0; r < rows_.size(); ++r) {
      const Value* v = find(rows_[r], cols[c]);
      text[r][c] = v ? to_text(*v) : "-";
      width[c] = std::max(width[c], text[r][c].size());
    }
  }
  std::string line;
  for (std::size_t c = 0; c < cols.size(); ++c) line += fmt::format("{:>{}}  ", cols[c], width[c]);
  fmt::print(out, "{}\n", line);
  for (const auto& row : text) {
    line.clear();
    for (std::size_t c = 0; c < cols.size(); ++c) line += fmt::format("{:>{}}  ", row[c], width[c]);
    fmt::print(out, "{}\n", line);
  }
  std::fflush(out);
}

std::string Report::to_csv() const {
  const auto cols = columns();
  std::string out;
  for (std::size_t c = 0; c < cols.size(); ++c) {
    if (c) out += ',';
    out += csv_field(cols[c]);
  }
  out += '\n';
  for (const auto& row : rows_) {
    for (std::size_t c = 0; c < cols.size(); ++c) {
      const Value* v = find(row, cols[c]);
      if (c) out += ',';
      if (v) out += csv_field(csv_value(*v));
    }
    out += '\n';
  }
  return out;
}

std::string Report::to_json() const {
  auto object = [](const Row& row) {
    std::string s = "{";
    bool first = true;
    for (const auto& [name, value] : row.cells()) {
      s += fmt::format("{}\"{}\": {}", first ? "" : ", ", json_escape(name), to_json_value(value));
      first = false;
    }
    return s + "}";
  };
  if (rows_.size() == 1) return object(rows_[0]) + "\n";
  std::string out = "[\n";
  for (std::size_t r = 0; r < rows_.size(); ++r) out += "  " + object(rows_[r]) + (r + 1 < rows_.size() ? ",\n" : "\n");
  return out + "]\n";
}

OutputSpec OutputSpec::parse(const std::vector<std::string>& tokens) {
  OutputSpec spec;
  if (tokens.empty()) return spec;
  if (tokens.size() > 2) throw UsageError("--output takes a format (csv|json) and an optional file");
  if (tokens[0] == "csv") spec.format = Format::kCsv;
  else if (tokens[0] == "json") spec.format = Format::kJson;
  else throw UsageError(fmt::format("--output: unknown format '{}' (csv|json)", tokens[0]));
  if (tokens.size() == 2) spec.path = tokens[1];
  return spec;
}

OutputSpec OutputSpec::from_options(const po::variables_map& vm) {
  return parse(vm.count("output") ? vm["output"].as<std::vector<std::string>>() : std::vector<std::string>{});
}

void emit(const Report& report, const OutputSpec& output) {
  const bool machine_on_stdout = output.format != OutputSpec::Format::kNone && output.path.empty();
  report.print_table(machine_on_stdout ? stderr : stdout);
  write_output(report, output);
}

void write_output(const Report& report, const OutputSpec& output) {
  if (output.format == OutputSpec::Format::kNone) return;
  const std::string text = output.format == OutputSpec::Format::kCsv ? report.to_csv() : report.to_json();
  if (output.path.empty()) {
    fmt::print("{}", text);
    std::fflush(stdout);
    return;
  }
  std::ofstream file(output.path, std::ios::trunc);
  if (!file) throw UsageError(fmt::format("--output: cannot write '{}'", output.path));
  file << text;
}

std::string format_bytes(double bytes) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  int u = 0;
  while (bytes >= 1024 && u < 4) {
    bytes /= 1024;
    ++u;
  }
  return u == 0 ? fmt::format("{:.0f} B", bytes) : fmt::format("{:.4g} {}", bytes, units[u]);
}

}  // namespace ringcast::launch
