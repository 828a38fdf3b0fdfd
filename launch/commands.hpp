// The subcommands of the `ringcast` executable. Each parses its own options (cli.hpp), does its work
// on every rank, prints its report on rank 0, and returns the process exit code.
#pragma once

#include "cli.hpp"

#include <span>
#include <string>
#include <string_view>

namespace ringcast::launch {

struct Command {
  std::string_view name;
  std::string_view summary;
  int (*run)(const CommandLine& cmd);
};

int run_command(const CommandLine& cmd);
int train_command(const CommandLine& cmd);
int bench_command(const CommandLine& cmd);
int plan_command(const CommandLine& cmd);
int check_command(const CommandLine& cmd);

std::span<const Command> commands();

// The communication test behind `run` and `bench comm` (cmd_run.cpp).
int comm_test_main(const CommandLine& cmd, const std::string& default_ops);

}  // namespace ringcast::launch
