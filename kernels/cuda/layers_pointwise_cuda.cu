// Pointwise layers on CUDA: RoPE (rotate-half, in place) and the SwiGLU gate, in the CPU backend's
// arithmetic. RoPE runs one block per token: the inverse frequencies are formed on the host exactly
// as the CPU backend forms them and passed by value; each angle and its cos/sin are formed in float64
// (positions reach millions), and the token's cos/sin table in shared memory serves all its heads.
#include "layers_cuda.hpp"
#include "layers_cuda.cuh"

#include <climits>
#include <cmath>

namespace ringcast::kernels::cuda {
namespace {

constexpr int kRopeThreads = 128;
constexpr int kMaxRopeHalf = 256;  // head_dim <= 512: the frequency table travels as a kernel argument

struct RopeArgs {
  std::int64_t rows;
  int heads;
  int head_dim;
  double sign;  // +1 rotates by the angle (forward), -1 by its negative (the transpose, backward)
  const std::int32_t* positions;
  float* x;
  double inv_freq[kMaxRopeHalf];
};

__global__ void rope_kernel(const RopeArgs a) {
  __shared__ float cos_t[kMaxRopeHalf];
  __shared__ float sin_t[kMaxRopeHalf];
  const std::int64_t t = blockIdx.x;
  const int half = a.head_dim / 2;
  const double position = a.positions[t];
  for (int i = threadIdx.x; i < half; i += blockDim.x) {
    double s, c;
    sincos(position * a.inv_freq[i], &s, &c);
    cos_t[i] = static_cast<float>(c);
    sin_t[i] = static_cast<float>(a.sign * s);
  }
  __syncthreads();
  float* x = a.x + t * a.heads * a.head_dim;
  for (int k = threadIdx.x; k < a.heads * half; k += blockDim.x) {
    const int i = k % half;
    float* xh = x + (k / half) * a.head_dim;
    const float x1 = xh[i];
    const float x2 = xh[i + half];
    xh[i] = x1 * cos_t[i] - x2 * sin_t[i];
    xh[i + half] = x2 * cos_t[i] + x1 * sin_t[i];
  }
}

void rotate(const RopeParams& p, double sign, cudaStream_t stream) {
  RINGCAST_CHECK(p.head_dim <= 2 * kMaxRopeHalf, "rope on CUDA: head_dim {} exceeds {}", p.head_dim, 2 * kMaxRopeHalf);
  RINGCAST_CHECK(p.rows <= INT_MAX, "rope on CUDA: {} tokens exceed the grid (one block per token)", p.rows);
  if (p.rows == 0) return;
  RopeArgs a{p.rows, p.heads, p.head_dim, sign, p.positions, p.x, {}};
  for (int i = 0; i < p.head_dim / 2; ++i) a.inv_freq[i] = std::pow(double(p.theta), -2.0 * i / p.head_dim);
  rope_kernel<<<static_cast<unsigned>(p.rows), kRopeThreads, 0, stream>>>(a);
  RINGCAST_CUDA_CHECK_LAUNCH();
}

__device__ float sigmoid(float a) { return 1.0f / (1.0f + expf(-a)); }

__global__ void swiglu_forward_kernel(const SwigluParams p) {
  for (std::int64_t i = blockIdx.x * std::int64_t{blockDim.x} + threadIdx.x; i < p.count;
       i += std::int64_t{gridDim.x} * blockDim.x)
    p.h[i] = p.a[i] * sigmoid(p.a[i]) * p.b[i];
}

// silu'(a) = σ(a) (1 + a (1 - σ(a))).
__global__ void swiglu_backward_kernel(const SwigluBackwardParams p) {
  for (std::int64_t i = blockIdx.x * std::int64_t{blockDim.x} + threadIdx.x; i < p.count;
       i += std::int64_t{gridDim.x} * blockDim.x) {
    const float a = p.a[i];
    const float s = sigmoid(a);
    p.d_a[i] += p.d_h[i] * p.b[i] * s * (1.0f + a * (1.0f - s));
    p.d_b[i] += p.d_h[i] * a * s;
  }
}

}  // namespace

void rope_forward(const RopeParams& p, const ExecContext& ctx) {
  rotate(p, 1.0, static_cast<cudaStream_t>(ctx.stream));
}

void rope_backward(const RopeParams& p, const ExecContext& ctx) {
  rotate(p, -1.0, static_cast<cudaStream_t>(ctx.stream));
}

void swiglu_forward(const SwigluParams& p, const ExecContext& ctx) {
  if (p.count == 0) return;
  swiglu_forward_kernel<<<grid_for(p.count), kThreads, 0, static_cast<cudaStream_t>(ctx.stream)>>>(p);
  RINGCAST_CUDA_CHECK_LAUNCH();
}

void swiglu_backward(const SwigluBackwardParams& p, const ExecContext& ctx) {
  if (p.count == 0) return;
  swiglu_backward_kernel<<<grid_for(p.count), kThreads, 0, static_cast<cudaStream_t>(ctx.stream)>>>(p);
  RINGCAST_CUDA_CHECK_LAUNCH();
}

}  // namespace ringcast::kernels::cuda
