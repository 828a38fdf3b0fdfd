// The seed layers' scores on CUDA (seed_scores.hpp). VIP scores: a block per query row hv for the
// row-wise steps (logits with their max, softmax with its sum, the backward's row dots), a thread per
// block column for the mean over rows, a thread per output element for the input gradients (each
// sums its terms in the CPU's order). Pyramidion scorer: a thread per row, its float64 dot in column
// order like the CPU, so the scores that decide the pairing match the CPU's to the last bit of the
// sigmoid. Block sums are fixed shared-memory trees.
#include <ringcast/cuda_check.hpp>

#include <cuda_runtime.h>

#include <climits>
#include <cmath>
#include <cstdint>

#include "layers_cuda.cuh"
#include "seed_rows_cuda.hpp"

namespace ringcast::kernels::cuda {
namespace {

struct Max {
  __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
};
struct Sum {
  template <typename T>
  __device__ T operator()(T a, T b) const { return a + b; }
};

// The block's kThreads values combined by a fixed tree; every thread gets the result.
template <typename T, typename Op>
__device__ T block_reduce(T value, Op op) {
  __shared__ T slots[kThreads];
  slots[threadIdx.x] = value;
  __syncthreads();
  for (int width = kThreads / 2; width > 0; width /= 2) {
    if (threadIdx.x < width) slots[threadIdx.x] = op(slots[threadIdx.x], slots[threadIdx.x + width]);
    __syncthreads();
  }
  const T result = slots[0];
  __syncthreads();
  return result;
}

__device__ float dot(const float* a, const float* b, int n) {
  float s = 0.0f;
  for (int i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

__global__ void vip_logits_kernel(const VipLogitsParams p) {
  const VipScoreShape& s = p.shape;
  const std::int64_t hv = blockIdx.x, nb = s.blocks;
  const int h = static_cast<int>(hv / s.vip), group = s.heads / s.kv_heads;
  const std::int64_t v = hv % s.vip;
  const float* q = p.q + (v * s.heads + h) * s.head_dim;
  float m = -INFINITY;
  for (std::int64_t j = threadIdx.x; j < nb; j += blockDim.x) {
    const float logit = s.scale * dot(q, p.k + (j * s.kv_heads + h / group) * s.head_dim, s.head_dim);
    p.probs[hv * nb + j] = logit;
    m = fmaxf(m, logit);
  }
  m = block_reduce(m, Max{});
  if (threadIdx.x == 0) p.row_max[hv] = m;
}

__global__ void vip_softmax_kernel(const VipSoftmaxParams p) {
  const std::int64_t hv = blockIdx.x, nb = p.shape.blocks;
  float sum = 0.0f;
  for (std::int64_t j = threadIdx.x; j < nb; j += blockDim.x) sum += p.probs[hv * nb + j] = expf(p.probs[hv * nb + j] - p.row_max[hv]);
  sum = block_reduce(sum, Sum{});
  if (threadIdx.x == 0) p.row_sum[hv] = sum;
}

__global__ void vip_mean_kernel(const VipMeanParams p) {
  const std::int64_t nb = p.shape.blocks, HV = std::int64_t{p.shape.heads} * p.shape.vip;
  for (std::int64_t j = blockIdx.x * std::int64_t{blockDim.x} + threadIdx.x; j < nb;
       j += std::int64_t{gridDim.x} * blockDim.x) {
    float acc = 0.0f;
    for (std::int64_t hv = 0; hv < HV; ++hv) acc += p.probs[hv * nb + j] /= p.row_sum[hv];
    acc *= 1.0f / static_cast<float>(HV);
    p.p[j] = acc;
    p.log_p[p.block_ids[j]] = logf(acc + p.floor);
  }
}

__global__ void vip_pi_dot_kernel(const VipPiDotParams p) {
  double s = 0.0;
  for (std::int64_t j = threadIdx.x; j < p.blocks; j += blockDim.x) s += double{p.pi[j]} * p.d_pi[j];
  s = block_reduce(s, Sum{});
  if (threadIdx.x == 0) *p.pi_dot = s;
}

__global__ void vip_d_p_kernel(const VipScoresBackwardRowsParams p) {
  const double pi_dot = *p.pi_dot;
  for (std::int64_t j = blockIdx.x * std::int64_t{blockDim.x} + threadIdx.x; j < p.shape.blocks;
       j += std::int64_t{gridDim.x} * blockDim.x)
    p.d_pi[j] = static_cast<float>(p.pi[j] * (p.d_pi[j] - pi_dot)) / (p.p[j] + p.floor);
}

__global__ void vip_row_dot_kernel(const VipScoresBackwardRowsParams p) {
  const std::int64_t hv = blockIdx.x, nb = p.shape.blocks;
  float t = 0.0f;
  for (std::int64_t j = threadIdx.x; j < nb; j += blockDim.x) t += p.probs[hv * nb + j] * p.d_pi[j];
  t = block_reduce(t, Sum{});
  if (threadIdx.x == 0) p.row_dot[hv] = t;
}

// d_q[v, h, i] += Σ_j g[hv, j] k[j, h / group, i], j ascending.
__global__ void vip_d_q_kernel(const VipScoresBackwardInputsParams p, float coef) {
  const VipScoreShape& s = p.shape;
  const int hd = s.head_dim, group = s.heads / s.kv_heads;
  const std::int64_t count = s.vip * s.heads * hd, nb = s.blocks;
  for (std::int64_t e = blockIdx.x * std::int64_t{blockDim.x} + threadIdx.x; e < count;
       e += std::int64_t{gridDim.x} * blockDim.x) {
    const int i = static_cast<int>(e % hd), h = static_cast<int>(e / hd % s.heads);
    const std::int64_t v = e / (std::int64_t{hd} * s.heads), hv = h * s.vip + v;
    float acc = p.d_q[e];
    for (std::int64_t j = 0; j < nb; ++j) {
      const float g = coef * p.probs[hv * nb + j] * (p.d_p[j] - p.row_dot[hv]);
      acc += g * p.k[(j * s.kv_heads + h / group) * hd + i];
    }
    p.d_q[e] = acc;
  }
}

// d_k[j, kvh, i] += Σ over the group's heads h (ascending), then v, of g[hv, j] q[v, h, i].
__global__ void vip_d_k_kernel(const VipScoresBackwardInputsParams p, float coef) {
  const VipScoreShape& s = p.shape;
  const int hd = s.head_dim, group = s.heads / s.kv_heads;
  const std::int64_t count = s.blocks * s.kv_heads * hd, nb = s.blocks;
  for (std::int64_t e = blockIdx.x * std::int64_t{blockDim.x} + threadIdx.x; e < count;
       e += std::int64_t{gridDim.x} * blockDim.x) {
    const int i = static_cast<int>(e % hd), kvh = static_cast<int>(e / hd % s.kv_heads);
    const std::int64_t j = e / (std::int64_t{hd} * s.kv_heads);
    float acc = p.d_k[e];
    for (int h = kvh * group; h < (kvh + 1) * group; ++h)
      for (std::int64_t v = 0; v < s.vip; ++v) {
        const std::int64_t hv = h * s.vip + v;
        const float g = coef * p.probs[hv * nb + j] * (p.d_p[j] - p.row_dot[hv]);
        acc += g * p.q[(v * s.heads + h) * hd + i];
      }
    p.d_k[e] = acc;
  }
}

__device__ float sigmoid(float a) { return 1.0f / (1.0f + expf(-a)); }

__global__ void pool_scores_kernel(const PoolScoreParams p) {
  const float bias = *p.bias;
  for (std::int64_t r = blockIdx.x * std::int64_t{blockDim.x} + threadIdx.x; r < p.rows;
       r += std::int64_t{gridDim.x} * blockDim.x) {
    const float* x = p.x + r * p.dim;
    double z = 0.0;
    for (int c = 0; c < p.dim; ++c) z += double{p.w[c]} * double{x[c]};
    p.logits[r] = static_cast<float>(z);
    p.scores[r] = sigmoid(p.logits[r] + bias) + p.floor;
  }
}

// One block: d_scores scaled in place, their float64 sum added into *d_bias.
__global__ void pool_scores_backward_kernel(const PoolScoreBackwardParams p) {
  const float bias = *p.bias;
  double sum = 0.0;
  for (std::int64_t r = threadIdx.x; r < p.rows; r += blockDim.x) {
    const float g = sigmoid(p.logits[r] + bias);
    p.d_scores[r] *= g * (1.0f - g);
    sum += p.d_scores[r];
  }
  sum = block_reduce(sum, Sum{});
  if (threadIdx.x == 0) *p.d_bias += static_cast<float>(sum);
}

cudaStream_t stream_of(const ExecContext& ctx) { return static_cast<cudaStream_t>(ctx.stream); }

unsigned rows_grid(const VipScoreShape& s) {
  const std::int64_t rows = std::int64_t{s.heads} * s.vip;
  RINGCAST_CHECK(rows <= INT_MAX, "VIP scores on CUDA: {} query rows exceed the grid (a block per row)", rows);
  return static_cast<unsigned>(rows);
}

float input_coef(const VipScoreShape& s) { return s.scale / static_cast<float>(std::int64_t{s.heads} * s.vip); }

}  // namespace

void vip_block_logits(const VipLogitsParams& p, const ExecContext& ctx) {
  vip_logits_kernel<<<rows_grid(p.shape), kThreads, 0, stream_of(ctx)>>>(p);
  RINGCAST_CUDA_CHECK_LAUNCH();
}

void vip_block_softmax(const VipSoftmaxParams& p, const ExecContext& ctx) {
  vip_softmax_kernel<<<rows_grid(p.shape), kThreads, 0, stream_of(ctx)>>>(p);
  RINGCAST_CUDA_CHECK_LAUNCH();
}

void vip_block_mean(const VipMeanParams& p, const ExecContext& ctx) {
  vip_mean_kernel<<<grid_for(p.shape.blocks), kThreads, 0, stream_of(ctx)>>>(p);
  RINGCAST_CUDA_CHECK_LAUNCH();
}

void vip_pi_dot(const VipPiDotParams& p, const ExecContext& ctx) {
  vip_pi_dot_kernel<<<1, kThreads, 0, stream_of(ctx)>>>(p);
  RINGCAST_CUDA_CHECK_LAUNCH();
}

void vip_scores_backward_rows(const VipScoresBackwardRowsParams& p, const ExecContext& ctx) {
  if (p.shape.blocks > 0) {
    vip_d_p_kernel<<<grid_for(p.shape.blocks), kThreads, 0, stream_of(ctx)>>>(p);
    RINGCAST_CUDA_CHECK_LAUNCH();
  }
  vip_row_dot_kernel<<<rows_grid(p.shape), kThreads, 0, stream_of(ctx)>>>(p);
  RINGCAST_CUDA_CHECK_LAUNCH();
}

void vip_scores_backward_inputs(const VipScoresBackwardInputsParams& p, const ExecContext& ctx) {
  const VipScoreShape& s = p.shape;
  const float coef = input_coef(s);
  vip_d_q_kernel<<<grid_for(s.vip * s.heads * s.head_dim), kThreads, 0, stream_of(ctx)>>>(p, coef);
  RINGCAST_CUDA_CHECK_LAUNCH();
  vip_d_k_kernel<<<grid_for(s.blocks * s.kv_heads * s.head_dim), kThreads, 0, stream_of(ctx)>>>(p, coef);
  RINGCAST_CUDA_CHECK_LAUNCH();
}

void pool_scores(const PoolScoreParams& p, const ExecContext& ctx) {
  pool_scores_kernel<<<grid_for(p.rows), kThreads, 0, stream_of(ctx)>>>(p);
  RINGCAST_CUDA_CHECK_LAUNCH();
}

void pool_scores_backward(const PoolScoreBackwardParams& p, const ExecContext& ctx) {
  pool_scores_backward_kernel<<<1, kThreads, 0, stream_of(ctx)>>>(p);
  RINGCAST_CUDA_CHECK_LAUNCH();
}

}  // namespace ringcast::kernels::cuda
