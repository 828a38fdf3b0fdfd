// The clustered attention mode (clusters = blocks) on a CUDA session (NCCL, bf16 storage, selection
// and block tables on the device) against the same layer on the CPU backend, the oracle (DESIGN.md §7),
// over 1, 2 and 4 ranks (ranks share one GPU through NCCL_HOSTID). Inputs are multiples of 1/16 in
// [-1/4, 1/4]: exact in bf16, and every summary and selection score is exact in fp32 whatever the order
// of summation (a power-of-two scaling of the integer inputs of `bench kernels`' selection check), so
// both backends must attend to exactly the same entries; outputs and gradients then differ only by
// bf16 rounding (the summary keys and the products). Bounds: O and LSE relative error <= 1e-2,
// dQ / dK / dV <= 2e-2. Bytes: the same messages, but the forward's halo and fetched blocks travel in
// bf16 on CUDA (fp32 on the CPU), so with P > 1 the forward sends at most the CPU's and more than
// half of it per rank (summaries and requests are the same), less over all ranks; the backward's
// (fp32 gradients) are equal; and the mean over ranks is within `ringcast plan`'s bf16 figures.
// Memory: on both backends the layer's workspace is at most what plan's attention_workspace_bytes()
// estimates for that device (the CUDA mode's fp32 gradient pool reuses its fp32 pool).
#include "device_array.hpp"
#include "layer_compare.hpp"
#include "test_util.hpp"

#include <ringcast/attention.hpp>
#include <ringcast/plan.hpp>
#include <ringcast/session.hpp>

#include <gtest/gtest.h>
#include <mpi.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <string>
#include <vector>

namespace ringcast {
namespace {

struct Case {
  std::string name;
  bool causal;
  SelectionUnit unit;
  ScoreKind score;
  int heads, kv_heads, head_dim;
};

void PrintTo(const Case& c, std::ostream* os) { *os << c.name; }

// n = 4096: 16 coarse blocks of 4 pages of 64 keys; 1024 rows per rank at P = 4.
test::LayerProblem make_problem(const Case& c) {
  test::LayerProblem pr(4096, c.heads, c.kv_heads, c.head_dim, c.causal);
  AttentionOptions& o = pr.options;
  o.mode = AttentionMode::kClustered;
  o.selection = c.unit;
  o.score = c.score;
  o.page_size = 64;
  o.coarse_pages = 4;
  o.window_before = 256;
  o.window_bidir = 128;
  o.top_k = 4;
  o.coarse_k = 2;
  o.remote_blocks = 2;
  std::mt19937_64 rng(977 + c.head_dim + 7 * c.heads);
  pr.draw_grid(rng);
  return pr;
}

struct Shard {
  test::LayerResults results;
  comm::OpCounters fwd, bwd;
};

Shard run_layer(const Session& session, const test::LayerProblem& pr, DType dtype) {
  LayerShape s = pr.shape;
  s.dtype = dtype;
  DistributedAttention layer(session, s, pr.options);
  const auto built = static_cast<std::int64_t>(layer.workspace_bytes());
  EXPECT_GE(attention_workspace_bytes(s, pr.options, session.device().kind), built) << dtype_name(dtype);
  const test::LayerTensors t(session, s, layer.positions(), pr.q, pr.k, pr.v, pr.d_o);
  const test::PassCounters bytes = test::run_counted(session, layer, t.forward_args(), t.backward_args());
  return {test::LayerResults(t, layer, session.stream()), bytes.fwd, bytes.bwd};
}

class ClusteredGpu : public ::testing::TestWithParam<Case> {};

TEST_P(ClusteredGpu, AttendsToTheCpuEntriesAndMatchesItsResults) {
  RINGCAST_SKIP_WITHOUT_CUDA();
  const test::LayerProblem pr = make_problem(GetParam());
  const Session cpu_session = Session::from_mpi(MPI_COMM_WORLD, Backend::kCpu);
  const Session gpu_session = Session::from_mpi(MPI_COMM_WORLD, Backend::kCuda);
  const Shard cpu = run_layer(cpu_session, pr, DType::kF32);
  const Shard gpu = run_layer(gpu_session, pr, DType::kBF16);

  test::expect_same_run(gpu.results, cpu.results);
  if (HasFatalFailure()) return;

  std::printf("    forward bytes sent: %llu (CUDA) vs %llu (CPU)\n", static_cast<unsigned long long>(gpu.fwd.bytes_sent),
              static_cast<unsigned long long>(cpu.fwd.bytes_sent));
  if (pr.shape.ranks == 1) {
    EXPECT_EQ(gpu.fwd.bytes_sent, 0u);
  } else {
    // Per rank at most the CPU's (causal: the last rank sends no halo and serves no block, so only its
    // summaries and requests: the same bytes), over all ranks less.
    EXPECT_LE(gpu.fwd.bytes_sent, cpu.fwd.bytes_sent) << "the blocks should travel in bf16";
    EXPECT_GT(2 * gpu.fwd.bytes_sent, cpu.fwd.bytes_sent) << "only the blocks travel in bf16";
    std::uint64_t sent[2] = {gpu.fwd.bytes_sent, cpu.fwd.bytes_sent};
    MPI_Allreduce(MPI_IN_PLACE, sent, 2, MPI_UINT64_T, MPI_SUM, MPI_COMM_WORLD);
    EXPECT_LT(sent[0], sent[1]) << "over all ranks, the blocks should travel in bf16";
  }
  EXPECT_EQ(gpu.bwd.bytes_sent, cpu.bwd.bytes_sent) << "backward bytes sent";
  EXPECT_EQ(gpu.bwd.bytes_received, cpu.bwd.bytes_received) << "backward bytes received";
  LayerShape bf16 = pr.shape;
  bf16.dtype = DType::kBF16;
  test::expect_within_plan(bf16, pr.options, gpu.fwd, gpu.bwd);
}

INSTANTIATE_TEST_SUITE_P(
    Modes, ClusteredGpu,
    ::testing::Values(Case{"causal_row_bound_gqa2_d64", true, SelectionUnit::kRow, ScoreKind::kBound, 4, 2, 64},
                      Case{"causal_tile_mean_gqa4_d128", true, SelectionUnit::kTile, ScoreKind::kMean, 8, 2, 128},
                      Case{"bidirectional_tile_bound_d64", false, SelectionUnit::kTile, ScoreKind::kBound, 4, 4, 64},
                      Case{"bidirectional_row_mean_gqa2_d128", false, SelectionUnit::kRow, ScoreKind::kMean, 4, 2,
                           128},
                      // Grouped rows with 16 tokens of 8 heads per tile (kernels/grouped_rows.hpp).
                      Case{"causal_row_bound_gqa8_d128", true, SelectionUnit::kRow, ScoreKind::kBound, 8, 1, 128}),
    [](const ::testing::TestParamInfo<Case>& info) { return info.param.name; });

}  // namespace
}  // namespace ringcast
