// Command-line plumbing shared by the subcommands: Boost.Program_options parsing with `--config FILE`
// (command-line values override the file), `--help`, and UsageError for anything the user got wrong
// (the launcher prints it on rank 0 and exits 2 on every rank, before any collective).
#pragma once

#include <boost/program_options.hpp>

#include <stdexcept>
#include <string>
#include <vector>

namespace ringcast::launch {

namespace po = boost::program_options;

class UsageError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// The arguments of one subcommand, after the subcommand name.
struct CommandLine {
  std::string command;             // e.g. "run"
  std::vector<std::string> args;   // the rest
};

// Adds the options every subcommand has: --help, --config FILE, --output FORMAT [FILE].
void add_common_options(po::options_description& desc);

// Parses args against desc, then the --config file if one was given. Returns false when --help was
// asked for (the help text has then been printed on rank 0). Throws UsageError.
bool parse_options(const CommandLine& cmd, const po::options_description& desc, po::variables_map& vm,
                   const std::string& synopsis, bool print);

// "1K", "64M", "2G", "4096": a byte count with an optional binary suffix.
std::size_t parse_size(const std::string& text);

}  // namespace ringcast::launch
