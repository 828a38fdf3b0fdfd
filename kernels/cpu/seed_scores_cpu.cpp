// The seed layers' scores on the CPU (seed_scores.hpp): VCC's VIP-over-blocks softmax pieces and the
// Pyramidion scorer, in plain loops whose summation orders are the reference the CUDA kernels follow.
#include "seed_rows_cpu.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

namespace ringcast::kernels::cpu {
namespace {

float dot(const float* a, const float* b, int n) {
  float s = 0.0f;
  for (int i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

}  // namespace

void vip_block_logits(const VipLogitsParams& p) {
  const VipScoreShape& s = p.shape;
  const int hd = s.head_dim, group = s.heads / s.kv_heads;
  const std::int64_t nb = s.blocks, V = s.vip;
  for (int h = 0; h < s.heads; ++h)
    for (std::int64_t v = 0; v < V; ++v) {
      const std::int64_t hv = h * V + v;
      const float* q = p.q + (v * s.heads + h) * hd;
      float m = -std::numeric_limits<float>::infinity();
      for (std::int64_t j = 0; j < nb; ++j) {
        const float logit = s.scale * dot(q, p.k + (j * s.kv_heads + h / group) * hd, hd);
        p.probs[hv * nb + j] = logit;
        m = std::max(m, logit);
      }
      p.row_max[hv] = m;
    }
}

void vip_block_softmax(const VipSoftmaxParams& p) {
  const std::int64_t nb = p.shape.blocks, HV = std::int64_t{p.shape.heads} * p.shape.vip;
  for (std::int64_t hv = 0; hv < HV; ++hv) {
    float sum = 0.0f;
    for (std::int64_t j = 0; j < nb; ++j) sum += p.probs[hv * nb + j] = std::exp(p.probs[hv * nb + j] - p.row_max[hv]);
    p.row_sum[hv] = sum;
  }
}

void vip_block_mean(const VipMeanParams& p) {
  const std::int64_t nb = p.shape.blocks, HV = std::int64_t{p.shape.heads} * p.shape.vip;
  std::fill_n(p.p, nb, 0.0f);
  for (std::int64_t hv = 0; hv < HV; ++hv)
    for (std::int64_t j = 0; j < nb; ++j) p.p[j] += p.probs[hv * nb + j] /= p.row_sum[hv];
  const float inv_hv = 1.0f / static_cast<float>(HV);
  for (std::int64_t j = 0; j < nb; ++j) {
    p.p[j] *= inv_hv;
    p.log_p[p.block_ids[j]] = std::log(p.p[j] + p.floor);
  }
}

void vip_pi_dot(const VipPiDotParams& p) {
  double s = 0.0;
  for (std::int64_t j = 0; j < p.blocks; ++j) s += double{p.pi[j]} * p.d_pi[j];
  *p.pi_dot = s;
}

void vip_scores_backward_rows(const VipScoresBackwardRowsParams& p) {
  const std::int64_t nb = p.shape.blocks, HV = std::int64_t{p.shape.heads} * p.shape.vip;
  const double pi_dot = *p.pi_dot;
  for (std::int64_t j = 0; j < nb; ++j)
    p.d_pi[j] = static_cast<float>(p.pi[j] * (p.d_pi[j] - pi_dot)) / (p.p[j] + p.floor);
  for (std::int64_t hv = 0; hv < HV; ++hv) {
    float t = 0.0f;
    for (std::int64_t j = 0; j < nb; ++j) t += p.probs[hv * nb + j] * p.d_pi[j];
    p.row_dot[hv] = t;
  }
}

void vip_scores_backward_inputs(const VipScoresBackwardInputsParams& p) {
  const VipScoreShape& s = p.shape;
  const int hd = s.head_dim, group = s.heads / s.kv_heads;
  const std::int64_t nb = s.blocks, V = s.vip;
  const float coef = s.scale / static_cast<float>(std::int64_t{s.heads} * V);
  for (int h = 0; h < s.heads; ++h)
    for (std::int64_t v = 0; v < V; ++v) {
      const std::int64_t hv = h * V + v;
      const float* q = p.q + (v * s.heads + h) * hd;
      float* dq = p.d_q + (v * s.heads + h) * hd;
      for (std::int64_t j = 0; j < nb; ++j) {
        const float g = coef * p.probs[hv * nb + j] * (p.d_p[j] - p.row_dot[hv]);
        const float* kj = p.k + (j * s.kv_heads + h / group) * hd;
        float* dkj = p.d_k + (j * s.kv_heads + h / group) * hd;
        for (int i = 0; i < hd; ++i) {
          dq[i] += g * kj[i];
          dkj[i] += g * q[i];
        }
      }
    }
}

void pool_scores(const PoolScoreParams& p) {
  const std::int64_t D = p.dim;
  const float bias = *p.bias;
#pragma omp parallel for schedule(static)
  for (std::int64_t i = 0; i < p.rows; ++i) {
    double z = 0.0;
    for (std::int64_t c = 0; c < D; ++c) z += double{p.w[c]} * double{p.x[i * D + c]};
    p.logits[i] = static_cast<float>(z);
    p.scores[i] = 1.0f / (1.0f + std::exp(-(p.logits[i] + bias))) + p.floor;
  }
}

void pool_scores_backward(const PoolScoreBackwardParams& p) {
  const float bias = *p.bias;
  double d_bias = 0.0;
  for (std::int64_t i = 0; i < p.rows; ++i) {
    const float g = 1.0f / (1.0f + std::exp(-(p.logits[i] + bias)));
    p.d_scores[i] *= g * (1.0f - g);
    d_bias += p.d_scores[i];
  }
  *p.d_bias += static_cast<float>(d_bias);
}

}  // namespace ringcast::kernels::cpu
