// The clustered mode with clusters = surrogate (CAST; DESIGN.md §4.1-4.2, ALGORITHMS.md §5,
// docs/clustered-design.md "Surrogate clusters"): bidirectional, contiguous placement, CPU backend.
// Per rank, element and KV head, the caller's surrogates S [h_kv, c, d] score the local tokens
// (A_q = Q Sᵀ per query head, A_k = K Sᵀ), assign them to c clusters of at most page_size members
// and summarise every cluster by its softmax(A_k)-weighted means (kernels/cast.hpp). Then
//  - combine = joint: clusters are the pages of the clustered mode (attention_cast.hpp). A query row
//    sees its own clusters exactly (the window), the clusters its unit selected exactly (local ones,
//    or remote ones fetched whole with their summaries) and every other cluster through a cluster or
//    coarse summary, in one softmax; rows run in cluster order (per KV head) so a tile meets few
//    clusters.
//  - combine = cast: CAST's mix. Intra-cluster attention over the gathered members; each surrogate's
//    summary merged over the ranks by log-sum-exp (one softmax over all of its members); the output
//    mixes them with softmax_c(A_q) (kernels::cast_mix).
// Gradients reach Q, K, V through attention and summaries, S through the affinities (the assignment
// is hard); dS is this rank's part, added into the caller's buffer. All buffers are host memory.
#include "attention_cast.hpp"
#include "attention_internal.hpp"
#include "clustered_internal.hpp"

#include <ringcast/error.hpp>
#include <ringcast/kernels/cast.hpp>
#include <ringcast/kernels/layout.hpp>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>

namespace ringcast {
namespace {

// The coarse-summary fields that travel and that selection reads, in this order.
enum Field { kMeanK, kMeanV, kMin, kMax, kFields };

// Per-channel min and max over `count` key rows (row(i) -> pointer); zeros when count is 0.
template <typename Row>
void key_bounds(int d, std::int32_t count, Row row, float* mn, float* mx) {
  std::fill(mn, mn + d, count > 0 ? std::numeric_limits<float>::infinity() : 0.f);
  std::fill(mx, mx + d, count > 0 ? -std::numeric_limits<float>::infinity() : 0.f);
  for (std::int32_t i = 0; i < count; ++i) {
    const float* k = row(i);
    for (int e = 0; e < d; ++e) {
      mn[e] = std::min(mn[e], k[e]);
      mx[e] = std::max(mx[e], k[e]);
    }
  }
}

// What the joint forward of one batch element leaves for the backward.
struct Element {
  std::vector<SurrogateRows> rows;             // per KV head
  std::vector<kernels::ClusteredLayout> layouts;
  std::vector<SurrogateSelection> selections;
  kernels::AttentionShape shape;               // batch 1, num_pages of this element
  kernels::HostBlockTable table;
  std::optional<DeviceTables> tables;
};

class SurrogateMode final : public DistributedAttention::Mode {
 public:
  SurrogateMode(const Session& s, const LayerShape& sh, const AttentionOptions& o)
      : Mode(s, sh, o), c_(o.resolved_surrogate_clusters(sh)), joint_(o.combine == ClusterCombine::kJoint) {
    check_clustered_support(sh, o);
    RINGCAST_CHECK(s.device().kind == DeviceKind::kCpu,
                   "clustered mode with clusters = surrogate: runs on the CPU backend for now (the CAST kernels "
                   "exist on CUDA but this mode's host-side table builder is not ported); use clusters = blocks");
    const std::int64_t d = sh.head_dim, n = sh.local_len(), ps = o.page_size;
    cast_ = {sh.batch, n, sh.heads, sh.kv_heads, sh.head_dim, c_, o.page_size};
    const std::int64_t q_elems = sh.batch * n * sh.heads * d, kv_elems = sh.batch * n * sh.kv_heads * d;
    a_q_ = allocate(sh.batch * sh.heads * n * c_ * sizeof(float));
    a_k_ = allocate(sh.batch * sh.kv_heads * n * c_ * sizeof(float));
    d_a_q_ = allocate(a_q_.bytes());
    d_a_k_ = allocate(a_k_.bytes());
    members_ = allocate(sh.batch * sh.kv_heads * c_ * ps * sizeof(std::int32_t));
    counts_ = allocate(sh.batch * sh.kv_heads * c_ * sizeof(std::int32_t));
    const std::int64_t sums = sh.kv_heads * cast_.summary_rows() * d;
    for (DeviceBuffer* b : {&key_sums_, &value_sums_, &d_key_sums_, &d_value_sums_}) *b = allocate(sums * sizeof(float));
    d_q_ = allocate(q_elems * sizeof(float));
    d_kv_ = allocate(2 * kv_elems * sizeof(float));
    // No entry is causal, so the kernel reads no query position: one zero buffer serves every call.
    q_pos_ = allocate(std::max<std::int64_t>(n, cast_.member_rows()) * sizeof(std::int32_t));
    kernels::fill_zero(q_pos_.data(), q_pos_.bytes(), ctx);
    if (joint_) {
      allocate_joint();
    } else {
      allocate_cast();
    }
  }

  void forward(const AttentionForwardArgs& a) override {
    const float* q = a.q.as<const float>();
    const float* k = a.k.as<const float>();
    const float* v = a.v.as<const float>();
    const float* s = a.surrogates.as<const float>();
    kernels::cast_affinities({cast_, q, k, s, a_q_.as<float>(), a_k_.as<float>()}, ctx);
    kernels::cast_assign({cast_,
                          options.assignment == SurrogateAssignment::kTopK ? kernels::CastAssignment::kTopK
                                                                           : kernels::CastAssignment::kSingleTopK,
                          a_q_.as<const float>(), a_k_.as<const float>(), members_.as<std::int32_t>(),
                          counts_.as<std::int32_t>()},
                         ctx);
    kernels::cast_summaries({cast_, members_.as<const std::int32_t>(), counts_.as<const std::int32_t>(),
                             a_k_.as<const float>(), k, v, key_sums_.as<float>(), value_sums_.as<float>()},
                            ctx);
    if (joint_) {
      joint_forward(a);
    } else {
      cast_forward(a);
    }
  }

  void backward(const AttentionBackwardArgs& a) override {
    RINGCAST_CHECK(joint_ ? elements_.front().tables.has_value() : intra_tables_.has_value(),
                   "clustered mode: backward() needs a forward() first");
    kernels::fill_zero(d_kv_.data(), d_kv_.bytes(), ctx);
    kernels::fill_zero(d_a_k_.data(), d_a_k_.bytes(), ctx);
    if (joint_) {
      joint_backward(a);
    } else {
      cast_backward(a);
    }
    const std::int64_t kv_elems = std::int64_t{shape.batch} * shape.local_len() * shape.kv_heads * shape.head_dim;
    float* d_k = d_kv_.as<float>();
    float* d_v = d_k + kv_elems;
    kernels::cast_affinities_backward({cast_, a.q.as<const float>(), a.k.as<const float>(),
                                       a.surrogates.as<const float>(), d_a_q_.as<const float>(),
                                       d_a_k_.as<const float>(), d_q_.as<float>(), d_k, a.d_surrogates.as<float>()},
                                      ctx);
    const std::int64_t q_elems = std::int64_t{shape.batch} * shape.local_len() * shape.heads * shape.head_dim;
    kernels::copy_strided(kernels::StridedCopy::flat(d_q_.data(), DType::kF32, a.d_q.data, shape.dtype, q_elems), ctx);
    kernels::copy_strided(kernels::StridedCopy::flat(d_k, DType::kF32, a.d_k.data, shape.dtype, kv_elems), ctx);
    kernels::copy_strided(kernels::StridedCopy::flat(d_v, DType::kF32, a.d_v.data, shape.dtype, kv_elems), ctx);
  }

  // Joint: the table read back per row (attention_cast.hpp). Cast: what the intra-cluster attention
  // attended, each row's own clusters (the summaries reach the output through the mix, not a softmax).
  std::vector<AttendedEntry> attended_entries() const override {
    RINGCAST_CHECK(joint_ ? elements_.front().tables.has_value() : intra_tables_.has_value(),
                   "clustered mode: attended_entries() needs a forward() first");
    std::vector<AttendedEntry> out;
    for (int b = 0; b < shape.batch; ++b) {
      if (joint_) {
        const std::vector<SurrogateHead> heads = surrogate_heads(b);
        append_surrogate_entries(out, b, heads, elements_[b].table, positions);
        continue;
      }
      for (std::int64_t tile = 0; tile * kernels::kQueryTile < shape.local_len(); ++tile)
        for (int g = 0; g < shape.kv_heads; ++g)
          for (int cl = 0; cl < c_; ++cl) {
            AttendedEntry e;
            e.batch = b;
            e.tile = tile;
            e.first_row_pos = positions[static_cast<std::size_t>(tile * kernels::kQueryTile)];
            e.kv_head = g;
            e.global_id = std::int64_t{session.rank()} * c_ + cl;
            for (int s = 0; s < counts(b, g)[cl]; ++s) {
              const std::int64_t j = members(b, g)[cl * options.page_size + s] - tile * kernels::kQueryTile;
              if (j >= 0 && j < kernels::kQueryTile) e.row_mask[j / 64] |= std::uint64_t{1} << (j % 64);
            }
            if (e.row_mask[0] | e.row_mask[1]) out.push_back(e);
          }
    }
    return out;
  }

  std::vector<std::int32_t> cluster_members() const override {
    RINGCAST_CHECK(joint_ ? elements_.front().tables.has_value() : intra_tables_.has_value(),
                   "clustered mode: cluster_members() needs a forward() first");
    const std::size_t count = members_.bytes() / sizeof(std::int32_t);
    std::vector<std::int32_t> out(members_.as<const std::int32_t>(), members_.as<const std::int32_t>() + count);
    for (std::int32_t& j : out)
      if (j >= 0) j = positions[static_cast<std::size_t>(j)];
    return out;
  }

 private:
  // ---- Addressing (layouts in kernels/cast.hpp and attention_cast.hpp). ----
  std::int64_t unit(int b, int g) const { return std::int64_t{b} * shape.kv_heads + g; }
  const std::int32_t* members(int b, int g) const {
    return members_.as<const std::int32_t>() + unit(b, g) * c_ * options.page_size;
  }
  const std::int32_t* counts(int b, int g) const { return counts_.as<const std::int32_t>() + unit(b, g) * c_; }
  // Cluster cl of (b, g) in a [kv_heads, summary_rows, d] summary buffer: row (g, b * c + cl).
  float* sums(const DeviceBuffer& buf, int b, int g) const {
    return buf.as<float>() + (g * cast_.summary_rows() + std::int64_t{b} * c_) * shape.head_dim;
  }
  // Local token j of (b, g) in a [B, n_loc, kv_heads, d] buffer.
  std::int64_t kv_row(int b, std::int64_t j, int g) const {
    return ((b * shape.local_len() + j) * shape.kv_heads + g) * shape.head_dim;
  }

  // ---- combine = joint ----
  void allocate_joint() {
    const LayerShape& sh = shape;
    const AttentionOptions& o = options;
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
    key_bias_ = allocate(sh.batch * sh.kv_heads * max_pages * o.page_size * sizeof(float));
    page_counts_ = allocate(units * max_resident_ * sizeof(std::int32_t));
    bounds_ = allocate(units * 2 * max_resident_ * d * sizeof(float));
    const std::int64_t rows = sh.batch * g_.local_blocks;
    gather_send_ = allocate(kFields * sh.kv_heads * rows * d * sizeof(float));
    gather_recv_ = allocate(g_.p * gather_send_.bytes());
    count_send_ = allocate(sh.kv_heads * rows * sizeof(std::int32_t));
    count_recv_ = allocate(g_.p * count_send_.bytes());
    coarse_ = allocate(units * kFields * num_blocks_ * d * sizeof(float));
    block_counts_ = allocate(units * num_blocks_ * sizeof(std::int32_t));
    scatter_recv_ = allocate(2 * sh.kv_heads * rows * d * sizeof(float));
    scatter_send_ = allocate(g_.p * scatter_recv_.bytes());
    // A requester fetches at most min(R, local_blocks) of this rank's blocks per (element, KV head).
    stage_ = allocate(g_.unit_stage_elems(o.remote_blocks) * sizeof(float));
    requests_ = allocate(request_scratch_ints(g_, o.remote_blocks) * sizeof(std::int32_t));
    const std::int64_t q_elems = n * sh.heads * d;
    q_rows_ = allocate(sh.batch * q_elems * sizeof(float));
    o_rows_ = allocate(sh.batch * q_elems * sizeof(float));
    lse_rows_ = allocate(sh.batch * sh.heads * n * sizeof(float));
    d_o_rows_ = allocate(q_elems * sizeof(float));
    d_q_rows_ = allocate(q_elems * sizeof(float));
    const kernels::AttentionShape widest{1, n, sh.heads, sh.kv_heads, sh.head_dim, o.page_size, max_pages};
    fwd_ws_ = allocate(kernels::attention_forward_workspace_bytes(widest, ctx));
    bwd_ws_ = allocate(kernels::attention_backward_workspace_bytes(widest, ctx));
    // A_q decides the assignment only: its gradient is zero in the joint combine.
    kernels::fill_zero(d_a_q_.data(), d_a_q_.bytes(), ctx);
    elements_.resize(static_cast<std::size_t>(sh.batch));
  }

  float* pool(const DeviceBuffer& buf, int b, int g, int kv) const {
    return buf.as<float>() + (2 * b + kv) * g_.pool_elems + g * elements_[b].shape.num_pages * g_.page_elems;
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
  float* bounds(int b, int g, int max) const {
    return bounds_.as<float>() + (unit(b, g) * 2 + max) * max_resident_ * shape.head_dim;
  }
  float* coarse(int b, int g, int f) const {
    return coarse_.as<float>() + (unit(b, g) * kFields + f) * num_blocks_ * shape.head_dim;
  }
  std::int32_t* block_counts(int b, int g) const { return block_counts_.as<std::int32_t>() + unit(b, g) * num_blocks_; }
  float* key_bias(int b) const { return key_bias_.as<float>() + std::int64_t{b} * g_.pool_elems / shape.head_dim; }
  float* rows_of(const DeviceBuffer& buf, int b) const {
    return buf.as<float>() + std::int64_t{b} * shape.local_len() * shape.heads * shape.head_dim;
  }

  // rows[i, h] = tokens[order_{h / G}[i], h] ([n_loc, heads, d] of one element), and the inverse.
  void tokens_to_rows(const Element& e, const float* tokens, float* rows) const {
    const int d = shape.head_dim, h = shape.heads, group = shape.heads / shape.kv_heads;
    for (int hh = 0; hh < h; ++hh) {
      const std::vector<std::int32_t>& order = e.rows[static_cast<std::size_t>(hh / group)].order;
      for (std::size_t i = 0; i < order.size(); ++i)
        std::copy_n(tokens + (std::int64_t{order[i]} * h + hh) * d, d, rows + (std::int64_t(i) * h + hh) * d);
    }
  }
  void rows_to_tokens(const Element& e, const float* rows, float* tokens) const {
    const int d = shape.head_dim, h = shape.heads, group = shape.heads / shape.kv_heads;
    for (int hh = 0; hh < h; ++hh) {
      const std::vector<std::int32_t>& order = e.rows[static_cast<std::size_t>(hh / group)].order;
      for (std::size_t i = 0; i < order.size(); ++i)
        std::copy_n(rows + (std::int64_t(i) * h + hh) * d, d, tokens + (std::int64_t{order[i]} * h + hh) * d);
    }
  }

  void joint_forward(const AttentionForwardArgs& a) {
    const float* k = a.k.as<const float>();
    const std::int64_t n = shape.local_len(), q_elems = n * shape.heads * shape.head_dim;
    for (int b = 0; b < shape.batch; ++b) {
      Element& e = elements_[b];
      e.rows.clear();
      e.tables.reset();
      for (int g = 0; g < shape.kv_heads; ++g)
        e.rows.push_back(surrogate_rows({members(b, g), static_cast<std::size_t>(c_) * options.page_size},
                                        {counts(b, g), static_cast<std::size_t>(c_)}, n, options.page_size));
      tokens_to_rows(e, a.q.as<const float>() + b * q_elems, rows_of(q_rows_, b));
    }
    summarize_blocks(k);
    gather_coarse();
    for (int b = 0; b < shape.batch; ++b) plan_element(a, b);
    const std::span<std::int32_t> requests(requests_.as<std::int32_t>(), requests_.bytes() / sizeof(std::int32_t));
    ClusteredTransfer t(session.comm(), ctx, g_, pool_view(pools_), requests,
                        [this](int b, int g) { return page_counts(b, g); });
    t.fetch_blocks(elements_layouts(), served_);
    for (int b = 0; b < shape.batch; ++b) attend(a, b);
  }

  // Step 2 on this rank: the bounds of every local cluster and the coarse summaries of the local
  // blocks (count-weighted means of their clusters' summaries, min and max of their bounds, member
  // counts), straight into the all-gather's send layout [kFields][kv_heads][B * local_blocks][d].
  void summarize_blocks(const float* k) {
    const int d = shape.head_dim, cp = options.coarse_pages;
    const std::int64_t rows = std::int64_t{shape.batch} * g_.local_blocks;
    float* send = gather_send_.as<float>();
    const auto field = [&](int f, int g, std::int64_t row) { return send + ((f * shape.kv_heads + g) * rows + row) * d; };
    for (int b = 0; b < shape.batch; ++b)
      for (int g = 0; g < shape.kv_heads; ++g) {
        const std::int32_t* mem = members(b, g);
        const std::int32_t* cnt = counts(b, g);
        for (int cl = 0; cl < c_; ++cl)
          key_bounds(
              d, cnt[cl], [&](std::int32_t s) { return k + kv_row(b, mem[cl * options.page_size + s], g); },
              bounds(b, g, 0) + std::int64_t{cl} * d, bounds(b, g, 1) + std::int64_t{cl} * d);
        for (std::int64_t l = 0; l < g_.local_blocks; ++l) {
          const std::int64_t row = b * g_.local_blocks + l;
          float *km = field(kMeanK, g, row), *vm = field(kMeanV, g, row), *mn = field(kMin, g, row),
                *mx = field(kMax, g, row);
          std::fill(km, km + d, 0.f);
          std::fill(vm, vm + d, 0.f);
          std::int32_t total = 0;
          for (std::int64_t cl = l * cp; cl < (l + 1) * cp; ++cl) {
            if (cnt[cl] == 0) continue;
            const float* ks = sums(key_sums_, b, g) + cl * d;
            const float* vs = sums(value_sums_, b, g) + cl * d;
            const float* cmn = bounds(b, g, 0) + cl * d;
            const float* cmx = bounds(b, g, 1) + cl * d;
            for (int e = 0; e < d; ++e) {
              km[e] += cnt[cl] * ks[e];
              vm[e] += cnt[cl] * vs[e];
              mn[e] = total == 0 ? cmn[e] : std::min(mn[e], cmn[e]);
              mx[e] = total == 0 ? cmx[e] : std::max(mx[e], cmx[e]);
            }
            total += cnt[cl];
          }
          if (total == 0) {
            std::fill(mn, mn + d, 0.f);
            std::fill(mx, mx + d, 0.f);
          }
          const float inv = total > 0 ? 1.f / static_cast<float>(total) : 0.f;
          for (int e = 0; e < d; ++e) {
            km[e] *= inv;
            vm[e] *= inv;
          }
          count_send_.as<std::int32_t>()[g * rows + row] = total;
        }
      }
  }

  // Step 3: every rank's coarse summaries and member counts (clusters may be partly filled).
  void gather_coarse() {
    all_gather_coarse(session.comm(), ctx, g_, kFields, gather_send_.as<float>(), gather_recv_.as<float>(),
                      [this](int b, int g) { return coarse(b, g, 0); });
    const std::int64_t rows = std::int64_t{shape.batch} * g_.local_blocks, per_rank = shape.kv_heads * rows;
    session.comm().all_gather({count_send_.data(), static_cast<std::size_t>(per_rank), DType::kI32},
                              {count_recv_.data(), static_cast<std::size_t>(g_.p * per_rank), DType::kI32},
                              ctx.stream);
    const std::int32_t* all = count_recv_.as<const std::int32_t>();
    for (int b = 0; b < shape.batch; ++b)
      for (int g = 0; g < shape.kv_heads; ++g)
        for (int q = 0; q < g_.p; ++q)
          std::copy_n(all + q * per_rank + g * rows + b * g_.local_blocks, g_.local_blocks,
                      block_counts(b, g) + q * g_.local_blocks);
  }

  SurrogateSelectionParams selection_params(int b, int g, const kernels::ClusteredLayout& L) const {
    SurrogateSelectionParams p;
    p.layout = &L;
    p.options = sel_;
    p.queries = {rows_of(q_rows_, b), shape.heads, shape.kv_heads, shape.head_dim, g};
    p.rows = &elements_[b].rows[static_cast<std::size_t>(g)];
    p.page_counts = {page_counts(b, g), static_cast<std::size_t>(L.resident_pages())};
    p.block_counts = {block_counts(b, g), static_cast<std::size_t>(num_blocks_)};
    p.coarse = {coarse(b, g, kMeanK), coarse(b, g, kMin), coarse(b, g, kMax)};
    return p;
  }

  // Step 4 (choice) and the pool's shape: top-R per KV head, fetch capacity = the most any head
  // fetches; the local clusters packed into their pages, their summaries and counts in place.
  void plan_element(const AttentionForwardArgs& a, int b) {
    Element& e = elements_[b];
    e.layouts.clear();
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
    const int ps = options.page_size, d = shape.head_dim;
    e.shape = {1, shape.local_len(), shape.heads, shape.kv_heads, d, ps, e.layouts.front().num_pages()};
    kernels::fill_zero(pool(pools_, b, 0, 0), 2 * g_.pool_elems * sizeof(float), ctx);
    const float* k = a.k.as<const float>();
    const float* v = a.v.as<const float>();
    for (int g = 0; g < shape.kv_heads; ++g) {
      const kernels::ClusteredLayout& L = e.layouts[static_cast<std::size_t>(g)];
      const std::int32_t* mem = members(b, g);
      for (int cl = 0; cl < c_; ++cl)
        for (int s = 0; s < counts(b, g)[cl]; ++s) {
          const std::int64_t slot = (std::int64_t{cl} * ps + s) * d, token = kv_row(b, mem[cl * ps + s], g);
          std::copy_n(k + token, d, pool(pools_, b, g, 0) + slot);
          std::copy_n(v + token, d, pool(pools_, b, g, 1) + slot);
        }
      const std::int64_t summaries = L.page_summary_first_page() * g_.page_elems;
      std::copy_n(sums(key_sums_, b, g), std::int64_t{c_} * d, pool(pools_, b, g, 0) + summaries);
      std::copy_n(sums(value_sums_, b, g), std::int64_t{c_} * d, pool(pools_, b, g, 1) + summaries);
      std::int32_t* cnt = page_counts(b, g);
      std::copy_n(counts(b, g), c_, cnt);
      std::fill(cnt + c_, cnt + max_resident_, 0);
    }
  }

  std::vector<SurrogateHead> surrogate_heads(int b) const {
    const Element& e = elements_[b];
    std::vector<SurrogateHead> heads;
    for (int g = 0; g < shape.kv_heads; ++g) {
      const auto gi = static_cast<std::size_t>(g);
      heads.push_back({&e.layouts[gi], &e.rows[gi], &e.selections[gi],
                       {page_counts(b, g), static_cast<std::size_t>(e.layouts[gi].resident_pages())},
                       {block_counts(b, g), static_cast<std::size_t>(num_blocks_)}});
    }
    return heads;
  }

  // Steps 5-6 for element b: the fetched clusters' bounds, the coarse summaries and biases in the pool,
  // cluster selection, the table and the attention over rows; O and LSE back to token order.
  void attend(const AttentionForwardArgs& a, int b) {
    Element& e = elements_[b];
    e.selections.clear();
    const int ps = options.page_size, d = shape.head_dim;
    for (int g = 0; g < shape.kv_heads; ++g) {
      const kernels::ClusteredLayout& L = e.layouts[static_cast<std::size_t>(g)];
      float* k = pool(pools_, b, g, 0);
      float* v = pool(pools_, b, g, 1);
      for (std::int64_t page = L.fetched_first_page(); page < L.resident_pages(); ++page)
        key_bounds(
            d, page_counts(b, g)[page], [&](std::int32_t s) { return k + (page * ps + s) * d; },
            bounds(b, g, 0) + page * d, bounds(b, g, 1) + page * d);
      const std::int64_t coarse_keys = L.coarse_summary_first_page() * g_.page_elems;
      std::copy_n(coarse(b, g, kMeanK), num_blocks_ * d, k + coarse_keys);
      std::copy_n(coarse(b, g, kMeanV), num_blocks_ * d, v + coarse_keys);
      kernels::fill_summary_key_bias(
          L, {page_counts(b, g), static_cast<std::size_t>(L.resident_pages())},
          {block_counts(b, g), static_cast<std::size_t>(num_blocks_)},
          {key_bias(b) + g * e.shape.num_pages * ps, static_cast<std::size_t>(e.shape.num_pages * ps)});
      SurrogateSelectionParams p = selection_params(b, g, L);
      p.pages = {k + L.page_summary_first_page() * g_.page_elems, bounds(b, g, 0), bounds(b, g, 1)};
      e.selections.push_back(select_surrogate_clusters(p));
    }
    const std::vector<SurrogateHead> heads = surrogate_heads(b);
    e.table = build_surrogate_table(heads, sel_.unit);
    e.tables.emplace(e.table, e.shape, session.device(), ctx.stream);
    kernels::attention_forward(params(b), ctx);
    const std::int64_t n = shape.local_len();
    rows_to_tokens(e, rows_of(o_rows_, b), a.o.as<float>() + b * n * shape.heads * d);
    const int group = shape.heads / shape.kv_heads;
    const float* lse_rows = lse_rows_.as<const float>() + std::int64_t{b} * shape.heads * n;
    float* lse = a.lse.as<float>() + std::int64_t{b} * shape.heads * n;
    for (int hh = 0; hh < shape.heads; ++hh) {
      const std::vector<std::int32_t>& order = e.rows[static_cast<std::size_t>(hh / group)].order;
      for (std::int64_t i = 0; i < n; ++i) lse[hh * n + order[static_cast<std::size_t>(i)]] = lse_rows[hh * n + i];
    }
  }

  kernels::AttentionForwardParams params(int b) const {
    const Element& e = elements_[b];
    kernels::AttentionForwardParams p;
    p.shape = e.shape;
    p.dtype = DType::kF32;
    p.o_dtype = DType::kF32;
    p.softmax_scale = 1.0f / std::sqrt(static_cast<float>(shape.head_dim));
    p.q = rows_of(q_rows_, b);
    p.k_pages = pool(pools_, b, 0, 0);
    p.v_pages = pool(pools_, b, 0, 1);
    p.q_pos = q_pos_.as<const std::int32_t>();
    p.key_bias = key_bias(b);
    p.table = e.tables->table();
    p.o = rows_of(o_rows_, b);
    p.lse = lse_rows_.as<float>() + std::int64_t{b} * shape.heads * shape.local_len();
    p.workspace = fwd_ws_.data();
    p.workspace_bytes = fwd_ws_.bytes();
    return p;
  }

  // Attention backward per element (rows), fetched clusters' page and summary gradients home, coarse
  // summaries' gradients to their clusters, then every local cluster's summary and page gradients to
  // its members (and through the summaries' weights to A_k).
  void joint_backward(const AttentionBackwardArgs& a) {
    const int ps = options.page_size, d = shape.head_dim;
    const std::int64_t n = shape.local_len(), q_elems = n * shape.heads * d;
    for (int b = 0; b < shape.batch; ++b) {
      const Element& e = elements_[b];
      tokens_to_rows(e, a.d_o.as<const float>() + b * q_elems, d_o_rows_.as<float>());
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
      rows_to_tokens(e, d_q_rows_.as<const float>(), d_q_.as<float>() + b * q_elems);
    }
    ClusteredTransfer t(session.comm(), ctx, g_, pool_view(d_pools_));
    t.return_all_gradients(elements_layouts(), served_, {stage_.as<float>(), stage_.bytes() / sizeof(float)});
    coarse_to_clusters();
    // The local clusters' summary gradients, complete now, in the summaries' own layout.
    for (int b = 0; b < shape.batch; ++b)
      for (int g = 0; g < shape.kv_heads; ++g) {
        const std::int64_t first = elements_[b].layouts[static_cast<std::size_t>(g)].page_summary_first_page();
        std::copy_n(pool(d_pools_, b, g, 0) + first * g_.page_elems, std::int64_t{c_} * d, sums(d_key_sums_, b, g));
        std::copy_n(pool(d_pools_, b, g, 1) + first * g_.page_elems, std::int64_t{c_} * d, sums(d_value_sums_, b, g));
      }
    const std::int64_t kv_elems = std::int64_t{shape.batch} * n * shape.kv_heads * d;
    float* d_k = d_kv_.as<float>();
    float* d_v = d_k + kv_elems;
    kernels::cast_summaries_backward({cast_, members_.as<const std::int32_t>(), counts_.as<const std::int32_t>(),
                                      a_k_.as<const float>(), a.k.as<const float>(), a.v.as<const float>(),
                                      d_key_sums_.as<const float>(), d_value_sums_.as<const float>(),
                                      d_a_k_.as<float>(), d_k, d_v},
                                     ctx);
    // A token's key and value gradient sums over the pages it was gathered into.
    for (int b = 0; b < shape.batch; ++b)
      for (int g = 0; g < shape.kv_heads; ++g)
        for (int cl = 0; cl < c_; ++cl)
          for (int s = 0; s < counts(b, g)[cl]; ++s) {
            const std::int64_t slot = (std::int64_t{cl} * ps + s) * d, token = kv_row(b, members(b, g)[cl * ps + s], g);
            const float* dk = pool(d_pools_, b, g, 0) + slot;
            const float* dv = pool(d_pools_, b, g, 1) + slot;
            for (int i = 0; i < d; ++i) {
              d_k[token + i] += dk[i];
              d_v[token + i] += dv[i];
            }
          }
  }

  // The coarse summaries' gradients, summed over the ranks into each block's owner, then to the
  // block's clusters: d R_cl += count_cl / count_block * d R_block (the count-weighted mean).
  void coarse_to_clusters() {
    reduce_scatter_coarse(
        session.comm(), ctx, g_,
        [this](int b, int g, int kv) {
          return pool(d_pools_, b, g, kv) +
                 elements_[b].layouts[static_cast<std::size_t>(g)].coarse_summary_first_page() * g_.page_elems;
        },
        scatter_send_.as<float>(), scatter_recv_.as<float>());
    const int d = shape.head_dim, cp = options.coarse_pages;
    const std::int64_t rows = std::int64_t{shape.batch} * g_.local_blocks;
    for (int b = 0; b < shape.batch; ++b)
      for (int g = 0; g < shape.kv_heads; ++g) {
        const std::int32_t* cnt = counts(b, g);
        const std::int64_t first = elements_[b].layouts[static_cast<std::size_t>(g)].page_summary_first_page();
        for (std::int64_t l = 0; l < g_.local_blocks; ++l) {
          std::int32_t total = 0;
          for (std::int64_t cl = l * cp; cl < (l + 1) * cp; ++cl) total += cnt[cl];
          for (std::int64_t cl = l * cp; cl < (l + 1) * cp && total > 0; ++cl) {
            const float w = static_cast<float>(cnt[cl]) / static_cast<float>(total);
            for (int kv = 0; kv < 2; ++kv) {
              const float* src = scatter_recv_.as<const float>() + ((kv * shape.kv_heads + g) * rows + b * g_.local_blocks + l) * d;
              float* dst = pool(d_pools_, b, g, kv) + first * g_.page_elems + cl * d;
              for (int i = 0; i < d; ++i) dst[i] += w * src[i];
            }
          }
        }
      }
  }

  // ---- combine = cast ----
  void allocate_cast() {
    const LayerShape& sh = shape;
    const std::int64_t d = sh.head_dim, rows = cast_.member_rows(), pages = std::int64_t{sh.batch} * c_;
    intra_shape_ = {sh.batch, rows, sh.heads, sh.kv_heads, sh.head_dim, options.page_size, pages};
    const std::int64_t q_gathered = sh.batch * rows * sh.heads * d, kv_pages = sh.kv_heads * pages * options.page_size * d;
    q_gathered_ = allocate(q_gathered * sizeof(float));
    d_q_gathered_ = allocate(q_gathered_.bytes());
    intra_o_ = allocate(q_gathered_.bytes());
    d_intra_ = allocate(q_gathered_.bytes());
    intra_lse_ = allocate(sh.batch * sh.heads * rows * sizeof(float));
    for (DeviceBuffer* b : {&k_pages_, &v_pages_, &d_k_pages_, &d_v_pages_}) *b = allocate(kv_pages * sizeof(float));
    // Per rank: the value summaries [kv_heads][B c][d], then their log-sum-exps [kv_heads][B c].
    const std::int64_t part = sh.kv_heads * pages * (d + 1);
    summary_send_ = allocate(part * sizeof(float));
    summary_recv_ = allocate(sh.ranks * summary_send_.bytes());
    merged_ = allocate(summary_send_.bytes());
    global_sums_ = allocate(key_sums_.bytes());
    d_global_sums_ = allocate(key_sums_.bytes());
    d_merged_ = allocate(sh.kv_heads * pages * d * sizeof(float));
    fwd_ws_ = allocate(kernels::attention_forward_workspace_bytes(intra_shape_, ctx));
    bwd_ws_ = allocate(kernels::attention_backward_workspace_bytes(intra_shape_, ctx));
  }

  // One merge/all-gather part: values [kv_heads][B c][d] and log-sum-exps [kv_heads][B c].
  float* part_values(const DeviceBuffer& buf, int rank) const {
    return buf.as<float>() + rank * summary_send_.bytes() / sizeof(float);
  }
  float* part_lse(const DeviceBuffer& buf, int rank) const {
    return part_values(buf, rank) + std::int64_t{shape.kv_heads} * shape.batch * c_ * shape.head_dim;
  }
  // Row (g, b * c + cl) of a part, as a pointer offset in values.
  std::int64_t part_row(int b, int g, int cl) const { return (std::int64_t{g} * shape.batch + b) * c_ + cl; }

  // The intra-cluster table: gathered row cl * ps + s is member s of cluster cl (page b * c + cl); a
  // tile's rows meet 128 / ps clusters, each seen by its members' rows, its padding masked.
  kernels::HostBlockTable intra_table() const {
    const int ps = options.page_size;
    kernels::HostBlockTable t;
    for (int b = 0; b < shape.batch; ++b)
      for (std::int64_t tile = 0; tile < intra_shape_.num_tiles(); ++tile)
        for (int g = 0; g < shape.kv_heads; ++g) {
          const std::int64_t r0 = tile * kernels::kQueryTile;
          for (std::int64_t cl = r0 / ps; cl < std::min<std::int64_t>(c_, (r0 + kernels::kQueryTile) / ps); ++cl) {
            const std::int32_t count = counts(b, g)[cl];
            if (count == 0) continue;
            kernels::BlockEntry e{};
            for (std::int64_t r = cl * ps - r0; r < cl * ps - r0 + count; ++r) e.row_mask[r / 64] |= std::uint64_t{1} << (r % 64);
            e.page = static_cast<std::int32_t>(std::int64_t{b} * c_ + cl);
            e.key_meta = -1;
            e.key_count = count;
            t.entries.push_back(e);
          }
          t.offsets.push_back(static_cast<std::int64_t>(t.entries.size()));
        }
    return t;
  }

  kernels::AttentionForwardParams intra_params() const {
    kernels::AttentionForwardParams p;
    p.shape = intra_shape_;
    p.dtype = DType::kF32;
    p.o_dtype = DType::kF32;
    p.softmax_scale = 1.0f / std::sqrt(static_cast<float>(shape.head_dim));
    p.q = q_gathered_.data();
    p.k_pages = k_pages_.data();
    p.v_pages = v_pages_.data();
    p.q_pos = q_pos_.as<const std::int32_t>();
    p.table = intra_tables_->table();
    p.o = intra_o_.data();
    p.lse = intra_lse_.as<float>();
    p.workspace = fwd_ws_.data();
    p.workspace_bytes = fwd_ws_.bytes();
    return p;
  }

  void cast_forward(const AttentionForwardArgs& a) {
    const int ps = options.page_size, d = shape.head_dim;
    const float* a_k = a_k_.as<const float>();
    kernels::cast_gather({cast_, members_.as<const std::int32_t>(), counts_.as<const std::int32_t>(),
                          a.q.as<const float>(), a.k.as<const float>(), a.v.as<const float>(), q_gathered_.as<float>(),
                          k_pages_.as<float>(), v_pages_.as<float>()},
                         ctx);
    intra_tables_.emplace(intra_table(), intra_shape_, session.device(), ctx.stream);
    kernels::attention_forward(intra_params(), ctx);

    // Each surrogate's summary over the whole sequence: this rank's softmax(A_k)-weighted means and
    // log Σ exp(A_k) of their members, merged over the ranks by log-sum-exp.
    for (int b = 0; b < shape.batch; ++b)
      for (int g = 0; g < shape.kv_heads; ++g)
        for (int cl = 0; cl < c_; ++cl) {
          const std::int64_t row = part_row(b, g, cl);
          std::copy_n(sums(value_sums_, b, g) + std::int64_t{cl} * d, d, part_values(summary_send_, 0) + row * d);
          part_lse(summary_send_, 0)[row] = member_lse(a_k, b, g, cl);
        }
    session.comm().all_gather(
        {summary_send_.data(), summary_send_.bytes() / sizeof(float), DType::kF32},
        {summary_recv_.data(), summary_recv_.bytes() / sizeof(float), DType::kF32}, ctx.stream);
    const std::int64_t rows = std::int64_t{shape.kv_heads} * shape.batch * c_;
    std::copy_n(part_values(summary_recv_, 0), rows * (d + 1), merged_.as<float>());
    for (int q = 1; q < shape.ranks; ++q)
      kernels::merge_by_lse({1, rows, 1, d, part_values(merged_, 0), part_lse(merged_, 0),
                             part_values(summary_recv_, q), part_lse(summary_recv_, q)},
                            ctx);
    kernels::fill_zero(global_sums_.data(), global_sums_.bytes(), ctx);
    for (int b = 0; b < shape.batch; ++b)
      for (int g = 0; g < shape.kv_heads; ++g)
        std::copy_n(part_values(merged_, 0) + part_row(b, g, 0) * d, std::int64_t{c_} * d, sums(global_sums_, b, g));

    kernels::cast_mix({cast_, members_.as<const std::int32_t>(), counts_.as<const std::int32_t>(),
                       a_q_.as<const float>(), intra_o_.as<const float>(), global_sums_.as<const float>(),
                       a.o.as<float>()},
                      ctx);
    // LSE: the intra-cluster attention's, in the token's first cluster (-inf in none).
    const std::int64_t n = shape.local_len(), rows_q = cast_.member_rows();
    float* lse = a.lse.as<float>();
    std::fill(lse, lse + std::int64_t{shape.batch} * shape.heads * n, -std::numeric_limits<float>::infinity());
    const int group = shape.heads / shape.kv_heads;
    for (int b = 0; b < shape.batch; ++b)
      for (int hh = 0; hh < shape.heads; ++hh) {
        const int g = hh / group;
        float* out = lse + (std::int64_t{b} * shape.heads + hh) * n;
        const float* intra = intra_lse_.as<const float>() + (std::int64_t{b} * shape.heads + hh) * rows_q;
        for (std::int64_t cl = c_ - 1; cl >= 0; --cl)  // the lowest cluster writes last
          for (int s = 0; s < counts(b, g)[cl]; ++s) out[members(b, g)[cl * ps + s]] = intra[cl * ps + s];
      }
  }

  // log Σ_{members j} exp(A_k[j, cl]) of cluster cl of (b, g); -inf when it is empty.
  float member_lse(const float* a_k, int b, int g, int cl) const {
    const std::int32_t count = counts(b, g)[cl];
    const std::int32_t* mem = members(b, g) + std::int64_t{cl} * options.page_size;
    const float* a = a_k + unit(b, g) * shape.local_len() * c_;
    float m = -std::numeric_limits<float>::infinity();
    for (std::int32_t s = 0; s < count; ++s) m = std::max(m, a[std::int64_t{mem[s]} * c_ + cl]);
    if (count == 0) return m;
    float sum = 0.f;
    for (std::int32_t s = 0; s < count; ++s) sum += std::exp(a[std::int64_t{mem[s]} * c_ + cl] - m);
    return m + std::log(sum);
  }

  // The mix's gradients; the merged summaries' gradient summed over the ranks (every rank's queries
  // read every surrogate's summary), then back through the merge: with α_r = exp(lse_r - lse),
  // dR_r = α_r dR and dlse_r = α_r (R_r - R)·dR, which reaches A_k through lse_r = log Σ exp(A_k).
  void cast_backward(const AttentionBackwardArgs& a) {
    const int ps = options.page_size, d = shape.head_dim;
    for (DeviceBuffer* b : {&d_a_q_, &d_intra_, &d_global_sums_, &d_q_, &d_key_sums_, &d_value_sums_})
      kernels::fill_zero(b->data(), b->bytes(), ctx);
    kernels::cast_mix_backward({cast_, members_.as<const std::int32_t>(), counts_.as<const std::int32_t>(),
                                a_q_.as<const float>(), intra_o_.as<const float>(), global_sums_.as<const float>(),
                                a.d_o.as<const float>(), d_a_q_.as<float>(), d_intra_.as<float>(),
                                d_global_sums_.as<float>()},
                               ctx);
    float* d_merged = d_merged_.as<float>();
    for (int b = 0; b < shape.batch; ++b)
      for (int g = 0; g < shape.kv_heads; ++g)
        std::copy_n(sums(d_global_sums_, b, g), std::int64_t{c_} * d, d_merged + part_row(b, g, 0) * d);
    const auto merged_count = static_cast<std::size_t>(d_merged_.bytes() / sizeof(float));
    session.comm().all_reduce({d_merged, merged_count, DType::kF32}, {d_merged, merged_count, DType::kF32},
                              comm::ReduceOp::kSum, ctx.stream);
    float* d_a_k = d_a_k_.as<float>();
    const float* a_k = a_k_.as<const float>();
    for (int b = 0; b < shape.batch; ++b)
      for (int g = 0; g < shape.kv_heads; ++g)
        for (int cl = 0; cl < c_; ++cl) {
          const std::int64_t row = part_row(b, g, cl);
          const float lse_r = part_lse(summary_send_, 0)[row];
          if (counts(b, g)[cl] == 0) continue;
          const float alpha = std::exp(lse_r - part_lse(merged_, 0)[row]);
          const float* r_local = sums(value_sums_, b, g) + std::int64_t{cl} * d;
          const float* r_global = part_values(merged_, 0) + row * d;
          const float* dr = d_merged + row * d;
          float* d_local = sums(d_value_sums_, b, g) + std::int64_t{cl} * d;
          float d_lse = 0.f;
          for (int e = 0; e < d; ++e) {
            d_local[e] = alpha * dr[e];
            d_lse += alpha * (r_local[e] - r_global[e]) * dr[e];
          }
          // d lse_r / d A_k[j, cl] = softmax over the members, π_j = exp(A_k[j, cl] - lse_r).
          const std::int32_t* mem = members(b, g) + std::int64_t{cl} * ps;
          const float* a = a_k + unit(b, g) * shape.local_len() * c_;
          float* da = d_a_k + unit(b, g) * shape.local_len() * c_;
          for (int s = 0; s < counts(b, g)[cl]; ++s) {
            const std::int64_t at = std::int64_t{mem[s]} * c_ + cl;
            da[at] += std::exp(a[at] - lse_r) * d_lse;
          }
        }
    const std::int64_t kv_elems = std::int64_t{shape.batch} * shape.local_len() * shape.kv_heads * d;
    float* d_k = d_kv_.as<float>();
    float* d_v = d_k + kv_elems;
    kernels::cast_summaries_backward({cast_, members_.as<const std::int32_t>(), counts_.as<const std::int32_t>(), a_k,
                                      a.k.as<const float>(), a.v.as<const float>(), d_key_sums_.as<const float>(),
                                      d_value_sums_.as<const float>(), d_a_k, d_k, d_v},
                                     ctx);
    kernels::AttentionBackwardParams p;
    p.fwd = intra_params();
    p.d_o = d_intra_.data();
    p.transposed = intra_tables_->transposed();
    p.d_q = d_q_gathered_.as<float>();
    p.d_k_pages = d_k_pages_.as<float>();
    p.d_v_pages = d_v_pages_.as<float>();
    p.accumulate = false;
    p.workspace = bwd_ws_.data();
    p.workspace_bytes = bwd_ws_.bytes();
    kernels::attention_backward(p, ctx);
    kernels::cast_gather_backward({cast_, members_.as<const std::int32_t>(), counts_.as<const std::int32_t>(),
                                   d_q_gathered_.as<const float>(), d_k_pages_.as<const float>(),
                                   d_v_pages_.as<const float>(), d_q_.as<float>(), d_k, d_v},
                                  ctx);
  }

  const int c_;       // clusters per rank and KV head
  const bool joint_;  // combine = joint (else cast)
  kernels::CastShape cast_;
  DeviceBuffer a_q_, a_k_, d_a_q_, d_a_k_, members_, counts_, key_sums_, value_sums_, d_key_sums_, d_value_sums_, d_q_,
      d_kv_, q_pos_, fwd_ws_, bwd_ws_;
  // joint
  ClusterGeometry g_;
  kernels::SelectionOptions sel_;
  kernels::ClusteredLayout base_;  // this rank's layout with no fetched block and the largest capacity
  std::int64_t num_blocks_ = 0, max_resident_ = 0;
  std::vector<Element> elements_;
  std::vector<ServedRequests> served_;
  DeviceBuffer requests_;  // request lists in flight (ClusteredTransfer)
  DeviceBuffer pools_, d_pools_, key_bias_, page_counts_, bounds_, gather_send_, gather_recv_, count_send_, count_recv_,
      coarse_, block_counts_, scatter_send_, scatter_recv_, stage_, q_rows_, o_rows_, lse_rows_, d_o_rows_, d_q_rows_;
  // cast
  kernels::AttentionShape intra_shape_;
  std::optional<DeviceTables> intra_tables_;
  DeviceBuffer q_gathered_, d_q_gathered_, intra_o_, d_intra_, intra_lse_, k_pages_, v_pages_, d_k_pages_, d_v_pages_,
      summary_send_, summary_recv_, merged_, global_sums_, d_global_sums_, d_merged_;
};

}  // namespace

std::unique_ptr<DistributedAttention::Mode> make_surrogate_mode(const Session& s, const LayerShape& sh,
                                                                const AttentionOptions& o) {
  return std::make_unique<SurrogateMode>(s, sh, o);
}

}  // namespace ringcast
