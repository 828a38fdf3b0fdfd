// CUDA layout primitives: one grid-stride kernel for the strided copy, templated on the source and
// destination element types. Index arithmetic is 64-bit; dimensions are unravelled from the flat
// index with the innermost dimension fastest, so consecutive threads touch consecutive elements
// whenever the innermost stride is 1 on both sides.
#include "layout_cuda.hpp"

#include <ringcast/cuda_check.hpp>
#include <ringcast/error.hpp>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace ringcast::kernels::cuda {
namespace {

struct CopyArgs {
  int ndim;
  std::int64_t shape[StridedCopy::kMaxDims];
  std::int64_t src_strides[StridedCopy::kMaxDims];
  std::int64_t dst_strides[StridedCopy::kMaxDims];
  std::int64_t total;
};

__device__ float to_float(float x) { return x; }
__device__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ float to_float(__half x) { return __half2float(x); }
template <typename T> __device__ T from_float(float x);
template <> __device__ float from_float<float>(float x) { return x; }
template <> __device__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }
template <> __device__ __half from_float<__half>(float x) { return __float2half_rn(x); }

template <typename Src, typename Dst, bool kAccumulate>
__global__ void copy_strided_kernel(CopyArgs a, const Src* __restrict__ src, Dst* __restrict__ dst) {
  for (std::int64_t i = blockIdx.x * std::int64_t{blockDim.x} + threadIdx.x; i < a.total;
       i += std::int64_t{gridDim.x} * blockDim.x) {
    std::int64_t rest = i, s = 0, d = 0;
    for (int k = a.ndim - 1; k >= 0; --k) {
      const std::int64_t idx = rest % a.shape[k];
      rest /= a.shape[k];
      s += idx * a.src_strides[k];
      d += idx * a.dst_strides[k];
    }
    const float x = to_float(src[s]);
    if constexpr (kAccumulate) dst[d] = from_float<Dst>(to_float(dst[d]) + x);
    else dst[d] = from_float<Dst>(x);
  }
}

template <typename Src, typename Dst>
void launch(const StridedCopy& c, const CopyArgs& a, cudaStream_t stream) {
  constexpr int kThreads = 256;
  const std::int64_t blocks = std::min<std::int64_t>((a.total + kThreads - 1) / kThreads, 65535LL * 8);
  const auto* src = static_cast<const Src*>(c.src);
  auto* dst = static_cast<Dst*>(c.dst);
  if (c.accumulate) copy_strided_kernel<Src, Dst, true><<<blocks, kThreads, 0, stream>>>(a, src, dst);
  else copy_strided_kernel<Src, Dst, false><<<blocks, kThreads, 0, stream>>>(a, src, dst);
  RINGCAST_CUDA_CHECK_LAUNCH();
}

template <typename Src>
void launch_for_dst(const StridedCopy& c, const CopyArgs& a, cudaStream_t stream) {
  switch (c.dst_dtype) {
    case DType::kF32: return launch<Src, float>(c, a, stream);
    case DType::kBF16: return launch<Src, __nv_bfloat16>(c, a, stream);
    case DType::kF16: return launch<Src, __half>(c, a, stream);
    default: RINGCAST_THROW("copy_strided on CUDA: destination dtype {} (f32, bf16, f16)", dtype_name(c.dst_dtype));
  }
}

}  // namespace

void copy_strided(const StridedCopy& c, Stream stream) {
  RINGCAST_CHECK(c.ndim >= 1 && c.ndim <= StridedCopy::kMaxDims, "copy_strided: {} dimensions", c.ndim);
  RINGCAST_CHECK(!c.accumulate || c.dst_dtype == DType::kF32, "copy_strided: accumulation needs an f32 destination");
  CopyArgs a{};
  a.ndim = c.ndim;
  a.total = 1;
  for (int k = 0; k < c.ndim; ++k) {
    a.shape[k] = c.shape[k];
    a.src_strides[k] = c.src_strides[k];
    a.dst_strides[k] = c.dst_strides[k];
    a.total *= c.shape[k];
  }
  if (a.total == 0) return;
  auto s = static_cast<cudaStream_t>(stream);
  switch (c.src_dtype) {
    case DType::kF32: return launch_for_dst<float>(c, a, s);
    case DType::kBF16: return launch_for_dst<__nv_bfloat16>(c, a, s);
    case DType::kF16: return launch_for_dst<__half>(c, a, s);
    default: RINGCAST_THROW("copy_strided on CUDA: source dtype {} (f32, bf16, f16)", dtype_name(c.src_dtype));
  }
}

void fill_zero(void* dst, std::size_t bytes, Stream stream) {
  RINGCAST_CUDA_CHECK(cudaMemsetAsync(dst, 0, bytes, static_cast<cudaStream_t>(stream)));
}

}  // namespace ringcast::kernels::cuda
