// The clustered mode with surrogate (CAST) clusters on a CUDA session (NCCL, bf16 storage, device
// pools and summaries, host-built tables) against the same layer on the CPU backend, the oracle
// (DESIGN.md §7), over 1, 2 and 4 ranks (ranks share one GPU), for both combines and both assignments.
// Inputs are multiples of 1/16 (exact in bf16, so both sides start from the same values, and the
// affinities Q Sᵀ, K Sᵀ are exact in fp32): every token is planted on one surrogate (4 S plus a small
// grid noise), page_size tokens per surrogate, so each token's best cluster wins by a margin of about
// 5 in the affinities and both assignments are the same on both backends (cluster_members() equal).
// Selections read softmax-weighted summaries that the backends round differently (expf, order of the
// sums: relative 1e-6), far below the gaps between the planted clusters' scores, so the attended
// entries must be equal too. Outputs then differ by bf16 rounding of the attention inputs and
// products (relative ~4e-3 per rounding): O, LSE <= 1e-2; dQ, dK, dV, dS (sums of more rounded
// terms) <= 2e-2, as in test_clustered_gpu.cpp. Everything travels from fp32 pools on both backends:
// the same bytes, within `ringcast plan`'s bf16 figures.
#include "device_array.hpp"
#include "layer_compare.hpp"
#include "test_util.hpp"

#include <ringcast/attention.hpp>
#include <ringcast/session.hpp>

#include <gtest/gtest.h>
#include <mpi.h>

#include <algorithm>
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
  ClusterCombine combine;
  SurrogateAssignment assignment;
  SelectionUnit unit;
  ScoreKind score;
  int heads, kv_heads, head_dim;
};

void PrintTo(const Case& c, std::ostream* os) { *os << c.name; }

struct Problem : test::LayerProblem {
  using LayerProblem::LayerProblem;
  std::vector<float> s;  // surrogates [kv_heads, c, d]
  int c = 0;
};

// n = 1536 (not a power of two): clusters of 64 (the only page size of the CUDA attention kernels),
// c = 1536 / (64 P) per rank, coarse blocks of 2.
Problem make_problem(const Case& cs) {
  Problem pr(1536, cs.heads, cs.kv_heads, cs.head_dim, /*causal=*/false);
  const LayerShape& s = pr.shape;
  AttentionOptions& o = pr.options;
  o.mode = AttentionMode::kClustered;
  o.clusters = ClusterKind::kSurrogate;
  o.combine = cs.combine;
  o.assignment = cs.assignment;
  o.selection = cs.unit;
  o.score = cs.score;
  o.page_size = 64;
  o.coarse_pages = 2;
  o.top_k = 3;
  o.coarse_k = 2;
  o.remote_blocks = 2;
  pr.c = o.resolved_surrogate_clusters(s);
  const std::int64_t n = s.seq_len, n_loc = s.local_len(), d = s.head_dim;
  std::mt19937_64 rng(4099 + cs.head_dim + 13 * cs.heads + 7 * static_cast<int>(cs.combine));
  std::uniform_int_distribution<int> noise(-1, 1);
  pr.s = test::LayerProblem::grid_values(static_cast<std::size_t>(s.kv_heads) * pr.c * d, rng);
  // Token j of rank r, element b, KV head g: surrogate target[(b * ranks + r) * kv_heads + g][j], the
  // same for its key and every query head of the group; page_size tokens per surrogate of the rank.
  std::vector<std::vector<int>> target;
  for (int i = 0; i < s.batch * s.ranks * s.kv_heads; ++i) {
    std::vector<int> t;
    for (int cl = 0; cl < pr.c; ++cl) t.insert(t.end(), static_cast<std::size_t>(o.page_size), cl);
    std::shuffle(t.begin(), t.end(), rng);
    target.push_back(std::move(t));
  }
  const auto planted = [&](int heads) {
    std::vector<float> x(static_cast<std::size_t>(s.batch) * n * heads * d);
    for (int b = 0; b < s.batch; ++b)
      for (int r = 0; r < s.ranks; ++r)
        for (int h = 0; h < heads; ++h) {
          const int g = h / (heads / s.kv_heads);
          const std::vector<int>& t = target[static_cast<std::size_t>((b * s.ranks + r) * s.kv_heads + g)];
          for (std::int64_t j = 0; j < n_loc; ++j) {
            const float* dir = pr.s.data() + (std::int64_t{g} * pr.c + t[static_cast<std::size_t>(j)]) * d;
            float* row = x.data() + ((b * n + r * n_loc + j) * heads + h) * d;
            for (std::int64_t e = 0; e < d; ++e) row[e] = 4.0f * dir[e] + static_cast<float>(noise(rng)) / 16.0f;
          }
        }
    return x;
  };
  pr.q = planted(s.heads);
  pr.k = planted(s.kv_heads);
  pr.v = test::LayerProblem::grid_values(pr.k.size(), rng);
  pr.d_o = test::LayerProblem::grid_values(pr.q.size(), rng);
  return pr;
}

struct Shard {
  test::LayerResults results;
  std::vector<float> d_s;
  std::vector<std::int32_t> members;
  comm::OpCounters fwd, bwd;
};

Shard run_layer(const Session& session, const Problem& pr, DType dtype) {
  LayerShape s = pr.shape;
  s.dtype = dtype;
  DistributedAttention layer(session, s, pr.options);
  const test::LayerTensors t(session, s, layer.positions(), pr.q, pr.k, pr.v, pr.d_o);
  const test::Tensor ts(session, dtype, pr.s, {s.kv_heads, pr.c, s.head_dim});
  const test::Tensor tds(session, DType::kF32, std::vector<float>(pr.s.size(), 0.0f), {s.kv_heads, pr.c, s.head_dim});
  AttentionForwardArgs fwd = t.forward_args();
  fwd.surrogates = ts.view();
  AttentionBackwardArgs bwd = t.backward_args();
  bwd.surrogates = ts.view();
  bwd.d_surrogates = tds.view();
  const test::PassCounters bytes = test::run_counted(session, layer, fwd, bwd);
  return {test::LayerResults(t, layer, session.stream()), tds.read(session.stream()), layer.cluster_members(),
          bytes.fwd, bytes.bwd};
}

class CastModeGpu : public ::testing::TestWithParam<Case> {};

TEST_P(CastModeGpu, ClustersAndAttendsLikeTheCpuAndMatchesItsResults) {
  RINGCAST_SKIP_WITHOUT_CUDA();
  const Problem pr = make_problem(GetParam());
  const Session cpu_session = Session::from_mpi(MPI_COMM_WORLD, Backend::kCpu);
  const Session gpu_session = Session::from_mpi(MPI_COMM_WORLD, Backend::kCuda);
  const Shard cpu = run_layer(cpu_session, pr, DType::kF32);
  const Shard gpu = run_layer(gpu_session, pr, DType::kBF16);

  EXPECT_EQ(gpu.members, cpu.members) << "the backends assign different clusters";
  test::expect_same_run(gpu.results, cpu.results);
  if (HasFatalFailure()) return;
  test::expect_close("dS vs CPU", gpu.d_s, test::to_double(cpu.d_s), 2e-2);
  // Blocks, summaries and gradients travel from the fp32 pools on both backends: the same bytes.
  EXPECT_EQ(gpu.fwd.bytes_sent, cpu.fwd.bytes_sent) << "forward bytes sent";
  EXPECT_EQ(gpu.bwd.bytes_sent, cpu.bwd.bytes_sent) << "backward bytes sent";
  LayerShape bf16 = pr.shape;
  bf16.dtype = DType::kBF16;
  test::expect_within_plan(bf16, pr.options, gpu.fwd, gpu.bwd);
}

INSTANTIATE_TEST_SUITE_P(
    Modes, CastModeGpu,
    ::testing::Values(Case{"joint_single_tile_bound_gqa2_d64", ClusterCombine::kJoint,
                           SurrogateAssignment::kSingle, SelectionUnit::kTile, ScoreKind::kBound, 4, 2, 64},
                      Case{"joint_topk_row_mean_d128", ClusterCombine::kJoint, SurrogateAssignment::kTopK,
                           SelectionUnit::kRow, ScoreKind::kMean, 2, 2, 128},
                      Case{"cast_single_gqa2_d64", ClusterCombine::kCast, SurrogateAssignment::kSingle,
                           SelectionUnit::kTile, ScoreKind::kBound, 4, 2, 64},
                      Case{"cast_topk_gqa3_d128", ClusterCombine::kCast, SurrogateAssignment::kTopK,
                           SelectionUnit::kTile, ScoreKind::kMean, 6, 2, 128}),
    [](const ::testing::TestParamInfo<Case>& info) { return info.param.name; });

}  // namespace
}  // namespace ringcast
