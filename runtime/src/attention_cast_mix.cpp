// The cast combine of surrogate (CAST) clusters (attention_cast_mode.hpp; ALGORITHMS.md §5): CAST's
// mix. Intra-cluster attention over the gathered members; each surrogate's summary merged over the
// ranks by log-sum-exp (one softmax over all of its members); the output mixes them with
// softmax_c(A_q) (kernels::cast_mix). Host waits: none but the collectives'.
#include "attention_cast_mode.hpp"
#include "clustered_internal.hpp"

#include <ringcast/kernels/cluster_ops.hpp>
#include <ringcast/kernels/layout.hpp>
#include <ringcast/kernels/row_gather.hpp>

#include <algorithm>
#include <cmath>
#include <limits>
#include <optional>

namespace ringcast {
namespace {

class SurrogateMixMode final : public SurrogateMode {
 public:
  SurrogateMixMode(const Session& s, const LayerShape& sh, const AttentionOptions& o) : SurrogateMode(s, sh, o) {
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

  // The intra-cluster attention's table (tiles of cluster members).
  TableEntries table_entries() const override {
    check_forward("table_entries");
    TableEntries t;
    t.add(intra_table().offsets);
    return t;
  }

  // What the intra-cluster attention attended: each row's own clusters (the summaries reach the output
  // through the mix, not a softmax).
  std::vector<AttendedEntry> attended_entries() const override {
    check_forward("attended_entries");
    std::vector<AttendedEntry> out;
    for (int b = 0; b < shape.batch; ++b)
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
    return out;
  }

 private:
  bool has_forward() const override { return intra_tables_.has_value(); }


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

  void combine_forward(const AttentionForwardArgs& a, const Fp32Inputs& in) override {
    const int d = shape.head_dim;
    kernels::cast_gather({cast_, members_.as<const std::int32_t>(), counts_.as<const std::int32_t>(), in.q, in.k, in.v,
                          q_gathered_.as<float>(), k_pages_.as<float>(), v_pages_.as<float>()},
                         ctx);
    intra_tables_.emplace(intra_table(), intra_shape_, session.device(), ctx.stream);
    upload(first_slot_, first_slots());
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
  void combine_backward(const AttentionBackwardArgs& a, const Fp32Inputs& in) override {
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
    summaries_backward(in);
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
                                   d_v_pages_.as<const float>(), d_q_.as<float>(), d_k(), d_v()},
                                  ctx);
  }

  kernels::AttentionShape intra_shape_;
  std::optional<DeviceTables> intra_tables_;
  DeviceBuffer q_gathered_, d_q_gathered_, intra_o_, d_intra_, intra_lse_, k_pages_, v_pages_, d_k_pages_, d_v_pages_,
      summary_send_, summary_recv_, merged_, global_sums_, d_global_sums_, d_merged_, first_slot_, fwd_ws_, bwd_ws_;
  DeviceBuffer attn_q_, attn_d_o_, attn_kv_, o32_;  // storage-dtype attention inputs, fp32 O / dO (non-fp32 dtype)
};

}  // namespace

std::unique_ptr<DistributedAttention::Mode> make_surrogate_mix_mode(const Session& s, const LayerShape& sh,
                                                                    const AttentionOptions& o) {
  return std::make_unique<SurrogateMixMode>(s, sh, o);
}

}  // namespace ringcast
