// Routes the selection building blocks (summaries, CAST, routing, pooling, clustered page selection,
// the surrogate clusters' cluster operations) to their backend after validating the
// parameters once. Both backends implement every family; the
// device-resident selection and tables of selection_device.hpp exist on CUDA only, and shapes past a
// CUDA kernel's limits are reported "not supported" by that kernel rather than run somewhere else.
#include <ringcast/error.hpp>
#include <ringcast/kernels/cast.hpp>
#include <ringcast/kernels/cluster_ops.hpp>
#include <ringcast/kernels/pooling.hpp>
#include <ringcast/kernels/routing.hpp>
#include <ringcast/kernels/selection.hpp>
#include <ringcast/kernels/selection_device.hpp>
#include <ringcast/kernels/summaries.hpp>

#include "dispatch_checks.hpp"
#include "cpu/cluster_ops_cpu.hpp"
#include "cpu/selection_cpu.hpp"
#if RINGCAST_WITH_CUDA
#include "cuda/cluster_ops_cuda.hpp"
#include "cuda/seed_cuda.hpp"
#include "cuda/selection_cuda.hpp"
#endif

#include <algorithm>
#include <initializer_list>

namespace ringcast::kernels {
namespace {

void validate(const SummaryShape& s, const char* op) {
  RINGCAST_CHECK(s.batch >= 1 && s.seq >= 1 && s.kv_heads >= 1 && s.head_dim >= 1,
                 "{}: batch, seq, kv_heads and head_dim must be positive (got {}, {}, {}, {})", op, s.batch, s.seq,
                 s.kv_heads, s.head_dim);
  RINGCAST_CHECK(s.page_size >= 1 && s.coarse_pages >= 1, "{}: page_size ({}) and coarse_pages ({}) must be positive",
                 op, s.page_size, s.coarse_pages);
}

void validate(const CastShape& s, const char* op) {
  RINGCAST_CHECK(s.batch >= 1 && s.seq >= 1 && s.head_dim >= 1 && s.clusters >= 1 && s.page_size >= 1,
                 "{}: batch, seq, head_dim, clusters and page_size must be positive (got {}, {}, {}, {}, {})", op,
                 s.batch, s.seq, s.head_dim, s.clusters, s.page_size);
  RINGCAST_CHECK(s.kv_heads >= 1 && s.heads >= s.kv_heads && s.heads % s.kv_heads == 0,
                 "{}: heads ({}) must be a positive multiple of kv_heads ({})", op, s.heads, s.kv_heads);
}

void validate_router(int batch, std::int64_t seq, int dim, const char* op) {
  RINGCAST_CHECK(batch >= 1 && seq >= 1 && dim >= 1, "{}: batch, seq and dim must be positive (got {}, {}, {})", op,
                 batch, seq, dim);
}

void validate_soft_topk(int batch, std::int64_t seq, int k, float epsilon, int iterations, const SliceAllReduce& r,
                        const char* op) {
  RINGCAST_CHECK(batch >= 1 && seq >= 1, "{}: batch and seq must be positive (got {}, {})", op, batch, seq);
  RINGCAST_CHECK(epsilon > 0.0f && iterations >= 1, "{}: need epsilon > 0 and iterations >= 1 (got {}, {})", op,
                 epsilon, iterations);
  RINGCAST_CHECK(k >= 1 && (r.fn || k <= seq), "{}: k = {} must lie in [1, seq = {}]", op, k, seq);
}

void validate(const HalvingShape& s, const char* op) {
  RINGCAST_CHECK(s.batch >= 1 && s.seq >= 1 && s.dim >= 1 && s.rounds >= 1,
                 "{}: batch, seq, dim and rounds must be positive (got {}, {}, {}, {})", op, s.batch, s.seq, s.dim,
                 s.rounds);
  RINGCAST_CHECK(s.beta > 0.0f, "{}: beta must be positive (got {})", op, s.beta);
}

void validate_selection(const ClusteredLayout* layout, const SelectionOptions& o, const SelectionQueries& q,
                        const char* op) {
  RINGCAST_CHECK(layout != nullptr, "{}: layout is null", op);
  layout->validate();
  RINGCAST_CHECK(o.top_k >= 0 && o.coarse_k >= 0 && o.remote_blocks >= 0 && o.remote_cap >= 0,
                 "{}: top_k ({}), coarse_k ({}), remote_blocks ({}) and remote_cap ({}) must be >= 0", op, o.top_k,
                 o.coarse_k, o.remote_blocks, o.remote_cap);
  // Windows reach at most one block past the shard: that is what the halo holds.
  RINGCAST_CHECK(o.window >= 0 && o.window <= layout->block_keys(),
                 "{}: window {} must lie in [0, {}] (one coarse block)", op, o.window, layout->block_keys());
  RINGCAST_CHECK(q.q && q.head_dim >= 1 && q.kv_heads >= 1 && q.heads % q.kv_heads == 0 && q.kv_head >= 0 &&
                     q.kv_head < q.kv_heads,
                 "{}: need queries, head_dim >= 1, heads ({}) a multiple of kv_heads ({}), kv_head ({}) in range",
                 op, q.heads, q.kv_heads, q.kv_head);
}

void validate_blocks(std::int64_t blocks, int coarse_pages, int head_dim, const char* op) {
  RINGCAST_CHECK(blocks >= 0 && coarse_pages >= 1 && head_dim >= 1,
                 "{}: blocks ({}) must be >= 0, coarse_pages ({}) and head_dim ({}) positive", op, blocks, coarse_pages,
                 head_dim);
}

void validate(const ClusterMembers& m, const char* op) {
  RINGCAST_CHECK(m.batch >= 1 && m.kv_heads >= 1 && m.seq >= 1 && m.clusters >= 1 && m.page_size >= 1,
                 "{}: batch, kv_heads, seq, clusters and page_size must be positive (got {}, {}, {}, {}, {})", op,
                 m.batch, m.kv_heads, m.seq, m.clusters, m.page_size);
  require_pointers(op, {m.members, m.counts});
}

void require_summaries(const SummaryRows& rows, SelectScore score, const char* what, const char* op) {
  const bool ok = score == SelectScore::kMean ? rows.mean != nullptr : rows.min && rows.max;
  RINGCAST_CHECK(ok, "{}: {} summaries lack the {} the score needs", op, what,
                 score == SelectScore::kMean ? "means" : "minima and maxima");
}

}  // namespace

void page_summaries(const PageSummaryParams& p, const ExecContext& ctx) {
  constexpr const char* kOp = "page_summaries";
  validate(p.shape, kOp);
  require_pointers(kOp, {p.k, p.v, p.pages.key_mean, p.pages.value_mean, p.pages.key_min, p.pages.key_max,
                         p.pages.count});
  RINGCAST_ROUTE(ctx, page_summaries, (p), (p, ctx.stream));
}

void coarse_summaries(const CoarseSummaryParams& p, const ExecContext& ctx) {
  constexpr const char* kOp = "coarse_summaries";
  validate(p.shape, kOp);
  require_pointers(kOp, {p.page_key_mean, p.page_value_mean, p.page_key_min, p.page_key_max, p.page_count,
                         p.blocks.key_mean, p.blocks.value_mean, p.blocks.key_min, p.blocks.key_max, p.blocks.count});
  RINGCAST_ROUTE(ctx, coarse_summaries, (p), (p, ctx.stream));
}

void page_summaries_backward(const PageSummaryBackwardParams& p, const ExecContext& ctx) {
  constexpr const char* kOp = "page_summaries_backward";
  validate(p.shape, kOp);
  require_pointers(kOp, {p.d_key_mean, p.d_value_mean, p.d_k, p.d_v});
  RINGCAST_ROUTE(ctx, page_summaries_backward, (p), (p, ctx.stream));
}

void coarse_summaries_backward(const CoarseSummaryBackwardParams& p, const ExecContext& ctx) {
  constexpr const char* kOp = "coarse_summaries_backward";
  validate(p.shape, kOp);
  require_pointers(kOp, {p.d_block_key_mean, p.d_block_value_mean, p.d_page_key_mean, p.d_page_value_mean});
  RINGCAST_ROUTE(ctx, coarse_summaries_backward, (p), (p, ctx.stream));
}

void cast_affinities(const CastAffinityParams& p, const ExecContext& ctx) {
  constexpr const char* kOp = "cast_affinities";
  validate(p.shape, kOp);
  require_pointers(kOp, {p.q, p.k, p.surrogates, p.a_q, p.a_k});
  RINGCAST_ROUTE(ctx, cast_affinities, (p), (p, ctx));
}

void cast_affinities_backward(const CastAffinityBackwardParams& p, const ExecContext& ctx) {
  constexpr const char* kOp = "cast_affinities_backward";
  validate(p.shape, kOp);
  require_pointers(kOp, {p.q, p.k, p.surrogates, p.d_a_q, p.d_a_k, p.d_q, p.d_k, p.d_surrogates});
  RINGCAST_ROUTE(ctx, cast_affinities_backward, (p), (p, ctx));
}

void cast_assign(const CastAssignParams& p, const ExecContext& ctx) {
  constexpr const char* kOp = "cast_assign";
  validate(p.shape, kOp);
  require_pointers(kOp, {p.a_q, p.a_k, p.members, p.counts});
  RINGCAST_ROUTE(ctx, cast_assign, (p), (p, ctx));
}

void cast_gather(const CastGatherParams& p, const ExecContext& ctx) {
  constexpr const char* kOp = "cast_gather";
  validate(p.shape, kOp);
  require_pointers(kOp, {p.members, p.counts, p.q, p.k, p.v, p.q_gathered, p.k_pages, p.v_pages});
  RINGCAST_ROUTE(ctx, cast_gather, (p), (p, ctx));
}

void cast_gather_backward(const CastGatherBackwardParams& p, const ExecContext& ctx) {
  constexpr const char* kOp = "cast_gather_backward";
  validate(p.shape, kOp);
  require_pointers(kOp, {p.members, p.counts, p.d_q_gathered, p.d_k_pages, p.d_v_pages, p.d_q, p.d_k, p.d_v});
  RINGCAST_ROUTE(ctx, cast_gather_backward, (p), (p, ctx));
}

void cast_summaries(const CastSummaryParams& p, const ExecContext& ctx) {
  constexpr const char* kOp = "cast_summaries";
  validate(p.shape, kOp);
  require_pointers(kOp, {p.members, p.counts, p.a_k, p.k, p.v, p.key_summary, p.value_summary});
  RINGCAST_ROUTE(ctx, cast_summaries, (p), (p, ctx));
}

void cast_summaries_backward(const CastSummaryBackwardParams& p, const ExecContext& ctx) {
  constexpr const char* kOp = "cast_summaries_backward";
  validate(p.shape, kOp);
  require_pointers(kOp, {p.members, p.counts, p.a_k, p.k, p.v, p.d_key_summary, p.d_value_summary, p.d_a_k, p.d_k,
                         p.d_v});
  RINGCAST_ROUTE(ctx, cast_summaries_backward, (p), (p, ctx));
}

void cast_mix(const CastMixParams& p, const ExecContext& ctx) {
  constexpr const char* kOp = "cast_mix";
  validate(p.shape, kOp);
  require_pointers(kOp, {p.members, p.counts, p.a_q, p.intra, p.value_summary, p.o});
  RINGCAST_ROUTE(ctx, cast_mix, (p), (p, ctx));
}

void cast_mix_backward(const CastMixBackwardParams& p, const ExecContext& ctx) {
  constexpr const char* kOp = "cast_mix_backward";
  validate(p.shape, kOp);
  require_pointers(kOp, {p.members, p.counts, p.a_q, p.intra, p.value_summary, p.d_o, p.d_a_q, p.d_intra,
                         p.d_value_summary});
  RINGCAST_ROUTE(ctx, cast_mix_backward, (p), (p, ctx));
}

void router_scores(const RouterScoreParams& p, const ExecContext& ctx) {
  constexpr const char* kOp = "router_scores";
  validate_router(p.batch, p.seq, p.dim, kOp);
  require_pointers(kOp, {p.x, p.u, p.s});
  RINGCAST_ROUTE(ctx, router_scores, (p), (p, ctx));
}

void router_scores_backward(const RouterScoreBackwardParams& p, const ExecContext& ctx) {
  constexpr const char* kOp = "router_scores_backward";
  validate_router(p.batch, p.seq, p.dim, kOp);
  require_pointers(kOp, {p.x, p.u, p.d_s, p.d_x, p.d_u});
  RINGCAST_ROUTE(ctx, router_scores_backward, (p), (p, ctx));
}

void soft_topk(const SoftTopkParams& p, const ExecContext& ctx) {
  constexpr const char* kOp = "soft_topk";
  validate_soft_topk(p.batch, p.seq, p.k, p.epsilon, p.iterations, p.reduce, kOp);
  require_pointers(kOp, {p.s, p.s_tilde, p.a_history});
  RINGCAST_CHECK(!(p.top_indices && p.reduce.fn),
                 "{}: the hard top-k of a sequence split across ranks needs the whole sequence; pass "
                 "top_indices = nullptr with a reduction and select globally",
                 kOp);
  RINGCAST_ROUTE(ctx, soft_topk, (p), (p, ctx));
}

void soft_topk_backward(const SoftTopkBackwardParams& p, const ExecContext& ctx) {
  constexpr const char* kOp = "soft_topk_backward";
  validate_soft_topk(p.batch, p.seq, p.k, p.epsilon, p.iterations, p.reduce, kOp);
  require_pointers(kOp, {p.s, p.a_history, p.d_s_tilde, p.d_s});
  RINGCAST_ROUTE(ctx, soft_topk_backward, (p), (p, ctx));
}

void halving_pool(const HalvingParams& p, const ExecContext& ctx) {
  constexpr const char* kOp = "halving_pool";
  validate(p.shape, kOp);
  require_pointers(kOp, {p.e, p.s, p.e_out, p.s_out});
  RINGCAST_ROUTE(ctx, halving_pool, (p), (p, ctx));
}

void halving_pool_backward(const HalvingBackwardParams& p, const ExecContext& ctx) {
  constexpr const char* kOp = "halving_pool_backward";
  validate(p.shape, kOp);
  require_pointers(kOp, {p.e, p.s, p.d_e_out, p.d_s_out, p.d_e, p.d_s});
  RINGCAST_ROUTE(ctx, halving_pool_backward, (p), (p, ctx));
}

RemoteSelection select_remote_blocks(const RemoteSelectionParams& p, const ExecContext& ctx) {
  constexpr const char* kOp = "select_remote_blocks";
  validate_selection(p.layout, p.options, p.queries, kOp);
  require_summaries(p.coarse, p.options.score, "coarse", kOp);
  RINGCAST_ROUTE(ctx, select_remote_blocks, (p), (p, ctx.stream));
}

namespace {

void validate_select_pages(const SelectionParams& p, const char* op) {
  validate_selection(p.layout, p.options, p.queries, op);
  require_summaries(p.coarse, p.options.score, "coarse", op);
  require_summaries(p.pages, p.options.score, "page", op);
  const ClusteredLayout& L = *p.layout;
  if (!p.usable_offsets.empty()) {
    RINGCAST_CHECK(p.usable_offsets.size() == static_cast<std::size_t>(L.num_tiles()) + 1 &&
                       p.usable_offsets.front() == 0 &&
                       p.usable_offsets.back() == static_cast<std::int64_t>(p.usable.size()) &&
                       std::is_sorted(p.usable_offsets.begin(), p.usable_offsets.end()),
                   "{}: usable_offsets must be a CSR over the {} tiles of {} blocks", op, L.num_tiles(),
                   p.usable.size());
  }
  for (const std::int64_t b : p.usable) {
    RINGCAST_CHECK(std::find(L.fetched.begin(), L.fetched.end(), b) != L.fetched.end(),
                   "{}: a tile may use remote block {}, which the layout did not fetch", op, b);
  }
}

// The device-resident calls exist on the CUDA backend only; the CPU backend has the host functions.
void require_cuda(const ExecContext& ctx, const char* op, const char* host_function) {
  RINGCAST_CHECK(ctx.device.kind == DeviceKind::kCuda, "{}: not supported on the CPU backend (use {})", op,
                 host_function);
}

}  // namespace

ClusteredSelection select_pages(const SelectionParams& p, const ExecContext& ctx) {
  constexpr const char* kOp = "select_pages";
  validate_select_pages(p, kOp);
  RINGCAST_ROUTE(ctx, select_pages, (p), (p, ctx.stream));
}

void select_pages_to_slots(const SelectionParams& p, const SelectionSlots& out, const ExecContext& ctx) {
  constexpr const char* kOp = "select_pages_to_slots";
  validate_select_pages(p, kOp);
  require_pointers(kOp, {out.counts});
  RINGCAST_CHECK((p.options.top_k == 0 || out.pages) && (p.options.coarse_k == 0 || out.blocks),
                 "{}: the page and block slots are required when top_k and coarse_k are positive", kOp);
  require_cuda(ctx, kOp, "select_pages");
  RINGCAST_ON_CUDA(select_pages_to_slots, (p, out, ctx.stream));
}

TableSize build_clustered_table_on_device(std::span<const ClusteredLayout> layouts, const SelectionOptions& options,
                                          std::span<const SelectionSlots> selections, const DeviceTableStorage& out,
                                          const ExecContext& ctx) {
  constexpr const char* kOp = "build_clustered_table_on_device";
  RINGCAST_CHECK(!layouts.empty() && layouts.size() == selections.size(),
                 "{}: need one layout and one selection per KV head (got {} and {})", kOp, layouts.size(),
                 selections.size());
  const ClusteredLayout& first = layouts.front();
  RINGCAST_CHECK(options.top_k >= 0 && options.window >= 0 && options.window <= first.block_keys(),
                 "{}: need top_k >= 0 and a window in [0, {}] (got {}, {})", kOp, first.block_keys(), options.top_k,
                 options.window);
  for (std::size_t g = 0; g < layouts.size(); ++g) {
    const ClusteredLayout& L = layouts[g];
    L.validate();
    RINGCAST_CHECK(L.n == first.n && L.first_pos == first.first_pos && L.n_loc == first.n_loc &&
                       L.page_size == first.page_size && L.coarse_pages == first.coarse_pages &&
                       L.num_pages() == first.num_pages(),
                   "{}: the layout of KV head {} has another pool shape than KV head 0", kOp, g);
    RINGCAST_CHECK(selections[g].counts && (options.top_k == 0 || selections[g].pages),
                   "{}: the selection of KV head {} lacks its counts or page slots", kOp, g);
  }
  RINGCAST_CHECK(out.offsets && (out.entry_capacity == 0 || out.entries) &&
                     (out.key_meta_capacity == 0 || out.key_meta),
                 "{}: the offsets, and the entries and KeyMeta records of positive capacity, need buffers", kOp);
  require_cuda(ctx, kOp, "build_clustered_table");
  RINGCAST_ON_CUDA(build_clustered_table_on_device, (layouts, options, selections, out, ctx.stream));
}

void transpose_on_device(const BlockTable& table, const AttentionShape& shape, std::int64_t* offsets, PageRef* refs,
                         const ExecContext& ctx) {
  constexpr const char* kOp = "transpose_on_device";
  RINGCAST_CHECK(shape.batch >= 1 && shape.kv_heads >= 1 && shape.num_pages >= 1 && table.num_entries >= 0,
                 "{}: need batch, kv_heads and num_pages >= 1 and num_entries >= 0", kOp);
  RINGCAST_CHECK(table.offsets && offsets && (table.num_entries == 0 || (table.entries && refs)),
                 "{}: a required buffer is null", kOp);
  require_cuda(ctx, kOp, "transpose");
  RINGCAST_ON_CUDA(transpose_on_device, (table, shape, offsets, refs, ctx.stream));
}


void page_key_bounds(const PageBoundsParams& p, const ExecContext& ctx) {
  constexpr const char* kOp = "page_key_bounds";
  RINGCAST_CHECK(p.pages >= 0 && p.page_size >= 1 && p.head_dim >= 1,
                 "{}: pages ({}) must be >= 0, page_size ({}) and head_dim ({}) positive", kOp, p.pages, p.page_size,
                 p.head_dim);
  if (p.pages == 0) return;
  require_pointers(kOp, {p.keys, p.counts, p.key_min, p.key_max});
  RINGCAST_ROUTE(ctx, page_key_bounds, (p), (p, ctx));
}

void cluster_blocks(const ClusterBlockParams& p, const ExecContext& ctx) {
  constexpr const char* kOp = "cluster_blocks";
  validate_blocks(p.blocks, p.coarse_pages, p.head_dim, kOp);
  if (p.blocks == 0) return;
  require_pointers(kOp, {p.counts, p.key_mean, p.value_mean, p.key_min, p.key_max, p.block_key_mean,
                         p.block_value_mean, p.block_key_min, p.block_key_max});
  RINGCAST_ROUTE(ctx, cluster_blocks, (p), (p, ctx));
}

void cluster_blocks_backward(const ClusterBlockBackwardParams& p, const ExecContext& ctx) {
  constexpr const char* kOp = "cluster_blocks_backward";
  validate_blocks(p.blocks, p.coarse_pages, p.head_dim, kOp);
  if (p.blocks == 0) return;
  require_pointers(kOp, {p.counts, p.d_block_key_mean, p.d_block_value_mean, p.d_key_mean, p.d_value_mean});
  RINGCAST_ROUTE(ctx, cluster_blocks_backward, (p), (p, ctx));
}

void unit_queries(const UnitQueryParams& p, const ExecContext& ctx) {
  constexpr const char* kOp = "unit_queries";
  RINGCAST_CHECK(p.head_dim >= 1 && p.kv_heads >= 1 && p.heads % p.kv_heads == 0 && p.kv_head >= 0 &&
                     p.kv_head < p.kv_heads && p.rows >= 0 && p.unit_rows >= 1,
                 "{}: need head_dim >= 1, heads ({}) a multiple of kv_heads ({}), kv_head ({}) in range, rows >= 0 and "
                 "unit_rows >= 1",
                 kOp, p.heads, p.kv_heads, p.kv_head);
  if (p.rows == 0) return;
  require_pointers(kOp, {p.q, p.order, p.out});
  RINGCAST_ROUTE(ctx, unit_queries, (p), (p, ctx));
}

void member_lse(const MemberLseParams& p, const ExecContext& ctx) {
  constexpr const char* kOp = "member_lse";
  validate(p.m, kOp);
  require_pointers(kOp, {p.a_k, p.lse});
  RINGCAST_ROUTE(ctx, member_lse, (p), (p, ctx));
}

void member_lse_merge_backward(const MemberLseMergeBackwardParams& p, const ExecContext& ctx) {
  constexpr const char* kOp = "member_lse_merge_backward";
  validate(p.m, kOp);
  RINGCAST_CHECK(p.head_dim >= 1 && p.summary_rows >= std::int64_t{p.m.batch} * p.m.clusters,
                 "{}: head_dim ({}) must be positive and summary_rows ({}) hold B * clusters", kOp, p.head_dim,
                 p.summary_rows);
  require_pointers(kOp, {p.a_k, p.lse, p.merged_lse, p.local_value, p.merged_value, p.d_merged_value,
                         p.d_local_value, p.d_a_k});
  RINGCAST_ROUTE(ctx, member_lse_merge_backward, (p), (p, ctx));
}

}  // namespace ringcast::kernels
