// The `clustered` attention mode (DESIGN.md §4.1-4.2, docs/clustered-design.md), `clusters = blocks`
// (surrogate clusters: attention_cast_mode.hpp), contiguous placement. Forward, per layer: summarise the local
// K/V; all-gather each KV head's coarse summaries while the previous head picks remote coarse blocks
// (top-R) for every batch element, and the halo beside the last head's; exchange the requests, then fetch
// each (element, KV head)'s blocks while the previous one's summaries and selection compute; build one
// table per element and attend. The pools, layouts and tables stay for the backward, which folds the page
// summaries' gradients into their pages, returns halo and fetched pages' gradients to their owners and
// reduce-scatters the coarse summaries' gradients. Summaries, selection and their pools are fp32 on both
// backends; on CUDA the bf16 / fp16 keys and values are converted once per forward and the queries one KV
// head group at a time where selection reads them, the pages also live in a storage-dtype pool (what the
// attention reads and the blocks travel in; converted region by region), and selection and tables stay on
// the device (clustered_tables.hpp). Pool buffers hold every batch element at the largest capacity; element
// b's pool is [2 (K, V)][kv_heads][num_pages_b][page_size][head_dim] at its start. Workspace by phase: on
// CUDA the fp32 pool is read by the forward only (the attention reads the storage pool), so the backward's
// fp32 gradient pool is the same buffer; the CPU's fp32 pool is the storage pool and has a gradient pool of
// its own. dK, dV are finished in the gradient pool's local pages and dQ in a buffer of the mode's, and
// written to the caller's outputs last: the backward reads q, k, v before it writes any gradient, so the
// gradients may overwrite them (in place). On CUDA the fp32 dQ buffer holds the forward's selection slots
// and one KV head group's queries, converted where selection reads them. Under GQA with per-row
// selection the attention runs on grouped rows (kernels/grouped_rows.hpp: a token's G heads are
// consecutive rows of their KV head): each element's Q, O, dO and LSE are permuted into a buffer of
// the mode's around the kernel calls, and dQ leaves the fp32 buffer for the caller's in token order
// (with one KV head only the LSE moves: the rows are already in that order).
#include "attention_internal.hpp"
#include "clustered_internal.hpp"
#include "clustered_tables.hpp"
#include "overlap.hpp"

#include <ringcast/error.hpp>
#include <ringcast/kernels/grouped_rows.hpp>
#include <ringcast/kernels/selection.hpp>
#include <ringcast/kernels/summaries.hpp>

#include <algorithm>
#include <cmath>
#include <optional>

namespace ringcast {

void check_clustered_support(const LayerShape& sh, const AttentionOptions& o) {
  RINGCAST_CHECK(o.resolved_placement(sh) == Placement::kContiguous,
                 "clustered mode: placement must be contiguous (its cost per query is flat), got {}",
                 name(o.resolved_placement(sh)));
  RINGCAST_CHECK(o.page_size <= 64,
                 "clustered mode: page size {} is not supported (at most 64: summary entries pick keys with a "
                 "64-bit mask)",
                 o.page_size);
}

namespace {

// What the forward of one batch element leaves for the backward.
struct ElementPool {
  std::vector<kernels::ClusteredLayout> layouts;  // per KV head
  std::vector<kernels::RemoteSelection> remote;   // per KV head
  kernels::AttentionShape shape;                  // batch 1, num_pages of this element
  std::optional<ClusteredTables> tables;          // rebuilt by every forward (sizes follow the selections)
};

// The forward's keys and values as the local summaries read them: fp32, on the session's device.
struct Fp32Inputs {
  const float* k;  // [B, n_loc, kv_heads, d]
  const float* v;
};

// The summary fields that travel and that selection reads, in this order.
enum Field { kMeanK, kMeanV, kMin, kMax, kFields };

class ClusteredMode final : public DistributedAttention::Mode {
 public:
  ClusteredMode(const Session& s, const LayerShape& sh, const AttentionOptions& o)
      : Mode(s, sh, o),
        rows_(sh.local_len(), sh.heads, sh.kv_heads, sh.head_dim,
              kernels::GroupedRows::group_for(sh.heads, sh.kv_heads, o.resolved_selection(sh) == SelectionUnit::kRow)),
        overlap_(s) {
    check_clustered_support(sh, o);
    const std::int64_t window = sh.causal ? o.window_before : o.window_bidir;
    RINGCAST_CHECK(window >= 0 && window <= o.coarse_block(),
                   "clustered mode: the {} window ({}) must lie in [0, {}] "
                   "(one coarse block: a window reaches at most into the halo)",
                   sh.causal ? "causal" : "bidirectional", window, o.coarse_block());
    g_.p = sh.ranks;
    g_.r = s.rank();
    g_.batch = sh.batch;
    g_.kv_heads = sh.kv_heads;
    g_.block_elems = o.coarse_block() * sh.head_dim;
    g_.page_elems = std::int64_t{o.page_size} * sh.head_dim;
    g_.head_dim = sh.head_dim;
    g_.coarse_pages = o.coarse_pages;
    g_.local_blocks = sh.local_len() / o.coarse_block();
    g_.first_block = g_.r * g_.local_blocks;
    g_.causal = sh.causal;
    g_.halo = true;

    sel_.causal = sh.causal;
    sel_.unit =
        o.resolved_selection(sh) == SelectionUnit::kRow ? kernels::SelectUnit::kRow : kernels::SelectUnit::kTile;
    sel_.score = o.score == ScoreKind::kBound ? kernels::SelectScore::kBound : kernels::SelectScore::kMean;
    sel_.top_k = o.top_k;
    sel_.coarse_k = o.coarse_k;
    sel_.window = static_cast<int>(sh.causal ? window : 2 * window);
    sel_.remote_blocks = o.remote_blocks;
    sel_.remote_cap = o.resolved_remote_cap();
    sel_.rows_per_token = rows_.group();

    base_.page_size = o.page_size;
    base_.coarse_pages = o.coarse_pages;
    base_.n = sh.seq_len;
    base_.first_pos = positions.front();
    base_.n_loc = sh.local_len();
    base_.halo_before = g_.r > 0 ? base_.first_block() - 1 : -1;
    base_.halo_after = !sh.causal && g_.r + 1 < g_.p ? base_.first_block() + base_.local_blocks() : -1;
    const std::int64_t remote = base_.num_blocks() - base_.local_blocks() - base_.halo_pages() / o.coarse_pages;
    const std::int64_t limit = sh.causal ? sel_.remote_cap : sel_.remote_blocks;
    base_.fetch_capacity = std::min(limit, remote);  // the most any KV head can fetch: sizes the buffers
    base_.validate();
    local_seg_ = shard_segments(sh, o, g_.r, o.page_size);
    summary_ = {sh.batch, sh.local_len(), sh.kv_heads, sh.head_dim, o.page_size, o.coarse_pages};

    const std::int64_t max_pages = base_.num_pages();
    g_.pool_elems = sh.kv_heads * max_pages * g_.page_elems;
    pools_ = allocate(sh.batch * 2 * g_.pool_elems * sizeof(float));
    if (sh.dtype == DType::kF32) own_d_pools_ = allocate(pools_.bytes());  // else d_pools() is pools_
    key_bias_ = allocate(sh.batch * sh.kv_heads * max_pages * o.page_size * sizeof(float));
    const std::int64_t d = sh.head_dim, loc_rows = sh.batch * g_.local_blocks;
    page_sums_ = allocate(kFields * sh.kv_heads * summary_.page_rows() * d * sizeof(float));
    page_counts_ = allocate(summary_.batch * summary_.num_pages() * sizeof(std::int32_t));
    block_sums_ = allocate(kFields * sh.kv_heads * summary_.block_rows() * d * sizeof(float));
    block_counts_ = allocate(loc_rows * sizeof(std::int32_t));
    gather_send_ = allocate(kFields * sh.kv_heads * loc_rows * d * sizeof(float));
    gather_recv_ = allocate(g_.p * gather_send_.bytes());
    coarse_ = allocate(sh.batch * sh.kv_heads * kFields * base_.num_blocks() * d * sizeof(float));
    bounds_ = allocate(2 * base_.page_summary_pages() * g_.page_elems * sizeof(float));
    const kernels::SummaryShape arrived{1, (base_.resident_pages() - base_.local_pages()) * o.page_size, 1,
                                        sh.head_dim, o.page_size, o.coarse_pages};
    arrived_sums_ = allocate(kFields * arrived.page_rows() * sh.head_dim * sizeof(float));
    arrived_counts_ = allocate(arrived.num_pages() * sizeof(std::int32_t));
    block_key_counts_.assign(static_cast<std::size_t>(base_.num_blocks()), static_cast<std::int32_t>(o.coarse_block()));
    // Gradients one (element, KV head) receives, twice: one unit lands while the next one travels.
    stage_ = allocate(2 * g_.unit_stage_elems(limit) * sizeof(float));
    requests_ = allocate(request_scratch_ints(g_, base_.fetch_capacity) * sizeof(std::int32_t));
    halo_stage_ = allocate(halo_stage_elems(g_) * dtype_size(sh.dtype));
    d_block_sums_ = allocate(2 * sh.kv_heads * summary_.block_rows() * d * sizeof(float));
    d_page_sums_ = allocate(2 * sh.kv_heads * summary_.page_rows() * d * sizeof(float));
    scatter_send_ = allocate(g_.p * 2 * sh.kv_heads * loc_rows * d * sizeof(float));
    scatter_recv_ = allocate(2 * sh.kv_heads * loc_rows * d * sizeof(float));
    const std::vector<std::int32_t> row_pos = rows_.row_positions(positions);
    q_pos_ = allocate(row_pos.size() * sizeof(std::int32_t));
    q_pos_.copy_from_host(row_pos.data(), row_pos.size() * sizeof(std::int32_t), 0, ctx.stream);
    const kernels::AttentionShape widest = rows_.attention_shape(o.page_size, max_pages);
    // Grouped rows: one element's Q, O, dO in the attention's row order (when they move), and its LSE.
    if (rows_.grouped()) grouped_ = allocate(moved_bytes(3) + sh.local_len() * sh.heads * sizeof(float));
    fwd_ws_ = allocate(kernels::attention_forward_workspace_bytes(widest, ctx));
    bwd_ws_ = allocate(kernels::attention_backward_workspace_bytes(widest, ctx));
    const std::int64_t units = sel_.unit == kernels::SelectUnit::kRow ? sh.local_len() : base_.num_tiles();
    const std::int64_t slots = ClusteredTables::slot_bytes(sel_, units, sh.kv_heads);
    // The fp32 dQ the attention backward writes, copied to the caller's d_q last (so d_q may be q
    // itself). On CUDA it holds, during the forward, every element's selection slots and then one KV
    // head group's fp32 queries (queries()).
    const std::int64_t dq_bytes = sh.batch * sh.local_len() * sh.heads * d * std::int64_t{sizeof(float)};
    const std::int64_t group_queries = sh.local_len() * (sh.heads / sh.kv_heads) * d * std::int64_t{sizeof(float)};
    const bool cuda = sh.dtype != DType::kF32;
    d_q_ = allocate(std::max(dq_bytes, cuda ? sh.batch * slots + group_queries : 0));
    if (cuda) {
      attn_pools_ = allocate(pools_.bytes() / sizeof(float) * dtype_size(sh.dtype));
      key_bias_host_.resize(key_bias_.bytes() / sizeof(float));
      q_group_ = reinterpret_cast<float*>(d_q_.as<char>() + sh.batch * slots);
    }
    elements_.resize(static_cast<std::size_t>(sh.batch));
    for (int b = 0; b < sh.batch; ++b)
      elements_[b].tables.emplace(ctx, sel_, units, sh.kv_heads, cuda ? d_q_.as<char>() + b * slots : nullptr);
  }

  void forward(const AttentionForwardArgs& a) override {
    const Fp32Inputs in = fp32_inputs(a);
    summarize_local(in.k, in.v);
    select_remote(a);
    for (int b = 0; b < shape.batch; ++b) lay_out_element(a, b);
    const ElementLayouts layouts = elements_layouts();
    ClusteredTransfer(session.comm(), ctx, g_, storage_view(),
                      {requests_.as<std::int32_t>(), requests_.bytes() / sizeof(std::int32_t)}, {}, shape.dtype)
        .exchange_requests(layouts, served_);
    // Pipelined over (element, KV head) units: one unit's fetched blocks travel while the previous
    // unit's summaries and selection compute.
    const TransferOn transfer = [this](const kernels::ExecContext& c) {
      return ClusteredTransfer(session.comm(), c, g_, storage_view(), {}, {}, shape.dtype);
    };
    fetch_overlapped(overlap_, transfer, ctx, layouts, served_, [&](int b, int g) { select_head(a, b, g); });
    for (int b = 0; b < shape.batch; ++b) attend(a, b);
  }

  void backward(const AttentionBackwardArgs& a) override {
    RINGCAST_CHECK(elements_.front().tables->built(), "clustered mode: backward() needs a forward() first");
    for (int b = 0; b < shape.batch; ++b) attend_backward(a, b);
    // The coarse summaries' gradients are complete now: packed here, summed over the ranks in the
    // first overlapped step, used by coarse_backward() at the end.
    pack_coarse_gradients(ctx, g_, [this](int b, int g, int kv) { return coarse_summary_gradients(b, g, kv); },
                          scatter_send_.as<float>());
    // Pipelined over (element, KV head) units: unit u's halo and fetched gradients travel home (and
    // the peers' for this rank's blocks land in a stage slot) while the next unit's page-summary
    // gradients fold into its pages and the previous unit's landed gradients are added.
    const TransferOn transfer = [this](const kernels::ExecContext& c) {
      return ClusteredTransfer(session.comm(), c, g_, pool_view(d_pools()));
    };
    return_overlapped(
        overlap_, transfer, ctx, elements_layouts(), served_, {stage_.as<float>(), stage_.bytes() / sizeof(float)},
        [this](Stream stream) {
          reduce_scatter_coarse(session.comm(), stream, g_, scatter_send_.as<float>(), scatter_recv_.as<float>());
        },
        [this](int b, int g) { fold_summaries(b, g); });
    coarse_backward();
    // The local pages now hold the complete dK, dV: written out in the caller's dtype.
    const std::size_t tokens = std::size_t(shape.local_len()) * shape.kv_heads * shape.head_dim * dtype_size(shape.dtype);
    for (int b = 0; b < shape.batch; ++b) {
      const kernels::AttentionShape& s = elements_[b].shape;
      for (int kv = 0; kv < 2; ++kv)
        unpack_from_pool(pool(d_pools(), b, 0, kv), static_cast<char*>((kv ? a.d_v : a.d_k).data) + b * tokens,
                         shape.dtype, 1, shape.kv_heads, shape.head_dim, local_seg_, options.page_size, ctx,
                         {s.num_pages, 0});
    }
    const std::int64_t q_elems = shape.local_len() * shape.heads * shape.head_dim;
    if (!rows_.moves_rows()) {
      kernels::copy_strided(
          kernels::StridedCopy::flat(d_q_.data(), DType::kF32, a.d_q.data, shape.dtype, shape.batch * q_elems), ctx);
      return;
    }
    for (int b = 0; b < shape.batch; ++b)
      rows_.to_tokens(d_q_.as<float>() + b * q_elems, DType::kF32,
                      static_cast<char*>(a.d_q.data) + b * q_elems * dtype_size(shape.dtype), shape.dtype, ctx);
  }

  TableEntries table_entries() const override {
    RINGCAST_CHECK(elements_.front().tables->built(), "clustered mode: table_entries() needs a forward() first");
    TableEntries t;
    for (const ElementPool& e : elements_) t.add(e.tables->host_offsets());
    return t;
  }

  // The host tables translated from pool pages to global pages and blocks: exact entries on resident
  // pages are window pages when the tile's window overlaps them (selected pages are eligible, hence
  // outside it); summary entries become one record per key taken, with its KeyMeta row mask if any.
  // Grouped rows: each attention tile's entries are reported in its selection tile's terms (row r of
  // the mask: the tile's token r), so one selection tile may list a page once per attention tile.
  std::vector<AttendedEntry> attended_entries() const override {
    RINGCAST_CHECK(elements_.front().tables->built(), "clustered mode: attended_entries() needs a forward() first");
    const std::int64_t ps = options.page_size;
    const int G = rows_.group();
    std::vector<AttendedEntry> out;
    for (int b = 0; b < shape.batch; ++b) {
      const ElementPool& e = elements_[b];
      const kernels::HostBlockTable table = e.tables->host_table();
      const std::int64_t tiles = kernels::attention_tiles(e.layouts.front(), sel_);
      for (std::int64_t tile = 0; tile < tiles; ++tile)
        for (int g = 0; g < shape.kv_heads; ++g) {
          const kernels::ClusteredLayout& L = e.layouts[g];
          const kernels::TileGeometry geo = kernels::tile_geometry(L, sel_, tile / G);
          const std::int64_t unit = tile * shape.kv_heads + g;
          // Tile rows to token rows of the selection tile: row t * G (head 0 of token t) gives token t.
          const auto set_rows = [&](AttendedEntry& a, std::uint64_t lo, std::uint64_t hi) {
            a.row_mask[0] = a.row_mask[1] = 0;
            for (int t = 0; t < kernels::kQueryTile / G; ++t) {
              const int r = t * G, token = static_cast<int>(tile % G) * (kernels::kQueryTile / G) + t;
              if ((((r < 64 ? lo : hi) >> (r & 63)) & 1u) != 0)
                a.row_mask[token >> 6] |= std::uint64_t{1} << (token & 63);
            }
          };
          AttendedEntry a;
          a.batch = b;
          a.tile = tile / G;
          a.first_row_pos = positions[static_cast<std::size_t>(tile / G * kernels::kQueryTile)];
          a.kv_head = g;
          for (std::int64_t i = table.offsets[unit]; i < table.offsets[unit + 1]; ++i) {
            const kernels::BlockEntry& x = table.entries[i];
            a.causal = (x.flags & kernels::kEntryCausal) != 0;
            if (x.page < L.resident_pages()) {
              a.global_id = L.pool_page_global(x.page);
              const bool window = a.global_id * ps < geo.window_hi && (a.global_id + 1) * ps > geo.window_lo;
              a.kind = window ? AttendedKind::kWindow : AttendedKind::kSelected;
              set_rows(a, x.row_mask[0], x.row_mask[1]);
              out.push_back(a);
              continue;
            }
            const bool coarse = x.page >= L.coarse_summary_first_page();
            a.kind = coarse ? AttendedKind::kCoarseSummary : AttendedKind::kPageSummary;
            const std::int64_t first_key =
                (x.page - (coarse ? L.coarse_summary_first_page() : L.page_summary_first_page())) * ps;
            for (int j = 0; j < ps; ++j) {
              if (!((x.key_mask >> j) & 1u)) continue;
              a.global_id = coarse ? first_key + j : L.pool_page_global(first_key + j);
              const std::uint64_t* rows = x.key_meta >= 0 ? table.key_meta[x.key_meta + j].row_mask : x.row_mask;
              set_rows(a, rows[0] & x.row_mask[0], rows[1] & x.row_mask[1]);
              out.push_back(a);
            }
          }
        }
    }
    return out;
  }

 private:
  // The fp32 gradient pool: its own buffer on the CPU, where pools_ is what the backward's attention
  // reads; on CUDA the fp32 pool, which only the forward reads.
  const DeviceBuffer& d_pools() const { return shape.dtype == DType::kF32 ? own_d_pools_ : pools_; }
  // Head g's K (kv = 0) or V (kv = 1) pages of element b in a pool buffer.
  float* pool(const DeviceBuffer& buf, int b, int g, int kv) const {
    return buf.as<float>() + (2 * b + kv) * g_.pool_elems + g * elements_[b].shape.num_pages * g_.page_elems;
  }
  PoolView pool_view(const DeviceBuffer& buf) const {
    return [this, &buf](int b, int g, int kv) { return pool(buf, b, g, kv); };
  }
  // Head g's K (kv = 0) or V (kv = 1) pages of element b in the storage dtype, at the fp32 pool's
  // element offsets: the attention reads them and the forward's blocks travel in them. The fp32 pool
  // itself on the CPU; on CUDA a second pool, converted to and from the fp32 one region by region.
  void* kv_pool(int b, int g, int kv) const {
    if (shape.dtype == DType::kF32) return pool(pools_, b, g, kv);
    const std::int64_t at = (2 * b + kv) * g_.pool_elems + g * elements_[b].shape.num_pages * g_.page_elems;
    return attn_pools_.as<char>() + at * dtype_size(shape.dtype);
  }
  PoolView storage_view() const {
    return [this](int b, int g, int kv) { return kv_pool(b, g, kv); };
  }
  // CUDA: pages [first, first + count) of KV heads [g0, g0 + heads) of element b, K and V, copied
  // between the fp32 pool and the storage pool (to_storage: fp32 -> storage dtype).
  void convert_pages(int b, int g0, int heads, std::int64_t first, std::int64_t count, bool to_storage) const {
    if (shape.dtype == DType::kF32 || count <= 0) return;
    kernels::StridedCopy c;
    c.ndim = 3;
    c.shape = {2, heads, count * g_.page_elems};
    c.src_strides = c.dst_strides = {g_.pool_elems, elements_[b].shape.num_pages * g_.page_elems, 1};
    const std::int64_t at = first * g_.page_elems;
    float* f32 = pool(pools_, b, g0, 0) + at;
    char* low = static_cast<char*>(kv_pool(b, g0, 0)) + at * dtype_size(shape.dtype);
    c.src = to_storage ? static_cast<const void*>(f32) : low;
    c.src_dtype = to_storage ? DType::kF32 : shape.dtype;
    c.dst = to_storage ? static_cast<void*>(low) : f32;
    c.dst_dtype = to_storage ? shape.dtype : DType::kF32;
    kernels::copy_strided(c, ctx);
  }
  ElementLayouts elements_layouts() const {
    ElementLayouts out;
    for (const ElementPool& e : elements_) out.emplace_back(e.layouts);
    return out;
  }
  float* field(const DeviceBuffer& buf, std::int64_t rows, int f) const {
    return buf.as<float>() + f * shape.kv_heads * rows * shape.head_dim;
  }
  // The whole sequence's coarse summaries of (element, KV head): [kFields][num_blocks][d].
  float* coarse(int b, int g, int f) const {
    return coarse_.as<float>() +
           ((std::int64_t{b} * shape.kv_heads + g) * kFields + f) * base_.num_blocks() * shape.head_dim;
  }

  // Step 1: page and coarse summaries of the local K/V ([kv_heads, rows, d] pools, slot b * units + u).
  void summarize_local(const float* k, const float* v) {
    const std::int64_t pr = summary_.page_rows(), br = summary_.block_rows();
    const kernels::SummaryPools pages{field(page_sums_, pr, kMeanK), field(page_sums_, pr, kMeanV),
                                      field(page_sums_, pr, kMin), field(page_sums_, pr, kMax),
                                      page_counts_.as<std::int32_t>()};
    kernels::page_summaries({summary_, k, v, pages}, ctx);
    kernels::coarse_summaries(
        {summary_,
         pages.key_mean,
         pages.value_mean,
         pages.key_min,
         pages.key_max,
         pages.count,
         {field(block_sums_, br, kMeanK), field(block_sums_, br, kMeanV), field(block_sums_, br, kMin),
          field(block_sums_, br, kMax), block_counts_.as<std::int32_t>()}},
        ctx);
  }

  // Steps 2-3, pipelined over KV heads: head g + 1's coarse summaries are all-gathered (CommOverlap)
  // while head g's rank-level top-R computes for every element (select_remote_blocks: a host result, it
  // decides the messages); the halo travels (into halo_stage_) beside the last head's. The summaries
  // travel as [kv_heads][kFields][B * local_blocks][d]; counts do not (every block is whole:
  // block_keys() keys).
  void select_remote(const AttentionForwardArgs& a) {
    const std::int64_t d = shape.head_dim, rows = std::int64_t{shape.batch} * g_.local_blocks;
    const std::int64_t br = summary_.block_rows();
    for (int f = 0; f < kFields; ++f)
      strided_copy(ctx, field(block_sums_, br, f), gather_send_.as<float>() + f * rows * d,
                   {{shape.kv_heads, br * d, kFields * rows * d}, {rows * d, 1, 1}});
    const auto gather = [this](int g) {
      overlap_.start([this, g](Stream stream) {
        all_gather_coarse(session.comm(), stream, g_, kFields, g, g + 1, gather_send_.as<float>(),
                          gather_recv_.as<float>());
      });
    };
    for (ElementPool& e : elements_) e.remote.assign(static_cast<std::size_t>(shape.kv_heads), {});
    gather(0);
    const auto halo = [this, &a] {
      overlap_.start([this, &a](Stream stream) {
        exchange_halo(session.comm(), stream, g_, shape.dtype, a.k.data, a.v.data, halo_stage_.data());
      });
    };
    for (int g = 0; g < shape.kv_heads; ++g) {
      overlap_.wait();
      if (g + 1 < shape.kv_heads) {
        gather(g + 1);
      } else {
        halo();
      }
      unpack_coarse(ctx, g_, kFields, g, g + 1, gather_recv_.as<float>(),
                    [this](int b, int h) { return coarse(b, h, 0); });
      for (int b = 0; b < shape.batch; ++b) {
        const kernels::SummaryRows blocks{coarse(b, g, kMeanK), coarse(b, g, kMin), coarse(b, g, kMax)};
        elements_[b].remote[g] = kernels::select_remote_blocks({&base_, sel_, queries(a, b, g), blocks}, ctx);
      }
    }
    overlap_.wait();  // the halo
  }

  // Step 4's pool for element b: fetch capacity = the most any KV head fetches; the local pages packed
  // from the caller's K/V and the halo from its stage into the storage pool, every other page zero until
  // the fetch and the summaries fill it (the padding must be zeros, not NaN). On CUDA the fp32 pool gets
  // the same zeros but not the local pages: the forward reads their summaries (summarize_local's), never
  // them.
  void lay_out_element(const AttentionForwardArgs& a, int b) {
    ElementPool& e = elements_[b];
    std::int64_t capacity = 0;
    for (const kernels::RemoteSelection& r : e.remote)
      capacity = std::max<std::int64_t>(capacity, static_cast<std::int64_t>(r.fetch.size()));
    e.layouts.clear();
    for (const kernels::RemoteSelection& r : e.remote) {
      kernels::ClusteredLayout L = base_;
      L.fetched = r.fetch;
      L.fetch_capacity = capacity;
      e.layouts.push_back(std::move(L));
    }
    const kernels::ClusteredLayout& L = e.layouts.front();  // every head's pool has its shape
    e.shape = rows_.attention_shape(options.page_size, L.num_pages());
    const std::size_t elt = dtype_size(shape.dtype);
    const std::int64_t tokens = shape.local_len() * shape.kv_heads * shape.head_dim;
    zero_past_local(b, storage_view(), elt);
    for (int kv = 0; kv < 2; ++kv)
      pack_to_pool(static_cast<const char*>((kv ? a.v : a.k).data) + b * tokens * elt, shape.dtype, kv_pool(b, 0, kv),
                   1, shape.kv_heads, shape.head_dim, local_seg_, options.page_size, ctx, {e.shape.num_pages, 0});
    const Segments block{1, options.coarse_block(), options.coarse_pages, {}};
    for (int side = 0; side < 2; ++side) {
      const std::int64_t id = side ? L.halo_after : L.halo_before;
      if (id < 0) continue;
      for (int kv = 0; kv < 2; ++kv)
        pack_to_pool(halo_stage_.as<char>() + halo_stage_block(g_, side, b, kv) * elt, shape.dtype, kv_pool(b, 0, kv),
                     1, shape.kv_heads, shape.head_dim, block, options.page_size, ctx,
                     {e.shape.num_pages, L.block_pool_page(id)});
    }
    if (shape.dtype != DType::kF32) zero_past_local(b, pool_view(pools_), sizeof(float));
  }

  // Every page of element b's pools in `view` (elements of `elt` bytes) but the local ones, zeroed.
  void zero_past_local(int b, const PoolView& view, std::size_t elt) const {
    const kernels::ClusteredLayout& L = elements_[b].layouts.front();  // every head's pool has its shape
    const std::int64_t first = L.halo_first_page() * g_.page_elems;
    const auto bytes = static_cast<std::size_t>((L.num_pages() - L.halo_first_page()) * g_.page_elems) * elt;
    for (int g = 0; g < shape.kv_heads; ++g)
      for (int kv = 0; kv < 2; ++kv) kernels::fill_zero(static_cast<char*>(view(b, g, kv)) + first * elt, bytes, ctx);
  }

  // The queries selection reads for element b, KV head g, in fp32: the caller's on the CPU backend;
  // on CUDA the group's heads converted into q_group_ (valid until the next call; same stream).
  kernels::SelectionQueries queries(const AttentionForwardArgs& a, int b, int g) const {
    const std::int64_t rows = shape.local_len(), d = shape.head_dim;
    const std::int64_t element = b * rows * shape.heads * d;
    if (shape.dtype == DType::kF32) return {a.q.as<const float>() + element, shape.heads, shape.kv_heads, shape.head_dim, g};
    const int group = shape.heads / shape.kv_heads;
    kernels::StridedCopy c;
    c.ndim = 2;
    c.shape = {rows, group * d};
    c.src_strides = {shape.heads * d, 1};
    c.dst_strides = {group * d, 1};
    c.src = static_cast<const char*>(a.q.data) + (element + g * group * d) * dtype_size(shape.dtype);
    c.src_dtype = shape.dtype;
    c.dst = q_group_;
    kernels::copy_strided(c, ctx);
    return {q_group_, group, 1, shape.head_dim, 0};
  }

  // The keys and values in fp32: the caller's on the CPU backend, converted copies on CUDA. These live
  // in the fp32 pool (at least as large), whose local pages the forward does not otherwise use and which
  // lay_out_element() zeroes elsewhere only after summarize_local() has read them.
  Fp32Inputs fp32_inputs(const AttentionForwardArgs& a) const {
    if (shape.dtype == DType::kF32) return {a.k.as<const float>(), a.v.as<const float>()};
    const std::int64_t kv_elems = std::int64_t{shape.batch} * shape.local_len() * shape.kv_heads * shape.head_dim;
    float* k = pools_.as<float>();
    float* v = k + kv_elems;
    kernels::copy_strided(kernels::StridedCopy::flat(a.k.data, shape.dtype, k, DType::kF32, kv_elems), ctx);
    kernels::copy_strided(kernels::StridedCopy::flat(a.v.data, shape.dtype, v, DType::kF32, kv_elems), ctx);
    return {k, v};
  }

  // Step 5 for element b, KV head g: page summaries of its resident pages into the pool, its coarse
  // summaries, its key bias, its page selection.
  void select_head(const AttentionForwardArgs& a, int b, int g) {
    ElementPool& e = elements_[b];
    const kernels::ClusteredLayout& L = e.layouts[g];
    const int ps = options.page_size;
    const std::int64_t d = shape.head_dim, pages = e.shape.num_pages;
    float* k = pool(pools_, b, g, 0);
    float* v = pool(pools_, b, g, 1);
    const std::int64_t summary_rows = L.page_summary_pages() * ps;
    float* k_min = bounds_.as<float>();
    float* k_max = k_min + summary_rows * d;
    resident_summaries(b, g, k_min, k_max);
    for (int kv = 0; kv < 2; ++kv)
      strided_copy(ctx, coarse(b, g, kv ? kMeanV : kMeanK),
                   (kv ? v : k) + L.coarse_summary_first_page() * g_.page_elems, {{L.num_blocks() * d, 1, 1}});
    // Every resident page is whole; the padding of the fetched region counts 0 (masked). The bias is
    // written on the host (CPU: in place; CUDA: uploaded by attend()).
    std::vector<std::int32_t> counts(static_cast<std::size_t>(L.resident_pages()));
    for (std::int64_t pp = 0; pp < L.resident_pages(); ++pp) counts[pp] = L.pool_page_global(pp) >= 0 ? ps : 0;
    kernels::fill_summary_key_bias(L, counts, block_key_counts_,
                                   {host_key_bias(b) + g * pages * ps, static_cast<std::size_t>(pages * ps)});
    kernels::SelectionParams sp;
    sp.layout = &L;
    sp.options = sel_;
    sp.queries = queries(a, b, g);
    sp.coarse = {coarse(b, g, kMeanK), coarse(b, g, kMin), coarse(b, g, kMax)};
    sp.pages = {k + L.page_summary_first_page() * g_.page_elems, k_min, k_max};
    sp.usable_offsets = e.remote[g].usable_offsets;
    sp.usable = e.remote[g].usable;
    e.tables->select(g, sp);
  }

  // The page summaries of element b, KV head g's resident pages: the mean keys and values where the
  // pool keeps them, the key minima and maxima at k_min and k_max (one row per summary row of the pool;
  // rows past the resident pages zero). The local pages' come from summarize_local(); the arrived ones
  // (halo, fetched) are computed from the pool, into which they are converted first (CUDA).
  void resident_summaries(int b, int g, float* k_min, float* k_max) {
    const kernels::ClusteredLayout& L = elements_[b].layouts[g];
    const std::int64_t d = shape.head_dim, ps = options.page_size;
    float* k = pool(pools_, b, g, 0);
    float* means = k + L.page_summary_first_page() * g_.page_elems;  // the values' at + pool_elems
    // Pages [first, first + pages) from summaries at src, one field every field_stride floats.
    const auto place = [&](const float* src, std::int64_t field_stride, std::int64_t first, std::int64_t pages) {
      const CopyDim row{pages * d, 1, 1};
      strided_copy(ctx, src + kMeanK * field_stride, means + first * d, {{2, field_stride, g_.pool_elems}, row});
      strided_copy(ctx, src + kMin * field_stride, k_min + first * d, {{2, field_stride, k_max - k_min}, row});
    };
    const std::int64_t pr = summary_.page_rows();
    place(field(page_sums_, pr, kMeanK) + (g * pr + b * summary_.num_pages()) * d, shape.kv_heads * pr * d, 0,
          L.local_pages());
    const std::int64_t arrived = L.resident_pages() - L.halo_first_page();
    if (arrived > 0) {
      convert_pages(b, g, 1, L.halo_first_page(), arrived, false);
      const kernels::SummaryShape s{1, arrived * ps, 1, shape.head_dim, options.page_size, options.coarse_pages};
      const std::int64_t ar = s.page_rows();
      const std::int64_t at = L.halo_first_page() * g_.page_elems;
      float* sums = arrived_sums_.as<float>();
      kernels::page_summaries({s,
                               k + at,
                               pool(pools_, b, g, 1) + at,
                               {sums + kMeanK * ar * d, sums + kMeanV * ar * d, sums + kMin * ar * d,
                                sums + kMax * ar * d, arrived_counts_.as<std::int32_t>()}},
                              ctx);
      place(sums, ar * d, L.halo_first_page(), arrived);
    }
    const auto padding = static_cast<std::size_t>(k_max - k_min - L.resident_pages() * d) * sizeof(float);
    for (float* bound : {k_min, k_max}) kernels::fill_zero(bound + L.resident_pages() * d, padding, ctx);
  }

  // Step 6 for element b: the table over every head's selection, then the attention.
  void attend(const AttentionForwardArgs& a, int b) {
    ElementPool& e = elements_[b];
    e.tables->build(e.layouts, e.shape);
    if (shape.dtype != DType::kF32) {
      const std::size_t offset = (key_bias(b) - key_bias_.as<float>()) * sizeof(float);
      key_bias_.copy_from_host(host_key_bias(b), shape.kv_heads * e.shape.num_pages * options.page_size * sizeof(float),
                               offset, ctx.stream);
      const kernels::ClusteredLayout& L = e.layouts.front();  // every head's pool has its shape
      convert_pages(b, 0, shape.kv_heads, L.page_summary_first_page(), L.num_pages() - L.page_summary_first_page(),
                    true);
    }
    const std::int64_t rows = shape.local_len() * shape.heads, d = shape.head_dim;
    void* o = static_cast<char*>(a.o.data) + b * rows * d * dtype_size(shape.dtype);
    float* lse = a.lse.as<float>() + b * rows;
    kernels::AttentionForwardParams p = params(element_rows(a.q.data, b), b);
    p.o_dtype = shape.dtype;
    p.o = o;
    p.lse = lse;
    if (rows_.moves_rows()) {
      rows_.to_grouped(p.q, shape.dtype, moved(0), shape.dtype, ctx);
      p.q = moved(0);
      p.o = moved(1);
    }
    if (rows_.grouped()) p.lse = grouped_lse();
    p.workspace = fwd_ws_.data();
    p.workspace_bytes = fwd_ws_.bytes();
    kernels::attention_forward(p, ctx);
    if (rows_.moves_rows()) rows_.to_tokens(moved(1), shape.dtype, o, shape.dtype, ctx);
    if (rows_.grouped()) rows_.lse_to_tokens(grouped_lse(), lse, ctx);
  }

  // Element b's query-shaped rows (Q, O, dO) in a [B, n_loc, heads, d] tensor of the storage dtype.
  const void* element_rows(const void* data, int b) const {
    return static_cast<const char*>(data) +
           std::int64_t{b} * shape.local_len() * shape.heads * shape.head_dim * dtype_size(shape.dtype);
  }
  // Grouped rows (rows_.grouped()): when rows move, buffer i of three element-sized [n_loc * heads, d]
  // buffers of the storage dtype (Q, O, dO); then the element's LSE.
  std::size_t moved_bytes(int count) const {
    const auto elems = static_cast<std::size_t>(shape.local_len() * shape.heads * shape.head_dim);
    return rows_.moves_rows() ? count * elems * dtype_size(shape.dtype) : 0;
  }
  void* moved(int i) const { return grouped_.as<char>() + moved_bytes(i); }
  float* grouped_lse() const { return reinterpret_cast<float*>(grouped_.as<char>() + moved_bytes(3)); }

  // The resident pages of one KV head's pool, read as a sequence of whole pages of one head.
  kernels::SummaryShape resident_shape(const kernels::ClusteredLayout& L) const {
    return {1, L.resident_pages() * options.page_size, 1, shape.head_dim, options.page_size, options.coarse_pages};
  }

  float* key_bias(int b) const { return key_bias_.as<float>() + std::int64_t{b} * g_.pool_elems / shape.head_dim; }
  // Where element b's key bias is written: key_bias(b) on the CPU, its host mirror on CUDA.
  float* host_key_bias(int b) {
    if (key_bias_host_.empty()) return key_bias(b);
    return key_bias_host_.data() + std::int64_t{b} * g_.pool_elems / shape.head_dim;
  }

  // Element b's attention over its pool, reading queries q in the attention's row order.
  kernels::AttentionForwardParams params(const void* q, int b) const {
    const ElementPool& e = elements_[b];
    kernels::AttentionForwardParams p;
    p.shape = e.shape;
    p.dtype = shape.dtype;
    p.softmax_scale = 1.0f / std::sqrt(static_cast<float>(shape.head_dim));
    p.q = q;
    p.k_pages = kv_pool(b, 0, 0);
    p.v_pages = kv_pool(b, 0, 1);
    p.q_pos = q_pos_.as<const std::int32_t>();
    p.key_bias = key_bias(b);
    p.table = e.tables->table();
    return p;
  }

  // Attention backward over element b's pool (every KV head's pages written).
  void attend_backward(const AttentionBackwardArgs& a, int b) {
    const ElementPool& e = elements_[b];
    const std::int64_t rows = shape.local_len() * shape.heads, d = shape.head_dim;
    kernels::AttentionBackwardParams p;
    p.fwd = params(element_rows(a.q.data, b), b);
    p.fwd.o_dtype = shape.dtype;
    p.fwd.o = static_cast<char*>(a.o.data) + b * rows * d * dtype_size(shape.dtype);
    p.fwd.lse = a.lse.as<float>() + b * rows;
    p.d_o = element_rows(a.d_o.data, b);
    if (rows_.moves_rows()) {
      const void* from[3] = {p.fwd.q, p.fwd.o, p.d_o};
      for (int i = 0; i < 3; ++i) rows_.to_grouped(from[i], shape.dtype, moved(i), shape.dtype, ctx);
      p.fwd.q = moved(0);
      p.fwd.o = moved(1);
      p.d_o = moved(2);
    }
    if (rows_.grouped()) {
      rows_.lse_to_grouped(p.fwd.lse, grouped_lse(), ctx);
      p.fwd.lse = grouped_lse();
    }
    p.transposed = e.tables->transposed();
    p.d_q = d_q_.as<float>() + b * rows * d;
    p.d_k_pages = pool(d_pools(), b, 0, 0);
    p.d_v_pages = pool(d_pools(), b, 0, 1);
    p.accumulate = false;  // writes every page of the pool
    p.workspace = bwd_ws_.data();
    p.workspace_bytes = bwd_ws_.bytes();
    kernels::attention_backward(p, ctx);
  }

  // Element b, KV head g: the page summaries' gradients folded into their pages (a summary's gradient
  // reaches each of its keys divided by the count), so that a page's gradient is complete before it
  // leaves for its owner.
  void fold_summaries(int b, int g) {
    const kernels::ClusteredLayout& L = elements_[b].layouts[g];
    float* dk = pool(d_pools(), b, g, 0);
    float* dv = pool(d_pools(), b, g, 1);
    const std::int64_t first = L.page_summary_first_page() * g_.page_elems;
    kernels::page_summaries_backward({resident_shape(L), dk + first, dv + first, dk, dv}, ctx);
  }

  // Element b, KV head g: the gradients of its coarse summaries of every block, mean keys (kv = 0) or
  // mean values (kv = 1), as the attention backward left them in the gradient pool.
  const float* coarse_summary_gradients(int b, int g, int kv) const {
    return pool(d_pools(), b, g, kv) + elements_[b].layouts[g].coarse_summary_first_page() * g_.page_elems;
  }

  // Coarse summaries' gradients: every rank holds them for every block; each owner has received the
  // sum for its own blocks (scatter_recv_, reduce-scattered beside the backward's first unit), which
  // goes back through coarse and page summaries to its keys, the local pages of the gradient pool
  // (one head's local pages are its keys in order).
  void coarse_backward() {
    const std::int64_t d = shape.head_dim, rows = std::int64_t{shape.batch} * g_.local_blocks;
    const std::int64_t br = summary_.block_rows(), pr = summary_.page_rows();
    kernels::fill_zero(d_block_sums_.data(), d_block_sums_.bytes(), ctx);
    kernels::fill_zero(d_page_sums_.data(), d_page_sums_.bytes(), ctx);
    strided_copy(ctx, scatter_recv_.as<float>(), d_block_sums_.as<float>(),
                 {{2 * shape.kv_heads, rows * d, br * d}, {rows * d, 1, 1}});
    kernels::coarse_summaries_backward({summary_, field(d_block_sums_, br, 0), field(d_block_sums_, br, 1),
                                        field(d_page_sums_, pr, 0), field(d_page_sums_, pr, 1)},
                                       ctx);
    const kernels::SummaryShape head{1, shape.local_len(), 1, shape.head_dim, options.page_size, options.coarse_pages};
    for (int b = 0; b < shape.batch; ++b)
      for (int g = 0; g < shape.kv_heads; ++g) {
        const std::int64_t rows = (g * pr + b * summary_.num_pages()) * d;
        kernels::page_summaries_backward({head, field(d_page_sums_, pr, 0) + rows, field(d_page_sums_, pr, 1) + rows,
                                          pool(d_pools(), b, g, 0), pool(d_pools(), b, g, 1)},
                                         ctx);
      }
  }

  kernels::GroupedRows rows_;  // the attention's row order (grouped under GQA with per-row selection)
  ClusterGeometry g_;
  kernels::SelectionOptions sel_;
  kernels::ClusteredLayout base_;  // this rank's layout with no fetched block and the largest capacity
  Segments local_seg_;
  kernels::SummaryShape summary_;  // the local K/V: [B, n_loc, kv_heads, d]
  std::vector<std::int32_t> block_key_counts_;
  std::vector<ElementPool> elements_;
  std::vector<ServedRequests> served_;  // per ring step: the blocks the rank r - s fetched from this rank
  DeviceBuffer pools_, own_d_pools_, key_bias_, page_sums_, page_counts_, block_sums_, block_counts_, gather_send_,
      gather_recv_, coarse_, bounds_, arrived_sums_, arrived_counts_, stage_, d_q_, d_block_sums_, d_page_sums_,
      scatter_send_, scatter_recv_, q_pos_, fwd_ws_, bwd_ws_, requests_, halo_stage_, grouped_;
  // CUDA only: the storage pools (kv_pool), one KV head group's fp32 queries (in d_q_) and the key
  // bias built on the host.
  DeviceBuffer attn_pools_;
  float* q_group_ = nullptr;
  std::vector<float> key_bias_host_;
  // Last, so destroyed first: when an error unwinds a pipeline, the step still in flight is waited for
  // before the buffers and host lists it uses are freed.
  CommOverlap overlap_;
};

}  // namespace

std::unique_ptr<DistributedAttention::Mode> make_clustered_mode(const Session& s, const LayerShape& sh,
                                                                const AttentionOptions& o) {
  if (o.clusters == ClusterKind::kSurrogate) return make_surrogate_mode(s, sh, o);
  return std::make_unique<ClusteredMode>(s, sh, o);
}

}  // namespace ringcast
