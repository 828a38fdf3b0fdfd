// Linear layer on CUDA: y = x Wᵀ, d_x += d_y W, d_w += d_yᵀ x, as cuBLAS products on the caller's
// stream. fp32 products run on the tensors as they are. bf16 products round W once per call and the
// token matrices kBf16Rows rows at a time into the stream's scratch, so the scratch stays bounded for
// any sequence length; d_w then sums the chunks' products in chunk order (fixed, deterministic).
#include "layers_cuda.hpp"
#include "layers_cuda.cuh"

namespace ringcast::kernels::cuda {
namespace {

// Rows per bf16 chunk: products of 8192 rows keep tensor cores busy; the copies stay in the megabytes.
constexpr std::int64_t kBf16Rows = 8192;

}  // namespace

void linear_forward(const LinearParams& p, const ExecContext& ctx) {
  if (p.rows == 0) return;
  StreamLease lease(ctx);
  const float beta = p.accumulate ? 1.0f : 0.0f;
  const std::int64_t in = p.in_dim, out = p.out_dim;
  if (p.dtype == DType::kF32) {
    matmul(lease, math_of(p.dtype, p.allow_tf32), false, true, p.rows, out, in, p.x, in, p.w, in, beta, p.y, out);
    return;
  }
  const std::int64_t chunk = std::min(p.rows, kBf16Rows);
  ScratchLayout layout;
  const auto w_at = layout.add<__nv_bfloat16>(out * in);
  const auto x_at = layout.add<__nv_bfloat16>(chunk * in);
  std::byte* base = lease.scratch(layout.bytes());
  auto* w16 = ScratchLayout::at<__nv_bfloat16>(base, w_at);
  auto* x16 = ScratchLayout::at<__nv_bfloat16>(base, x_at);
  round_to_bf16(p.w, out * in, w16, lease.stream());
  for (std::int64_t r0 = 0; r0 < p.rows; r0 += chunk) {
    const std::int64_t n = std::min(chunk, p.rows - r0);
    round_to_bf16(p.x + r0 * in, n * in, x16, lease.stream());
    matmul(lease, Math::kBF16, false, true, n, out, in, x16, in, w16, in, beta, p.y + r0 * out, out);
  }
}

void linear_backward(const LinearBackwardParams& p, const ExecContext& ctx) {
  if (p.rows == 0) return;
  StreamLease lease(ctx);
  const std::int64_t in = p.in_dim, out = p.out_dim;
  if (p.dtype == DType::kF32) {
    const Math math = math_of(p.dtype, p.allow_tf32);
    matmul(lease, math, false, false, p.rows, in, out, p.d_y, out, p.w, in, 1.0f, p.d_x, in);
    matmul(lease, math, true, false, out, in, p.rows, p.d_y, out, p.x, in, 1.0f, p.d_w, in);
    return;
  }
  const std::int64_t chunk = std::min(p.rows, kBf16Rows);
  ScratchLayout layout;
  const auto w_at = layout.add<__nv_bfloat16>(out * in);
  const auto x_at = layout.add<__nv_bfloat16>(chunk * in);
  const auto dy_at = layout.add<__nv_bfloat16>(chunk * out);
  std::byte* base = lease.scratch(layout.bytes());
  auto* w16 = ScratchLayout::at<__nv_bfloat16>(base, w_at);
  auto* x16 = ScratchLayout::at<__nv_bfloat16>(base, x_at);
  auto* dy16 = ScratchLayout::at<__nv_bfloat16>(base, dy_at);
  round_to_bf16(p.w, out * in, w16, lease.stream());
  for (std::int64_t r0 = 0; r0 < p.rows; r0 += chunk) {
    const std::int64_t n = std::min(chunk, p.rows - r0);
    round_to_bf16(p.x + r0 * in, n * in, x16, lease.stream());
    round_to_bf16(p.d_y + r0 * out, n * out, dy16, lease.stream());
    matmul(lease, Math::kBF16, false, false, n, in, out, dy16, out, w16, in, 1.0f, p.d_x + r0 * in, in);
    matmul(lease, Math::kBF16, true, false, out, in, n, dy16, out, x16, in, 1.0f, p.d_w, in);
  }
}

}  // namespace ringcast::kernels::cuda
