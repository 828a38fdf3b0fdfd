// Pointwise layers on the CPU: RoPE (rotate-half, in place) and the SwiGLU gate. RoPE forms the
// cos/sin of a token once in float64 (positions reach millions, where an fp32 angle is off by
// ~0.1 rad) and applies them to every head of the token.
#include "cpu/layers_cpu.hpp"

#include <cmath>
#include <vector>

namespace ringcast::kernels::cpu {
namespace {

// sign = +1 rotates by the angle (forward), -1 by its negative (the transpose, backward).
void rotate(const RopeParams& p, double sign) {
  const int half = p.head_dim / 2;
  std::vector<double> inv_freq(half);
  for (int i = 0; i < half; ++i) inv_freq[i] = std::pow(double(p.theta), -2.0 * i / p.head_dim);
#pragma omp parallel
  {
    std::vector<float> cos_t(half), sin_t(half);
#pragma omp for schedule(static)
    for (std::int64_t t = 0; t < p.rows; ++t) {
      for (int i = 0; i < half; ++i) {
        const double angle = double(p.positions[t]) * inv_freq[i];
        cos_t[i] = static_cast<float>(std::cos(angle));
        sin_t[i] = static_cast<float>(sign * std::sin(angle));
      }
      for (int h = 0; h < p.heads; ++h) {
        float* x = p.x + (t * p.heads + h) * p.head_dim;
#pragma omp simd
        for (int i = 0; i < half; ++i) {
          const float x1 = x[i];
          const float x2 = x[i + half];
          x[i] = x1 * cos_t[i] - x2 * sin_t[i];
          x[i + half] = x2 * cos_t[i] + x1 * sin_t[i];
        }
      }
    }
  }
}

float sigmoid(float a) { return 1.0f / (1.0f + std::exp(-a)); }

}  // namespace

void rope_forward(const RopeParams& p) { rotate(p, 1.0); }
void rope_backward(const RopeParams& p) { rotate(p, -1.0); }

void swiglu_forward(const SwigluParams& p) {
#pragma omp parallel for schedule(static)
  for (std::int64_t i = 0; i < p.count; ++i) p.h[i] = p.a[i] * sigmoid(p.a[i]) * p.b[i];
}

// silu'(a) = σ(a) (1 + a (1 - σ(a))).
void swiglu_backward(const SwigluBackwardParams& p) {
#pragma omp parallel for schedule(static)
  for (std::int64_t i = 0; i < p.count; ++i) {
    const float a = p.a[i];
    const float s = sigmoid(a);
    p.d_a[i] += p.d_h[i] * p.b[i] * s * (1.0f + a * (1.0f - s));
    p.d_b[i] += p.d_h[i] * a * s;
  }
}

}  // namespace ringcast::kernels::cpu
