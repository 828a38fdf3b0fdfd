// The optimizer update and the buffer checks of gradient clipping on CUDA. AdamW's bias corrections
// are formed on the host in float64 exactly as the CPU backend forms them. sum_of_squares runs over
// the CPU backend's fixed blocks of kBlock elements, each summed by one CUDA block in float64 with a
// fixed tree, then over the blocks in a fixed order: the result repeats bitwise, whatever the GPU.
#include "layers_cuda.hpp"
#include "layers_cuda.cuh"

#include <climits>
#include <cmath>

namespace ringcast::kernels::cuda {
namespace {

constexpr std::int64_t kBlock = 4096;
constexpr int kFinishThreads = 1024;

struct AdamWArgs {
  std::int64_t count;
  float step_size;       // lr / (1 - β1^step)
  float inv_sqrt_bias2;  // 1 / sqrt(1 - β2^step)
  float decay;           // 1 - lr · weight_decay
  float beta1, beta2, eps;
  float* param;
  const float* grad;
  float* m;
  float* v;
};

__global__ void adamw_kernel(const AdamWArgs a) {
  for (std::int64_t i = blockIdx.x * std::int64_t{blockDim.x} + threadIdx.x; i < a.count;
       i += std::int64_t{gridDim.x} * blockDim.x) {
    const float g = a.grad[i];
    const float m = a.beta1 * a.m[i] + (1.0f - a.beta1) * g;
    const float v = a.beta2 * a.v[i] + (1.0f - a.beta2) * g * g;
    a.m[i] = m;
    a.v[i] = v;
    a.param[i] = a.param[i] * a.decay - a.step_size * m / (sqrtf(v) * a.inv_sqrt_bias2 + a.eps);
  }
}

__global__ void __launch_bounds__(kThreads)
    block_squares_kernel(const float* __restrict__ x, std::int64_t count, double* __restrict__ partial) {
  __shared__ double shared[kWarp];
  const std::int64_t begin = blockIdx.x * kBlock;
  const std::int64_t end = min(count, begin + kBlock);
  double sum = 0.0;
  for (std::int64_t i = begin + threadIdx.x; i < end; i += blockDim.x) sum += double(x[i]) * x[i];
  sum = block_sum(sum, shared);
  if (threadIdx.x == 0) partial[blockIdx.x] = sum;
}

__global__ void __launch_bounds__(kFinishThreads)
    sum_partials_kernel(const double* __restrict__ partial, std::int64_t blocks, double* __restrict__ result) {
  __shared__ double shared[kWarp];
  double sum = 0.0;
  for (std::int64_t b = threadIdx.x; b < blocks; b += blockDim.x) sum += partial[b];
  sum = block_sum(sum, shared);
  if (threadIdx.x == 0) *result = sum;
}

__global__ void scale_kernel(std::int64_t count, float scale, float* __restrict__ x) {
  for (std::int64_t i = blockIdx.x * std::int64_t{blockDim.x} + threadIdx.x; i < count;
       i += std::int64_t{gridDim.x} * blockDim.x)
    x[i] *= scale;
}

// `found` was zeroed on the stream; a block that sees a non-finite value sets it (the same value from
// every such block, so the outcome does not depend on their order).
__global__ void non_finite_kernel(std::int64_t count, const float* __restrict__ x, std::int32_t* found) {
  bool bad = false;
  for (std::int64_t i = blockIdx.x * std::int64_t{blockDim.x} + threadIdx.x; i < count;
       i += std::int64_t{gridDim.x} * blockDim.x)
    bad = bad || !isfinite(x[i]);
  if (__syncthreads_or(bad) && threadIdx.x == 0) atomicExch(found, 1);
}

}  // namespace

void adamw_step(const AdamWParams& p, const ExecContext& ctx) {
  if (p.count == 0) return;
  const double bias1 = 1.0 - std::pow(double(p.beta1), double(p.step));
  const double bias2 = 1.0 - std::pow(double(p.beta2), double(p.step));
  const AdamWArgs a{p.count,
                    static_cast<float>(p.lr / bias1),
                    static_cast<float>(1.0 / std::sqrt(bias2)),
                    1.0f - p.lr * p.weight_decay,
                    p.beta1,
                    p.beta2,
                    p.eps,
                    p.param,
                    p.grad,
                    p.m,
                    p.v};
  adamw_kernel<<<grid_for(p.count), kThreads, 0, static_cast<cudaStream_t>(ctx.stream)>>>(a);
  RINGCAST_CUDA_CHECK_LAUNCH();
}

void sum_of_squares(std::int64_t count, const float* x, double* result, const ExecContext& ctx) {
  const std::int64_t blocks = (count + kBlock - 1) / kBlock;
  RINGCAST_CHECK(blocks <= INT_MAX, "sum_of_squares on CUDA: {} elements exceed the grid", count);
  StreamLease lease(ctx);
  auto* partial = reinterpret_cast<double*>(lease.scratch(sizeof(double) * static_cast<std::size_t>(blocks)));
  if (blocks > 0) {
    block_squares_kernel<<<static_cast<unsigned>(blocks), kThreads, 0, lease.stream()>>>(x, count, partial);
    RINGCAST_CUDA_CHECK_LAUNCH();
  }
  sum_partials_kernel<<<1, kFinishThreads, 0, lease.stream()>>>(partial, blocks, result);
  RINGCAST_CUDA_CHECK_LAUNCH();
}

void scale_in_place(std::int64_t count, float scale, float* x, const ExecContext& ctx) {
  if (count == 0) return;
  scale_kernel<<<grid_for(count), kThreads, 0, static_cast<cudaStream_t>(ctx.stream)>>>(count, scale, x);
  RINGCAST_CUDA_CHECK_LAUNCH();
}

void find_non_finite(std::int64_t count, const float* x, std::int32_t* found, const ExecContext& ctx) {
  const auto stream = static_cast<cudaStream_t>(ctx.stream);
  RINGCAST_CUDA_CHECK(cudaMemsetAsync(found, 0, sizeof(std::int32_t), stream));
  if (count == 0) return;
  non_finite_kernel<<<grid_for(count), kThreads, 0, stream>>>(count, x, found);
  RINGCAST_CUDA_CHECK_LAUNCH();
}

}  // namespace ringcast::kernels::cuda
