// Pyramidion successive-halving soft top-k pooling (ALGORITHMS.md §2). Each round sorts the tokens
// by score, descending (stable: ties keep the lower index first), pairs rank i with rank m-1-i (best
// with worst), and merges a pair with weights (w_a, w_b) = softmax(s_a ln β, s_b ln β):
// e = w_a e_a + w_b e_b, s = w_a s_a + w_b s_b. With m odd the median token passes through unpaired,
// so a round maps m tokens to ceil(m / 2). Survivors keep rank order, or with sort_back the input
// order of their top-ranked member. States E [B, n, D], scores s [B, n] (the scorer is the caller's),
// fp32. The backward holds the sort permutations fixed and recomputes them (and the intermediate
// rounds) from the inputs, so nothing is kept between passes. Backward adds into its outputs.
#pragma once

#include <ringcast/kernels/attention.hpp>

#include <cstdint>

namespace ringcast::kernels {

struct HalvingShape {
  int batch = 1;
  std::int64_t seq = 0;  // n
  int dim = 0;           // D
  int rounds = 1;        // r >= 1
  float beta = 20.0f;
  bool sort_back = true;

  std::int64_t output_len() const {
    std::int64_t m = seq;
    for (int i = 0; i < rounds; ++i) m = (m + 1) / 2;
    return m;
  }
};

struct HalvingParams {
  HalvingShape shape;
  const float* e = nullptr;  // [B, n, D]
  const float* s = nullptr;  // [B, n]
  float* e_out = nullptr;    // [B, output_len, D]
  float* s_out = nullptr;    // [B, output_len]
};

struct HalvingBackwardParams {
  HalvingShape shape;
  const float* e = nullptr;
  const float* s = nullptr;
  const float* d_e_out = nullptr;
  const float* d_s_out = nullptr;
  float* d_e = nullptr;  // added into
  float* d_s = nullptr;
};

void halving_pool(const HalvingParams& p, const ExecContext& ctx);
void halving_pool_backward(const HalvingBackwardParams& p, const ExecContext& ctx);

}  // namespace ringcast::kernels
