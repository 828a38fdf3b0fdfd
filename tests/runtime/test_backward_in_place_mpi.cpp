// Gradients in place of the inputs (DistributedAttention::backward: d_q, d_k, d_v may be q, k, v), on
// the CPU backend under 1, 2 and 4 ranks, for every mode: the gradients written over the inputs are
// bit for bit those written to buffers of their own. And what backward() refuses: an output that
// overlaps an input other than its own, or another output, partly or whole.
#include "clustered_budgets.hpp"
#include "attention_reference.hpp"

#include <ringcast/attention.hpp>
#include <ringcast/error.hpp>

#include <gtest/gtest.h>
#include <mpi.h>

#include <string>
#include <vector>

namespace ringcast {
namespace {

int world_size() {
  int p = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &p);
  return p;
}

struct Config {
  AttentionMode mode;
  ClusterKind clusters;
  ClusterCombine combine;
  bool causal;
  std::string name;
};

void PrintTo(const Config& c, std::ostream* os) { *os << c.name; }

// 768 tokens (192 rows per rank at P = 4), 8 query heads over 4 KV heads (Ulysses shards both over
// P), head dim 64; the clustered budgets of tests/runtime/test_clustered_mpi.cpp (pages of 32 keys,
// coarse blocks of 2 pages), so that selections are sparse.
LayerShape layer_shape(const Config& c) {
  LayerShape s;
  s.seq_len = 768;
  s.ranks = world_size();
  s.batch = 2;
  s.heads = 8;
  s.kv_heads = 4;
  s.head_dim = 64;
  s.dtype = DType::kF32;
  s.causal = c.causal;
  return s;
}

AttentionOptions layer_options(const Config& c) {
  AttentionOptions o;
  o.mode = c.mode;
  o.clusters = c.clusters;
  o.combine = c.combine;
  test::use_small_clustered_budgets(o);
  return o;
}

struct Gradients {
  std::vector<float> d_q, d_k, d_v, d_s;
};

// One forward and backward of this rank's shard; in_place: d_q, d_k, d_v are q, k, v themselves.
Gradients run_layer(const Session& session, const Config& c, bool in_place) {
  const LayerShape s = layer_shape(c);
  const AttentionOptions opts = layer_options(c);
  DistributedAttention layer(session, s, opts);
  const std::int64_t n = s.local_len();
  const std::size_t q_elems = std::size_t(s.batch) * n * s.heads * s.head_dim;
  const std::size_t kv_elems = std::size_t(s.batch) * n * s.kv_heads * s.head_dim;
  const int rank = session.rank();
  std::vector<float> q = test::random_normal(q_elems, 10 + rank), k = test::random_normal(kv_elems, 20 + rank);
  std::vector<float> v = test::random_normal(kv_elems, 30 + rank), d_o = test::random_normal(q_elems, 40 + rank);
  std::vector<float> o(q_elems), lse(std::size_t(s.batch) * s.heads * n);
  Gradients g;
  g.d_q.assign(q_elems, NAN);
  g.d_k.assign(kv_elems, NAN);
  g.d_v.assign(kv_elems, NAN);
  const Device& dev = session.device();
  const auto view = [&](std::vector<float>& x, int heads) {
    return TensorView::contiguous(x.data(), DType::kF32, {s.batch, n, heads, s.head_dim}, dev);
  };
  const TensorView lse_view = TensorView::contiguous(lse.data(), DType::kF32, {s.batch, s.heads, n}, dev);
  std::vector<float> surrogates;
  TensorView s_view, d_s_view;
  if (opts.uses_surrogates()) {
    const auto [h_kv, clusters, d] = surrogate_shape(s, opts);
    surrogates = test::random_normal(std::size_t(h_kv) * clusters * d, 50);  // identical on every rank
    g.d_s.assign(surrogates.size(), 0.0f);
    s_view = TensorView::contiguous(surrogates.data(), DType::kF32, {h_kv, clusters, d}, dev);
    d_s_view = TensorView::contiguous(g.d_s.data(), DType::kF32, {h_kv, clusters, d}, dev);
  }
  layer.forward({view(q, s.heads), view(k, s.kv_heads), view(v, s.kv_heads), view(o, s.heads), lse_view, s_view});
  std::vector<float>& d_q = in_place ? q : g.d_q;
  std::vector<float>& d_k = in_place ? k : g.d_k;
  std::vector<float>& d_v = in_place ? v : g.d_v;
  layer.backward({view(q, s.heads), view(k, s.kv_heads), view(v, s.kv_heads), view(o, s.heads), lse_view,
                  view(d_o, s.heads), view(d_q, s.heads), view(d_k, s.kv_heads), view(d_v, s.kv_heads), s_view,
                  d_s_view});
  if (in_place) {
    g.d_q = q;
    g.d_k = k;
    g.d_v = v;
  }
  return g;
}

class InPlace : public ::testing::TestWithParam<Config> {};

TEST_P(InPlace, GivesTheGradientsOfSeparateBuffers) {
  Session session = Session::from_mpi(MPI_COMM_WORLD, Backend::kCpu);
  const Gradients apart = run_layer(session, GetParam(), false);
  const Gradients over = run_layer(session, GetParam(), true);
  EXPECT_EQ(over.d_q, apart.d_q);
  EXPECT_EQ(over.d_k, apart.d_k);
  EXPECT_EQ(over.d_v, apart.d_v);
  EXPECT_EQ(over.d_s, apart.d_s);
}

INSTANTIATE_TEST_SUITE_P(
    Modes, InPlace,
    ::testing::Values(
        Config{AttentionMode::kRing, ClusterKind::kBlocks, ClusterCombine::kJoint, true, "ring_zigzag_causal"},
        Config{AttentionMode::kRing, ClusterKind::kBlocks, ClusterCombine::kJoint, false, "ring_bidirectional"},
        Config{AttentionMode::kUlysses, ClusterKind::kBlocks, ClusterCombine::kJoint, true, "ulysses_causal"},
        Config{AttentionMode::kAllGather, ClusterKind::kBlocks, ClusterCombine::kJoint, true, "allgather_causal"},
        Config{AttentionMode::kClustered, ClusterKind::kBlocks, ClusterCombine::kJoint, true, "clustered_causal"},
        Config{AttentionMode::kClustered, ClusterKind::kBlocks, ClusterCombine::kJoint, false,
               "clustered_bidirectional"},
        Config{AttentionMode::kClustered, ClusterKind::kSurrogate, ClusterCombine::kJoint, false,
               "surrogate_joint"},
        Config{AttentionMode::kClustered, ClusterKind::kSurrogate, ClusterCombine::kCast, false, "surrogate_cast"}),
    [](const ::testing::TestParamInfo<Config>& info) { return info.param.name; });

// Views cut from one buffer; nothing here reaches a collective (views are checked first, the same way
// on every rank).
TEST(InPlaceChecks, OverlapsOtherThanAnOutputOverItsOwnInputAreRefused) {
  Session session = Session::from_mpi(MPI_COMM_WORLD, Backend::kCpu);
  const Config ring{AttentionMode::kRing, ClusterKind::kBlocks, ClusterCombine::kJoint, true, "ring"};
  const LayerShape s = layer_shape(ring);
  DistributedAttention layer(session, s, layer_options(ring));
  const std::int64_t n = s.local_len();
  const std::int64_t q_elems = s.batch * n * s.heads * s.head_dim, kv_elems = s.batch * n * s.kv_heads * s.head_dim;
  std::vector<float> buf(3 * q_elems + 4 * kv_elems + s.batch * s.heads * n, 0.5f);
  float* at = buf.data();
  const auto take = [&](std::int64_t elems, int heads) {
    const TensorView t = TensorView::contiguous(at, DType::kF32, {s.batch, n, heads, s.head_dim}, session.device());
    at += elems;
    return t;
  };
  const TensorView q = take(q_elems, s.heads), k = take(kv_elems, s.kv_heads), v = take(kv_elems, s.kv_heads);
  const TensorView o = take(q_elems, s.heads), d_o = take(q_elems, s.heads);
  const TensorView d_k = take(kv_elems, s.kv_heads), d_v = take(kv_elems, s.kv_heads);
  const TensorView lse = TensorView::contiguous(at, DType::kF32, {s.batch, s.heads, n}, session.device());
  const auto expect_error = [&](const AttentionBackwardArgs& a, const std::string& words) {
    try {
      layer.backward(a);
      FAIL() << "no error, expected: " << words;
    } catch (const Error& e) {
      EXPECT_NE(e.message().find(words), std::string::npos) << e.message();
    }
  };
  TensorView shifted = d_k;
  shifted.data = static_cast<float*>(k.data) + 1;
  expect_error({q, k, v, o, lse, d_o, q, shifted, d_v}, "d_k overlaps k");
  expect_error({q, k, v, o, lse, d_o, q, k, k}, "d_v overlaps k");
  expect_error({q, k, v, o, lse, d_o, q, d_k, d_k}, "d_v overlaps d_k");
  expect_error({q, k, v, o, lse, d_o, o, d_k, d_v}, "d_q overlaps o");
  expect_error({q, k, v, o, lse, d_o, d_o, d_k, d_v}, "d_q overlaps d_o");
}

}  // namespace
}  // namespace ringcast
