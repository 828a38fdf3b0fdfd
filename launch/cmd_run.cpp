// `ringcast run`: the main job. Times one distributed attention layer, forward and forward+backward,
// on every rank (median of --iters after --warmup), and reports the slowest and fastest rank, the
// effective TFLOP/s, the bytes each rank sent (the communicator's counters, with plan's figures
// beside them) and the peak memory the layer allocated. `ringcast bench comm` is the communication
// test (comm_test_main, below).
#include "comm_bench.hpp"
#include "commands.hpp"
#include "layer_options.hpp"
#include "tensor_arena.hpp"

#include <ringcast/attention.hpp>
#include <ringcast/log.hpp>
#include <ringcast/plan.hpp>
#include <ringcast/session.hpp>
#include <ringcast/version.hpp>

#include <fmt/format.h>
#include <mpi.h>

#include <algorithm>
#include <random>

namespace ringcast::launch {
namespace {

std::string backend_label(const Session& s) {
  return fmt::format("{} rank(s) on {} ({} communicator)", s.size(),
                     s.device().kind == DeviceKind::kCuda ? "CUDA devices" : "the CPU backend", s.comm().backend_name());
}

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0.0 : v[v.size() / 2];
}

// Min and max of a value over the ranks.
std::pair<double, double> over_ranks(double x) {
  double lo = 0, hi = 0;
  MPI_Allreduce(&x, &lo, 1, MPI_DOUBLE, MPI_MIN, MPI_COMM_WORLD);
  MPI_Allreduce(&x, &hi, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
  return {lo, hi};
}

std::vector<float> random_values(std::size_t n, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> dist(0.f, 1.f);
  std::vector<float> x(n);
  for (auto& v : x) v = dist(rng);
  return x;
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
  reset_peak_allocated_bytes();
  DistributedAttention layer(session, shape, options);
  log::info("ringcast {} ({}): {} attention, n = {}, h = {}, h_kv = {}, d = {}, {}, {}; {}", version(), git_commit(),
            name(options.mode), shape.seq_len, shape.heads, shape.kv_heads, shape.head_dim,
            shape.causal ? "causal" : "bidirectional", dtype_name(shape.dtype), backend_label(session));

  const auto& s = shape;
  const std::int64_t n = s.local_len();
  TensorArena arena(session);
  const std::size_t qn = std::size_t(s.batch) * n * s.heads * s.head_dim, kn = std::size_t(s.batch) * n * s.kv_heads * s.head_dim;
  const std::uint64_t seed = 1000 + 17 * static_cast<std::uint64_t>(rank);
  const LayerTensors x = arena.layer(shape, {random_values(qn, seed), random_values(kn, seed + 1),
                                             random_values(kn, seed + 2), random_values(qn, seed + 3)});
  const AttentionForwardArgs fwd{x.q, x.k, x.v, x.o, x.lse};
  const AttentionBackwardArgs bwd{x.q, x.k, x.v, x.o, x.lse, x.d_o, x.d_q, x.d_k, x.d_v};

  auto& comm = session.comm();
  std::vector<double> fwd_s, total_s;
  std::uint64_t sent_fwd = 0, sent_bwd = 0;
  const double start = MPI_Wtime();
  for (int i = 0; i < warmup + iters; ++i) {
    synchronize(session.device(), session.stream());
    MPI_Barrier(MPI_COMM_WORLD);
    comm.reset_counters();
    const double t0 = MPI_Wtime();
    layer.forward(fwd);
    synchronize(session.device(), session.stream());
    const double t1 = MPI_Wtime();
    sent_fwd = comm.counters().total().bytes_sent;
    layer.backward(bwd);
    synchronize(session.device(), session.stream());
    const double t2 = MPI_Wtime();
    sent_bwd = comm.counters().total().bytes_sent - sent_fwd;
    if (i >= warmup) {
      fwd_s.push_back(t1 - t0);
      total_s.push_back(t2 - t0);
    }
    if (MPI_Wtime() - start > 5.0)
      log::info("  pass {}/{} ({}): forward {:.1f} ms, forward+backward {:.1f} ms", i + 1, warmup + iters,
                i < warmup ? "warm-up" : "timed", 1e3 * (t1 - t0), 1e3 * (t2 - t0));
  }
  const LayerPlan plan = plan_layer(shape, options);
  const auto [fwd_lo, fwd_hi] = over_ranks(median(fwd_s));
  const auto [tot_lo, tot_hi] = over_ranks(median(total_s));
  const double sent_fwd_hi = over_ranks(static_cast<double>(sent_fwd)).second;
  const double sent_bwd_hi = over_ranks(static_cast<double>(sent_bwd)).second;
  const double mem_hi = over_ranks(static_cast<double>(peak_allocated_bytes())).second;

  Report report;
  report.add_row()
      .set("mode", std::string(name(options.mode)))
      .set("placement", std::string(name(options.resolved_placement(shape))))
      .set("seq_len", s.seq_len)
      .set("ranks", std::int64_t{s.ranks})
      .set("batch", std::int64_t{s.batch})
      .set("heads", std::int64_t{s.heads})
      .set("kv_heads", std::int64_t{s.kv_heads})
      .set("head_dim", std::int64_t{s.head_dim})
      .set("dtype", std::string(dtype_name(s.dtype)))
      .set("causal", std::string(s.causal ? "yes" : "no"))
      .set("device", std::string(session.device().kind == DeviceKind::kCuda ? "cuda" : "cpu"))
      .set("fwd_ms_min", 1e3 * fwd_lo)
      .set("fwd_ms_max", 1e3 * fwd_hi)
      .set("fwd_bwd_ms_min", 1e3 * tot_lo)
      .set("fwd_bwd_ms_max", 1e3 * tot_hi)
      .set("tflops_fwd", plan.attention_flops_fwd / fwd_hi / 1e12)
      .set("tflops_fwd_bwd", 3.5 * plan.attention_flops_fwd / tot_hi / 1e12)
      .set("bytes_sent_fwd", static_cast<std::int64_t>(sent_fwd_hi))
      .set("bytes_sent_bwd", static_cast<std::int64_t>(sent_bwd_hi))
      .set("plan_bytes_sent_fwd", plan.bytes_sent_fwd)
      .set("plan_bytes_sent_bwd", plan.bytes_sent_bwd)
      .set("peak_memory_bytes", static_cast<std::int64_t>(mem_hi))
      .set("commit", std::string(git_commit()));
  if (rank == 0) emit(report, output);
  return 0;
}

}  // namespace ringcast::launch
