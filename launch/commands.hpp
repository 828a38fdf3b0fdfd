// The subcommands of the `ringcast` executable. Each parses its own options (cli.hpp), does its work
// on every rank, prints its report on rank 0, and returns the process exit code.
#pragma once

#include "cli.hpp"

#include <cstdint>
#include <span>
#include <string>
#include <string_view>
#include <utility>
#include <vector>

namespace ringcast {
class Session;
class DistributedAttention;
}  // namespace ringcast

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

// The comparison behind `check` and `bench layer --verify` (cmd_check.cpp). Collective: every rank
// builds the same seeded inputs of the whole sequence (rounded to the layer's dtype), runs its shard
// through `layer`, and the whole sequence through exact attention on one rank (CPU backend, fp32).
// Returns the relative errors of o, lse, d_q, d_k, d_v, worst over the ranks. A non-empty
// `dump_dir` also writes `check --dump`'s files there.
std::vector<std::pair<std::string, double>> reference_errors(const Session& session, DistributedAttention& layer,
                                                             std::uint64_t seed, const std::string& dump_dir);

}  // namespace ringcast::launch
