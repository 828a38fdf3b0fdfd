// The exact distributed modes (ring with zigzag or contiguous placement, ulysses, allgather) on a CUDA
// session (NCCL, bf16 storage) against the same layer on the CPU backend, the oracle (DESIGN.md §7,
// itself checked against float64 in tests/runtime/test_attention_mpi.cpp), over 1, 2 and 4 ranks (ranks
// share one GPU through NCCL_HOSTID). Inputs are multiples of 1/16 in [-1/4, 1/4], exact in bf16, so
// outputs differ only by the bf16 rounding of the products and of O: O, LSE <= 1e-2, dQ / dK / dV
// <= 2e-2, as in test_clustered_gpu.cpp. Every rank's NCCL byte counters equal `ringcast plan`'s bf16
// figures exactly (K/V, Q, O, dO in bf16; LSE and gradients in fp32).
#include "device_array.hpp"
#include "layer_compare.hpp"
#include "test_util.hpp"

#include <ringcast/attention.hpp>
#include <ringcast/plan.hpp>
#include <ringcast/session.hpp>

#include <gtest/gtest.h>
#include <mpi.h>

#include <cstdint>
#include <random>
#include <string>
#include <vector>

namespace ringcast {
namespace {

struct Case {
  std::string name;
  AttentionMode mode;
  Placement placement;
  bool causal;
  int heads, kv_heads, head_dim;
};

void PrintTo(const Case& c, std::ostream* os) { *os << c.name; }

// n = 4096 divides by 2P for P = 1, 2, 4 (zigzag: two chunks of 512 rows per rank at P = 4); ulysses
// needs heads and KV heads divisible by P.
test::LayerProblem make_problem(const Case& c) {
  test::LayerProblem pr(4096, c.heads, c.kv_heads, c.head_dim, c.causal);
  pr.options.mode = c.mode;
  pr.options.placement = c.placement;
  std::mt19937_64 rng(4099 + c.head_dim + 13 * c.heads + static_cast<int>(c.mode));
  pr.draw_grid(rng);
  return pr;
}

struct Shard {
  test::LayerResults results;
  test::PassCounters bytes;
};

Shard run_layer(const Session& session, const test::LayerProblem& pr, DType dtype) {
  LayerShape s = pr.shape;
  s.dtype = dtype;
  DistributedAttention layer(session, s, pr.options);
  const test::LayerTensors t(session, s, layer.positions(), pr.q, pr.k, pr.v, pr.d_o);
  const test::PassCounters bytes = test::run_counted(session, layer, t.forward_args(), t.backward_args());
  return {test::LayerResults(t, session.stream()), bytes};
}

class ExactGpu : public ::testing::TestWithParam<Case> {};

TEST_P(ExactGpu, MatchesTheCpuBackendAndSendsWhatThePlanSays) {
  RINGCAST_SKIP_WITHOUT_CUDA();
  const test::LayerProblem pr = make_problem(GetParam());
  const Session cpu_session = Session::from_mpi(MPI_COMM_WORLD, Backend::kCpu);
  const Session gpu_session = Session::from_mpi(MPI_COMM_WORLD, Backend::kCuda);
  const Shard cpu = run_layer(cpu_session, pr, DType::kF32);
  const Shard gpu = run_layer(gpu_session, pr, DType::kBF16);

  test::expect_same_outputs(gpu.results, cpu.results);

  LayerShape bf16 = pr.shape;
  bf16.dtype = DType::kBF16;
  const LayerPlan plan = plan_layer(bf16, pr.options);
  EXPECT_EQ(gpu.bytes.fwd.bytes_sent, static_cast<std::uint64_t>(plan.bytes_sent_fwd)) << "forward bytes sent";
  EXPECT_EQ(gpu.bytes.fwd.bytes_received, static_cast<std::uint64_t>(plan.bytes_recv_fwd)) << "forward bytes received";
  EXPECT_EQ(gpu.bytes.bwd.bytes_sent, static_cast<std::uint64_t>(plan.bytes_sent_bwd)) << "backward bytes sent";
  EXPECT_EQ(gpu.bytes.bwd.bytes_received, static_cast<std::uint64_t>(plan.bytes_recv_bwd)) << "backward bytes received";
}

INSTANTIATE_TEST_SUITE_P(
    Modes, ExactGpu,
    ::testing::Values(Case{"ring_zigzag_causal_gqa2_d128", AttentionMode::kRing, Placement::kAuto, true, 8, 4, 128},
                      Case{"ring_contiguous_causal_d64", AttentionMode::kRing, Placement::kContiguous, true, 4, 4, 64},
                      Case{"ring_bidirectional_gqa4_d64", AttentionMode::kRing, Placement::kAuto, false, 8, 2, 64},
                      Case{"ulysses_causal_gqa2_d128", AttentionMode::kUlysses, Placement::kAuto, true, 8, 4, 128},
                      Case{"allgather_bidirectional_gqa2_d64", AttentionMode::kAllGather, Placement::kAuto, false,
                           8, 4, 64}),
    [](const ::testing::TestParamInfo<Case>& info) { return info.param.name; });

}  // namespace
}  // namespace ringcast
