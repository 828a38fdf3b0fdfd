// Routes the per-token layers and the optimizer (layers.hpp) to their backend after validating the
// parameters once. Both backends implement every op; bf16 products exist on CUDA only, and the CPU
// backend reports them "not supported" rather than compute something else.
#include <ringcast/error.hpp>
#include <ringcast/kernels/layers.hpp>
#include <ringcast/kernels/row_gather.hpp>

#include "dispatch_checks.hpp"
#include "cpu/layers_cpu.hpp"
#if RINGCAST_WITH_CUDA
#include "cuda/layers_cuda.hpp"
#endif

#include <climits>
#include <initializer_list>

namespace ringcast::kernels {
namespace {

// Matrix sizes go to BLAS as int.
void require_matrix(const char* op, std::int64_t rows, std::int64_t cols) {
  RINGCAST_CHECK(rows >= 0 && cols >= 1, "{}: need rows >= 0 and a positive width (got {}, {})", op, rows, cols);
  RINGCAST_CHECK(rows <= INT_MAX && cols <= INT_MAX, "{}: {} x {} exceeds the BLAS index range", op, rows, cols);
}

void validate_linear(const char* op, std::int64_t rows, int in_dim, int out_dim) {
  require_matrix(op, rows, in_dim);
  require_matrix(op, rows, out_dim);
}

// Products in fp32 anywhere, in bf16 where there are tensor cores (layers.hpp).
void validate_precision(const char* op, DType dtype, const ExecContext& ctx) {
  RINGCAST_CHECK(dtype == DType::kF32 || dtype == DType::kBF16,
                 "{}: products in {} are not supported (f32, or bf16 on CUDA)", op, dtype_name(dtype));
  RINGCAST_CHECK(dtype == DType::kF32 || ctx.device.kind == DeviceKind::kCuda,
                 "{}: bf16 products are not supported on the CPU backend (it computes in fp32)", op);
}

void validate_rope(const RopeParams& p, const char* op) {
  RINGCAST_CHECK(p.rows >= 0 && p.heads >= 1, "{}: need rows >= 0 and heads >= 1 (got {}, {})", op, p.rows, p.heads);
  RINGCAST_CHECK(p.head_dim >= 2 && p.head_dim % 2 == 0, "{}: head_dim must be even and positive (got {})", op,
                 p.head_dim);
  RINGCAST_CHECK(p.theta > 1.0f, "{}: theta must exceed 1 (got {})", op, p.theta);
  require_pointers(op, {p.positions, p.x});
}

void validate_pool(int batch, std::int64_t seq, int dim, const char* op) {
  RINGCAST_CHECK(batch >= 1 && seq >= 0 && dim >= 1, "{}: need batch >= 1, seq >= 0, dim >= 1 (got {}, {}, {})", op,
                 batch, seq, dim);
}

}  // namespace

void linear_forward(const LinearParams& p, const ExecContext& ctx) {
  constexpr const char* kOp = "linear_forward";
  validate_linear(kOp, p.rows, p.in_dim, p.out_dim);
  require_pointers(kOp, {p.x, p.w, p.y});
  validate_precision(kOp, p.dtype, ctx);
  RINGCAST_ROUTE(ctx, linear_forward, (p), (p, ctx));
}

void linear_backward(const LinearBackwardParams& p, const ExecContext& ctx) {
  constexpr const char* kOp = "linear_backward";
  validate_linear(kOp, p.rows, p.in_dim, p.out_dim);
  require_pointers(kOp, {p.x, p.w, p.d_y, p.d_x, p.d_w});
  validate_precision(kOp, p.dtype, ctx);
  RINGCAST_ROUTE(ctx, linear_backward, (p), (p, ctx));
}

void rms_norm_forward(const RmsNormParams& p, const ExecContext& ctx) {
  constexpr const char* kOp = "rms_norm_forward";
  require_matrix(kOp, p.rows, p.dim);
  RINGCAST_CHECK(p.eps > 0.0f, "{}: eps must be positive (got {})", kOp, p.eps);
  require_pointers(kOp, {p.x, p.g, p.y});
  RINGCAST_ROUTE(ctx, rms_norm_forward, (p), (p, ctx));
}

void rms_norm_backward(const RmsNormBackwardParams& p, const ExecContext& ctx) {
  constexpr const char* kOp = "rms_norm_backward";
  require_matrix(kOp, p.rows, p.dim);
  RINGCAST_CHECK(p.eps > 0.0f, "{}: eps must be positive (got {})", kOp, p.eps);
  require_pointers(kOp, {p.x, p.g, p.d_y, p.d_x, p.d_g});
  RINGCAST_ROUTE(ctx, rms_norm_backward, (p), (p, ctx));
}

void rope_forward(const RopeParams& p, const ExecContext& ctx) {
  validate_rope(p, "rope_forward");
  RINGCAST_ROUTE(ctx, rope_forward, (p), (p, ctx));
}

void rope_backward(const RopeParams& p, const ExecContext& ctx) {
  validate_rope(p, "rope_backward");
  RINGCAST_ROUTE(ctx, rope_backward, (p), (p, ctx));
}

void swiglu_forward(const SwigluParams& p, const ExecContext& ctx) {
  constexpr const char* kOp = "swiglu_forward";
  RINGCAST_CHECK(p.count >= 0, "{}: count must not be negative (got {})", kOp, p.count);
  require_pointers(kOp, {p.a, p.b, p.h});
  RINGCAST_ROUTE(ctx, swiglu_forward, (p), (p, ctx));
}

void swiglu_backward(const SwigluBackwardParams& p, const ExecContext& ctx) {
  constexpr const char* kOp = "swiglu_backward";
  RINGCAST_CHECK(p.count >= 0, "{}: count must not be negative (got {})", kOp, p.count);
  require_pointers(kOp, {p.a, p.b, p.d_h, p.d_a, p.d_b});
  RINGCAST_ROUTE(ctx, swiglu_backward, (p), (p, ctx));
}

void embedding_forward(const EmbeddingParams& p, const ExecContext& ctx) {
  constexpr const char* kOp = "embedding_forward";
  require_matrix(kOp, p.vocab, p.dim);
  RINGCAST_CHECK(p.rows >= 0 && p.vocab >= 1, "{}: need rows >= 0 and vocab >= 1 (got {}, {})", kOp, p.rows, p.vocab);
  require_pointers(kOp, {p.ids, p.table, p.y});
  RINGCAST_ROUTE(ctx, embedding_forward, (p), (p, ctx));
}

void embedding_backward(const EmbeddingBackwardParams& p, const ExecContext& ctx) {
  constexpr const char* kOp = "embedding_backward";
  require_matrix(kOp, p.vocab, p.dim);
  RINGCAST_CHECK(p.rows >= 0 && p.vocab >= 1, "{}: need rows >= 0 and vocab >= 1 (got {}, {})", kOp, p.rows, p.vocab);
  require_pointers(kOp, {p.ids, p.d_y, p.d_table});
  // The adjoint of the forward's row gather: d_y's rows added into the table by id, each table row in
  // token order (row_gather.hpp). The CPU rejects ids outside the vocabulary; CUDA skips them.
  if (ctx.device.kind == DeviceKind::kCpu) cpu::check_embedding_ids(p.ids, p.rows, p.vocab, kOp);
  RowScatter s;
  s.rows = p.rows;
  s.out_rows = p.vocab;
  s.width = p.dim;
  s.index = p.ids;
  s.src = p.d_y;
  s.dst = p.d_table;
  scatter_add_rows(s, ctx);
}

void token_pool_forward(const TokenPoolParams& p, const ExecContext& ctx) {
  constexpr const char* kOp = "token_pool_forward";
  validate_pool(p.batch, p.seq, p.dim, kOp);
  require_pointers(kOp, {p.x, p.pooled});
  RINGCAST_ROUTE(ctx, token_pool_forward, (p), (p, ctx));
}

void token_pool_backward(const TokenPoolBackwardParams& p, const ExecContext& ctx) {
  constexpr const char* kOp = "token_pool_backward";
  validate_pool(p.batch, p.seq, p.dim, kOp);
  require_pointers(kOp, {p.d_pooled, p.d_x});
  RINGCAST_ROUTE(ctx, token_pool_backward, (p), (p, ctx));
}

void linear_cross_entropy(const LinearCrossEntropyParams& p, const ExecContext& ctx) {
  constexpr const char* kOp = "linear_cross_entropy";
  require_matrix(kOp, p.rows, p.dim);
  require_matrix(kOp, p.vocab, p.dim);
  RINGCAST_CHECK(p.chunk_rows >= 1, "{}: chunk_rows must be positive (got {})", kOp, p.chunk_rows);
  require_pointers(kOp, {p.h, p.w, p.targets, p.totals});
  RINGCAST_CHECK((p.d_h == nullptr) == (p.d_w == nullptr),
                 "{}: d_h and d_w go together (both for training, neither for evaluation)", kOp);
  RINGCAST_CHECK(!p.d_h || (p.bias == nullptr) == (p.d_bias == nullptr),
                 "{}: when training, d_bias is required exactly when bias is given", kOp);
  validate_precision(kOp, p.dtype, ctx);
  RINGCAST_ROUTE(ctx, linear_cross_entropy, (p), (p, ctx));
}

void adamw_step(const AdamWParams& p, const ExecContext& ctx) {
  constexpr const char* kOp = "adamw_step";
  RINGCAST_CHECK(p.count >= 0 && p.step >= 1, "{}: need count >= 0 and step >= 1 (got {}, {})", kOp, p.count, p.step);
  RINGCAST_CHECK(p.beta1 >= 0.0f && p.beta1 < 1.0f && p.beta2 >= 0.0f && p.beta2 < 1.0f && p.eps > 0.0f,
                 "{}: need betas in [0, 1) and eps > 0 (got {}, {}, {})", kOp, p.beta1, p.beta2, p.eps);
  require_pointers(kOp, {p.param, p.grad, p.m, p.v});
  RINGCAST_ROUTE(ctx, adamw_step, (p), (p, ctx));
}

void sum_of_squares(std::int64_t count, const float* x, double* result, const ExecContext& ctx) {
  constexpr const char* kOp = "sum_of_squares";
  RINGCAST_CHECK(count >= 0, "{}: count must not be negative (got {})", kOp, count);
  require_pointers(kOp, {x, result});
  if (ctx.device.kind == DeviceKind::kCpu) {
    *result = cpu::sum_of_squares(count, x);
    return;
  }
  RINGCAST_ON_CUDA(sum_of_squares, (count, x, result, ctx));
}

void scale_in_place(std::int64_t count, float scale, float* x, const ExecContext& ctx) {
  constexpr const char* kOp = "scale_in_place";
  RINGCAST_CHECK(count >= 0, "{}: count must not be negative (got {})", kOp, count);
  require_pointers(kOp, {x});
  RINGCAST_ROUTE(ctx, scale_in_place, (count, scale, x), (count, scale, x, ctx));
}

void find_non_finite(std::int64_t count, const float* x, std::int32_t* found, const ExecContext& ctx) {
  constexpr const char* kOp = "find_non_finite";
  RINGCAST_CHECK(count >= 0, "{}: count must not be negative (got {})", kOp, count);
  require_pointers(kOp, {x, found});
  if (ctx.device.kind == DeviceKind::kCpu) {
    *found = cpu::has_non_finite(count, x) ? 1 : 0;
    return;
  }
  RINGCAST_ON_CUDA(find_non_finite, (count, x, found, ctx));
}

}  // namespace ringcast::kernels
