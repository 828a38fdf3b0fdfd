// Indexed row gather-sum and row dot products on CUDA (segment_gather.hpp). The gather runs a thread per
// output element, its segment summed in index order from the first term (the CPU's arithmetic, so a
// copy or a sum of the same terms is bitwise the CPU's); the row dot runs a warp per row with a
// fixed shuffle tree.
#include <ringcast/cuda_check.hpp>

#include <cuda_runtime.h>

#include <cstdint>

#include "layers_cuda.cuh"
#include "seed_rows_cuda.hpp"

namespace ringcast::kernels::cuda {
namespace {

__global__ void gather_segments_kernel(const SegmentGatherParams p, std::int64_t src_stride, std::int64_t dst_stride) {
  const std::int64_t count = p.rows * p.dim;
  for (std::int64_t e = blockIdx.x * std::int64_t{blockDim.x} + threadIdx.x; e < count;
       e += std::int64_t{gridDim.x} * blockDim.x) {
    const std::int64_t o = e / p.dim, i = e % p.dim;
    const std::int64_t begin = p.offsets ? p.offsets[o] : o, end = p.offsets ? p.offsets[o + 1] : o + 1;
    float s = 0.0f;
    for (std::int64_t k = begin; k < end; ++k) {
      const float x = p.src[(p.index ? p.index[k] : k) * src_stride + i];
      s = k == begin ? x : s + x;
    }
    const float w = p.weights ? p.weights[o] : p.scale;
    float* dst = p.dst + (p.dst_rows ? p.dst_rows[o] : o) * dst_stride + i;
    *dst = p.accumulate ? *dst + w * s : w * s;
  }
}

__global__ void rowwise_dot_kernel(const RowwiseDotParams p) {
  const std::int64_t warps = std::int64_t{gridDim.x} * (blockDim.x / kWarp);
  const int lane = threadIdx.x % kWarp;
  for (std::int64_t r = blockIdx.x * std::int64_t{blockDim.x / kWarp} + threadIdx.x / kWarp; r < p.rows; r += warps) {
    const float *a = p.a + r * p.dim, *b = p.b + r * p.dim;
    float s = 0.0f;
    for (int i = lane; i < p.dim; i += kWarp) s += a[i] * b[i];
    for (int off = kWarp / 2; off > 0; off /= 2) s += __shfl_down_sync(0xffffffffu, s, off);
    if (lane == 0) p.out[r] = s;
  }
}

}  // namespace

void gather_segments(const SegmentGatherParams& p, const ExecContext& ctx) {
  const std::int64_t src_stride = p.src_stride ? p.src_stride : p.dim, dst_stride = p.dst_stride ? p.dst_stride : p.dim;
  gather_segments_kernel<<<grid_for(p.rows * p.dim), kThreads, 0, static_cast<cudaStream_t>(ctx.stream)>>>(p, src_stride,
                                                                                                        dst_stride);
  RINGCAST_CUDA_CHECK_LAUNCH();
}

void rowwise_dot(const RowwiseDotParams& p, const ExecContext& ctx) {
  rowwise_dot_kernel<<<grid_for(p.rows * kWarp), kThreads, 0, static_cast<cudaStream_t>(ctx.stream)>>>(p);
  RINGCAST_CUDA_CHECK_LAUNCH();
}

}  // namespace ringcast::kernels::cuda
