// Token embedding and sequence mean pooling on the CPU (the embedding backward is a row scatter-add,
// layers_dispatch.cpp). Pooling splits by (sequence, column block), so the result is the same for any
// thread count.
#include "cpu/layers_cpu.hpp"

#include <ringcast/error.hpp>

#include <algorithm>
#include <cstring>

namespace ringcast::kernels::cpu {
namespace {

constexpr int kColumnBlock = 64;

}  // namespace

void embedding_forward(const EmbeddingParams& p) {
  check_embedding_ids(p.ids, p.rows, p.vocab, "embedding_forward");
#pragma omp parallel for schedule(static)
  for (std::int64_t t = 0; t < p.rows; ++t)
    std::memcpy(p.y + t * p.dim, p.table + std::int64_t{p.ids[t]} * p.dim, sizeof(float) * p.dim);
}

void check_embedding_ids(const std::int32_t* ids, std::int64_t rows, std::int64_t vocab, const char* op) {
  for (std::int64_t t = 0; t < rows; ++t)
    RINGCAST_CHECK(ids[t] >= 0 && ids[t] < vocab, "{}: token {} has id {} outside [0, {})", op, t, ids[t], vocab);
}

void token_pool_forward(const TokenPoolParams& p) {
  const int blocks = (p.dim + kColumnBlock - 1) / kColumnBlock;
#pragma omp parallel for collapse(2) schedule(static)
  for (int b = 0; b < p.batch; ++b) {
    for (int blk = 0; blk < blocks; ++blk) {
      const int c0 = blk * kColumnBlock;
      const int c1 = std::min(p.dim, c0 + kColumnBlock);
      float acc[kColumnBlock] = {};
      for (std::int64_t t = 0; t < p.seq; ++t) {
        const float* x = p.x + (b * p.seq + t) * p.dim;
        for (int c = c0; c < c1; ++c) acc[c - c0] += x[c];
      }
      for (int c = c0; c < c1; ++c) p.pooled[std::int64_t{b} * p.dim + c] = p.scale * acc[c - c0];
    }
  }
}

void token_pool_backward(const TokenPoolBackwardParams& p) {
#pragma omp parallel for collapse(2) schedule(static)
  for (int b = 0; b < p.batch; ++b) {
    for (std::int64_t t = 0; t < p.seq; ++t) {
      const float* dp = p.d_pooled + std::int64_t{b} * p.dim;
      float* dx = p.d_x + (b * p.seq + t) * p.dim;
#pragma omp simd
      for (int c = 0; c < p.dim; ++c) dx[c] += p.scale * dp[c];
    }
  }
}

}  // namespace ringcast::kernels::cpu
