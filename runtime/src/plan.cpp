// Formulas of plan.hpp. Every term names the message it stands for; the figures are per rank and
// per layer, summed over the batch.
#include <ringcast/plan.hpp>

#include <algorithm>

namespace ringcast {
namespace {

constexpr std::int64_t kF32 = 4;
constexpr std::int64_t kQueryTile = 128;

struct Sizes {
  std::int64_t p, n, n_loc, b, h, hk, d, e;
  std::int64_t q() const { return b * n_loc * h * d * e; }             // local Q (or O, dO) shard
  std::int64_t kv() const { return b * n_loc * hk * d * e; }           // local K (or V) shard
  std::int64_t q32() const { return b * n_loc * h * d * kF32; }
  std::int64_t kv32() const { return b * n_loc * hk * d * kF32; }
  std::int64_t lse() const { return b * n_loc * h * kF32; }
};

double exact_keys_per_query(const LayerShape& s) {
  return s.causal ? (static_cast<double>(s.seq_len) + 1) / 2 : static_cast<double>(s.seq_len);
}

// clusters = surrogate (bidirectional). Both combines hold the affinities A_q, A_k ([B, h + h_kv,
// n_loc, c] fp32), the assignment and the clusters' fp32 summaries.
//   joint: the clustered figures over cluster pages (c per rank, coarse blocks of coarse_pages
//     clusters, no halo): the coarse summaries also carry each block's member count (int32), and a
//     fetched block carries its page summaries (mean key, mean value) and its pages' counts; their
//     fp32 gradients travel back with the block's.
//   cast: all-gather of every cluster's value summary and log-sum-exp (fp32), all-reduce of the
//     summaries' fp32 gradients; keys per query: the own cluster plus the other surrogates' summaries.
void plan_surrogate(const LayerShape& shape, const AttentionOptions& o, const Sizes& z, LayerPlan& plan) {
  const std::int64_t peers = z.p - 1, c = o.resolved_surrogate_clusters(shape), ps = o.page_size;
  const std::int64_t units = z.b * z.hk;  // (element, KV head) pairs
  const std::int64_t local_io = 2 * z.q() + 2 * z.kv() + z.lse();
  const std::int64_t affinities = z.b * (z.h + z.hk) * z.n_loc * c * kF32;
  const std::int64_t clusters = units * c * (ps + 1) * 4 + units * c * 2 * z.d * kF32;  // members, counts, summaries
  if (o.combine == ClusterCombine::kCast) {
    plan.bytes_sent_fwd = peers * units * c * (z.d + 1) * kF32;
    plan.bytes_sent_bwd = peers * units * c * z.d * kF32;
    plan.keys_per_query = static_cast<double>(ps + c - 1);
    const std::int64_t gathered = z.b * c * ps * z.h * z.d * kF32;  // gathered Q and the intra output
    plan.activation_bytes = local_io + affinities + clusters + 2 * gathered + 2 * units * c * ps * z.d * z.e +
                            z.p * units * c * (z.d + 1) * kF32;
    return;
  }
  const std::int64_t cp = o.coarse_pages, blocks_loc = c / cp, blocks_total = z.p * blocks_loc;
  const std::int64_t cap = z.p > 1 ? std::min<std::int64_t>(o.remote_blocks, blocks_total - blocks_loc) : 0;
  const std::int64_t summaries = peers * units * blocks_loc * (4 * z.d * z.e + 4);  // + the block's count
  const std::int64_t requests = z.p > 1 ? units * (peers + cap) * 4 : 0;
  const std::int64_t block = cp * ps * z.d * z.e * 2 + cp * 2 * z.d * z.e + cp * 4;  // K,V, page summaries, counts
  plan.bytes_sent_fwd = summaries + requests + units * cap * block;
  const std::int64_t block_grad = (cp * ps * z.d * 2 + cp * 2 * z.d) * kF32;
  plan.bytes_sent_bwd = units * cap * block_grad + units * (blocks_total - blocks_loc) * 2 * z.d * kF32;
  // Own cluster + selected clusters + the other clusters of the own block and of partly selected
  // blocks (page summaries) + coarse summaries.
  const double selected = static_cast<double>(o.top_k) * ps;
  const double page_summaries = (cp - 1) + std::max<std::int64_t>(0, std::min<std::int64_t>(o.top_k, o.coarse_k) * cp - o.top_k);
  plan.keys_per_query = std::min(ps + selected + page_summaries + static_cast<double>(blocks_total),
                                 exact_keys_per_query(shape));
  const std::int64_t pools = units * (c + cap * cp) * ps * z.d * z.e * 2;
  plan.activation_bytes = local_io + affinities + clusters + pools + units * blocks_total * 4 * z.d * kF32 +
                          z.b * (z.n_loc / kQueryTile) * z.hk * (o.top_k + 8) * 48;  // + block tables
}

}  // namespace

LayerPlan plan_layer(const LayerShape& shape, const AttentionOptions& o) {
  validate(shape, o);
  const Sizes z{shape.ranks, shape.seq_len, shape.local_len(), shape.batch, shape.heads, shape.kv_heads,
                shape.head_dim, static_cast<std::int64_t>(dtype_size(shape.dtype))};
  const std::int64_t peers = z.p - 1;
  // Ring and all-gather move K/V as page pools: each segment of the shard (2 when zigzag) is padded
  // to whole pages of kExactPageSize keys.
  constexpr std::int64_t kPage = 64;
  const std::int64_t segments = o.resolved_placement(shape) == Placement::kZigzag ? 2 : 1;
  const std::int64_t n_pad = segments * ((z.n_loc / segments + kPage - 1) / kPage) * kPage;
  const std::int64_t kv_pool = z.b * n_pad * z.hk * z.d * z.e, kv_pool32 = kv_pool / z.e * kF32;
  LayerPlan plan;
  const std::int64_t local_io = 2 * z.q() + 2 * z.kv() + z.lse();  // Q, O, K, V, LSE

  switch (o.mode) {
    case AttentionMode::kRing:
      plan.bytes_sent_fwd = peers * 2 * kv_pool;
      plan.bytes_sent_bwd = peers * 2 * kv_pool + (z.p > 1 ? z.p * 2 * kv_pool32 : 0);
      plan.keys_per_query = exact_keys_per_query(shape);
      plan.activation_bytes = local_io + 2 * 2 * z.kv() + z.q32() + z.lse();  // double buffer, fp32 partials
      break;
    case AttentionMode::kUlysses:
      plan.bytes_sent_fwd = peers * (2 * z.q() + 2 * z.kv() + z.lse()) / z.p;
      plan.bytes_sent_bwd = peers * (z.q() + z.q32() + 2 * z.kv32()) / z.p;
      plan.keys_per_query = exact_keys_per_query(shape);
      plan.activation_bytes = 2 * local_io;  // the head-sharded copies are as large as the local ones
      break;
    case AttentionMode::kAllGather:
      plan.bytes_sent_fwd = peers * 2 * kv_pool;
      plan.bytes_sent_bwd = peers * 2 * kv_pool32;
      plan.keys_per_query = exact_keys_per_query(shape);
      plan.activation_bytes = local_io + z.p * 2 * kv_pool + z.p * 2 * kv_pool32;
      break;
    case AttentionMode::kClustered: {
      if (o.clusters == ClusterKind::kSurrogate) {
        plan_surrogate(shape, o, z, plan);
        break;
      }
      // Figures at the cap: an upper bound of the mean over ranks (every fetched block is sent by one
      // rank and received by another; a rank whose blocks are popular sends more than the mean).
      const std::int64_t block = o.coarse_block();
      const std::int64_t blocks_total = z.n / block, blocks_loc = z.n_loc / block;
      const std::int64_t summary = 4 * z.d * z.e;  // mean k, mean v, min, max (blocks are whole: no counts)
      const std::int64_t block_kv = block * z.d * z.e * 2;
      const std::int64_t fetch = o.resolved_remote_cap();
      const std::int64_t cap = z.p > 1 ? std::min<std::int64_t>(shape.causal ? fetch : o.remote_blocks,
                                                                blocks_total - blocks_loc) : 0;
      const std::int64_t halo_sides = z.p > 1 ? (shape.causal ? 1 : 2) : 0;  // an interior rank's; edges send less
      const std::int64_t summaries = peers * z.b * blocks_loc * z.hk * summary;
      const std::int64_t halo = halo_sides * z.b * z.hk * block_kv;
      // One count per (element, KV head) per ring step, then the ids of the blocks wanted.
      const std::int64_t requests = z.p > 1 ? z.b * z.hk * (peers + cap) * 4 : 0;
      const std::int64_t pages = z.b * z.hk * cap * block_kv;  // page summaries are recomputed on arrival
      plan.bytes_sent_fwd = summaries + halo + requests + pages;
      // fp32 dK,dV of fetched and halo blocks home (page-summary gradients folded in), and the
      // reduce-scatter of every coarse summary's (mean key, mean value) gradient.
      const std::int64_t block_grad = block * z.d * kF32 * 2;
      plan.bytes_sent_bwd = z.b * z.hk * (cap + halo_sides) * block_grad +
                            z.b * z.hk * (blocks_total - blocks_loc) * 2 * z.d * kF32;
      // Window + selected pages + page summaries of the partly selected blocks + coarse summaries.
      const double window = shape.causal ? o.window_before + kQueryTile / 2.0 : 2.0 * o.window_bidir + kQueryTile;
      const double selected = static_cast<double>(o.top_k) * o.page_size;
      const double page_summaries = std::max(0, std::min(o.top_k, o.coarse_k) * o.coarse_pages - o.top_k);
      const double coarse = static_cast<double>(blocks_total) * (shape.causal ? 0.5 : 1.0);
      plan.keys_per_query = std::min(window + selected + page_summaries + coarse, exact_keys_per_query(shape));
      const std::int64_t pages_loc = z.n_loc / o.page_size;
      plan.activation_bytes = local_io + z.b * z.hk * (blocks_total + pages_loc) * summary + halo + pages +
                              z.b * (z.n_loc / kQueryTile) * z.hk * (o.top_k + 8) * 48;  // + block tables
      break;
    }
  }
  // The input checks gather one count per checked tensor from every rank (q, k, v; then d_o).
  if (o.check_inputs) {
    plan.bytes_sent_fwd += peers * 3 * 8;
    plan.bytes_sent_bwd += peers * 1 * 8;
  }
  // Every mode's exchanges are symmetric over the ranks: what one rank sends, another receives
  // (clustered: on the mean over ranks).
  plan.bytes_recv_fwd = plan.bytes_sent_fwd;
  plan.bytes_recv_bwd = plan.bytes_sent_bwd;
  plan.attention_flops_fwd = 4.0 * z.b * z.n_loc * plan.keys_per_query * z.d * z.h;
  return plan;
}

}  // namespace ringcast
