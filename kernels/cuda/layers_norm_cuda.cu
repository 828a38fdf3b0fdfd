// RMSNorm on CUDA: one warp per row for y and d_x, with the row's sums reduced by a fixed shuffle tree
// (lane 0's result broadcast, so every lane scales by the same bits). The backward keeps each row's
// inverse RMS in scratch for d_g, a sum over rows done by the deterministic column sums.
#include "layers_cuda.hpp"
#include "layers_cuda.cuh"

namespace ringcast::kernels::cuda {
namespace {

constexpr int kRowsPerBlock = kThreads / kWarp;

unsigned row_blocks(std::int64_t rows) { return static_cast<unsigned>((rows + kRowsPerBlock - 1) / kRowsPerBlock); }

__device__ float inverse_rms(const float* __restrict__ x, int dim, float eps, int lane) {
  float sum = 0.0f;
  for (int c = lane; c < dim; c += kWarp) sum += x[c] * x[c];
  sum = warp_sum(sum);
  return 1.0f / sqrtf(sum / static_cast<float>(dim) + eps);
}

__global__ void rms_norm_forward_kernel(const RmsNormParams p) {
  const std::int64_t row = blockIdx.x * std::int64_t{kRowsPerBlock} + threadIdx.x / kWarp;
  if (row >= p.rows) return;
  const int lane = threadIdx.x % kWarp;
  const float* x = p.x + row * p.dim;
  float* y = p.y + row * p.dim;
  const float r = inverse_rms(x, p.dim, p.eps, lane);
  for (int c = lane; c < p.dim; c += kWarp) y[c] = x[c] * r * p.g[c];
}

// d_x += r (u - x r² mean(u ⊙ x)), u = d_y ⊙ g; the row's r goes to inv_rms for d_g.
__global__ void rms_norm_backward_rows_kernel(const RmsNormBackwardParams p, float* __restrict__ inv_rms) {
  const std::int64_t row = blockIdx.x * std::int64_t{kRowsPerBlock} + threadIdx.x / kWarp;
  if (row >= p.rows) return;
  const int lane = threadIdx.x % kWarp;
  const float* x = p.x + row * p.dim;
  const float* dy = p.d_y + row * p.dim;
  float* dx = p.d_x + row * p.dim;
  const float r = inverse_rms(x, p.dim, p.eps, lane);
  if (lane == 0) inv_rms[row] = r;
  float ux = 0.0f;
  for (int c = lane; c < p.dim; c += kWarp) ux += dy[c] * p.g[c] * x[c];
  ux = warp_sum(ux);
  const float coef = r * r * r * ux / static_cast<float>(p.dim);
  for (int c = lane; c < p.dim; c += kWarp) dx[c] += r * dy[c] * p.g[c] - coef * x[c];
}

// d_g's term: d_y ⊙ x r of one (row, column).
struct GainGradTerm {
  const float* x;
  const float* d_y;
  const float* inv_rms;
  int dim;
  __device__ float operator()(int, std::int64_t r, int c) const {
    const std::int64_t at = r * dim + c;
    return d_y[at] * x[at] * inv_rms[r];
  }
};

}  // namespace

void rms_norm_forward(const RmsNormParams& p, const ExecContext& ctx) {
  if (p.rows == 0) return;
  rms_norm_forward_kernel<<<row_blocks(p.rows), kThreads, 0, static_cast<cudaStream_t>(ctx.stream)>>>(p);
  RINGCAST_CUDA_CHECK_LAUNCH();
}

void rms_norm_backward(const RmsNormBackwardParams& p, const ExecContext& ctx) {
  if (p.rows == 0) return;
  StreamLease lease(ctx);
  ScratchLayout layout;
  const auto inv_at = layout.add<float>(p.rows);
  const auto partial_at = layout.add<float>(column_partials_count(1, p.rows, p.dim));
  std::byte* base = lease.scratch(layout.bytes());
  float* inv_rms = ScratchLayout::at<float>(base, inv_at);
  rms_norm_backward_rows_kernel<<<row_blocks(p.rows), kThreads, 0, lease.stream()>>>(p, inv_rms);
  RINGCAST_CUDA_CHECK_LAUNCH();
  column_sums(GainGradTerm{p.x, p.d_y, inv_rms, p.dim}, 1, p.rows, p.dim, ScratchLayout::at<float>(base, partial_at),
              1.0f, true, p.d_g, lease.stream());
}

}  // namespace ringcast::kernels::cuda
