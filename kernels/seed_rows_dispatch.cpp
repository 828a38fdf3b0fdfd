// Routes the indexed row movement (row_gather.hpp) and the seed layers' scores (seed_scores.hpp) to
// their backend after validating the parameters once. Both backends implement every op.
#include <ringcast/error.hpp>
#include <ringcast/kernels/row_gather.hpp>
#include <ringcast/kernels/seed_scores.hpp>

#include "cpu/seed_rows_cpu.hpp"
#include "dispatch_checks.hpp"
#if RINGCAST_WITH_CUDA
#include "cuda/seed_rows_cuda.hpp"
#endif

namespace ringcast::kernels {
namespace {

// The shape and strides shared by the gather and the scatter.
void validate_rows(const char* op, std::int64_t rows, std::int64_t width, int heads, int group,
                   std::int64_t index_stride, std::int64_t src_row_stride, std::int64_t dst_row_stride) {
  RINGCAST_CHECK(rows >= 0 && width >= 1 && heads >= 1 && group >= 1 && heads % group == 0 && index_stride >= 0,
                 "{}: need rows >= 0 ({}), width >= 1 ({}), heads ({}) a positive multiple of group ({}) and "
                 "index_stride >= 0 ({})",
                 op, rows, width, heads, group, index_stride);
  RINGCAST_CHECK((src_row_stride == 0 || src_row_stride >= width) && (dst_row_stride == 0 || dst_row_stride >= width),
                 "{}: row strides ({}, {}) below the row width {}", op, src_row_stride, dst_row_stride, width);
}

void validate(const VipScoreShape& s, const char* op) {
  RINGCAST_CHECK(s.heads >= 1 && s.kv_heads >= 1 && s.heads % s.kv_heads == 0 && s.head_dim >= 1,
                 "{}: need heads a positive multiple of kv_heads and head_dim >= 1 (got {}, {}, {})", op, s.heads,
                 s.kv_heads, s.head_dim);
  RINGCAST_CHECK(s.vip >= 0 && s.blocks >= 0, "{}: need vip >= 0 and blocks >= 0 (got {}, {})", op, s.vip, s.blocks);
}

// Empty calls (no rows, no blocks) are valid and may pass null buffers.
bool empty(const VipScoreShape& s) { return s.vip == 0 || s.blocks == 0; }

}  // namespace

void gather_rows(const RowGather& p, const ExecContext& ctx) {
  constexpr const char* kOp = "gather_rows";
  validate_rows(kOp, p.rows, p.width, p.heads, p.group, p.index_stride, p.src_row_stride, p.dst_row_stride);
  RINGCAST_CHECK(p.dtype == DType::kF32 || p.dtype == DType::kBF16 || p.dtype == DType::kF16,
                 "{}: dtype {} is not supported (f32, bf16, f16)", kOp, dtype_name(p.dtype));
  RINGCAST_CHECK(p.dtype == DType::kF32 || (!p.offsets && !p.weights && p.scale == 1.0f && p.fill == 0.0f &&
                                            !p.accumulate),
                 "{}: {} rows are copied bits: one term per row, no weight or scale, fill 0, no accumulate", kOp,
                 dtype_name(p.dtype));
  if (p.rows == 0) return;
  require_pointers(kOp, {p.src, p.dst});
  RINGCAST_ROUTE(ctx, gather_rows, (p), (p, ctx));
}

void scatter_add_rows(const RowScatter& p, const ExecContext& ctx) {
  constexpr const char* kOp = "scatter_add_rows";
  validate_rows(kOp, p.rows, p.width, p.heads, p.group, p.index_stride, p.src_row_stride, p.dst_row_stride);
  RINGCAST_CHECK(p.out_rows >= 0, "{}: need out_rows >= 0 (got {})", kOp, p.out_rows);
  if (p.rows == 0 || p.out_rows == 0) return;
  require_pointers(kOp, {p.index.data, p.src, p.dst});
  RINGCAST_ROUTE(ctx, scatter_add_rows, (p), (p, ctx));
}

void rowwise_dot(const RowwiseDotParams& p, const ExecContext& ctx) {
  constexpr const char* kOp = "rowwise_dot";
  RINGCAST_CHECK(p.rows >= 0 && p.dim >= 1, "{}: need rows >= 0 and dim >= 1 (got {}, {})", kOp, p.rows, p.dim);
  if (p.rows == 0) return;
  require_pointers(kOp, {p.a, p.b, p.out});
  RINGCAST_ROUTE(ctx, rowwise_dot, (p), (p, ctx));
}

void vip_block_logits(const VipLogitsParams& p, const ExecContext& ctx) {
  constexpr const char* kOp = "vip_block_logits";
  validate(p.shape, kOp);
  if (p.shape.vip == 0) return;
  require_pointers(kOp, {p.q, p.row_max});
  if (p.shape.blocks > 0) require_pointers(kOp, {p.k, p.probs});
  RINGCAST_ROUTE(ctx, vip_block_logits, (p), (p, ctx));
}

void vip_block_softmax(const VipSoftmaxParams& p, const ExecContext& ctx) {
  constexpr const char* kOp = "vip_block_softmax";
  validate(p.shape, kOp);
  if (p.shape.vip == 0) return;
  require_pointers(kOp, {p.row_max, p.row_sum});
  if (p.shape.blocks > 0) require_pointers(kOp, {p.probs});
  RINGCAST_ROUTE(ctx, vip_block_softmax, (p), (p, ctx));
}

void vip_block_mean(const VipMeanParams& p, const ExecContext& ctx) {
  constexpr const char* kOp = "vip_block_mean";
  validate(p.shape, kOp);
  RINGCAST_CHECK(p.shape.vip >= 1, "{}: the mean over VIP queries needs vip >= 1", kOp);
  if (p.shape.blocks == 0) return;
  require_pointers(kOp, {p.row_sum, p.block_ids, p.probs, p.p, p.log_p});
  RINGCAST_ROUTE(ctx, vip_block_mean, (p), (p, ctx));
}

void vip_pi_dot(const VipPiDotParams& p, const ExecContext& ctx) {
  constexpr const char* kOp = "vip_pi_dot";
  RINGCAST_CHECK(p.blocks >= 0, "{}: need blocks >= 0 (got {})", kOp, p.blocks);
  require_pointers(kOp, {p.pi_dot});
  if (p.blocks > 0) require_pointers(kOp, {p.pi, p.d_pi});
  RINGCAST_ROUTE(ctx, vip_pi_dot, (p), (p, ctx));
}

void vip_scores_backward_rows(const VipScoresBackwardRowsParams& p, const ExecContext& ctx) {
  constexpr const char* kOp = "vip_scores_backward_rows";
  validate(p.shape, kOp);
  if (p.shape.vip == 0) return;
  require_pointers(kOp, {p.pi_dot, p.row_dot});
  if (p.shape.blocks > 0) require_pointers(kOp, {p.pi, p.p, p.probs, p.d_pi});
  RINGCAST_ROUTE(ctx, vip_scores_backward_rows, (p), (p, ctx));
}

void vip_scores_backward_inputs(const VipScoresBackwardInputsParams& p, const ExecContext& ctx) {
  constexpr const char* kOp = "vip_scores_backward_inputs";
  validate(p.shape, kOp);
  if (empty(p.shape)) return;
  require_pointers(kOp, {p.q, p.k, p.probs, p.d_p, p.row_dot, p.d_q, p.d_k});
  RINGCAST_ROUTE(ctx, vip_scores_backward_inputs, (p), (p, ctx));
}

void pool_scores(const PoolScoreParams& p, const ExecContext& ctx) {
  constexpr const char* kOp = "pool_scores";
  RINGCAST_CHECK(p.rows >= 0 && p.dim >= 1, "{}: need rows >= 0 and dim >= 1 (got {}, {})", kOp, p.rows, p.dim);
  if (p.rows == 0) return;
  require_pointers(kOp, {p.x, p.w, p.bias, p.logits, p.scores});
  RINGCAST_ROUTE(ctx, pool_scores, (p), (p, ctx));
}

void pool_scores_backward(const PoolScoreBackwardParams& p, const ExecContext& ctx) {
  constexpr const char* kOp = "pool_scores_backward";
  RINGCAST_CHECK(p.rows >= 0, "{}: need rows >= 0 (got {})", kOp, p.rows);
  require_pointers(kOp, {p.bias, p.d_bias});
  if (p.rows > 0) require_pointers(kOp, {p.logits, p.d_scores});
  RINGCAST_ROUTE(ctx, pool_scores_backward, (p), (p, ctx));
}


}  // namespace ringcast::kernels
