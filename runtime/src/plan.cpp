// Formulas of plan.hpp. Every term names the message it stands for; the figures are per rank and
// per layer, summed over the batch.
#include "attention_internal.hpp"
#include "clustered_tables.hpp"

#include <ringcast/error.hpp>
#include <ringcast/kernels/attention.hpp>
#include <ringcast/kernels/grouped_rows.hpp>
#include <ringcast/kernels/selection.hpp>
#include <ringcast/kernels/summaries.hpp>
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
  // Everything travels in fp32: the pools the blocks leave from are fp32 on both backends (on CUDA an
  // attention copy in the storage dtype sits beside them).
  const std::int64_t summaries = peers * units * blocks_loc * (4 * z.d * kF32 + 4);  // + the block's count
  const std::int64_t requests = z.p > 1 ? units * (peers + cap) * 4 : 0;
  const std::int64_t block = (cp * ps * z.d * 2 + cp * 2 * z.d) * kF32 + cp * 4;  // K,V, page summaries, counts
  plan.bytes_sent_fwd = summaries + requests + units * cap * block;
  const std::int64_t block_grad = (cp * ps * z.d * 2 + cp * 2 * z.d) * kF32;
  plan.bytes_sent_bwd = units * cap * block_grad + units * (blocks_total - blocks_loc) * 2 * z.d * kF32;
  // Own cluster + selected clusters + the other clusters of the own block and of partly selected
  // blocks (page summaries) + coarse summaries.
  const double selected = static_cast<double>(o.top_k) * ps;
  const double page_summaries = (cp - 1) + std::max<std::int64_t>(0, std::min<std::int64_t>(o.top_k, o.coarse_k) * cp - o.top_k);
  plan.keys_per_query = std::min(ps + selected + page_summaries + static_cast<double>(blocks_total),
                                 exact_keys_per_query(shape));
  const std::int64_t pools = units * (c + cap * cp) * ps * z.d * 2 * (kF32 + (z.e < kF32 ? z.e : 0));
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
      // mean k, mean v, min, max, fp32 on both backends (blocks are whole: no counts)
      const std::int64_t summary = 4 * z.d * kF32;
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

namespace {

// attention_workspace_bytes(), term by term. Every figure is one allocation of the mode's
// constructor (or, for clustered tables, of its forward), in its order.
constexpr std::int64_t kEntry = sizeof(kernels::BlockEntry), kRef = sizeof(kernels::PageRef);
constexpr std::int64_t kMeta = sizeof(kernels::KeyMeta), kI64 = 8, kI32 = 4;

// The attention kernels' own workspace for one call of `s`: the CPU kernels' per-thread scratch, or
// the CUDA kernels' (attention_cuda.cu: none forward, the backward's per-row delta, 256-byte aligned).
std::int64_t kernel_workspace(const kernels::AttentionShape& s, DeviceKind device) {
  if (device == DeviceKind::kCpu) {
    const kernels::ExecContext cpu{};
    return static_cast<std::int64_t>(kernels::attention_forward_workspace_bytes(s, cpu) +
                                     kernels::attention_backward_workspace_bytes(s, cpu));
  }
  const std::int64_t delta = std::int64_t{s.batch} * s.heads * s.seq_q * kF32;
  return (delta + 255) / 256 * 256;
}

// A dense table (kernels::dense_table) and its transpose as DeviceTables holds them: queries at
// q_pos (tiles of kQueryTile rows), keys in `ranges` of (first position, count), pages of kPage.
std::int64_t dense_table_bytes(const kernels::AttentionShape& s, const std::vector<std::int32_t>& q_pos,
                               const std::vector<std::pair<std::int64_t, std::int64_t>>& ranges, bool causal) {
  const std::int64_t ps = s.page_size, tiles = s.num_tiles();
  std::int64_t per_head = 0;  // entries of one KV head (the builder copies them for every head)
  for (std::int64_t t = 0; t < tiles; ++t) {
    const auto first = q_pos.begin() + t * kQueryTile;
    const auto end = std::min<std::int64_t>((t + 1) * kQueryTile, static_cast<std::int64_t>(q_pos.size()));
    const auto last = q_pos.begin() + end;
    const std::int64_t t_max = *std::max_element(first, last);
    for (const auto& [pos0, count] : ranges) {
      const std::int64_t pages = (count + ps - 1) / ps;
      per_head += !causal ? pages : t_max < pos0 ? 0 : std::min(pages, (t_max - pos0) / ps + 1);
    }
  }
  const std::int64_t entries = per_head * s.kv_heads * s.batch;
  return (s.batch * tiles * s.kv_heads + 1) * kI64 + entries * (kEntry + kRef) + (s.kv_heads * s.num_pages + 1) * kI64;
}

std::vector<std::pair<std::int64_t, std::int64_t>> key_ranges(const Segments& seg) {
  std::vector<std::pair<std::int64_t, std::int64_t>> out;
  for (const std::int32_t p : seg.pos0) out.emplace_back(p, seg.len);
  return out;
}

// attention_ring.cpp (ring and all-gather), for rank r.
std::int64_t ring_workspace(const LayerShape& sh, const AttentionOptions& o, int r, DeviceKind device) {
  const std::int64_t n = sh.local_len(), d = sh.head_dim, e = static_cast<std::int64_t>(dtype_size(sh.dtype));
  const bool gather = o.mode == AttentionMode::kAllGather;
  const Segments local = shard_segments(sh, o, r, kExactPageSize);
  const kernels::AttentionShape k{1, n, sh.heads, sh.kv_heads, sh.head_dim, kExactPageSize, local.pages()};
  const std::vector<std::int32_t> pos = shard_positions(sh, o, r);
  std::int64_t bytes = n * kI32;  // q_pos
  for (int src = 0; src < sh.ranks; ++src)
    bytes += dense_table_bytes(k, pos, key_ranges(shard_segments(sh, o, src, kExactPageSize)), sh.causal);
  const std::int64_t block = 2 * std::int64_t{sh.batch} * sh.kv_heads * local.pages() * kExactPageSize * d;
  const std::int64_t blocks = gather ? sh.ranks : 2;
  bytes += blocks * block * (e + kF32) + (gather ? block * (e + kF32) : 0);
  const std::int64_t rows = std::int64_t{sh.batch} * n * sh.heads;
  bytes += 3 * rows * d * kF32 + 2 * rows * kF32;  // o_acc, o_part, dq_acc; lse_acc, lse_part
  return bytes + kernel_workspace(k, device);
}

// attention_ulysses.cpp.
std::int64_t ulysses_workspace(const LayerShape& sh, const AttentionOptions& o, DeviceKind device) {
  const std::int64_t p = sh.ranks, g = o.resolved_pipeline_groups(sh), n = sh.seq_len, d = sh.head_dim;
  const std::int64_t hqg = sh.heads / p / g, hkqg = sh.kv_heads / p / g;
  const std::int64_t e = static_cast<std::int64_t>(dtype_size(sh.dtype));
  std::vector<std::int32_t> all_pos;
  std::vector<std::pair<std::int64_t, std::int64_t>> ranges;
  std::int64_t pages = 0;
  for (int src = 0; src < sh.ranks; ++src) {
    const Segments seg = shard_segments(sh, o, src, kExactPageSize);
    const auto r = key_ranges(seg);
    ranges.insert(ranges.end(), r.begin(), r.end());
    pages += seg.pages();
    const auto pos = shard_positions(sh, o, src);
    all_pos.insert(all_pos.end(), pos.begin(), pos.end());
  }
  const kernels::AttentionShape k{1, n, static_cast<int>(hqg), static_cast<int>(hkqg), sh.head_dim, kExactPageSize,
                                  pages};
  std::int64_t bytes = n * kI32 + dense_table_bytes(k, all_pos, ranges, sh.causal);
  const std::int64_t n_loc = sh.local_len(), b = sh.batch;
  const std::int64_t block = b * n_loc * (hqg + 2 * hkqg) * d;  // per peer and group: Q | K | V
  const std::int64_t q_group = b * n * hqg * d, lse_group = b * hqg * n;
  const std::int64_t pool = g * b * hkqg * pages * kExactPageSize * d;
  bytes += 2 * g * p * block * kF32;                 // send, recv
  bytes += 3 * g * q_group * e + g * q_group * kF32;  // Q, O, dO head shards; fp32 dQ
  bytes += 3 * g * lse_group * kF32;                  // LSE head shard, send, recv
  bytes += 2 * pool * (e + kF32);                     // K/V pool, fp32 dK/dV pool
  return bytes + kernel_workspace(k, device);
}

// Rank r's clustered layout with no fetched block and the largest fetch capacity (attention_clustered.cpp).
kernels::ClusteredLayout clustered_base(const LayerShape& sh, const AttentionOptions& o, int r) {
  const bool causal = sh.causal;
  const std::int64_t p = sh.ranks;
  kernels::ClusteredLayout base;
  base.page_size = o.page_size;
  base.coarse_pages = o.coarse_pages;
  base.n = sh.seq_len;
  base.n_loc = sh.local_len();
  base.first_pos = r * base.n_loc;  // clustered placement is contiguous
  base.halo_before = r > 0 ? base.first_block() - 1 : -1;
  base.halo_after = !causal && r + 1 < p ? base.first_block() + base.local_blocks() : -1;
  const std::int64_t remote = base.num_blocks() - base.local_blocks() - base.halo_pages() / o.coarse_pages;
  const std::int64_t limit = causal ? o.resolved_remote_cap() : o.remote_blocks;
  base.fetch_capacity = std::min(limit, remote);
  return base;
}

// The attention's row order of the clustered mode (attention_clustered.cpp): grouped under GQA with
// per-row selection.
kernels::GroupedRows clustered_rows(const LayerShape& sh, const AttentionOptions& o) {
  return {sh.local_len(), sh.heads, sh.kv_heads, sh.head_dim,
          kernels::GroupedRows::group_for(sh.heads, sh.kv_heads, o.resolved_selection(sh) == SelectionUnit::kRow)};
}

// The tables of one clustered forward of rank r (clustered_tables.cpp), bounded per element. Entries
// per (attention tile, KV head): the window's pages and two more on each side, the selected pages, the
// summary pages that hold partly selected blocks' page summaries, and every coarse-summary page;
// summary pages carry page_size KeyMeta records. A tile's lists are the union of `choosers` different
// choices (1: the tokens of a tile agree, as tile selection makes them; up to its kQueryTile / G
// tokens with row selection), at most the resident pages and blocks there are.
std::int64_t clustered_table_bytes(const LayerShape& sh, const AttentionOptions& o, int r, std::int64_t choosers) {
  const kernels::ClusteredLayout base = clustered_base(sh, o, r);
  const std::int64_t ps = o.page_size, hk = sh.kv_heads;
  const std::int64_t window = sh.causal ? o.window_before : 2 * o.window_bidir;
  const std::int64_t blocks = std::min(choosers * o.coarse_k, base.num_blocks());
  const std::int64_t summary_pages = (blocks * o.coarse_pages + ps - 1) / ps + 1 + base.coarse_summary_pages();
  const std::int64_t selected = std::min(choosers * o.top_k, base.resident_pages());
  const std::int64_t per_unit = (window + kQueryTile) / ps + 4 + selected + summary_pages;
  const std::int64_t tile_units = clustered_rows(sh, o).attention_shape(o.page_size, 0).num_tiles() * hk;
  const std::int64_t table = (tile_units + 1) * kI64 + tile_units * per_unit * (kEntry + kRef) +
                             tile_units * summary_pages * ps * kMeta + (hk * base.num_pages() + 1) * kI64;
  return sh.batch * table;
}

// attention_clustered.cpp, for rank r, and a bound on the tables of one forward whose tiles' rows agree.
std::int64_t clustered_workspace(const LayerShape& sh, const AttentionOptions& o, int r, DeviceKind device) {
  const std::int64_t p = sh.ranks, d = sh.head_dim, ps = o.page_size, b = sh.batch, hk = sh.kv_heads;
  const kernels::ClusteredLayout base = clustered_base(sh, o, r);
  const std::int64_t limit = sh.causal ? o.resolved_remote_cap() : o.remote_blocks;
  const kernels::SummaryShape summary{sh.batch, sh.local_len(), sh.kv_heads, sh.head_dim, o.page_size, o.coarse_pages};
  constexpr std::int64_t kFields = 4;  // mean key, mean value, min, max
  const std::int64_t e = static_cast<std::int64_t>(dtype_size(sh.dtype));
  const std::int64_t max_pages = base.num_pages(), page_elems = ps * d, block_elems = o.coarse_block() * d;
  const std::int64_t pool = b * 2 * hk * max_pages * page_elems * kF32;
  const std::int64_t loc_rows = b * base.local_blocks();
  // The fp32 pool; its gradients have their own pool on fp32 storage (CPU) and reuse it otherwise.
  const bool f32 = sh.dtype == DType::kF32;
  std::int64_t bytes = (f32 ? 2 : 1) * pool;                                // pools, own_d_pools
  bytes += b * hk * max_pages * ps * kF32;                                  // key_bias
  bytes += (kFields + 2) * hk * summary.page_rows() * d * kF32;             // page_sums, d_page_sums
  bytes += summary.batch * summary.num_pages() * kI32 + loc_rows * kI32;    // page_counts, block_counts
  bytes += (kFields + 2) * hk * summary.block_rows() * d * kF32;            // block_sums, d_block_sums
  bytes += (1 + p) * kFields * hk * loc_rows * d * kF32;                    // gather send, recv
  bytes += b * hk * kFields * base.num_blocks() * d * kF32;                 // coarse
  bytes += 2 * base.page_summary_pages() * page_elems * kF32;               // bounds
  const kernels::SummaryShape arrived{1, (base.resident_pages() - base.local_pages()) * ps, 1, sh.head_dim, o.page_size,
                                      o.coarse_pages};
  bytes += kFields * arrived.page_rows() * d * kF32 + arrived.num_pages() * kI32;  // arrived sums, counts
  // Two stage slots (double-buffered over units), each the gradients one (element, KV head) gets
  // back: the halo's two blocks and at most min(limit, local blocks) from every peer.
  const std::int64_t stage_blocks = p > 1 ? 2 + (p - 1) * std::min(limit, base.local_blocks()) : 0;
  bytes += 2 * stage_blocks * 2 * block_elems * kF32;                       // stage
  bytes += 2 * b * hk * (1 + base.fetch_capacity) * kI32;                   // requests
  bytes += p > 1 ? (sh.causal ? 1 : 2) * b * 2 * block_elems * hk * e : 0;   // halo stage
  bytes += (p + 1) * 2 * hk * loc_rows * d * kF32;                          // scatter send, recv
  const kernels::GroupedRows rows = clustered_rows(sh, o);
  bytes += base.n_loc * rows.group() * kI32;                                // q_pos
  // Grouped rows: Q, O, dO when they move; the LSE.
  bytes += ((rows.moves_rows() ? 3 * e * d : 0) + (rows.grouped() ? kF32 : 0)) * base.n_loc * sh.heads;
  const kernels::AttentionShape widest = rows.attention_shape(o.page_size, max_pages);
  bytes += kernel_workspace(widest, device);
  const std::int64_t units = o.resolved_selection(sh) == SelectionUnit::kRow ? base.n_loc : base.num_tiles();
  // The fp32 dQ; on CUDA it holds every element's selection slots and one KV head group's queries in
  // the forward. CUDA: attn_pools (the fp32 K/V inputs reuse the fp32 pool).
  kernels::SelectionOptions sel;
  sel.top_k = o.top_k;
  sel.coarse_k = o.coarse_k;
  const std::int64_t group_queries = base.n_loc * (sh.heads / hk) * d * kF32;
  const std::int64_t forward_use = f32 ? 0 : b * ClusteredTables::slot_bytes(sel, units, sh.kv_heads) + group_queries;
  bytes += std::max(b * base.n_loc * sh.heads * d * kF32, forward_use);
  if (!f32) bytes += pool / kF32 * e;
  return bytes + clustered_table_bytes(sh, o, r, 1);
}

}  // namespace

std::int64_t row_union_extra_bytes(const LayerShape& shape, const AttentionOptions& o) {
  validate(shape, o);
  if (o.mode != AttentionMode::kClustered || o.clusters != ClusterKind::kBlocks ||
      o.resolved_selection(shape) != SelectionUnit::kRow)
    return 0;
  std::int64_t most = 0;
  const std::int64_t tokens_per_tile = kQueryTile / clustered_rows(shape, o).group();
  for (int r = 0; r < shape.ranks; ++r)
    most = std::max(most, clustered_table_bytes(shape, o, r, tokens_per_tile) - clustered_table_bytes(shape, o, r, 1));
  return most;
}

std::int64_t attention_workspace_bytes(const LayerShape& shape, const AttentionOptions& o, DeviceKind device) {
  validate(shape, o);
  RINGCAST_CHECK(o.clusters != ClusterKind::kSurrogate,
                 "attention_workspace_bytes: surrogate clusters (CAST) are not estimated");
  if (o.mode == AttentionMode::kUlysses) return ulysses_workspace(shape, o, device);
  std::int64_t most = 0;
  for (int r = 0; r < shape.ranks; ++r)
    most = std::max(most, o.mode == AttentionMode::kClustered ? clustered_workspace(shape, o, r, device)
                                                              : ring_workspace(shape, o, r, device));
  return most;
}

}  // namespace ringcast
