// `ringcast bench <what>`: comm (communication microbenchmark) and, on CUDA builds, kernels.
#include "commands.hpp"

#include <fmt/format.h>
#include <mpi.h>

namespace ringcast::launch {

int bench_command(const CommandLine& cmd) {
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  const std::string what = cmd.args.empty() ? std::string() : cmd.args[0];
  if (what.empty() || what == "--help" || what == "-h") {
    if (rank == 0) fmt::print("usage: ringcast bench comm [options]     (ringcast bench comm --help)\n");
    return what.empty() ? 2 : 0;
  }
  const CommandLine sub{"bench " + what, {cmd.args.begin() + 1, cmd.args.end()}};
  if (what == "comm") return comm_test_main(sub, "ring,allgather,alltoall");
  throw UsageError(fmt::format("ringcast bench: unknown benchmark '{}' (comm)", what));
}

}  // namespace ringcast::launch
