// The joint combine of surrogate (CAST) clusters (attention_cast_mode.hpp; DESIGN.md §4.1 with
// clusters = surrogate, docs/clustered-design.md "Surrogate clusters"): clusters are the pages of the
// clustered mode (attention_cast.hpp). A query row sees its own clusters exactly (the window), the
// clusters its unit selected exactly (local ones, or remote ones fetched whole with their summaries)
// and every other cluster through a cluster or coarse summary, in one softmax; rows run in cluster
// order (per KV head) so a tile meets few clusters. Host waits per layer, forward: the coarse
// summaries, block counts and selection queries; the fetch's request exchange; per (element, KV head)
// the pool counts, cluster summaries and bounds its selection reads, while the next unit's blocks
// travel (CommOverlap; uploads follow on an idle stream). Backward: none but the collectives' and the
// gradient returns' (pipelined over units like the fetch).
#include "attention_cast.hpp"
#include "attention_cast_mode.hpp"
#include "clustered_internal.hpp"
#include "overlap.hpp"

#include <ringcast/kernels/cluster_ops.hpp>
#include <ringcast/kernels/layout.hpp>
#include <ringcast/kernels/row_gather.hpp>

#include <algorithm>
#include <cmath>
#include <optional>

namespace ringcast {
namespace {

// The coarse-summary fields that travel and that selection reads, in this order.
enum Field { kMeanK, kMeanV, kMin, kMax, kFields };

// What the joint forward of one batch element leaves for the backward.
struct Element {
  std::vector<SurrogateRows> rows;             // per KV head
  std::vector<kernels::ClusteredLayout> layouts;
  std::vector<SurrogateSelection> selections;
  kernels::AttentionShape shape;               // batch 1, num_pages of this element
  kernels::HostBlockTable table;
  std::optional<DeviceTables> tables;
};

class SurrogateJointMode final : public SurrogateMode {
 public:
  SurrogateJointMode(const Session& s, const LayerShape& sh, const AttentionOptions& o)
      : SurrogateMode(s, sh, o), overlap_(s) {
    const std::int64_t d = sh.head_dim, n = sh.local_len();
    g_.p = sh.ranks;
    g_.r = session.rank();
    g_.batch = sh.batch;
    g_.kv_heads = sh.kv_heads;
    g_.coarse_pages = o.coarse_pages;
    g_.causal = false;
    g_.local_blocks = c_ / o.coarse_pages;
    g_.first_block = g_.r * g_.local_blocks;
    g_.page_elems = std::int64_t{o.page_size} * d;
    g_.block_elems = o.coarse_pages * g_.page_elems;
    g_.head_dim = sh.head_dim;
    g_.block_summaries = true;

    sel_.causal = false;
    sel_.unit =
        o.resolved_selection(sh) == SelectionUnit::kRow ? kernels::SelectUnit::kRow : kernels::SelectUnit::kTile;
    sel_.score = o.score == ScoreKind::kBound ? kernels::SelectScore::kBound : kernels::SelectScore::kMean;
    sel_.top_k = o.top_k;
    sel_.coarse_k = o.coarse_k;
    sel_.remote_blocks = o.remote_blocks;

    // Cluster slots as the clustered layout's positions: rank r's slots [r c ps, (r + 1) c ps).
    base_.page_size = o.page_size;
    base_.coarse_pages = o.coarse_pages;
    base_.n = std::int64_t{sh.ranks} * c_ * o.page_size;
    base_.n_loc = std::int64_t{c_} * o.page_size;
    base_.first_pos = g_.r * base_.n_loc;
    base_.fetch_capacity = std::min<std::int64_t>(o.remote_blocks, base_.num_blocks() - g_.local_blocks);
    base_.validate();
    num_blocks_ = base_.num_blocks();
    max_resident_ = base_.resident_pages();
    const std::int64_t max_pages = base_.num_pages(), units = std::int64_t{sh.batch} * sh.kv_heads;
    g_.pool_elems = sh.kv_heads * max_pages * g_.page_elems;
    pools_ = allocate(sh.batch * 2 * g_.pool_elems * sizeof(float));
    d_pools_ = allocate(pools_.bytes());
    if (sh.dtype != DType::kF32) attn_pools_ = allocate(pools_.bytes() / sizeof(float) * dtype_size(sh.dtype));
    key_bias_ = allocate(sh.batch * sh.kv_heads * max_pages * o.page_size * sizeof(float));
    key_bias_host_.resize(key_bias_.bytes() / sizeof(float));
    page_counts_ = allocate(units * max_resident_ * sizeof(std::int32_t));
    page_counts_host_.resize(static_cast<std::size_t>(units * max_resident_));
    bounds_ = allocate(units * 2 * max_resident_ * d * sizeof(float));
    bounds_host_.resize(bounds_.bytes() / sizeof(float));
    page_sums_host_.resize(static_cast<std::size_t>(units * max_resident_ * d));
    cluster_keys_ = allocate(sh.batch * sh.kv_heads * base_.n_loc * d * sizeof(float));
    const std::int64_t rows = sh.batch * g_.local_blocks;
    gather_send_ = allocate(kFields * sh.kv_heads * rows * d * sizeof(float));
    gather_recv_ = allocate(g_.p * gather_send_.bytes());
    count_send_ = allocate(sh.kv_heads * rows * sizeof(std::int32_t));
    count_recv_ = allocate(g_.p * count_send_.bytes());
    coarse_ = allocate(units * kFields * num_blocks_ * d * sizeof(float));
    block_counts_host_.resize(static_cast<std::size_t>(units * num_blocks_));
    scatter_recv_ = allocate(2 * sh.kv_heads * rows * d * sizeof(float));
    scatter_send_ = allocate(g_.p * scatter_recv_.bytes());
    // A requester fetches at most min(R, local_blocks) of this rank's blocks per (element, KV head);
    // twice: one unit's gradients land while the next unit's travel.
    stage_ = allocate(2 * g_.unit_stage_elems(o.remote_blocks) * sizeof(float));
    requests_ = allocate(request_scratch_ints(g_, o.remote_blocks) * sizeof(std::int32_t));
    order_ = allocate(units * n * sizeof(std::int32_t));
    inverse_ = allocate(order_.bytes());
    const std::int64_t tiles = (n + kernels::kQueryTile - 1) / kernels::kQueryTile;
    tile_queries_ = allocate(units * tiles * d * sizeof(float));
    if (sel_.unit == kernels::SelectUnit::kRow) row_queries_ = allocate(units * n * d * sizeof(float));
    const std::int64_t q_elems = n * sh.heads * d;
    q_rows_ = allocate(sh.batch * q_elems * dtype_size(sh.dtype));
    o_rows_ = allocate(q_rows_.bytes());
    lse_rows_ = allocate(sh.batch * sh.heads * n * sizeof(float));
    d_o_rows_ = allocate(q_elems * dtype_size(sh.dtype));
    d_q_rows_ = allocate(q_elems * sizeof(float));
    const kernels::AttentionShape widest{1, n, sh.heads, sh.kv_heads, sh.head_dim, o.page_size, max_pages};
    fwd_ws_ = allocate(kernels::attention_forward_workspace_bytes(widest, ctx));
    bwd_ws_ = allocate(kernels::attention_backward_workspace_bytes(widest, ctx));
    // A_q decides the assignment only: its gradient is zero in the joint combine.
    kernels::fill_zero(d_a_q_.data(), d_a_q_.bytes(), ctx);
    elements_.resize(static_cast<std::size_t>(sh.batch));
  }

  // Every element's table.
  TableEntries table_entries() const override {
    check_forward("table_entries");
    TableEntries t;
    for (const Element& e : elements_) t.add(e.table.offsets);
    return t;
  }

  // The tables read back per row (attention_cast.hpp).
  std::vector<AttendedEntry> attended_entries() const override {
    check_forward("attended_entries");
    std::vector<AttendedEntry> out;
    for (int b = 0; b < shape.batch; ++b)
      append_surrogate_entries(out, b, surrogate_heads(b), elements_[b].table, positions);
    return out;
  }

 private:
  bool has_forward() const override { return elements_.front().tables.has_value(); }


  float* pool(const DeviceBuffer& buf, int b, int g, int kv) const {
    return buf.as<float>() + (2 * b + kv) * g_.pool_elems + g * elements_[b].shape.num_pages * g_.page_elems;
  }
  // Element b's K (kv = 0) or V pages as the attention reads them: the fp32 pool, or its copy in the
  // storage dtype at the same element offsets.
  void* attention_pool(int b, int kv) const {
    if (shape.dtype == DType::kF32) return pool(pools_, b, 0, kv);
    return attn_pools_.as<char>() + (2 * b + kv) * g_.pool_elems * dtype_size(shape.dtype);
  }
  PoolView pool_view(const DeviceBuffer& buf) const {
    return [this, &buf](int b, int g, int kv) { return pool(buf, b, g, kv); };
  }
  ElementLayouts elements_layouts() const {
    ElementLayouts out;
    for (const Element& e : elements_) out.emplace_back(e.layouts);
    return out;
  }
  std::int32_t* page_counts(int b, int g) const { return page_counts_.as<std::int32_t>() + unit(b, g) * max_resident_; }
  std::span<const std::int32_t> host_page_counts(int b, int g) const {
    return {page_counts_host_.data() + unit(b, g) * max_resident_,
            static_cast<std::size_t>(elements_[b].layouts[static_cast<std::size_t>(g)].resident_pages())};
  }
  std::span<const std::int32_t> host_block_counts(int b, int g) const {
    return {block_counts_host_.data() + unit(b, g) * num_blocks_, static_cast<std::size_t>(num_blocks_)};
  }
  float* bounds(int b, int g, int max) const {
    return bounds_.as<float>() + (unit(b, g) * 2 + max) * max_resident_ * shape.head_dim;
  }
  const float* host_bounds(int b, int g, int max) const {
    return bounds_host_.data() + (unit(b, g) * 2 + max) * max_resident_ * shape.head_dim;
  }
  float* coarse(int b, int g, int f) const {
    return coarse_.as<float>() + (unit(b, g) * kFields + f) * num_blocks_ * shape.head_dim;
  }
  const float* host_coarse(int b, int g, int f) const {
    return coarse_host_.data() + (unit(b, g) * kFields + f) * num_blocks_ * shape.head_dim;
  }
  // Element b's key bias [kv_heads][num_pages_b][ps]: built on the host, read on the device.
  std::int64_t key_bias_offset(int b) const { return std::int64_t{b} * g_.pool_elems / shape.head_dim; }
  std::int64_t num_tiles() const { return (shape.local_len() + kernels::kQueryTile - 1) / kernels::kQueryTile; }
  const float* host_tile_queries(int b, int g) const {
    return tile_queries_host_.data() + unit(b, g) * num_tiles() * shape.head_dim;
  }
  const float* host_unit_queries(int b, int g) const {
    if (sel_.unit == kernels::SelectUnit::kTile) return host_tile_queries(b, g);
    return row_queries_host_.data() + unit(b, g) * shape.local_len() * shape.head_dim;
  }
  // Element b's rows [n_loc, heads, d] in a rows buffer of `dtype`.
  void* rows_of(const DeviceBuffer& buf, int b, DType dtype) const {
    return buf.as<char>() + b * q_elems_per_element() * dtype_size(dtype);
  }
  const std::int32_t* device_order(const DeviceBuffer& buf, int b) const {
    return buf.as<const std::int32_t>() + unit(b, 0) * shape.local_len();
  }

  // Rows <-> tokens of element b, [n_loc, heads, width] with every query head in its KV head's row
  // order: `index` is order_ (rows from tokens) or inverse_ (tokens from rows).
  void permute(const DeviceBuffer& index, int b, const void* src, void* dst, DType dtype) const {
    const std::int64_t n = shape.local_len(), d = shape.head_dim;
    kernels::RowGather p;
    p.rows = n;
    p.heads = shape.heads;
    p.group = shape.heads / shape.kv_heads;
    p.width = d;
    p.index = device_order(index, b);
    p.index_stride = n;
    p.src = src;
    p.src_row_stride = p.dst_row_stride = shape.heads * d;
    p.src_head_stride = p.dst_head_stride = d;
    p.dst = dst;
    p.dtype = dtype;
    kernels::gather_rows(p, ctx);
  }
  // The same for a [heads, n_loc] log-sum-exp.
  void permute_lse(const DeviceBuffer& index, int b, const float* src, float* dst) const {
    const std::int64_t n = shape.local_len();
    kernels::RowGather p;
    p.rows = n;
    p.heads = shape.heads;
    p.group = shape.heads / shape.kv_heads;
    p.width = 1;
    p.index = device_order(index, b);
    p.index_stride = n;
    p.src = src + std::int64_t{b} * shape.heads * n;
    p.src_row_stride = p.dst_row_stride = 1;
    p.src_head_stride = p.dst_head_stride = n;
    p.dst = dst + std::int64_t{b} * shape.heads * n;
    kernels::gather_rows(p, ctx);
  }
  // Members of element b (every KV head) between tokens [n_loc, kv_heads, d] and cluster slots
  // [kv_heads][c ps][d] at `slots` with `head_stride` between heads: padding slots are zero.
  kernels::RowGather member_slots(int b) const {
    kernels::RowGather p;
    p.rows = std::int64_t{c_} * options.page_size;
    p.heads = shape.kv_heads;
    p.width = shape.head_dim;
    p.index = device_members(b);
    p.index_stride = p.rows;
    return p;
  }
  void tokens_to_slots(int b, const float* tokens, float* slots, std::int64_t head_stride) const {
    kernels::RowGather p = member_slots(b);
    p.src = tokens + b * kv_elems_per_element();
    p.src_row_stride = std::int64_t{shape.kv_heads} * shape.head_dim;
    p.src_head_stride = shape.head_dim;
    p.dst = slots;
    p.dst_row_stride = shape.head_dim;
    p.dst_head_stride = head_stride;
    kernels::gather_rows(p, ctx);
  }
  // A token's gradient sums over the slots it was gathered into, in ascending slot order.
  void slots_to_tokens(int b, const float* slots, std::int64_t head_stride, float* tokens) const {
    kernels::RowScatter p;
    p.rows = std::int64_t{c_} * options.page_size;
    p.out_rows = shape.local_len();
    p.width = shape.head_dim;
    p.heads = shape.kv_heads;
    p.index = device_members(b);
    p.index_stride = p.rows;
    p.src = slots;
    p.src_row_stride = shape.head_dim;
    p.src_head_stride = head_stride;
    p.dst = tokens + b * kv_elems_per_element();
    p.dst_row_stride = std::int64_t{shape.kv_heads} * shape.head_dim;
    p.dst_head_stride = shape.head_dim;
    kernels::scatter_add_rows(p, ctx);
  }

  void combine_forward(const AttentionForwardArgs& a, const Fp32Inputs& in) override {
    plan_rows();
    summarize_blocks(in);
    gather_coarse();
    for (int b = 0; b < shape.batch; ++b) plan_element(in, b);
    const ElementLayouts layouts = elements_layouts();
    fetcher(ctx).exchange_requests(layouts, served_);
    // Pipelined over (element, KV head) units: one unit's blocks travel while the previous unit's pool
    // is completed and its clusters are selected on the host.
    fetch_overlapped(overlap_, [this](const kernels::ExecContext& c) { return fetcher(c); }, ctx, layouts, served_,
                     [this](int b, int g) {
                       complete_pool(b, g);
                       select_clusters(b, g);
                       if (g + 1 == shape.kv_heads) build_table(b);
                     });
    upload(key_bias_, key_bias_host_);
    for (int b = 0; b < shape.batch; ++b) attend(a, b);
  }

  // The rows of every (element, KV head) from the members, their order and its inverse on the
  // device, and the local clusters' counts as the pools' first counts (the fetch fills the rest).
  void plan_rows() {
    const std::int64_t n = shape.local_len();
    std::vector<std::int32_t> order, inverse(static_cast<std::size_t>(shape.batch * shape.kv_heads * n));
    for (int b = 0; b < shape.batch; ++b) {
      Element& e = elements_[b];
      e.rows.clear();
      e.tables.reset();
      for (int g = 0; g < shape.kv_heads; ++g) {
        e.rows.push_back(surrogate_rows({members(b, g), static_cast<std::size_t>(c_) * options.page_size},
                                        {counts(b, g), static_cast<std::size_t>(c_)}, n, options.page_size));
        const std::vector<std::int32_t>& rows = e.rows.back().order;
        for (std::int64_t i = 0; i < n; ++i) inverse[unit(b, g) * n + rows[i]] = static_cast<std::int32_t>(i);
        order.insert(order.end(), rows.begin(), rows.end());
        std::int32_t* cnt = page_counts_host_.data() + unit(b, g) * max_resident_;
        std::copy_n(counts(b, g), c_, cnt);
        std::fill(cnt + c_, cnt + max_resident_, 0);
      }
    }
    upload(order_, order);
    upload(inverse_, inverse);
    upload(page_counts_, page_counts_host_);
  }

  // Step 2 on this rank: the bounds of every local cluster and the coarse summaries of the local
  // blocks (count-weighted means of their clusters' summaries, min and max of their bounds, member
  // counts), straight into the all-gather's send layout [kFields][kv_heads][B * local_blocks][d]; and
  // the selection queries of the rows.
  void summarize_blocks(const Fp32Inputs& in) {
    const int d = shape.head_dim, cp = options.coarse_pages;
    const std::int64_t rows = std::int64_t{shape.batch} * g_.local_blocks, slots = base_.n_loc;
    float* send = gather_send_.as<float>();
    const auto field = [&](int f, int g, std::int64_t row) { return send + ((g * kFields + f) * rows + row) * d; };
    std::vector<std::int32_t> totals(static_cast<std::size_t>(shape.kv_heads * rows), 0);
    for (int b = 0; b < shape.batch; ++b) {
      float* keys = cluster_keys_.as<float>() + unit(b, 0) * slots * d;
      tokens_to_slots(b, in.k, keys, slots * d);
      for (int g = 0; g < shape.kv_heads; ++g) {
        kernels::page_key_bounds({c_, options.page_size, d, keys + g * slots * d, device_counts(b, g), bounds(b, g, 0),
                                  bounds(b, g, 1)},
                                 ctx);
        const std::int64_t row = std::int64_t{b} * g_.local_blocks;
        kernels::cluster_blocks({g_.local_blocks, cp, d, device_counts(b, g), sums(key_sums_, b, g),
                                 sums(value_sums_, b, g), bounds(b, g, 0), bounds(b, g, 1), field(kMeanK, g, row),
                                 field(kMeanV, g, row), field(kMin, g, row), field(kMax, g, row)},
                                ctx);
        for (int cl = 0; cl < c_; ++cl) totals[g * rows + row + cl / cp] += counts(b, g)[cl];
        selection_queries(in, b, g);
      }
    }
    upload(count_send_, totals);
  }

  void selection_queries(const Fp32Inputs& in, int b, int g) {
    const std::int64_t n = shape.local_len();
    kernels::UnitQueryParams p;
    p.q = in.q + b * q_elems_per_element();
    p.heads = shape.heads;
    p.kv_heads = shape.kv_heads;
    p.head_dim = shape.head_dim;
    p.kv_head = g;
    p.order = order_.as<const std::int32_t>() + unit(b, g) * n;
    p.rows = n;
    p.out = tile_queries_.as<float>() + unit(b, g) * num_tiles() * shape.head_dim;
    kernels::unit_queries(p, ctx);
    if (sel_.unit == kernels::SelectUnit::kTile) return;
    p.unit_rows = 1;
    p.out = row_queries_.as<float>() + unit(b, g) * n * shape.head_dim;
    kernels::unit_queries(p, ctx);
  }

  // Step 3: every rank's coarse summaries and member counts (clusters may be partly filled); the
  // host keeps them with the selection queries for steps 4-6.
  void gather_coarse() {
    all_gather_coarse(session.comm(), ctx.stream, g_, kFields, 0, shape.kv_heads, gather_send_.as<float>(),
                      gather_recv_.as<float>());
    unpack_coarse(ctx, g_, kFields, 0, shape.kv_heads, gather_recv_.as<float>(),
                  [this](int b, int g) { return coarse(b, g, 0); });
    const std::int64_t rows = std::int64_t{shape.batch} * g_.local_blocks, per_rank = shape.kv_heads * rows;
    session.comm().all_gather({count_send_.data(), static_cast<std::size_t>(per_rank), DType::kI32},
                              {count_recv_.data(), static_cast<std::size_t>(g_.p * per_rank), DType::kI32},
                              ctx.stream);
    std::vector<std::int32_t> all;
    download(all, count_recv_);
    download(coarse_host_, coarse_);
    download(tile_queries_host_, tile_queries_);
    if (sel_.unit == kernels::SelectUnit::kRow) download(row_queries_host_, row_queries_);
    for (int b = 0; b < shape.batch; ++b)
      for (int g = 0; g < shape.kv_heads; ++g)
        for (int q = 0; q < g_.p; ++q)
          std::copy_n(all.data() + q * per_rank + g * rows + b * g_.local_blocks, g_.local_blocks,
                      block_counts_host_.data() + unit(b, g) * num_blocks_ + q * g_.local_blocks);
  }

  SurrogateSelectionParams selection_params(int b, int g, const kernels::ClusteredLayout& L) const {
    SurrogateSelectionParams p;
    p.layout = &L;
    p.options = sel_;
    p.head_dim = shape.head_dim;
    p.tile_queries = host_tile_queries(b, g);
    p.unit_queries = host_unit_queries(b, g);
    p.rows = &elements_[b].rows[static_cast<std::size_t>(g)];
    p.page_counts = {page_counts_host_.data() + unit(b, g) * max_resident_, static_cast<std::size_t>(L.resident_pages())};
    p.block_counts = host_block_counts(b, g);
    p.coarse = {host_coarse(b, g, kMeanK), host_coarse(b, g, kMin), host_coarse(b, g, kMax)};
    return p;
  }

  // Step 4 (choice) and the pool's shape: top-R per KV head, fetch capacity = the most any head
  // fetches; the local clusters gathered into their pages, their summaries in place.
  void plan_element(const Fp32Inputs& in, int b) {
    Element& e = elements_[b];
    e.layouts.clear();
    e.selections.clear();
    std::vector<std::vector<std::int64_t>> fetch;
    std::int64_t capacity = 0;
    for (int g = 0; g < shape.kv_heads; ++g) {
      fetch.push_back(select_remote_surrogate_blocks(selection_params(b, g, base_)));
      capacity = std::max<std::int64_t>(capacity, static_cast<std::int64_t>(fetch.back().size()));
    }
    for (int g = 0; g < shape.kv_heads; ++g) {
      kernels::ClusteredLayout L = base_;
      L.fetched = std::move(fetch[static_cast<std::size_t>(g)]);
      L.fetch_capacity = capacity;
      e.layouts.push_back(std::move(L));
    }
    const int d = shape.head_dim;
    const kernels::ClusteredLayout& L0 = e.layouts.front();
    e.shape = {1, shape.local_len(), shape.heads, shape.kv_heads, d, options.page_size, L0.num_pages()};
    kernels::fill_zero(pool(pools_, b, 0, 0), 2 * g_.pool_elems * sizeof(float), ctx);
    const std::int64_t head_stride = e.shape.num_pages * g_.page_elems;
    const std::int64_t summaries = L0.page_summary_first_page() * g_.page_elems;
    for (int kv = 0; kv < 2; ++kv) {
      tokens_to_slots(b, kv ? in.v : in.k, pool(pools_, b, 0, kv), head_stride);
      strided_copy(ctx, sums(kv ? value_sums_ : key_sums_, b, 0), pool(pools_, b, 0, kv) + summaries,
                   {{shape.kv_heads, cast_.summary_rows() * d, head_stride}, {std::int64_t{c_} * d, 1, 1}});
    }
  }

  // The forward's transfers on ctx (which must outlive it): blocks travel with their clusters'
  // summaries and counts.
  ClusteredTransfer fetcher(const kernels::ExecContext& c) const {
    return ClusteredTransfer(session.comm(), c, g_, pool_view(pools_),
                             {requests_.as<std::int32_t>(), requests_.bytes() / sizeof(std::int32_t)},
                             [this](int b, int g) { return page_counts(b, g); });
  }

  // After unit (b, g)'s fetch: its fetched clusters' bounds and the coarse summaries in its pool; then
  // the host reads what its selection needs: pool counts, cluster summaries (keys) and bounds.
  void complete_pool(int b, int g) {
    const int ps = options.page_size, d = shape.head_dim;
    const kernels::ClusteredLayout& L = elements_[b].layouts[static_cast<std::size_t>(g)];
    float* k = pool(pools_, b, g, 0);
    float* v = pool(pools_, b, g, 1);
    const std::int64_t first = L.fetched_first_page();
    kernels::page_key_bounds({L.fetched_pages(), ps, d, k + first * g_.page_elems, page_counts(b, g) + first,
                              bounds(b, g, 0) + first * d, bounds(b, g, 1) + first * d},
                             ctx);
    const std::int64_t coarse_keys = L.coarse_summary_first_page() * g_.page_elems;
    strided_copy(ctx, coarse(b, g, kMeanK), k + coarse_keys, {{num_blocks_ * d, 1, 1}});
    strided_copy(ctx, coarse(b, g, kMeanV), v + coarse_keys, {{num_blocks_ * d, 1, 1}});
    const std::int64_t u = unit(b, g);
    copy_to_host(page_counts_host_.data() + u * max_resident_, page_counts(b, g), max_resident_ * sizeof(std::int32_t),
                 session.device(), ctx.stream);
    copy_to_host(bounds_host_.data() + u * 2 * max_resident_ * d, bounds(b, g, 0),
                 2 * max_resident_ * d * sizeof(float), session.device(), ctx.stream);
    copy_to_host(page_sums_host_.data() + u * max_resident_ * d, k + L.page_summary_first_page() * g_.page_elems,
                 L.resident_pages() * d * sizeof(float), session.device(), ctx.stream);
  }

  std::vector<SurrogateHead> surrogate_heads(int b) const {
    const Element& e = elements_[b];
    std::vector<SurrogateHead> heads;
    for (int g = 0; g < shape.kv_heads; ++g) {
      const auto gi = static_cast<std::size_t>(g);
      heads.push_back({&e.layouts[gi], &e.rows[gi], &e.selections[gi], host_page_counts(b, g), host_block_counts(b, g)});
    }
    return heads;
  }

  // Step 5 for unit (b, g) on the host: its key bias and its cluster selection (KV heads in order).
  void select_clusters(int b, int g) {
    Element& e = elements_[b];
    const int ps = options.page_size, d = shape.head_dim;
    const kernels::ClusteredLayout& L = e.layouts[static_cast<std::size_t>(g)];
    kernels::fill_summary_key_bias(L, host_page_counts(b, g), host_block_counts(b, g),
                                   {key_bias_host_.data() + key_bias_offset(b) + g * e.shape.num_pages * ps,
                                    static_cast<std::size_t>(e.shape.num_pages * ps)});
    SurrogateSelectionParams p = selection_params(b, g, L);
    p.pages = {page_sums_host_.data() + unit(b, g) * max_resident_ * d, host_bounds(b, g, 0), host_bounds(b, g, 1)};
    e.selections.push_back(select_surrogate_clusters(p));
  }

  // Step 6 for element b: the table over every KV head's selection, uploaded.
  void build_table(int b) {
    Element& e = elements_[b];
    e.table = build_surrogate_table(surrogate_heads(b), sel_.unit);
    e.tables.emplace(e.table, e.shape, session.device(), ctx.stream);
  }

  // Step 6 on the device: the attention over element b's rows; O and LSE back to token order.
  void attend(const AttentionForwardArgs& a, int b) {
    if (shape.dtype != DType::kF32)
      kernels::copy_strided(kernels::StridedCopy::flat(pool(pools_, b, 0, 0), DType::kF32, attention_pool(b, 0),
                                                       shape.dtype, 2 * g_.pool_elems),
                            ctx);
    const std::size_t elt = dtype_size(shape.dtype);
    permute(order_, b, static_cast<const char*>(a.q.data) + b * q_elems_per_element() * elt,
            rows_of(q_rows_, b, shape.dtype), shape.dtype);
    kernels::attention_forward(params(b), ctx);
    permute(inverse_, b, rows_of(o_rows_, b, shape.dtype),
            static_cast<char*>(a.o.data) + b * q_elems_per_element() * elt, shape.dtype);
    permute_lse(inverse_, b, lse_rows_.as<const float>(), a.lse.as<float>());
  }

  kernels::AttentionForwardParams params(int b) const {
    const Element& e = elements_[b];
    kernels::AttentionForwardParams p;
    p.shape = e.shape;
    p.dtype = shape.dtype;
    p.o_dtype = shape.dtype;
    p.softmax_scale = 1.0f / std::sqrt(static_cast<float>(shape.head_dim));
    p.q = rows_of(q_rows_, b, shape.dtype);
    p.k_pages = attention_pool(b, 0);
    p.v_pages = attention_pool(b, 1);
    p.q_pos = q_pos_.as<const std::int32_t>();
    p.key_bias = key_bias_.as<float>() + key_bias_offset(b);
    p.table = e.tables->table();
    p.o = rows_of(o_rows_, b, shape.dtype);
    p.lse = lse_rows_.as<float>() + std::int64_t{b} * shape.heads * shape.local_len();
    p.workspace = fwd_ws_.data();
    p.workspace_bytes = fwd_ws_.bytes();
    return p;
  }

  // Attention backward per element (rows), fetched clusters' page and summary gradients home, coarse
  // summaries' gradients to their clusters, then every local cluster's summary and page gradients to
  // its members (and through the summaries' weights to A_k).
  void combine_backward(const AttentionBackwardArgs& a, const Fp32Inputs& in) override {
    const int d = shape.head_dim;
    const std::size_t elt = dtype_size(shape.dtype);
    for (int b = 0; b < shape.batch; ++b) {
      const Element& e = elements_[b];
      permute(order_, b, static_cast<const char*>(a.d_o.data) + b * q_elems_per_element() * elt, d_o_rows_.data(),
              shape.dtype);
      kernels::AttentionBackwardParams p;
      p.fwd = params(b);
      p.d_o = d_o_rows_.data();
      p.transposed = e.tables->transposed();
      p.d_q = d_q_rows_.as<float>();
      p.d_k_pages = pool(d_pools_, b, 0, 0);
      p.d_v_pages = pool(d_pools_, b, 0, 1);
      p.accumulate = false;  // writes every page of the pool
      p.workspace = bwd_ws_.data();
      p.workspace_bytes = bwd_ws_.bytes();
      kernels::attention_backward(p, ctx);
      permute(inverse_, b, d_q_rows_.data(), d_q_.as<float>() + b * q_elems_per_element(), DType::kF32);
    }
    // The coarse summaries' gradients are complete now: packed here, summed over the ranks in the first
    // overlapped step. Pipelined over (element, KV head) units: unit u's fetched clusters' gradients
    // travel home (and the peers' for this rank's clusters land in a stage slot) while the previous
    // unit's landed gradients are added.
    pack_coarse_gradients(
        ctx, g_,
        [this](int b, int g, int kv) {
          return pool(d_pools_, b, g, kv) +
                 elements_[b].layouts[static_cast<std::size_t>(g)].coarse_summary_first_page() * g_.page_elems;
        },
        scatter_send_.as<float>());
    const TransferOn transfer = [this](const kernels::ExecContext& c) {
      return ClusteredTransfer(session.comm(), c, g_, pool_view(d_pools_));
    };
    return_overlapped(
        overlap_, transfer, ctx, elements_layouts(), served_, {stage_.as<float>(), stage_.bytes() / sizeof(float)},
        [this](Stream stream) {
          reduce_scatter_coarse(session.comm(), stream, g_, scatter_send_.as<float>(), scatter_recv_.as<float>());
        },
        [](int, int) {});
    coarse_to_clusters();
    // The local clusters' summary gradients, complete now, in the summaries' own layout.
    for (int b = 0; b < shape.batch; ++b) {
      const std::int64_t head_stride = elements_[b].shape.num_pages * g_.page_elems;
      const std::int64_t first = elements_[b].layouts.front().page_summary_first_page() * g_.page_elems;
      for (int kv = 0; kv < 2; ++kv)
        strided_copy(ctx, pool(d_pools_, b, 0, kv) + first, sums(kv ? d_value_sums_ : d_key_sums_, b, 0),
                     {{shape.kv_heads, head_stride, cast_.summary_rows() * d}, {std::int64_t{c_} * d, 1, 1}});
    }
    summaries_backward(in);
    for (int b = 0; b < shape.batch; ++b) {
      const std::int64_t head_stride = elements_[b].shape.num_pages * g_.page_elems;
      slots_to_tokens(b, pool(d_pools_, b, 0, 0), head_stride, d_k());
      slots_to_tokens(b, pool(d_pools_, b, 0, 1), head_stride, d_v());
    }
  }

  // The coarse summaries' gradients, summed over the ranks into each block's owner (scatter_recv_),
  // to the block's clusters: d R_cl += count_cl / count_block * d R_block (the count-weighted mean).
  void coarse_to_clusters() {
    const int d = shape.head_dim;
    const std::int64_t rows = std::int64_t{shape.batch} * g_.local_blocks;
    const float* recv = scatter_recv_.as<const float>();
    for (int b = 0; b < shape.batch; ++b)
      for (int g = 0; g < shape.kv_heads; ++g) {
        const std::int64_t first = elements_[b].layouts[static_cast<std::size_t>(g)].page_summary_first_page();
        const auto block = [&](int kv) { return recv + ((kv * shape.kv_heads + g) * rows + b * g_.local_blocks) * d; };
        kernels::cluster_blocks_backward({g_.local_blocks, options.coarse_pages, d, device_counts(b, g), block(0),
                                          block(1), pool(d_pools_, b, g, 0) + first * g_.page_elems,
                                          pool(d_pools_, b, g, 1) + first * g_.page_elems},
                                         ctx);
      }
  }

  ClusterGeometry g_;
  kernels::SelectionOptions sel_;
  kernels::ClusteredLayout base_;  // this rank's layout with no fetched block and the largest capacity
  std::int64_t num_blocks_ = 0, max_resident_ = 0;
  std::vector<Element> elements_;
  std::vector<ServedRequests> served_;
  DeviceBuffer requests_;  // request lists in flight (ClusteredTransfer)
  DeviceBuffer pools_, d_pools_, attn_pools_, key_bias_, page_counts_, bounds_, cluster_keys_, gather_send_,
      gather_recv_, count_send_, count_recv_, coarse_, scatter_send_, scatter_recv_, stage_, order_, inverse_,
      tile_queries_, row_queries_, q_rows_, o_rows_, lse_rows_, d_o_rows_, d_q_rows_, fwd_ws_, bwd_ws_;
  // Host copies of what selection and the tables read (attention_cast.hpp).
  std::vector<std::int32_t> page_counts_host_, block_counts_host_;
  std::vector<float> coarse_host_, bounds_host_, page_sums_host_, tile_queries_host_, row_queries_host_, key_bias_host_;
  // The forward's fetches and the backward's returns, beside compute. Last, so destroyed first: when an
  // error unwinds a pipeline, the step still in flight is waited for before the buffers it uses are freed.
  CommOverlap overlap_;
};

}  // namespace

std::unique_ptr<DistributedAttention::Mode> make_surrogate_joint_mode(const Session& s, const LayerShape& sh,
                                                                      const AttentionOptions& o) {
  return std::make_unique<SurrogateJointMode>(s, sh, o);
}

}  // namespace ringcast
