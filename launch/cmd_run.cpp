// `ringcast run`: the main job. For now a communication self-test on the session's backend (NCCL on
// GPUs, MPI on host memory): ring shift and all-gather over a range of sizes, timed and verified.
// `ringcast bench comm` is the same program with all-to-all added. Exits 1 when any element arrived
// wrong.
#include "comm_bench.hpp"
#include "commands.hpp"

#include <ringcast/log.hpp>
#include <ringcast/session.hpp>
#include <ringcast/version.hpp>

#include <fmt/format.h>
#include <mpi.h>

namespace ringcast::launch {

int comm_test_main(const CommandLine& cmd, const std::string& default_ops) {
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  po::options_description desc(fmt::format("ringcast {} options", cmd.command));
  add_common_options(desc);
  add_comm_bench_options(desc, default_ops);
  po::variables_map vm;
  if (!parse_options(cmd, desc, vm, fmt::format("usage: mpirun -np P ringcast {} [options]", cmd.command), rank == 0))
    return 0;
  const CommBenchOptions opt = read_comm_bench_options(vm);
  const OutputSpec output = OutputSpec::parse(vm.count("output") ? vm["output"].as<std::vector<std::string>>()
                                                                 : std::vector<std::string>{});

  Session session = Session::from_mpi(MPI_COMM_WORLD);
  log::info("ringcast {} ({}): communication test, {} rank(s) on {} ({} communicator)", version(), git_commit(),
            session.size(), session.device().kind == DeviceKind::kCuda ? "CUDA devices" : "the CPU backend",
            session.comm().backend_name());
  std::int64_t wrong = 0;
  Report report = comm_benchmark(session, opt, wrong);
  if (rank == 0) emit(report, output);
  if (wrong != 0) {
    log::error("communication test: {} elements arrived wrong", wrong);
    return 1;
  }
  log::info("communication test passed: every element arrived intact");
  return 0;
}

int run_command(const CommandLine& cmd) { return comm_test_main(cmd, "ring,allgather"); }

}  // namespace ringcast::launch
