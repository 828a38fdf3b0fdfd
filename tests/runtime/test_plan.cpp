// The layer plan: exact figures for the exact modes and for surrogate (CAST) clusters, the clustered
// mode's budget against ring at 1M tokens on 4 ranks (DESIGN.md §4.1: <= 5% of ring, goal 2%), and the
// shape checks every rank runs before communicating.
#include <ringcast/error.hpp>
#include <ringcast/plan.hpp>

#include <gtest/gtest.h>

#include <array>

namespace ringcast {
namespace {

LayerShape shape_1m() {
  LayerShape s;
  s.seq_len = 1 << 20;
  s.ranks = 4;
  s.heads = 16;
  s.kv_heads = 16;
  s.head_dim = 128;
  s.dtype = DType::kBF16;
  return s;
}

TEST(RuntimePlan, RingSendsEveryOtherShardOfKAndV) {
  const LayerShape s = shape_1m();
  AttentionOptions o;
  o.check_inputs = false;
  const LayerPlan p = plan_layer(s, o);
  const std::int64_t kv = std::int64_t{1} * (1 << 18) * 16 * 128 * 2;
  EXPECT_EQ(p.bytes_sent_fwd, 3 * 2 * kv);
  EXPECT_EQ(p.bytes_recv_fwd, p.bytes_sent_fwd);
  EXPECT_EQ(p.bytes_sent_bwd, 3 * 2 * kv + 4 * 2 * 2 * kv);  // K,V again + fp32 dK,dV over P steps
  EXPECT_DOUBLE_EQ(p.keys_per_query, ((1 << 20) + 1) / 2.0);
}

TEST(RuntimePlan, UlyssesAndAllGather) {
  LayerShape s = shape_1m();
  s.kv_heads = 4;
  AttentionOptions o;
  o.check_inputs = false;
  o.mode = AttentionMode::kUlysses;
  const std::int64_t q = std::int64_t{1} * (1 << 18) * 16 * 128 * 2, kv = q / 4;
  EXPECT_EQ(plan_layer(s, o).bytes_sent_fwd, 3 * (2 * q + 2 * kv + std::int64_t{1} * (1 << 18) * 16 * 4) / 4);
  // Backward: dO in bf16 to the head shards, fp32 dQ, dK, dV back.
  EXPECT_EQ(plan_layer(s, o).bytes_sent_bwd, 3 * (q + 2 * q + 2 * 2 * kv) / 4);
  o.mode = AttentionMode::kAllGather;
  EXPECT_EQ(plan_layer(s, o).bytes_sent_fwd, 3 * 2 * kv);
  EXPECT_EQ(plan_layer(s, o).bytes_sent_bwd, 3 * 2 * 2 * kv);
}

TEST(RuntimePlan, ClusteredIsAFewPercentOfRingAtOneMillionTokens) {
  const LayerShape s = shape_1m();
  AttentionOptions ring, clustered;
  clustered.mode = AttentionMode::kClustered;
  ring.check_inputs = clustered.check_inputs = false;
  // Forward, causal, at the fetch cap (2R = 16 blocks per KV head): the coarse summaries (mean key,
  // mean value, min, max: fp32 whatever the storage dtype), one halo block, request counts and ids,
  // and the fetched blocks (K and V in bf16).
  const std::int64_t units = 16, blocks_loc = 256, peers = 3, cap = 16, block_kv = 1024 * 128 * 2 * 2;
  EXPECT_EQ(plan_layer(s, clustered).bytes_sent_fwd, peers * units * blocks_loc * 4 * 128 * 4 + units * block_kv +
                                                         units * (peers + cap) * 4 + units * cap * block_kv);
  // Backward, all fp32 whatever the storage dtype: dK, dV of the fetched and halo blocks home, and the
  // reduce-scatter of the coarse summaries' (mean key, mean value) gradients.
  EXPECT_EQ(plan_layer(s, clustered).bytes_sent_bwd,
            units * (cap + 1) * 1024 * 128 * 4 * 2 + units * peers * blocks_loc * 2 * 128 * 4);
  const double ratio = static_cast<double>(plan_layer(s, clustered).bytes_sent_fwd) / plan_layer(s, ring).bytes_sent_fwd;
  EXPECT_LT(ratio, 0.05) << "clustered/ring bytes " << ratio;
  // Keys per query: window 384ish + 16 pages of 64 + n/1024 summaries (DESIGN.md: about 2.4K at 1M).
  const double keys = plan_layer(s, clustered).keys_per_query;
  EXPECT_GT(keys, 1024 + 256);
  EXPECT_LT(keys, 2600);
}

// Surrogate (CAST) clusters, bidirectional: c = n_loc / page_size = 4096 clusters per rank and KV head.
TEST(RuntimePlan, SurrogateClustersJointAndCast) {
  LayerShape s = shape_1m();
  s.causal = false;
  AttentionOptions ring, o;
  ring.check_inputs = o.check_inputs = false;
  o.mode = AttentionMode::kClustered;
  o.clusters = ClusterKind::kSurrogate;
  const std::array<std::int64_t, 3> expected_shape{16, 4096, 128};
  EXPECT_EQ(surrogate_shape(s, o), expected_shape);
  const std::int64_t units = 16, blocks_loc = 4096 / 16, peers = 3, cap = 8;
  // Joint: coarse summaries and block counts, request counts and ids, fetched blocks with their page
  // summaries and counts, all from the fp32 pools whatever the storage dtype; back: fp32 block and
  // page-summary gradients, coarse gradients.
  const std::int64_t block = (16 * 64 * 128 * 2 + 16 * 2 * 128) * 4 + 16 * 4;
  const LayerPlan joint = plan_layer(s, o);
  EXPECT_EQ(joint.bytes_sent_fwd, peers * units * blocks_loc * (4 * 128 * 4 + 4) + units * (peers + cap) * 4 +
                                      units * cap * block);
  EXPECT_EQ(joint.bytes_sent_bwd, units * cap * (16 * 64 * 128 * 2 + 16 * 2 * 128) * 4 +
                                      units * (4 * blocks_loc - blocks_loc) * 2 * 128 * 4);
  const double ratio = static_cast<double>(joint.bytes_sent_fwd) / plan_layer(s, ring).bytes_sent_fwd;
  EXPECT_LT(ratio, 0.05) << "surrogate/ring bytes " << ratio;
  EXPECT_GT(joint.keys_per_query, 64 + 16 * 64);
  EXPECT_LT(joint.keys_per_query, 2600);
  o.combine = ClusterCombine::kCast;
  const LayerPlan cast = plan_layer(s, o);
  EXPECT_EQ(cast.bytes_sent_fwd, peers * units * 4096 * (128 + 1) * 4);  // value summaries and log-sum-exps
  EXPECT_EQ(cast.bytes_sent_bwd, peers * units * 4096 * 128 * 4);         // all-reduce of their gradients
  EXPECT_DOUBLE_EQ(cast.keys_per_query, 64 + 4096 - 1);
  EXPECT_EQ(cast.bytes_recv_fwd, cast.bytes_sent_fwd);
  o.surrogate_clusters = 24;  // the cast combine has no coarse blocks: any count
  EXPECT_EQ(surrogate_shape(s, o)[1], 24);
  o.combine = ClusterCombine::kJoint;
  EXPECT_THROW(plan_layer(s, o), Error);  // joint: whole coarse blocks of 16 clusters
}

TEST(RuntimePlan, OneRankSendsNothing) {
  LayerShape s = shape_1m();
  s.ranks = 1;
  for (auto mode : {AttentionMode::kRing, AttentionMode::kUlysses, AttentionMode::kAllGather, AttentionMode::kClustered}) {
    AttentionOptions o;
    o.mode = mode;  // one rank: the input checks gather nothing from peers either
    const LayerPlan p = plan_layer(s, o);
    EXPECT_EQ(p.bytes_sent_fwd, 0) << name(mode);
    EXPECT_EQ(p.bytes_sent_bwd, 0) << name(mode);
  }
  s.causal = false;
  s.seq_len = 1 << 16;
  for (auto combine : {ClusterCombine::kJoint, ClusterCombine::kCast}) {
    AttentionOptions o;
    o.mode = AttentionMode::kClustered;
    o.clusters = ClusterKind::kSurrogate;
    o.combine = combine;
    const LayerPlan p = plan_layer(s, o);
    EXPECT_EQ(p.bytes_sent_fwd, 0) << name(combine);
    EXPECT_EQ(p.bytes_sent_bwd, 0) << name(combine);
  }
}

TEST(RuntimePlan, ShapesThatDoNotFitAreRefused) {
  LayerShape s = shape_1m();
  AttentionOptions o;
  s.seq_len = (1 << 20) + 2;  // divides by 2 but not by 2P = 8 (zigzag) or P = 4
  EXPECT_THROW(plan_layer(s, o), Error);
  s = shape_1m();
  s.head_dim = 96;
  EXPECT_THROW(plan_layer(s, o), Error);
  s = shape_1m();
  s.kv_heads = 6;
  EXPECT_THROW(plan_layer(s, o), Error);
  s = shape_1m();
  s.heads = s.kv_heads = 6;
  o.mode = AttentionMode::kUlysses;
  EXPECT_THROW(plan_layer(s, o), Error);
  o.mode = AttentionMode::kClustered;
  o.clusters = ClusterKind::kSurrogate;
  s = shape_1m();
  EXPECT_THROW(plan_layer(s, o), Error);  // CAST is bidirectional only
  try {
    s.seq_len = 1000;
    s.ranks = 3;
    plan_layer(s, AttentionOptions{});
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(std::string(e.message()).find("does not divide evenly over 3 ranks"), std::string::npos) << e.message();
  }
}

TEST(RuntimePlan, NamesRoundTrip) {
  for (auto m : {AttentionMode::kRing, AttentionMode::kUlysses, AttentionMode::kAllGather, AttentionMode::kClustered})
    EXPECT_EQ(parse_mode(name(m)), m);
  EXPECT_THROW(parse_mode("dense"), Error);
  for (auto a : {SurrogateAssignment::kSingle, SurrogateAssignment::kTopK}) EXPECT_EQ(parse_assignment(name(a)), a);
  for (auto c : {ClusterCombine::kJoint, ClusterCombine::kCast}) EXPECT_EQ(parse_combine(name(c)), c);
  EXPECT_THROW(parse_combine("sum"), Error);
  EXPECT_EQ(parse_dtype("bf16"), DType::kBF16);
}

}  // namespace
}  // namespace ringcast
