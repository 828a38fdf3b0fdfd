// CPU merge of partial attention results by log-sum-exp (attention.hpp, DESIGN.md §4), fp32.
// One row = (b, head, position): its LSE pair decides the two weights, then head_dim outputs mix.
// A side with LSE = -inf is never read (its O may be anything), so empty partials merge exactly.
#include "attention_cpu.hpp"

#include <algorithm>
#include <cmath>

namespace ringcast::kernels::cpu {

void merge_by_lse(const MergeParams& p) {
  const std::int64_t rows = std::int64_t{p.batch} * p.heads * p.seq;
  const int d = p.head_dim;
#pragma omp parallel for schedule(static)
  for (std::int64_t row = 0; row < rows; ++row) {  // row = (b * heads + h) * seq + i, the LSE layout
    const std::int64_t i = row % p.seq;
    const std::int64_t h = (row / p.seq) % p.heads;
    const std::int64_t b = row / (std::int64_t{p.heads} * p.seq);
    const std::int64_t o_off = ((b * p.seq + i) * p.heads + h) * d;
    float* o_acc = p.o_acc + o_off;
    const float* o_part = p.o_part + o_off;
    const float lse_acc = p.lse_acc[row];
    const float lse_part = p.lse_part[row];
    if (lse_part == kNegInf) {
      if (lse_acc == kNegInf) std::fill(o_acc, o_acc + d, 0.f);
      continue;
    }
    if (lse_acc == kNegInf) {
      std::copy(o_part, o_part + d, o_acc);
      p.lse_acc[row] = lse_part;
      continue;
    }
    // Weights exp(lse_x - lse) computed from the max, so neither exponent can overflow.
    const float m = std::max(lse_acc, lse_part);
    const float w_acc = std::exp(lse_acc - m);
    const float w_part = std::exp(lse_part - m);
    const float total = w_acc + w_part;
    const float a = w_acc / total;
    const float c = w_part / total;
#pragma omp simd
    for (int j = 0; j < d; ++j) o_acc[j] = a * o_acc[j] + c * o_part[j];
    p.lse_acc[row] = m + std::log(total);
  }
}

}  // namespace ringcast::kernels::cpu
