// The optimizer update and the buffer checks of gradient clipping on the CPU. Reductions run over
// fixed blocks of kBlock elements, each summed by one thread, then over the blocks in order: the
// result is the same for any thread count (checkpoint resumes stay bit-exact).
#include "cpu/layers_cpu.hpp"

#include <algorithm>
#include <cmath>
#include <vector>

namespace ringcast::kernels::cpu {
namespace {

constexpr std::int64_t kBlock = 4096;

}  // namespace

void adamw_step(const AdamWParams& p) {
  const double bias1 = 1.0 - std::pow(double(p.beta1), double(p.step));
  const double bias2 = 1.0 - std::pow(double(p.beta2), double(p.step));
  const float step_size = static_cast<float>(p.lr / bias1);
  const float inv_sqrt_bias2 = static_cast<float>(1.0 / std::sqrt(bias2));
  const float decay = 1.0f - p.lr * p.weight_decay;
#pragma omp parallel for simd schedule(static)
  for (std::int64_t i = 0; i < p.count; ++i) {
    const float g = p.grad[i];
    const float m = p.beta1 * p.m[i] + (1.0f - p.beta1) * g;
    const float v = p.beta2 * p.v[i] + (1.0f - p.beta2) * g * g;
    p.m[i] = m;
    p.v[i] = v;
    p.param[i] = p.param[i] * decay - step_size * m / (std::sqrt(v) * inv_sqrt_bias2 + p.eps);
  }
}

double sum_of_squares(std::int64_t count, const float* x) {
  const std::int64_t blocks = (count + kBlock - 1) / kBlock;
  std::vector<double> partial(blocks);
#pragma omp parallel for schedule(static)
  for (std::int64_t blk = 0; blk < blocks; ++blk) {
    const std::int64_t end = std::min(count, (blk + 1) * kBlock);
    double sum = 0.0;
    for (std::int64_t i = blk * kBlock; i < end; ++i) sum += double(x[i]) * x[i];
    partial[blk] = sum;
  }
  double total = 0.0;
  for (const double s : partial) total += s;
  return total;
}

void scale_in_place(std::int64_t count, float scale, float* x) {
#pragma omp parallel for simd schedule(static)
  for (std::int64_t i = 0; i < count; ++i) x[i] *= scale;
}

bool has_non_finite(std::int64_t count, const float* x) {
  bool found = false;
#pragma omp parallel for schedule(static) reduction(|| : found)
  for (std::int64_t i = 0; i < count; ++i) found = found || !std::isfinite(x[i]);
  return found;
}

}  // namespace ringcast::kernels::cpu
