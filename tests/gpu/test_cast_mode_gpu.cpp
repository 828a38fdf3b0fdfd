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
// terms) <= 2e-2, as in test_clustered_gpu.cpp.
#include "device_array.hpp"
#include "layer_compare.hpp"
#include "test_util.hpp"

#include <ringcast/attention.hpp>
#include <ringcast/memory.hpp>
#include <ringcast/session.hpp>

#include <cuda_bf16.h>
#include <gtest/gtest.h>
#include <mpi.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <random>
#include <span>
#include <string>
#include <vector>

namespace ringcast {
namespace {

using test::rows;
using test::same_entry;
using test::Tensor;

int world_size() {
  int p = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &p);
  return p;
}

struct Case {
  std::string name;
  ClusterCombine combine;
  SurrogateAssignment assignment;
  SelectionUnit unit;
  ScoreKind score;
  int heads, kv_heads, head_dim;
};

void PrintTo(const Case& c, std::ostream* os) { *os << c.name; }

struct Problem {
  LayerShape shape;
  AttentionOptions options;
  std::vector<float> q, k, v, d_o, s;  // global [B, n, heads, d]; surrogates [kv_heads, c, d]
  int c = 0;
};

// n = 1536 (not a power of two): clusters of 32, c = 1536 / (32 P) per rank, coarse blocks of 2.
Problem make_problem(const Case& cs) {
  Problem pr;
  LayerShape& s = pr.shape;
  s.seq_len = 1536;
  s.ranks = world_size();
  s.batch = 2;
  s.heads = cs.heads;
  s.kv_heads = cs.kv_heads;
  s.head_dim = cs.head_dim;
  s.causal = false;
  AttentionOptions& o = pr.options;
  o.mode = AttentionMode::kClustered;
  o.clusters = ClusterKind::kSurrogate;
  o.combine = cs.combine;
  o.assignment = cs.assignment;
  o.selection = cs.unit;
  o.score = cs.score;
  o.page_size = 32;
  o.coarse_pages = 2;
  o.top_k = 3;
  o.coarse_k = 2;
  o.remote_blocks = 2;
  pr.c = o.resolved_surrogate_clusters(s);
  const std::int64_t n = s.seq_len, n_loc = s.local_len(), d = s.head_dim;
  std::mt19937_64 rng(4099 + cs.head_dim + 13 * cs.heads + 7 * static_cast<int>(cs.combine));
  std::uniform_int_distribution<int> grid(-4, 4), noise(-1, 1);
  pr.s.resize(static_cast<std::size_t>(s.kv_heads) * pr.c * d);
  for (float& x : pr.s) x = static_cast<float>(grid(rng)) / 16.0f;
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
  pr.v.resize(pr.k.size());
  for (float& x : pr.v) x = static_cast<float>(grid(rng)) / 16.0f;
  pr.d_o.resize(pr.q.size());
  for (float& x : pr.d_o) x = static_cast<float>(grid(rng)) / 16.0f;
  return pr;
}

struct Shard {
  std::vector<float> o, lse, d_q, d_k, d_v, d_s;
  std::vector<std::int32_t> members;
  std::vector<AttendedEntry> entries;
};

Shard run_layer(const Session& session, const Problem& pr, DType dtype) {
  LayerShape s = pr.shape;
  s.dtype = dtype;
  DistributedAttention layer(session, s, pr.options);
  const std::span<const std::int32_t> pos = layer.positions();
  const std::int64_t n = s.local_len();
  const std::vector<float> q = rows(pr.q, s, s.heads, pos), k = rows(pr.k, s, s.kv_heads, pos);
  const std::vector<float> v = rows(pr.v, s, s.kv_heads, pos), d_o = rows(pr.d_o, s, s.heads, pos);
  const std::vector<float> poison_q(q.size(), NAN), poison_k(k.size(), NAN);
  const std::vector<float> poison_lse(static_cast<std::size_t>(s.batch) * s.heads * n, NAN);
  const std::vector<float> zero_s(pr.s.size(), 0.0f);
  const auto tokens = [&](const std::vector<float>& x, int heads) {
    return Tensor(session, dtype, x, {s.batch, n, heads, s.head_dim});
  };
  Tensor tq = tokens(q, s.heads), tk = tokens(k, s.kv_heads), tv = tokens(v, s.kv_heads);
  Tensor to = tokens(poison_q, s.heads), tdo = tokens(d_o, s.heads);
  Tensor tdq = tokens(poison_q, s.heads), tdk = tokens(poison_k, s.kv_heads), tdv = tokens(poison_k, s.kv_heads);
  Tensor tlse(session, DType::kF32, poison_lse, {s.batch, s.heads, n});
  Tensor ts(session, dtype, pr.s, {s.kv_heads, pr.c, s.head_dim});
  Tensor tds(session, DType::kF32, zero_s, {s.kv_heads, pr.c, s.head_dim});
  layer.forward({tq.view(), tk.view(), tv.view(), to.view(), tlse.view(), ts.view()});
  layer.backward({tq.view(), tk.view(), tv.view(), to.view(), tlse.view(), tdo.view(), tdq.view(), tdk.view(),
                  tdv.view(), ts.view(), tds.view()});
  Shard sh;
  sh.o = to.read(session.stream());
  sh.lse = tlse.read(session.stream());
  sh.d_q = tdq.read(session.stream());
  sh.d_k = tdk.read(session.stream());
  sh.d_v = tdv.read(session.stream());
  sh.d_s = tds.read(session.stream());
  sh.members = layer.cluster_members();
  sh.entries = layer.attended_entries();
  return sh;
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
  ASSERT_EQ(gpu.entries.size(), cpu.entries.size()) << "the backends attend to different numbers of entries";
  std::size_t differ = 0;
  for (std::size_t i = 0; i < cpu.entries.size(); ++i) differ += !same_entry(gpu.entries[i], cpu.entries[i]);
  std::printf("    %zu attended entries, %zu differ\n", cpu.entries.size(), differ);
  EXPECT_EQ(differ, 0u) << "selections or tables differ between CUDA and the CPU backend";

  test::expect_close("O (bf16) vs CPU", gpu.o, test::to_double(cpu.o), 1e-2);
  test::expect_close("LSE vs CPU", gpu.lse, test::to_double(cpu.lse), 1e-2);
  test::expect_close("dQ (bf16) vs CPU", gpu.d_q, test::to_double(cpu.d_q), 2e-2);
  test::expect_close("dK (bf16) vs CPU", gpu.d_k, test::to_double(cpu.d_k), 2e-2);
  test::expect_close("dV (bf16) vs CPU", gpu.d_v, test::to_double(cpu.d_v), 2e-2);
  test::expect_close("dS vs CPU", gpu.d_s, test::to_double(cpu.d_s), 2e-2);
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
