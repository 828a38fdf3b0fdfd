// RMSNorm on the CPU: one thread per row for y and d_x; d_g, a sum over rows, is split by columns
// so that each column is summed in row order by one thread (deterministic for any thread count).
// The backward recomputes each row's inverse RMS from x.
#include "cpu/layers_cpu.hpp"

#include <algorithm>
#include <cmath>
#include <vector>

namespace ringcast::kernels::cpu {
namespace {

constexpr int kColumnBlock = 64;

float inverse_rms(const float* x, int dim, float eps) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int c = 0; c < dim; ++c) sum += x[c] * x[c];
  return 1.0f / std::sqrt(sum / static_cast<float>(dim) + eps);
}

}  // namespace

void rms_norm_forward(const RmsNormParams& p) {
#pragma omp parallel for schedule(static)
  for (std::int64_t i = 0; i < p.rows; ++i) {
    const float* x = p.x + i * p.dim;
    float* y = p.y + i * p.dim;
    const float r = inverse_rms(x, p.dim, p.eps);
#pragma omp simd
    for (int c = 0; c < p.dim; ++c) y[c] = x[c] * r * p.g[c];
  }
}

void rms_norm_backward(const RmsNormBackwardParams& p) {
  std::vector<float> inv_rms(p.rows);
#pragma omp parallel for schedule(static)
  for (std::int64_t i = 0; i < p.rows; ++i) {
    const float* x = p.x + i * p.dim;
    const float* dy = p.d_y + i * p.dim;
    float* dx = p.d_x + i * p.dim;
    const float r = inverse_rms(x, p.dim, p.eps);
    inv_rms[i] = r;
    float ux = 0.0f;  // Σ_c (d_y g)_c x_c
#pragma omp simd reduction(+ : ux)
    for (int c = 0; c < p.dim; ++c) ux += dy[c] * p.g[c] * x[c];
    const float coef = r * r * r * ux / static_cast<float>(p.dim);
#pragma omp simd
    for (int c = 0; c < p.dim; ++c) dx[c] += r * dy[c] * p.g[c] - coef * x[c];
  }
  const int blocks = (p.dim + kColumnBlock - 1) / kColumnBlock;
#pragma omp parallel for schedule(static)
  for (int blk = 0; blk < blocks; ++blk) {
    const int c0 = blk * kColumnBlock;
    const int c1 = std::min(p.dim, c0 + kColumnBlock);
    float acc[kColumnBlock] = {};
    for (std::int64_t i = 0; i < p.rows; ++i) {
      const float* x = p.x + i * p.dim;
      const float* dy = p.d_y + i * p.dim;
      for (int c = c0; c < c1; ++c) acc[c - c0] += dy[c] * x[c] * inv_rms[i];
    }
    for (int c = c0; c < c1; ++c) p.d_g[c] += acc[c - c0];
  }
}

}  // namespace ringcast::kernels::cpu
