// The command table, and the commands whose issues have not landed yet: they say so and exit 3.
#include "commands.hpp"

#include <fmt/format.h>
#include <mpi.h>

#include <array>

namespace ringcast::launch {
namespace {

int not_built(const CommandLine& cmd, std::string_view what) {
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  po::options_description desc(fmt::format("ringcast {} options", cmd.command));
  add_common_options(desc);
  po::variables_map vm;
  if (!parse_options(cmd, desc, vm, fmt::format("usage: ringcast {} (not built yet: {})", cmd.command, what),
                     rank == 0))
    return 0;
  if (rank == 0) fmt::print(stderr, "ringcast {}: not built yet ({})\n", cmd.command, what);
  return 3;
}

}  // namespace

int train_command(const CommandLine& cmd) { return not_built(cmd, "the model stack and training"); }

std::span<const Command> commands() {
  static constexpr std::array<Command, 5> kCommands{{
      {"run", "run the main job: a communication self-test (ring shift, all-gather) with timings", run_command},
      {"train", "train a model (decoder or encoder stack) on a dataset or a synthetic task", train_command},
      {"bench", "benchmarks: `bench kernels` (attention kernels), `bench comm`", bench_command},
      {"plan", "predict bytes, FLOPs and memory per rank for a configuration, without running it", plan_command},
      {"check", "run one distributed attention layer against the single-rank reference", check_command},
  }};
  return kCommands;
}

}  // namespace ringcast::launch
