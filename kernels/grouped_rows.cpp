// GroupedRows (grouped_rows.hpp): the permutations as copy_strided calls on either backend.
#include <ringcast/error.hpp>
#include <ringcast/kernels/grouped_rows.hpp>
#include <ringcast/kernels/layout.hpp>
#include <ringcast/kernels/selection.hpp>

#include <array>

namespace ringcast::kernels {
namespace {

using Dims = std::array<std::int64_t, 4>;

// One copy over `shape` from a layout with strides `from` to one with strides `to` (elements).
void copy_4d(const Dims& shape, const Dims& from, const Dims& to, const void* src, DType src_dtype, void* dst,
             DType dst_dtype, const ExecContext& ctx) {
  StridedCopy c;
  c.ndim = 4;
  for (int i = 0; i < 4; ++i) {
    c.shape[i] = shape[i];
    c.src_strides[i] = from[i];
    c.dst_strides[i] = to[i];
  }
  c.src = src;
  c.src_dtype = src_dtype;
  c.dst = dst;
  c.dst_dtype = dst_dtype;
  copy_strided(c, ctx);
}

}  // namespace

GroupedRows::GroupedRows(std::int64_t tokens, int heads, int kv_heads, int head_dim, int group)
    : tokens_(tokens), heads_(heads), kv_heads_(kv_heads), head_dim_(head_dim), group_(group) {
  RINGCAST_CHECK(group == 1 || group == group_for(heads, kv_heads, true),
                 "grouped rows: {} rows per token for {} heads over {} KV heads", group, heads, kv_heads);
}

int GroupedRows::group_for(int heads, int kv_heads, bool row_selection) {
  return row_selection ? grouped_rows_per_token(heads, kv_heads) : 1;
}

AttentionShape GroupedRows::attention_shape(int page_size, std::int64_t num_pages) const {
  return {1, tokens_ * group_, heads_ / group_, kv_heads_, head_dim_, page_size, num_pages};
}

std::vector<std::int32_t> GroupedRows::row_positions(std::span<const std::int32_t> token_positions) const {
  std::vector<std::int32_t> rows;
  rows.reserve(token_positions.size() * static_cast<std::size_t>(group_));
  for (const std::int32_t p : token_positions) rows.insert(rows.end(), static_cast<std::size_t>(group_), p);
  return rows;
}

// Element (token t, KV head k, head j in group, e): token order at t * heads + (k * G + j), grouped
// order at (t * G + j) * kv_heads + k, times head_dim.
void GroupedRows::to_grouped(const void* src, DType src_dtype, void* dst, DType dst_dtype,
                             const ExecContext& ctx) const {
  const std::int64_t d = head_dim_, g = group_, kv = kv_heads_;
  copy_4d({tokens_, kv, g, d}, {heads_ * d, g * d, d, 1}, {g * kv * d, d, kv * d, 1}, src, src_dtype, dst, dst_dtype,
          ctx);
}

void GroupedRows::to_tokens(const void* src, DType src_dtype, void* dst, DType dst_dtype,
                            const ExecContext& ctx) const {
  const std::int64_t d = head_dim_, g = group_, kv = kv_heads_;
  copy_4d({tokens_, kv, g, d}, {g * kv * d, d, kv * d, 1}, {heads_ * d, g * d, d, 1}, src, src_dtype, dst, dst_dtype,
          ctx);
}

// LSE (KV head k, head j in group, token t): token order at (k * G + j) * tokens + t, grouped order
// at k * tokens * G + t * G + j.
void GroupedRows::lse_to_grouped(const float* src, float* dst, const ExecContext& ctx) const {
  const std::int64_t g = group_, n = tokens_;
  copy_4d({kv_heads_, g, n, 1}, {g * n, n, 1, 1}, {n * g, 1, g, 1}, src, DType::kF32, dst, DType::kF32, ctx);
}

void GroupedRows::lse_to_tokens(const float* src, float* dst, const ExecContext& ctx) const {
  const std::int64_t g = group_, n = tokens_;
  copy_4d({kv_heads_, g, n, 1}, {n * g, 1, g, 1}, {g * n, n, 1, 1}, src, DType::kF32, dst, DType::kF32, ctx);
}

}  // namespace ringcast::kernels
