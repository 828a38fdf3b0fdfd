// `ringcast plan`: per rank and per layer, what a configuration costs -- bytes sent and received
// (forward, backward), keys per query, attention FLOPs, activation memory -- from the formulas of
// runtime/include/ringcast/plan.hpp, with exact ring attention of the same shape beside it.
// Runs no kernels and needs no MPI peers.
#include "commands.hpp"
#include "layer_options.hpp"
#include "report.hpp"

#include <ringcast/plan.hpp>

#include <fmt/format.h>
#include <algorithm>
#include <mpi.h>

namespace ringcast::launch {

int plan_command(const CommandLine& cmd) {
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  po::options_description desc("ringcast plan options");
  add_common_options(desc);
  add_layer_options(desc, /*with_ranks=*/true);
  po::variables_map vm;
  if (!parse_options(cmd, desc, vm, "usage: ringcast plan --seq-len N --ranks P --mode M [options]", rank == 0))
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
