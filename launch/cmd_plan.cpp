// `ringcast plan`: per rank and per layer, what a configuration costs -- bytes sent and received
// (forward, backward), keys per query, attention FLOPs, activation memory -- from the formulas of
// runtime/include/ringcast/plan.hpp, with exact ring attention of the same shape beside it.
// `ringcast plan --model --config FILE`: the memory per rank of a `train` configuration's training
// step (ringcast::estimate_memory), by component, against --device-memory.
// Runs no kernels and needs no MPI peers.
#include "commands.hpp"
#include "layer_options.hpp"
#include "model_options.hpp"
#include "report.hpp"

#include <ringcast/data.hpp>
#include <ringcast/error.hpp>
#include <ringcast/model.hpp>
#include <ringcast/plan.hpp>

#include <fmt/format.h>
#include <algorithm>
#include <fstream>
#include <iostream>
#include <mpi.h>

namespace ringcast::launch {
namespace {

constexpr double kGiB = 1024.0 * 1024.0 * 1024.0;

// A `train` config file holds training keys (steps, lr, ...) that the estimate does not need: the
// command line is parsed strictly, the file with those keys skipped.
void parse_model_plan_options(const CommandLine& cmd, const po::options_description& desc, po::variables_map& vm) {
  try {
    po::store(po::command_line_parser(cmd.args).options(desc).run(), vm);
    if (vm.count("config") && !vm.count("help")) {
      const auto path = vm["config"].as<std::string>();
      std::ifstream file(path);
      if (!file) throw UsageError(fmt::format("cannot read config file '{}'", path));
      po::store(po::parse_config_file(file, desc, /*allow_unregistered=*/true), vm);
    }
    po::notify(vm);
  } catch (const po::error& e) {
    throw UsageError(fmt::format("ringcast plan --model: {}", e.what()));
  }
}

int plan_model(const CommandLine& cmd, int rank) {
  po::options_description desc("ringcast plan --model options");
  add_common_options(desc);
  add_model_layer_options(desc, /*default_seq_len=*/1024, /*default_heads=*/4, /*default_head_dim=*/64);  // train's
  add_model_options(desc);
  desc.add_options()
      ("model", po::bool_switch(), "the memory of a model's training step (a `train` config) instead of one layer")
      ("ranks", po::value<int>()->default_value(1), "P: ranks the sequence is sharded over (mpirun -np P)")
      ("task", po::value<std::string>()->default_value("recall"),
       "the train task: recall|needle|bytes (decoder) or listops|prefix-recall (encoder)")
      ("backend", po::value<std::string>()->default_value("cuda"), "cuda|cpu: the backend the step runs on")
      ("device-memory", po::value<double>()->default_value(0.0), "GiB of memory per rank to fit in (0: no verdict)");
  po::variables_map vm;
  parse_model_plan_options(cmd, desc, vm);
  if (vm.count("help")) {
    if (rank == 0)
      std::cout << "usage: ringcast plan --model --config FILE [--ranks P] [--device-memory GIB] [options]\n\n"
                << desc << "\n";
    return 0;
  }
  LayerShape layer;
  AttentionOptions attention;
  ModelConfig config;
  const std::string task = vm["task"].as<std::string>();
  const bool encoder = task == "listops" || task == "prefix-recall";
  if (!encoder && task != "recall" && task != "needle" && task != "bytes")
    throw UsageError(fmt::format("--task: unknown task '{}' (recall|needle|bytes|listops|prefix-recall)", task));
  read_layer_options(vm, 1, layer, attention, !encoder);
  read_model_options(vm, layer, attention, config);
  if (encoder) {
    config.kind = ModelKind::kEncoder;
    config.num_classes = task == "listops" ? ListOpsDataset(0).classes() : PrefixRecallDataset(0, 2).classes();
  }
  const std::string backend = vm["backend"].as<std::string>();
  if (backend != "cuda" && backend != "cpu") throw UsageError(fmt::format("--backend: '{}' is not cuda|cpu", backend));
  const DeviceKind device = backend == "cuda" ? DeviceKind::kCuda : DeviceKind::kCpu;
  const double capacity = vm["device-memory"].as<double>();
  if (capacity < 0) throw UsageError("--device-memory must be >= 0");
  MemoryEstimate m;
  try {
    m = estimate_memory(config, {layer.seq_len, layer.batch}, layer.ranks, device);
  } catch (const Error& e) {
    throw UsageError(fmt::format("ringcast plan --model: {}", e.message()));
  }

  const std::pair<const char*, std::int64_t> rows[] = {
      {"parameters", m.parameters},
      {"gradients", m.gradients},
      {"optimizer", m.optimizer},
      {"layer_inputs", m.layer_inputs},
      {"residual", m.residual},
      {"block_scratch", m.block_scratch},
      {"attention_projections", m.attention_projections},
      {"ffn_chunks", m.ffn_chunks},
      {"attention_workspace", m.attention_workspace},
      {"kernel_temporaries", m.kernel_temporaries},
      {"runtime", m.runtime},
      {"total", m.total()}};
  const bool judged = capacity > 0;
  const double total_gib = static_cast<double>(m.total()) / kGiB;
  const bool fits = total_gib <= capacity;
  Report report;
  for (const auto& [component, bytes] : rows) {
    auto& row = report.add_row();
    row.set("component", std::string(component))
        .set("bytes", bytes)
        .set("GiB", static_cast<double>(bytes) / kGiB)
        .set("share", static_cast<double>(bytes) / static_cast<double>(m.total()));
  }
  const OutputSpec output = OutputSpec::from_options(vm);
  if (rank == 0) {
    emit(report, output);
    std::FILE* out = output.format != OutputSpec::Format::kNone && output.path.empty() ? stderr : stdout;
    fmt::print(out, "{} D {} layers {} h {} F {}, {} tokens x {} on {} ranks (n_loc {}), mode {}, {} backend\n",
               encoder ? "encoder" : "decoder", config.dim, config.layers, config.heads, config.ffn_hidden,
               layer.seq_len, layer.batch, layer.ranks, layer.local_len(), name(attention.mode), backend);
    if (judged)
      fmt::print(out, "per rank: {:.2f} GiB of {:.2f} GiB: {} ({:.1f}% spare)\n", total_gib, capacity,
                 fits ? "fits" : "does NOT fit", 100.0 * (capacity - total_gib) / capacity);
    else
      fmt::print(out, "per rank: {:.2f} GiB (pass --device-memory GIB for a verdict)\n", total_gib);
    if (const std::int64_t extra = row_union_extra_bytes(layer, config.attention); extra > 0) {
      const double worst = total_gib + static_cast<double>(extra) / kGiB;
      fmt::print(out,
                 "row selection: the block tables are counted as the rows of a tile agree; if no two rows of a "
                 "tile chose alike they would take {:.2f} GiB more ({:.2f} GiB{}). `ringcast run --mode clustered` "
                 "reports the union a run builds (table_entries_mean)\n",
                 static_cast<double>(extra) / kGiB, worst,
                 judged ? fmt::format(", {:.1f}% spare", 100.0 * (capacity - worst) / capacity) : "");
    }
  }
  return 0;
}

}  // namespace

int plan_command(const CommandLine& cmd) {
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  if (std::find(cmd.args.begin(), cmd.args.end(), "--model") != cmd.args.end()) return plan_model(cmd, rank);
  po::options_description desc("ringcast plan options");
  add_common_options(desc);
  add_layer_options(desc, /*with_ranks=*/true);
  po::variables_map vm;
  if (!parse_options(cmd, desc, vm,
                     "usage: ringcast plan --seq-len N --ranks P --mode M [options]\n"
                     "       ringcast plan --model --config FILE [--ranks P] [--device-memory GIB]: a model's memory",
                     rank == 0))
    return 0;
  LayerShape shape;
  AttentionOptions options;
  read_layer_options(vm, 1, shape, options);
  const OutputSpec output = OutputSpec::from_options(vm);
  const LayerPlan plan = plan_layer(shape, options);
  AttentionOptions ring = options;
  ring.mode = AttentionMode::kRing;
  ring.placement = Placement::kAuto;
  const LayerPlan ring_plan = plan_layer(shape, ring);

  Report report;
  auto& row = report.add_row();
  row.set("mode", std::string(name(options.mode)))
      .set("seq_len", shape.seq_len)
      .set("ranks", std::int64_t{shape.ranks})
      .set("heads", std::int64_t{shape.heads})
      .set("kv_heads", std::int64_t{shape.kv_heads})
      .set("head_dim", std::int64_t{shape.head_dim})
      .set("causal", std::string(shape.causal ? "yes" : "no"))
      .set("bytes_sent_fwd", plan.bytes_sent_fwd)
      .set("bytes_recv_fwd", plan.bytes_recv_fwd)
      .set("bytes_sent_bwd", plan.bytes_sent_bwd)
      .set("bytes_recv_bwd", plan.bytes_recv_bwd)
      .set("bytes_sent_fwd_vs_ring", ring_plan.bytes_sent_fwd > 0
                                         ? static_cast<double>(plan.bytes_sent_fwd) / ring_plan.bytes_sent_fwd
                                         : 1.0)
      .set("keys_per_query", plan.keys_per_query)
      .set("attention_flops_fwd", plan.attention_flops_fwd)
      .set("activation_bytes", plan.activation_bytes);
  if (rank == 0) {
    emit(report, output);
    if (output.format == OutputSpec::Format::kNone)
      fmt::print("per rank per layer: forward sends {} ({:.2f}% of exact ring attention's {}), backward sends {}\n",
                 format_bytes(plan.bytes_sent_fwd), 100.0 * plan.bytes_sent_fwd / std::max<std::int64_t>(1, ring_plan.bytes_sent_fwd),
                 format_bytes(ring_plan.bytes_sent_fwd), format_bytes(plan.bytes_sent_bwd));
  }
  return 0;
}

}  // namespace ringcast::launch
