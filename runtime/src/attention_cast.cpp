// The clustered mode with clusters = surrogate (CAST; DESIGN.md §4.1-4.2, ALGORITHMS.md §5,
// docs/clustered-design.md "Surrogate clusters"): bidirectional, contiguous placement, CPU and CUDA.
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
// is hard); dS is this rank's part, added into the caller's buffer.
// Memory: activations, summaries and pools live on the session's device and are touched only by
// kernels (fp32; bf16 / fp16 inputs converted once per call); the attention reads storage-dtype
// copies. The host holds the cluster metadata: members and counts (downloaded after the assignment),
// the rows' order and the tables built from them. Joint forward, host waits per layer: the members;
// the coarse summaries, block counts and selection queries; the fetch's request exchange; per
// (element, KV head) the pool counts, cluster summaries and bounds its selection reads, while the next
// unit's blocks travel (CommOverlap; uploads follow on an idle stream). Cast forward: the members.
// Backward: none but the collectives' and the gradient returns' (pipelined over units like the fetch).
#include "attention_cast.hpp"
#include "attention_internal.hpp"
#include "clustered_internal.hpp"
#include "overlap.hpp"

#include <ringcast/error.hpp>
#include <ringcast/kernels/cast.hpp>
#include <ringcast/kernels/cluster_ops.hpp>
#include <ringcast/kernels/layout.hpp>
#include <ringcast/kernels/row_gather.hpp>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>

namespace ringcast {
namespace {

// The coarse-summary fields that travel and that selection reads, in this order.
enum Field { kMeanK, kMeanV, kMin, kMax, kFields };

// The inputs as the CAST kernels read them: fp32, on the session's device.
struct Fp32Inputs {
  const float* q;  // [B, n_loc, heads, d]
  const float* k;  // [B, n_loc, kv_heads, d]
  const float* v;
  const float* s;  // [kv_heads, c, d]
};

// What the joint forward of one batch element leaves for the backward.
struct Element {
  std::vector<SurrogateRows> rows;             // per KV head
  std::vector<kernels::ClusteredLayout> layouts;
  std::vector<SurrogateSelection> selections;
  kernels::AttentionShape shape;               // batch 1, num_pages of this element
  kernels::HostBlockTable table;
  std::optional<DeviceTables> tables;
};

// Synchronous host <-> device copies of whole buffers in stream order (plain copies on the CPU backend).
template <typename T>
void download(std::vector<T>& dst, const DeviceBuffer& src, const kernels::ExecContext& ctx) {
  dst.resize(src.bytes() / sizeof(T));
  src.download(std::span<T>(dst), ctx.stream);
}
template <typename T>
void upload(DeviceBuffer& dst, const std::vector<T>& src, const kernels::ExecContext& ctx) {
  dst.upload(std::span<const T>(src), ctx.stream);
}

class SurrogateMode final : public DistributedAttention::Mode {
 public:
  SurrogateMode(const Session& s, const LayerShape& sh, const AttentionOptions& o)
      : Mode(s, sh, o), c_(o.resolved_surrogate_clusters(sh)), joint_(o.combine == ClusterCombine::kJoint),
        overlap_(s) {
    check_clustered_support(sh, o);
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
    if (sh.dtype != DType::kF32) {
      q32_ = allocate(q_elems * sizeof(float));
      kv32_ = allocate(2 * kv_elems * sizeof(float));
      s32_ = allocate(sh.kv_heads * c_ * d * sizeof(float));
    }
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
    const Fp32Inputs in = fp32_inputs(a.q, a.k, a.v, a.surrogates);
    kernels::cast_affinities({cast_, in.q, in.k, in.s, a_q_.as<float>(), a_k_.as<float>()}, ctx);
    kernels::cast_assign({cast_,
                          options.assignment == SurrogateAssignment::kTopK ? kernels::CastAssignment::kTopK
                                                                           : kernels::CastAssignment::kSingleTopK,
                          a_q_.as<const float>(), a_k_.as<const float>(), members_.as<std::int32_t>(),
                          counts_.as<std::int32_t>()},
                         ctx);
    kernels::cast_summaries({cast_, members_.as<const std::int32_t>(), counts_.as<const std::int32_t>(),
                             a_k_.as<const float>(), in.k, in.v, key_sums_.as<float>(), value_sums_.as<float>()},
                            ctx);
    download(members_host_, members_, ctx);
    download(counts_host_, counts_, ctx);
    if (joint_) {
      joint_forward(a, in);
    } else {
      cast_forward(a, in);
    }
  }

  void backward(const AttentionBackwardArgs& a) override {
    RINGCAST_CHECK(joint_ ? elements_.front().tables.has_value() : intra_tables_.has_value(),
                   "clustered mode: backward() needs a forward() first");
    const Fp32Inputs in = fp32_inputs(a.q, a.k, a.v, a.surrogates);
    kernels::fill_zero(d_kv_.data(), d_kv_.bytes(), ctx);
    kernels::fill_zero(d_a_k_.data(), d_a_k_.bytes(), ctx);
    if (joint_) {
      joint_backward(a, in);
    } else {
      cast_backward(a, in);
    }
    const std::int64_t kv_elems = std::int64_t{shape.batch} * shape.local_len() * shape.kv_heads * shape.head_dim;
    float* d_k = d_kv_.as<float>();
    float* d_v = d_k + kv_elems;
    kernels::cast_affinities_backward({cast_, in.q, in.k, in.s, d_a_q_.as<const float>(), d_a_k_.as<const float>(),
                                       d_q_.as<float>(), d_k, a.d_surrogates.as<float>()},
                                      ctx);
    const std::int64_t q_elems = std::int64_t{shape.batch} * shape.local_len() * shape.heads * shape.head_dim;
    kernels::copy_strided(kernels::StridedCopy::flat(d_q_.data(), DType::kF32, a.d_q.data, shape.dtype, q_elems), ctx);
    kernels::copy_strided(kernels::StridedCopy::flat(d_k, DType::kF32, a.d_k.data, shape.dtype, kv_elems), ctx);
    kernels::copy_strided(kernels::StridedCopy::flat(d_v, DType::kF32, a.d_v.data, shape.dtype, kv_elems), ctx);
  }

  // Joint: every element's table. Cast: the intra-cluster attention's (tiles of cluster members).
  TableEntries table_entries() const override {
    RINGCAST_CHECK(joint_ ? elements_.front().tables.has_value() : intra_tables_.has_value(),
                   "clustered mode: table_entries() needs a forward() first");
    TableEntries t;
    if (!joint_) t.add(intra_table().offsets);
    for (int b = 0; joint_ && b < shape.batch; ++b) t.add(elements_[b].table.offsets);
    return t;
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
    std::vector<std::int32_t> out = members_host_;
    for (std::int32_t& j : out)
      if (j >= 0) j = positions[static_cast<std::size_t>(j)];
    return out;
  }

 private:
  // ---- Addressing (layouts in kernels/cast.hpp and attention_cast.hpp). ----
  std::int64_t unit(int b, int g) const { return std::int64_t{b} * shape.kv_heads + g; }
  // Host copies of members [B, kv_heads, c, page_size] and counts [B, kv_heads, c].
  const std::int32_t* members(int b, int g) const { return members_host_.data() + unit(b, g) * c_ * options.page_size; }
  const std::int32_t* counts(int b, int g) const { return counts_host_.data() + unit(b, g) * c_; }
  // The same on the device: element b's members, every KV head, as a gather index [kv_heads][c ps].
  const std::int32_t* device_members(int b) const {
    return members_.as<const std::int32_t>() + unit(b, 0) * c_ * options.page_size;
  }
  const std::int32_t* device_counts(int b, int g) const { return counts_.as<const std::int32_t>() + unit(b, g) * c_; }
  // Cluster cl of (b, g) in a [kv_heads, summary_rows, d] summary buffer: row (g, b * c + cl).
  float* sums(const DeviceBuffer& buf, int b, int g) const {
    return buf.as<float>() + (g * cast_.summary_rows() + std::int64_t{b} * c_) * shape.head_dim;
  }
  std::int64_t kv_elems_per_element() const { return shape.local_len() * shape.kv_heads * shape.head_dim; }
  std::int64_t q_elems_per_element() const { return shape.local_len() * shape.heads * shape.head_dim; }

  // The inputs in fp32: the caller's with an fp32 storage dtype, converted copies otherwise.
  Fp32Inputs fp32_inputs(const TensorView& q, const TensorView& k, const TensorView& v, const TensorView& s) const {
    if (shape.dtype == DType::kF32) return {q.as<const float>(), k.as<const float>(), v.as<const float>(), s.as<const float>()};
    const std::int64_t q_elems = shape.batch * q_elems_per_element(), kv_elems = shape.batch * kv_elems_per_element();
    float* q32 = q32_.as<float>();
    float* k32 = kv32_.as<float>();
    float* v32 = k32 + kv_elems;
    float* s32 = s32_.as<float>();
    kernels::copy_strided(kernels::StridedCopy::flat(q.data, shape.dtype, q32, DType::kF32, q_elems), ctx);
    kernels::copy_strided(kernels::StridedCopy::flat(k.data, shape.dtype, k32, DType::kF32, kv_elems), ctx);
    kernels::copy_strided(kernels::StridedCopy::flat(v.data, shape.dtype, v32, DType::kF32, kv_elems), ctx);
    kernels::copy_strided(kernels::StridedCopy::flat(s.data, shape.dtype, s32, DType::kF32,
                                                     std::int64_t{shape.kv_heads} * c_ * shape.head_dim),
                          ctx);
    return {q32, k32, v32, s32};
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

  void joint_forward(const AttentionForwardArgs& a, const Fp32Inputs& in) {
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
    upload(key_bias_, key_bias_host_, ctx);
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
    upload(order_, order, ctx);
    upload(inverse_, inverse, ctx);
    upload(page_counts_, page_counts_host_, ctx);
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
    upload(count_send_, totals, ctx);
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
    download(all, count_recv_, ctx);
    download(coarse_host_, coarse_, ctx);
    download(tile_queries_host_, tile_queries_, ctx);
    if (sel_.unit == kernels::SelectUnit::kRow) download(row_queries_host_, row_queries_, ctx);
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
  void joint_backward(const AttentionBackwardArgs& a, const Fp32Inputs& in) {
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
    const std::int64_t kv_elems = shape.batch * kv_elems_per_element();
    float* d_k = d_kv_.as<float>();
    float* d_v = d_k + kv_elems;
    kernels::cast_summaries_backward({cast_, members_.as<const std::int32_t>(), counts_.as<const std::int32_t>(),
                                      a_k_.as<const float>(), in.k, in.v, d_key_sums_.as<const float>(),
                                      d_value_sums_.as<const float>(), d_a_k_.as<float>(), d_k, d_v},
                                     ctx);
    for (int b = 0; b < shape.batch; ++b) {
      const std::int64_t head_stride = elements_[b].shape.num_pages * g_.page_elems;
      slots_to_tokens(b, pool(d_pools_, b, 0, 0), head_stride, d_k);
      slots_to_tokens(b, pool(d_pools_, b, 0, 1), head_stride, d_v);
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
    if (sh.dtype != DType::kF32) {
      const std::size_t elt = dtype_size(sh.dtype);
      attn_q_ = allocate(q_gathered * elt);
      attn_d_o_ = allocate(q_gathered * elt);
      attn_kv_ = allocate(2 * kv_pages * elt);
      o32_ = allocate(sh.batch * sh.local_len() * sh.heads * d * sizeof(float));
    }
    // Per rank: the value summaries [kv_heads][B c][d], then their log-sum-exps [kv_heads][B c].
    const std::int64_t part = sh.kv_heads * pages * (d + 1);
    summary_send_ = allocate(part * sizeof(float));
    summary_recv_ = allocate(sh.ranks * summary_send_.bytes());
    merged_ = allocate(summary_send_.bytes());
    global_sums_ = allocate(key_sums_.bytes());
    d_global_sums_ = allocate(key_sums_.bytes());
    d_merged_ = allocate(sh.kv_heads * pages * d * sizeof(float));
    first_slot_ = allocate(sh.batch * sh.kv_heads * sh.local_len() * sizeof(std::int32_t));
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
  // [kv_heads, summary_rows, d] summaries <-> [kv_heads][B c][d] parts.
  void sums_to_part(const float* sums, float* part) const {
    const std::int64_t rows = std::int64_t{shape.batch} * c_ * shape.head_dim;
    strided_copy(ctx, sums, part, {{shape.kv_heads, cast_.summary_rows() * shape.head_dim, rows}, {rows, 1, 1}});
  }
  void part_to_sums(const float* part, float* sums) const {
    const std::int64_t rows = std::int64_t{shape.batch} * c_ * shape.head_dim;
    strided_copy(ctx, part, sums, {{shape.kv_heads, rows, cast_.summary_rows() * shape.head_dim}, {rows, 1, 1}});
  }
  // The gathered queries and pages as the attention reads them: fp32, or copies in the storage dtype.
  const void* attention_q() const { return shape.dtype == DType::kF32 ? q_gathered_.data() : attn_q_.data(); }
  void* attention_pages(int kv) const {
    if (shape.dtype == DType::kF32) return kv ? v_pages_.data() : k_pages_.data();
    return attn_kv_.as<char>() + kv * (attn_kv_.bytes() / 2);
  }

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

  // Per token of (b, g): the gathered row of its first (lowest) cluster, or -1 in none. Its LSE is
  // the token's.
  std::vector<std::int32_t> first_slots() const {
    const std::int64_t n = shape.local_len();
    const int ps = options.page_size;
    std::vector<std::int32_t> out(static_cast<std::size_t>(shape.batch * shape.kv_heads * n), -1);
    for (int b = 0; b < shape.batch; ++b)
      for (int g = 0; g < shape.kv_heads; ++g)
        for (int cl = c_ - 1; cl >= 0; --cl)  // the lowest cluster writes last
          for (int s = 0; s < counts(b, g)[cl]; ++s)
            out[unit(b, g) * n + members(b, g)[cl * ps + s]] = cl * ps + s;
    return out;
  }

  kernels::AttentionForwardParams intra_params() const {
    kernels::AttentionForwardParams p;
    p.shape = intra_shape_;
    p.dtype = shape.dtype;
    p.o_dtype = DType::kF32;  // the mix reads it in fp32
    p.softmax_scale = 1.0f / std::sqrt(static_cast<float>(shape.head_dim));
    p.q = attention_q();
    p.k_pages = attention_pages(0);
    p.v_pages = attention_pages(1);
    p.q_pos = q_pos_.as<const std::int32_t>();
    p.table = intra_tables_->table();
    p.o = intra_o_.data();
    p.lse = intra_lse_.as<float>();
    p.workspace = fwd_ws_.data();
    p.workspace_bytes = fwd_ws_.bytes();
    return p;
  }

  void cast_forward(const AttentionForwardArgs& a, const Fp32Inputs& in) {
    const int d = shape.head_dim;
    kernels::cast_gather({cast_, members_.as<const std::int32_t>(), counts_.as<const std::int32_t>(), in.q, in.k, in.v,
                          q_gathered_.as<float>(), k_pages_.as<float>(), v_pages_.as<float>()},
                         ctx);
    intra_tables_.emplace(intra_table(), intra_shape_, session.device(), ctx.stream);
    upload(first_slot_, first_slots(), ctx);
    if (shape.dtype != DType::kF32) {
      const std::int64_t kv_pages = k_pages_.bytes() / sizeof(float);
      kernels::copy_strided(kernels::StridedCopy::flat(q_gathered_.data(), DType::kF32, attn_q_.data(), shape.dtype,
                                                       q_gathered_.bytes() / sizeof(float)),
                            ctx);
      for (int kv = 0; kv < 2; ++kv)
        kernels::copy_strided(kernels::StridedCopy::flat(kv ? v_pages_.data() : k_pages_.data(), DType::kF32,
                                                         attention_pages(kv), shape.dtype, kv_pages),
                              ctx);
    }
    kernels::attention_forward(intra_params(), ctx);

    // Each surrogate's summary over the whole sequence: this rank's softmax(A_k)-weighted means and
    // log Σ exp(A_k) of their members, merged over the ranks by log-sum-exp.
    sums_to_part(value_sums_.as<const float>(), part_values(summary_send_, 0));
    kernels::member_lse({members_view(), a_k_.as<const float>(), part_lse(summary_send_, 0)}, ctx);
    session.comm().all_gather(
        {summary_send_.data(), summary_send_.bytes() / sizeof(float), DType::kF32},
        {summary_recv_.data(), summary_recv_.bytes() / sizeof(float), DType::kF32}, ctx.stream);
    const std::int64_t rows = std::int64_t{shape.kv_heads} * shape.batch * c_;
    strided_copy(ctx, part_values(summary_recv_, 0), part_values(merged_, 0), {{rows * (d + 1), 1, 1}});
    for (int q = 1; q < shape.ranks; ++q)
      kernels::merge_by_lse({1, rows, 1, d, part_values(merged_, 0), part_lse(merged_, 0),
                             part_values(summary_recv_, q), part_lse(summary_recv_, q)},
                            ctx);
    kernels::fill_zero(global_sums_.data(), global_sums_.bytes(), ctx);
    part_to_sums(part_values(merged_, 0), global_sums_.as<float>());

    const std::int64_t q_elems = shape.batch * q_elems_per_element();
    float* o = shape.dtype == DType::kF32 ? a.o.as<float>() : o32_.as<float>();
    kernels::cast_mix({cast_, members_.as<const std::int32_t>(), counts_.as<const std::int32_t>(),
                       a_q_.as<const float>(), intra_o_.as<const float>(), global_sums_.as<const float>(), o},
                      ctx);
    if (shape.dtype != DType::kF32)
      kernels::copy_strided(kernels::StridedCopy::flat(o, DType::kF32, a.o.data, shape.dtype, q_elems), ctx);
    // LSE: the intra-cluster attention's, in the token's first cluster (-inf in none).
    const std::int64_t n = shape.local_len(), rows_q = cast_.member_rows();
    for (int b = 0; b < shape.batch; ++b) {
      kernels::RowGather p;
      p.rows = n;
      p.heads = shape.heads;
      p.group = shape.heads / shape.kv_heads;
      p.width = 1;
      p.index = first_slot_.as<const std::int32_t>() + unit(b, 0) * n;
      p.index_stride = n;
      p.src = intra_lse_.as<const float>() + std::int64_t{b} * shape.heads * rows_q;
      p.src_row_stride = p.dst_row_stride = 1;
      p.src_head_stride = rows_q;
      p.dst = a.lse.as<float>() + std::int64_t{b} * shape.heads * n;
      p.dst_head_stride = n;
      p.fill = -std::numeric_limits<float>::infinity();
      kernels::gather_rows(p, ctx);
    }
  }

  kernels::ClusterMembers members_view() const {
    return {shape.batch, shape.kv_heads, shape.local_len(), c_, options.page_size,
            members_.as<const std::int32_t>(), counts_.as<const std::int32_t>()};
  }

  // The mix's gradients; the merged summaries' gradient summed over the ranks (every rank's queries
  // read every surrogate's summary), then back through the merge (kernels::member_lse_merge_backward).
  void cast_backward(const AttentionBackwardArgs& a, const Fp32Inputs& in) {
    for (DeviceBuffer* b : {&d_a_q_, &d_intra_, &d_global_sums_, &d_q_, &d_key_sums_, &d_value_sums_})
      kernels::fill_zero(b->data(), b->bytes(), ctx);
    const float* d_o = a.d_o.as<const float>();
    if (shape.dtype != DType::kF32) {
      kernels::copy_strided(kernels::StridedCopy::flat(a.d_o.data, shape.dtype, o32_.data(), DType::kF32,
                                                       shape.batch * q_elems_per_element()),
                            ctx);
      d_o = o32_.as<const float>();
    }
    kernels::cast_mix_backward({cast_, members_.as<const std::int32_t>(), counts_.as<const std::int32_t>(),
                                a_q_.as<const float>(), intra_o_.as<const float>(), global_sums_.as<const float>(), d_o,
                                d_a_q_.as<float>(), d_intra_.as<float>(), d_global_sums_.as<float>()},
                               ctx);
    float* d_merged = d_merged_.as<float>();
    sums_to_part(d_global_sums_.as<const float>(), d_merged);
    const auto merged_count = static_cast<std::size_t>(d_merged_.bytes() / sizeof(float));
    session.comm().all_reduce({d_merged, merged_count, DType::kF32}, {d_merged, merged_count, DType::kF32},
                              comm::ReduceOp::kSum, ctx.stream);
    part_to_sums(d_merged, d_global_sums_.as<float>());
    kernels::MemberLseMergeBackwardParams m;
    m.m = members_view();
    m.head_dim = shape.head_dim;
    m.summary_rows = cast_.summary_rows();
    m.a_k = a_k_.as<const float>();
    m.lse = part_lse(summary_send_, 0);
    m.merged_lse = part_lse(merged_, 0);
    m.local_value = value_sums_.as<const float>();
    m.merged_value = global_sums_.as<const float>();
    m.d_merged_value = d_global_sums_.as<const float>();
    m.d_local_value = d_value_sums_.as<float>();
    m.d_a_k = d_a_k_.as<float>();
    kernels::member_lse_merge_backward(m, ctx);
    const std::int64_t kv_elems = shape.batch * kv_elems_per_element();
    float* d_k = d_kv_.as<float>();
    float* d_v = d_k + kv_elems;
    kernels::cast_summaries_backward({cast_, members_.as<const std::int32_t>(), counts_.as<const std::int32_t>(),
                                      a_k_.as<const float>(), in.k, in.v, d_key_sums_.as<const float>(),
                                      d_value_sums_.as<const float>(), d_a_k_.as<float>(), d_k, d_v},
                                     ctx);
    kernels::AttentionBackwardParams p;
    p.fwd = intra_params();
    p.d_o = d_intra_.data();
    if (shape.dtype != DType::kF32) {
      kernels::copy_strided(kernels::StridedCopy::flat(d_intra_.data(), DType::kF32, attn_d_o_.data(), shape.dtype,
                                                       d_intra_.bytes() / sizeof(float)),
                            ctx);
      p.d_o = attn_d_o_.data();
    }
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
  DeviceBuffer q32_, kv32_, s32_;  // fp32 copies of the inputs (storage dtype other than fp32)
  std::vector<std::int32_t> members_host_, counts_host_;
  // joint
  ClusterGeometry g_;
  kernels::SelectionOptions sel_;
  kernels::ClusteredLayout base_;  // this rank's layout with no fetched block and the largest capacity
  std::int64_t num_blocks_ = 0, max_resident_ = 0;
  std::vector<Element> elements_;
  std::vector<ServedRequests> served_;
  DeviceBuffer requests_;  // request lists in flight (ClusteredTransfer)
  DeviceBuffer pools_, d_pools_, attn_pools_, key_bias_, page_counts_, bounds_, cluster_keys_, gather_send_,
      gather_recv_, count_send_, count_recv_, coarse_, scatter_send_, scatter_recv_, stage_, order_, inverse_,
      tile_queries_, row_queries_, q_rows_, o_rows_, lse_rows_, d_o_rows_, d_q_rows_;
  // Host copies of what selection and the tables read (attention_cast.hpp).
  std::vector<std::int32_t> page_counts_host_, block_counts_host_;
  std::vector<float> coarse_host_, bounds_host_, page_sums_host_, tile_queries_host_, row_queries_host_, key_bias_host_;
  // cast
  kernels::AttentionShape intra_shape_;
  std::optional<DeviceTables> intra_tables_;
  DeviceBuffer q_gathered_, d_q_gathered_, intra_o_, d_intra_, intra_lse_, k_pages_, v_pages_, d_k_pages_, d_v_pages_,
      summary_send_, summary_recv_, merged_, global_sums_, d_global_sums_, d_merged_, first_slot_;
  DeviceBuffer attn_q_, attn_d_o_, attn_kv_, o32_;  // storage-dtype attention inputs, fp32 O / dO (non-fp32 dtype)
  // The forward's fetches and the backward's returns, beside compute. Last, so destroyed first: when an
  // error unwinds a pipeline, the step still in flight is waited for before the buffers it uses are freed.
  CommOverlap overlap_;
};

}  // namespace

std::unique_ptr<DistributedAttention::Mode> make_surrogate_mode(const Session& s, const LayerShape& sh,
                                                                const AttentionOptions& o) {
  return std::make_unique<SurrogateMode>(s, sh, o);
}

}  // namespace ringcast
