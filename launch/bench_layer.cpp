// `ringcast bench layer` and the layer timing it shares with `ringcast run` (bench_layer.hpp).
// The sweep is the product of --modes x --seq-lens x --heads x --kv-heads x --head-dims; every other
// layer option (batch, dtype, causal, placement, the clustered budgets) is `run`'s, read by the same
// reader for each configuration, and every configuration is validated before the first one runs.
// Exposed communication is measured by the communicator while the passes run (docs/scaling.md);
// the performance model (scripts/perf_model.py) predicts it beside the measurement.
#include "bench_layer.hpp"

#include "commands.hpp"
#include "layer_options.hpp"
#include "tensor_arena.hpp"

#include <ringcast/attention.hpp>
#include <ringcast/log.hpp>
#include <ringcast/memory.hpp>
#include <ringcast/plan.hpp>
#include <ringcast/version.hpp>

#if RINGCAST_WITH_CUDA
#include <ringcast/cuda_check.hpp>

#include <cuda_runtime_api.h>
#endif

#include <fmt/chrono.h>
#include <fmt/format.h>
#include <mpi.h>

#include <algorithm>
#include <cmath>
#include <ctime>
#include <fstream>
#include <random>
#include <set>
#include <sstream>

namespace ringcast::launch {
namespace {

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v.empty() ? 0.0 : v[v.size() / 2];
}

Spread over_ranks(double x) {
  int world = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &world);
  std::vector<double> all(static_cast<std::size_t>(world));
  MPI_Allgather(&x, 1, MPI_DOUBLE, all.data(), 1, MPI_DOUBLE, MPI_COMM_WORLD);
  std::sort(all.begin(), all.end());
  return {all.front(), all[all.size() / 2], all.back()};
}

std::vector<float> random_values(std::size_t n, std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> dist(0.f, 1.f);
  std::vector<float> x(n);
  for (auto& v : x) v = dist(rng);
  return x;
}

// ---- the sweep ---------------------------------------------------------------------------------------

// The options a sweep takes as lists; `run` has each of them as a single value.
const std::set<std::string> kSwept{"seq-len", "mode", "heads", "kv-heads", "head-dim"};

struct Configuration {
  std::int64_t seq_len;
  std::string mode;
  int heads, kv_heads, head_dim;
};

std::vector<std::string> split_list(const po::variables_map& vm, const std::string& option) {
  std::vector<std::string> items;
  std::stringstream text(vm[option].as<std::string>());
  for (std::string item; std::getline(text, item, ',');) {
    if (item.empty()) throw UsageError(fmt::format("--{}: empty item in '{}'", option, vm[option].as<std::string>()));
    items.push_back(item);
  }
  if (items.empty()) throw UsageError(fmt::format("--{}: name at least one value", option));
  return items;
}

std::vector<int> int_list(const po::variables_map& vm, const std::string& option) {
  std::vector<int> values;
  for (const auto& item : split_list(vm, option)) {
    std::size_t used = 0;
    int v = 0;
    try {
      v = std::stoi(item, &used);
    } catch (const std::exception&) {
      used = 0;
    }
    if (used != item.size()) throw UsageError(fmt::format("--{}: '{}' is not an integer", option, item));
    values.push_back(v);
  }
  return values;
}

// `run`'s variables for one configuration: the sweep's values in place of its lists.
po::variables_map configuration_options(const po::variables_map& sweep, const Configuration& c) {
  po::variables_map vm = sweep;
  const auto put = [&vm](const std::string& key, boost::any value) {
    vm.erase(key);
    vm.emplace(key, po::variable_value(std::move(value), false));
  };
  put("seq-len", c.seq_len);
  put("mode", c.mode);
  put("heads", c.heads);
  put("kv-heads", c.kv_heads);
  put("head-dim", c.head_dim);
  return vm;
}

std::string utc_timestamp() {
  return fmt::format("{:%Y-%m-%dT%H:%M:%SZ}", fmt::gmtime(std::time(nullptr)));
}

// The device's name and its driver ("CUDA 12.8": the CUDA version the driver supports; the driver's
// own version is in the scaling script's environment.txt), or the CPU's model name and "cpu".
std::pair<std::string, std::string> device_and_driver([[maybe_unused]] const Session& session) {
#if RINGCAST_WITH_CUDA
  if (session.device().kind == DeviceKind::kCuda) {
    cudaDeviceProp prop{};
    RINGCAST_CUDA_CHECK(cudaGetDeviceProperties(&prop, session.device().index));
    int driver = 0;
    RINGCAST_CUDA_CHECK(cudaDriverGetVersion(&driver));
    return {prop.name, fmt::format("CUDA {}.{}", driver / 1000, driver % 1000 / 10)};
  }
#endif
  std::ifstream cpuinfo("/proc/cpuinfo");
  for (std::string line; std::getline(cpuinfo, line);) {
    if (line.starts_with("model name")) {
      const auto colon = line.find(':');
      if (colon != std::string::npos && colon + 2 <= line.size()) return {line.substr(colon + 2), "cpu"};
    }
  }
  return {"cpu", "cpu"};
}

}  // namespace

LayerTiming time_layer(const Session& session, const LayerShape& shape, const AttentionOptions& options, int warmup,
                       int iters) {
  reset_peak_allocated_bytes();
  DistributedAttention layer(session, shape, options);
  const auto& s = shape;
  const std::int64_t n = s.local_len();
  TensorArena arena(session);
  const std::size_t qn = std::size_t(s.batch) * n * s.heads * s.head_dim;
  const std::size_t kn = std::size_t(s.batch) * n * s.kv_heads * s.head_dim;
  const std::uint64_t seed = 1000 + 17 * static_cast<std::uint64_t>(session.rank());
  const LayerTensors x = arena.layer(shape, {random_values(qn, seed), random_values(kn, seed + 1),
                                             random_values(kn, seed + 2), random_values(qn, seed + 3)});
  TensorView surrogates, d_surrogates;  // the layer's parameters when it takes them: the same on every rank
  if (options.uses_surrogates()) {
    const auto [h_kv, c, d] = surrogate_shape(shape, options);
    const auto count = static_cast<std::size_t>(h_kv * c * d);
    const std::vector<float> values = random_values(count, /*seed=*/999), zeros(count, 0.f);
    surrogates = arena.make({h_kv, c, d}, shape.dtype, &values);
    d_surrogates = arena.make({h_kv, c, d}, DType::kF32, &zeros);
  }
  const AttentionForwardArgs fwd{x.q, x.k, x.v, x.o, x.lse, surrogates};
  const AttentionBackwardArgs bwd{x.q, x.k, x.v, x.o, x.lse, x.d_o, x.d_q, x.d_k, x.d_v, surrogates, d_surrogates};

  auto& comm = session.comm();
  comm::ExposedTimingScope exposed({&comm}, session.stream());
  std::vector<double> fwd_s, total_s, exposed_fwd_s, exposed_total_s;
  std::uint64_t sent_fwd = 0, sent_bwd = 0;
  const double start = MPI_Wtime();
  for (int i = 0; i < warmup + iters; ++i) {
    synchronize(session.device(), session.stream());
    MPI_Barrier(MPI_COMM_WORLD);
    comm.reset_counters();
    exposed.take();
    const double t0 = MPI_Wtime();
    layer.forward(fwd);
    synchronize(session.device(), session.stream());
    const double t1 = MPI_Wtime();
    sent_fwd = comm.counters().total().bytes_sent;
    const double exposed_fwd = exposed.take();
    layer.backward(bwd);
    synchronize(session.device(), session.stream());
    const double t2 = MPI_Wtime();
    sent_bwd = comm.counters().total().bytes_sent - sent_fwd;
    const double exposed_bwd = exposed.take();
    if (i >= warmup) {
      fwd_s.push_back(t1 - t0);
      total_s.push_back(t2 - t0);
      exposed_fwd_s.push_back(exposed_fwd);
      exposed_total_s.push_back(exposed_fwd + exposed_bwd);
    }
    if (MPI_Wtime() - start > 5.0)
      log::info("  pass {}/{} ({}): forward {:.1f} ms, forward+backward {:.1f} ms", i + 1, warmup + iters,
                i < warmup ? "warm-up" : "timed", 1e3 * (t1 - t0), 1e3 * (t2 - t0));
  }
  LayerTiming t;
  t.fwd_s = over_ranks(median(fwd_s));
  t.fwd_bwd_s = over_ranks(median(total_s));
  t.exposed_fwd_s = over_ranks(median(exposed_fwd_s));
  t.exposed_fwd_bwd_s = over_ranks(median(exposed_total_s));
  t.bytes_sent_fwd = static_cast<std::int64_t>(over_ranks(static_cast<double>(sent_fwd)).max);
  t.bytes_sent_bwd = static_cast<std::int64_t>(over_ranks(static_cast<double>(sent_bwd)).max);
  t.peak_memory_bytes = static_cast<std::int64_t>(over_ranks(static_cast<double>(peak_allocated_bytes())).max);
  if (options.mode == AttentionMode::kClustered) {
    const TableEntries mine = layer.table_entries();
    std::int64_t sums[2] = {mine.total, mine.units}, longest = mine.max;
    MPI_Allreduce(MPI_IN_PLACE, sums, 2, MPI_INT64_T, MPI_SUM, MPI_COMM_WORLD);
    MPI_Allreduce(MPI_IN_PLACE, &longest, 1, MPI_INT64_T, MPI_MAX, MPI_COMM_WORLD);
    t.table_entries_mean = TableEntries{sums[1], sums[0], longest}.mean();
    t.table_entries_max = longest;
  }
  return t;
}

void set_layer_columns(Report::Row& row, const Session& session, const LayerShape& s, const AttentionOptions& options,
                       const LayerTiming& t) {
  const LayerPlan plan = plan_layer(s, options);
  row.set("mode", std::string(name(options.mode)))
      .set("placement", std::string(name(options.resolved_placement(s))))
      .set("seq_len", s.seq_len)
      .set("ranks", std::int64_t{s.ranks})
      .set("batch", std::int64_t{s.batch})
      .set("heads", std::int64_t{s.heads})
      .set("kv_heads", std::int64_t{s.kv_heads})
      .set("head_dim", std::int64_t{s.head_dim})
      .set("dtype", std::string(dtype_name(s.dtype)))
      .set("causal", std::string(s.causal ? "yes" : "no"))
      .set("device", std::string(session.device().kind == DeviceKind::kCuda ? "cuda" : "cpu"));
  for (const auto& [prefix, seconds] : {std::pair{"fwd_ms", t.fwd_s}, std::pair{"fwd_bwd_ms", t.fwd_bwd_s},
                                        std::pair{"exposed_fwd_ms", t.exposed_fwd_s},
                                        std::pair{"exposed_fwd_bwd_ms", t.exposed_fwd_bwd_s}})
    row.set(fmt::format("{}_min", prefix), 1e3 * seconds.min)
        .set(fmt::format("{}_median", prefix), 1e3 * seconds.median)
        .set(fmt::format("{}_max", prefix), 1e3 * seconds.max);
  row.set("attention_flops_fwd", plan.attention_flops_fwd)
      .set("tflops_fwd", plan.attention_flops_fwd / t.fwd_s.max / 1e12)
      .set("tflops_fwd_bwd", 3.5 * plan.attention_flops_fwd / t.fwd_bwd_s.max / 1e12)
      .set("bytes_sent_fwd", t.bytes_sent_fwd)
      .set("bytes_sent_bwd", t.bytes_sent_bwd)
      .set("plan_bytes_sent_fwd", plan.bytes_sent_fwd)
      .set("plan_bytes_sent_bwd", plan.bytes_sent_bwd)
      .set("peak_memory_bytes", t.peak_memory_bytes);
  if (t.table_entries_mean)
    row.set("table_entries_mean", *t.table_entries_mean).set("table_entries_max", t.table_entries_max);
  row.set("commit", std::string(git_commit()));
}

int bench_layer_main(const CommandLine& cmd) {
  int rank = 0, world = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &world);
  po::options_description desc("ringcast bench layer options");
  add_common_options(desc);
  desc.add_options()
      ("seq-lens", po::value<std::string>()->default_value("4096"), "comma-separated n (e.g. 16K,64K)")
      ("modes", po::value<std::string>()->default_value("ring"), "comma-separated: ring, ulysses, allgather, clustered")
      ("heads", po::value<std::string>()->default_value("16"), "comma-separated query heads h")
      ("kv-heads", po::value<std::string>()->default_value("0"), "comma-separated KV heads h_kv (0: = h)")
      ("head-dims", po::value<std::string>()->default_value("128"), "comma-separated head dims d (64, 128)")
      ("warmup", po::value<int>()->default_value(1), "untimed forward+backward passes per configuration")
      ("iters", po::value<int>()->default_value(3), "timed passes per configuration (each rank's median)")
      ("verify", po::bool_switch(), "also measure the relative error against the single-rank reference")
      ("verify-max-seq", po::value<std::string>()->default_value("8K"),
       "--verify: only configurations up to this n (the reference runs on one CPU rank)")
      ("seed", po::value<std::uint64_t>()->default_value(1), "--verify: seed of the reference inputs");
  po::options_description layer_desc;
  add_layer_options(layer_desc, /*with_ranks=*/false);
  po::options_description rest("layer options, as `ringcast run` (one value each)");
  for (const auto& option : layer_desc.options())
    if (!kSwept.contains(option->long_name())) rest.add(option);
  desc.add(rest);
  po::variables_map vm;
  if (!parse_options(cmd, desc, vm,
                     "usage: mpirun -np P ringcast bench layer [--seq-lens LIST] [--modes LIST] [--heads LIST]\n"
                     "                                  [--head-dims LIST] [--verify] [options]\n"
                     "Times one attention layer (forward, forward+backward) for every combination of the lists on\n"
                     "the world's ranks: one row each with times min/median/max over ranks, effective TFLOP/s per\n"
                     "rank, bytes sent per rank (counters and plan), peak memory and, with --verify, the error.",
                     rank == 0))
    return 0;
  const int warmup = vm["warmup"].as<int>(), iters = vm["iters"].as<int>();
  if (warmup < 0 || iters < 1) throw UsageError("--warmup must be >= 0 and --iters >= 1");
  const bool verify = vm["verify"].as<bool>();
  const auto verify_max_seq = static_cast<std::int64_t>(parse_size(vm["verify-max-seq"].as<std::string>()));
  const OutputSpec output = OutputSpec::from_options(vm);

  std::vector<std::int64_t> seq_lens;
  for (const auto& item : split_list(vm, "seq-lens")) seq_lens.push_back(static_cast<std::int64_t>(parse_size(item)));
  // Every configuration is read (and validated) before the first runs: a bad one fails on every rank alike.
  std::vector<std::pair<LayerShape, AttentionOptions>> configs;
  for (const auto& mode : split_list(vm, "modes"))
    for (const std::int64_t n : seq_lens)
      for (const int h : int_list(vm, "heads"))
        for (const int hk : int_list(vm, "kv-heads"))
          for (const int d : int_list(vm, "head-dims")) {
            auto& [shape, options] = configs.emplace_back();
            read_layer_options(configuration_options(vm, {n, mode, h, hk == 0 ? h : hk, d}), world, shape, options);
          }

  Session session = Session::from_mpi(MPI_COMM_WORLD);
  const auto [device_name, driver] = device_and_driver(session);
  log::info("ringcast {} ({}): bench layer, {} configuration(s) on {} rank(s), {} ({})", version(), git_commit(),
            configs.size(), world, device_name, driver);
  Report report;
  const double start = MPI_Wtime();
  for (std::size_t i = 0; i < configs.size(); ++i) {
    auto [shape, options] = configs[i];
    if (session.device().kind == DeviceKind::kCpu) shape.dtype = DType::kF32;  // the CPU backend computes in fp32
    auto& row = report.add_row();
    row.set("timestamp", utc_timestamp());
    const LayerTiming timing = time_layer(session, shape, options, warmup, iters);
    set_layer_columns(row, session, shape, options, timing);
    row.set("device_name", device_name).set("driver", driver);
    if (verify && shape.seq_len <= verify_max_seq) {
      DistributedAttention layer(session, shape, options);
      double worst = 0;  // over o, lse, d_q, d_k, d_v; a NaN stays
      for (const auto& [what, err] : reference_errors(session, layer, vm["seed"].as<std::uint64_t>(), {}))
        worst = std::isnan(err) ? err : std::max(worst, err);
      row.set("rel_error", worst);
    }
    const double elapsed = MPI_Wtime() - start;
    log::info("bench layer [{}/{}] {} n = {} h = {}/{} d = {}: forward+backward {:.3f} ms (slowest rank); "
              "{:.0f} s elapsed, about {:.0f} s left", i + 1, configs.size(), name(options.mode), shape.seq_len,
              shape.heads, shape.kv_heads, shape.head_dim, 1e3 * timing.fwd_bwd_s.max, elapsed,
              elapsed / static_cast<double>(i + 1) * static_cast<double>(configs.size() - i - 1));
  }
  if (rank == 0) emit(report, output);
  return 0;
}

}  // namespace ringcast::launch
