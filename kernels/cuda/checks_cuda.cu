// CUDA non-finite count: a grid-stride loop, a warp reduction, one atomicAdd per warp.
#include "checks_cuda.hpp"

#include <ringcast/cuda_check.hpp>
#include <ringcast/error.hpp>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace ringcast::kernels::cuda {
namespace {

__device__ bool nonfinite(float x) { return !isfinite(x); }
__device__ bool nonfinite(__nv_bfloat16 x) { return !isfinite(__bfloat162float(x)); }
__device__ bool nonfinite(__half x) { return !isfinite(__half2float(x)); }

template <typename T>
__global__ void count_nonfinite_kernel(const T* __restrict__ x, std::int64_t n, unsigned long long* counter) {
  unsigned bad = 0;
  for (std::int64_t i = blockIdx.x * std::int64_t{blockDim.x} + threadIdx.x; i < n;
       i += std::int64_t{gridDim.x} * blockDim.x)
    bad += nonfinite(x[i]);
  for (int off = 16; off > 0; off /= 2) bad += __shfl_down_sync(0xffffffffu, bad, off);
  if ((threadIdx.x & 31) == 0 && bad) atomicAdd(counter, static_cast<unsigned long long>(bad));
}

template <typename T>
void launch(const void* x, std::int64_t n, std::int64_t* counter, cudaStream_t stream) {
  constexpr int kThreads = 256;
  const std::int64_t blocks = std::min<std::int64_t>((n + kThreads - 1) / kThreads, 2048);
  count_nonfinite_kernel<T><<<blocks, kThreads, 0, stream>>>(static_cast<const T*>(x), n,
                                                             reinterpret_cast<unsigned long long*>(counter));
  RINGCAST_CUDA_CHECK_LAUNCH();
}

}  // namespace

void count_nonfinite(const void* x, DType dtype, std::int64_t n, std::int64_t* counter, Stream stream) {
  if (n == 0) return;
  const auto s = static_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::kF32: return launch<float>(x, n, counter, s);
    case DType::kBF16: return launch<__nv_bfloat16>(x, n, counter, s);
    case DType::kF16: return launch<__half>(x, n, counter, s);
    default: RINGCAST_THROW("count_nonfinite on CUDA: dtype {} (f32, bf16, f16)", dtype_name(dtype));
  }
}

}  // namespace ringcast::kernels::cuda
