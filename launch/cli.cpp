// Option parsing for the subcommands.
#include "cli.hpp"

#include <fmt/format.h>

#include <cctype>
#include <fstream>
#include <iostream>

namespace ringcast::launch {

void add_common_options(po::options_description& desc) {
  desc.add_options()
      ("help,h", "print this help and exit")
      ("config", po::value<std::string>(), "read options from FILE (key = value lines; the command line wins)")
      ("output", po::value<std::vector<std::string>>()->multitoken(),
       "machine-readable output: csv|json [FILE] (stdout when FILE is omitted)");
}

bool parse_options(const CommandLine& cmd, const po::options_description& desc, po::variables_map& vm,
                   const std::string& synopsis, bool print) {
  try {
    po::store(po::command_line_parser(cmd.args).options(desc).run(), vm);
    if (vm.count("help")) {
      if (print) std::cout << synopsis << "\n\n" << desc << "\n";
      return false;
    }
    if (vm.count("config")) {
      const auto path = vm["config"].as<std::string>();
      std::ifstream file(path);
      if (!file) throw UsageError(fmt::format("cannot read config file '{}'", path));
      po::store(po::parse_config_file(file, desc), vm);
    }
    po::notify(vm);
  } catch (const po::error& e) {
    throw UsageError(fmt::format("ringcast {}: {}", cmd.command, e.what()));
  }
  return true;
}

std::size_t parse_size(const std::string& text) {
  std::size_t pos = 0;
  unsigned long long value = 0;
  try {
    value = std::stoull(text, &pos);
  } catch (const std::exception&) {
    throw UsageError(fmt::format("'{}' is not a size (e.g. 4096, 64K, 16M, 1G)", text));
  }
  std::string suffix = text.substr(pos);
  for (auto& c : suffix) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
  if (suffix.empty() || suffix == "B") return value;
  if (suffix == "K" || suffix == "KB" || suffix == "KIB") return value << 10;
  if (suffix == "M" || suffix == "MB" || suffix == "MIB") return value << 20;
  if (suffix == "G" || suffix == "GB" || suffix == "GIB") return value << 30;
  throw UsageError(fmt::format("'{}' is not a size (e.g. 4096, 64K, 16M, 1G)", text));
}

}  // namespace ringcast::launch
