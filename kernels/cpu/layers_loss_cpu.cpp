// Linear head + cross-entropy on the CPU, chunk_rows tokens at a time: the chunk's logits are made
// by one gemm, turned row by row (one thread per row) into the loss and, in place, into
// d logits = loss_scale (softmax - onehot), which two more gemms take to d_h and d_w. Losses are
// summed in float64 in row order after each chunk, so the sum does not depend on the chunking.
#include "cpu/layers_cpu.hpp"

#include <ringcast/error.hpp>

#include <algorithm>
#include <cmath>
#include <vector>

namespace ringcast::kernels::cpu {
namespace {

constexpr std::int64_t kColumnBlock = 64;

struct RowResult {
  float loss = 0.0f;
  bool counted = false;
  bool correct = false;
};

// Loss of one row of logits z (bias already added); with `grad`, z becomes d logits.
RowResult softmax_row(float* z, std::int64_t vocab, std::int32_t target, float scale, bool grad) {
  if (target < 0) {
    if (grad) std::fill(z, z + vocab, 0.0f);
    return {};
  }
  std::int64_t best = 0;
  for (std::int64_t j = 1; j < vocab; ++j)
    if (z[j] > z[best]) best = j;
  const float max = z[best];
  float sum = 0.0f;
  for (std::int64_t j = 0; j < vocab; ++j) sum += std::exp(z[j] - max);
  const float lse = max + std::log(sum);
  const RowResult r{lse - z[target], true, best == target};
  if (grad) {
    for (std::int64_t j = 0; j < vocab; ++j) z[j] = scale * std::exp(z[j] - lse);
    z[target] -= scale;
  }
  return r;
}

// d_bias += column sums of d logits [rows, vocab], each column summed in row order by one thread.
void add_column_sums(const float* dz, std::int64_t rows, std::int64_t vocab, float* d_bias) {
  const std::int64_t blocks = (vocab + kColumnBlock - 1) / kColumnBlock;
#pragma omp parallel for schedule(static)
  for (std::int64_t blk = 0; blk < blocks; ++blk) {
    const std::int64_t j0 = blk * kColumnBlock;
    const std::int64_t j1 = std::min(vocab, j0 + kColumnBlock);
    for (std::int64_t i = 0; i < rows; ++i)
      for (std::int64_t j = j0; j < j1; ++j) d_bias[j] += dz[i * vocab + j];
  }
}

}  // namespace

void linear_cross_entropy(const LinearCrossEntropyParams& p) {
  for (std::int64_t i = 0; i < p.rows; ++i)
    RINGCAST_CHECK(p.targets[i] < p.vocab, "linear_cross_entropy: row {} has target {} >= vocab {}", i, p.targets[i],
                   p.vocab);
  const bool grad = p.d_h != nullptr;
  const std::int64_t chunk = std::min(p.chunk_rows, p.rows);
  std::vector<float> logits(chunk * p.vocab);
  std::vector<RowResult> results(chunk);
  CrossEntropyTotals totals;
  for (std::int64_t r0 = 0; r0 < p.rows; r0 += chunk) {
    const std::int64_t n = std::min(chunk, p.rows - r0);
    const float* h = p.h + r0 * p.dim;
    parallel_gemm(false, true, n, p.vocab, p.dim, h, p.dim, p.w, p.dim, 0.0f, logits.data(), p.vocab);
#pragma omp parallel for schedule(static)
    for (std::int64_t i = 0; i < n; ++i) {
      float* z = logits.data() + i * p.vocab;
      if (p.bias)
        for (std::int64_t j = 0; j < p.vocab; ++j) z[j] += p.bias[j];
      results[i] = softmax_row(z, p.vocab, p.targets[r0 + i], p.loss_scale, grad);
    }
    for (std::int64_t i = 0; i < n; ++i) {
      totals.loss_sum += results[i].loss;
      totals.count += results[i].counted;
      totals.correct += results[i].correct;
    }
    if (!grad) continue;
    parallel_gemm(false, false, n, p.dim, p.vocab, logits.data(), p.vocab, p.w, p.dim, 1.0f, p.d_h + r0 * p.dim, p.dim);
    parallel_gemm(true, false, p.vocab, p.dim, n, logits.data(), p.vocab, h, p.dim, 1.0f, p.d_w, p.dim);
    if (p.d_bias) add_column_sums(logits.data(), n, p.vocab, p.d_bias);
  }
  *p.totals = totals;
}

}  // namespace ringcast::kernels::cpu
