// `ringcast run`: the main job. Times one distributed attention layer, forward and forward+backward,
// on every rank (median of --iters after --warmup), and reports the fastest, median and slowest rank,
// the exposed communication, the effective TFLOP/s, the bytes each rank sent (the communicator's
// counters, with plan's figures beside them) and the peak memory the layer allocated; the timing is
// bench_layer.hpp's, which `bench layer` sweeps. `ringcast bench comm` is the communication test (comm_test_main, below).
#include "bench_layer.hpp"
#include "comm_bench.hpp"
#include "commands.hpp"
#include "layer_options.hpp"

#include <ringcast/log.hpp>
#include <ringcast/session.hpp>
#include <ringcast/version.hpp>

#include <fmt/format.h>
#include <mpi.h>

namespace ringcast::launch {
namespace {

std::string backend_label(const Session& s) {
  return fmt::format("{} rank(s) on {} ({} communicator)", s.size(),
                     s.device().kind == DeviceKind::kCuda ? "CUDA devices" : "the CPU backend", s.comm().backend_name());
}

}  // namespace

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
  const OutputSpec output = OutputSpec::from_options(vm);
  Session session = Session::from_mpi(MPI_COMM_WORLD);
  log::info("ringcast {} ({}): communication test, {}", version(), git_commit(), backend_label(session));
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

int run_command(const CommandLine& cmd) {
  int rank = 0, world = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &world);
  po::options_description desc("ringcast run options");
  add_common_options(desc);
  add_layer_options(desc, /*with_ranks=*/false, /*default_seq_len=*/4096);
  desc.add_options()
      ("warmup", po::value<int>()->default_value(1), "untimed forward+backward passes")
      ("iters", po::value<int>()->default_value(3), "timed passes (the median is reported)");
  po::variables_map vm;
  if (!parse_options(cmd, desc, vm, "usage: mpirun -np P ringcast run [--mode M] [--seq-len N] [options]", rank == 0))
    return 0;
  LayerShape shape;
  AttentionOptions options;
  read_layer_options(vm, world, shape, options);
  const int warmup = vm["warmup"].as<int>(), iters = vm["iters"].as<int>();
  if (warmup < 0 || iters < 1) throw UsageError("--warmup must be >= 0 and --iters >= 1");
  const OutputSpec output = OutputSpec::from_options(vm);

  Session session = Session::from_mpi(MPI_COMM_WORLD);
  if (session.device().kind == DeviceKind::kCpu) shape.dtype = DType::kF32;
  log::info("ringcast {} ({}): {} attention, n = {}, h = {}, h_kv = {}, d = {}, {}, {}; {}", version(), git_commit(),
            name(options.mode), shape.seq_len, shape.heads, shape.kv_heads, shape.head_dim,
            shape.causal ? "causal" : "bidirectional", dtype_name(shape.dtype), backend_label(session));
  const LayerTiming timing = time_layer(session, shape, options, warmup, iters);
  Report report;
  set_layer_columns(report.add_row(), session, shape, options, timing);
  if (rank == 0) emit(report, output);
  return 0;
}

}  // namespace ringcast::launch
