// The `ringcast` executable: `mpirun -np P ringcast <command> [options] [--config FILE]`.
// Usage errors are found before any collective, on every rank alike: rank 0 prints the message and
// every rank exits 2. Any other failure is logged on the rank where it happened ("[rank r/P host]")
// and brings the whole job down with MPI_Abort, so no rank is left waiting on it.
#include "commands.hpp"

#include <ringcast/error.hpp>
#include <ringcast/log.hpp>
#include <ringcast/version.hpp>

#include <fmt/format.h>
#include <mpi.h>

#include <cstdio>
#include <exception>
#include <string>
#include <vector>

namespace ringcast::launch {
namespace {

void print_usage(std::FILE* out) {
  fmt::print(out,
             "ringcast {}: distributed long-sequence attention and training\n\n"
             "usage: mpirun -np P ringcast <command> [options] [--config FILE]\n"
             "       ringcast <command> --help\n"
             "       ringcast --version\n\ncommands:\n",
             version());
  for (const auto& c : commands()) fmt::print(out, "  {:<8} {}\n", c.name, c.summary);
  fmt::print(out, "\nenvironment: RINGCAST_LOG_LEVEL=debug|info|warn|error|off, RINGCAST_COMM_TIMEOUT_S\n");
}

int dispatch(int argc, char** argv, int rank) {
  const std::vector<std::string> args(argv + 1, argv + argc);
  if (args.empty() || args[0] == "--help" || args[0] == "-h" || args[0] == "help") {
    if (rank == 0) print_usage(stdout);
    return args.empty() ? 2 : 0;
  }
  if (args[0] == "--version") {
    if (rank == 0) fmt::print("ringcast {} ({})\n", version(), git_commit());
    return 0;
  }
  for (const auto& c : commands()) {
    if (c.name == args[0]) return c.run(CommandLine{args[0], {args.begin() + 1, args.end()}});
  }
  throw UsageError(args[0].starts_with("-") ? fmt::format("unknown option '{}'", args[0])
                                            : fmt::format("unknown command '{}'", args[0]));
}

}  // namespace
}  // namespace ringcast::launch

int main(int argc, char** argv) {
  int provided = 0;
  // Helper threads communicate beside the compute (ring overlap), and the model's gradient sums beside the
  // layers' own communication (CommOverlap, overlap.hpp); with less, they run inline.
  MPI_Init_thread(&argc, &argv, MPI_THREAD_MULTIPLE, &provided);
  int rank = 0, size = 1, name_len = 0;
  char host[MPI_MAX_PROCESSOR_NAME] = {};
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  MPI_Get_processor_name(host, &name_len);
  ringcast::log::set_rank(rank, size, host);
  int code = 0;
  try {
    code = ringcast::launch::dispatch(argc, argv, rank);
  } catch (const ringcast::launch::UsageError& e) {
    if (rank == 0) fmt::print(stderr, "ringcast: error: {}\nTry 'ringcast --help'.\n", e.what());
    code = 2;
  } catch (const std::exception& e) {
    ringcast::log::error("{}", e.what());
    MPI_Abort(MPI_COMM_WORLD, 1);
  }
  MPI_Finalize();
  return code;
}
