// The clustered attention mode (clusters = blocks) on a CUDA session (NCCL, bf16 storage, selection
// and block tables on the device) against the same layer on the CPU backend, the oracle (DESIGN.md §7),
// over 1, 2 and 4 ranks (ranks share one GPU through NCCL_HOSTID). Inputs are multiples of 1/16 in
// [-1/4, 1/4]: exact in bf16, and every summary and selection score is exact in fp32 whatever the order
// of summation (a power-of-two scaling of the integer inputs of `bench kernels`' selection check), so
// both backends must attend to exactly the same entries; outputs and gradients then differ only by
// bf16 rounding (the summary keys and the products). Bounds: O and LSE relative error <= 1e-2,
// dQ / dK / dV <= 2e-2. Bytes: the same messages, but the forward's halo and fetched blocks travel in
// bf16 on CUDA (fp32 on the CPU), so with P > 1 the forward sends less than the CPU's and more than
// half of it (summaries and requests are the same); the backward's (fp32 gradients) are equal.
#include "device_array.hpp"
#include "layer_compare.hpp"
#include "test_util.hpp"

#include <ringcast/attention.hpp>
#include <ringcast/memory.hpp>
#include <ringcast/session.hpp>

#include <cuda_bf16.h>
#include <gtest/gtest.h>
#include <mpi.h>

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
  bool causal;
  SelectionUnit unit;
  ScoreKind score;
  int heads, kv_heads, head_dim;
};

void PrintTo(const Case& c, std::ostream* os) { *os << c.name; }

struct Problem {
  LayerShape shape;
  AttentionOptions options;
  std::vector<float> q, k, v, d_o;  // global, [B, n, heads, d]
};

// n = 4096: 16 coarse blocks of 4 pages of 64 keys; 1024 rows per rank at P = 4.
Problem make_problem(const Case& c) {
  Problem pr;
  LayerShape& s = pr.shape;
  s.seq_len = 4096;
  s.ranks = world_size();
  s.batch = 2;
  s.heads = c.heads;
  s.kv_heads = c.kv_heads;
  s.head_dim = c.head_dim;
  s.causal = c.causal;
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
  std::uniform_int_distribution<int> grid(-4, 4);
  const auto draw = [&](int heads) {
    std::vector<float> x(static_cast<std::size_t>(s.batch) * s.seq_len * heads * s.head_dim);
    for (float& e : x) e = static_cast<float>(grid(rng)) / 16.0f;
    return x;
  };
  pr.q = draw(s.heads);
  pr.k = draw(s.kv_heads);
  pr.v = draw(s.kv_heads);
  pr.d_o = draw(s.heads);
  return pr;
}

struct Shard {
  std::vector<float> o, lse, d_q, d_k, d_v;
  std::vector<AttendedEntry> entries;
  comm::OpCounters fwd, bwd;
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
  const auto tokens = [&](const std::vector<float>& x, int heads, DType t = DType::kF32) {
    return Tensor(session, t, x, {s.batch, n, heads, s.head_dim});
  };
  Tensor tq = tokens(q, s.heads, dtype), tk = tokens(k, s.kv_heads, dtype), tv = tokens(v, s.kv_heads, dtype);
  Tensor to = tokens(poison_q, s.heads, dtype), tdo = tokens(d_o, s.heads, dtype);
  Tensor tdq = tokens(poison_q, s.heads, dtype), tdk = tokens(poison_k, s.kv_heads, dtype);
  Tensor tdv = tokens(poison_k, s.kv_heads, dtype);
  Tensor tlse(session, DType::kF32, poison_lse, {s.batch, s.heads, n});
  Shard sh;
  session.comm().reset_counters();
  layer.forward({tq.view(), tk.view(), tv.view(), to.view(), tlse.view()});
  sh.fwd = session.comm().counters().total();
  session.comm().reset_counters();
  layer.backward({tq.view(), tk.view(), tv.view(), to.view(), tlse.view(), tdo.view(), tdq.view(), tdk.view(),
                  tdv.view()});
  sh.bwd = session.comm().counters().total();
  sh.o = to.read(session.stream());
  sh.lse = tlse.read(session.stream());
  sh.d_q = tdq.read(session.stream());
  sh.d_k = tdk.read(session.stream());
  sh.d_v = tdv.read(session.stream());
  sh.entries = layer.attended_entries();
  return sh;
}

class ClusteredGpu : public ::testing::TestWithParam<Case> {};

TEST_P(ClusteredGpu, AttendsToTheCpuEntriesAndMatchesItsResults) {
  RINGCAST_SKIP_WITHOUT_CUDA();
  const Problem pr = make_problem(GetParam());
  const Session cpu_session = Session::from_mpi(MPI_COMM_WORLD, Backend::kCpu);
  const Session gpu_session = Session::from_mpi(MPI_COMM_WORLD, Backend::kCuda);
  const Shard cpu = run_layer(cpu_session, pr, DType::kF32);
  const Shard gpu = run_layer(gpu_session, pr, DType::kBF16);

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

  std::printf("    forward bytes sent: %llu (CUDA) vs %llu (CPU)\n", static_cast<unsigned long long>(gpu.fwd.bytes_sent),
              static_cast<unsigned long long>(cpu.fwd.bytes_sent));
  if (pr.shape.ranks == 1) {
    EXPECT_EQ(gpu.fwd.bytes_sent, 0u);
  } else {
    EXPECT_LT(gpu.fwd.bytes_sent, cpu.fwd.bytes_sent) << "the blocks should travel in bf16";
    EXPECT_GT(2 * gpu.fwd.bytes_sent, cpu.fwd.bytes_sent) << "only the blocks travel in bf16";
  }
  EXPECT_EQ(gpu.bwd.bytes_sent, cpu.bwd.bytes_sent) << "backward bytes sent";
  EXPECT_EQ(gpu.bwd.bytes_received, cpu.bwd.bytes_received) << "backward bytes received";
}

INSTANTIATE_TEST_SUITE_P(
    Modes, ClusteredGpu,
    ::testing::Values(Case{"causal_row_bound_gqa2_d64", true, SelectionUnit::kRow, ScoreKind::kBound, 4, 2, 64},
                      Case{"causal_tile_mean_gqa4_d128", true, SelectionUnit::kTile, ScoreKind::kMean, 8, 2, 128},
                      Case{"bidirectional_tile_bound_d64", false, SelectionUnit::kTile, ScoreKind::kBound, 4, 4, 64},
                      Case{"bidirectional_row_mean_gqa2_d128", false, SelectionUnit::kRow, ScoreKind::kMean, 4, 2,
                           128}),
    [](const ::testing::TestParamInfo<Case>& info) { return info.param.name; });

}  // namespace
}  // namespace ringcast
