// Pieces shared by the CUDA CAST, routing and pooling kernels (cast_cuda.cu, routing_cuda.cu,
// pooling_cuda.cu): the sort key under which a stable radix sort orders scores exactly as the CPU
// backend's std::stable_sort(..., greater) does, and the segmented sort built on it. Included only by
// CUDA sources of this folder.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace ringcast::kernels::cuda::detail {

// Ascending order of the keys is descending order of x. -0 and +0 get one key: the CPU compares with
// `>`, under which they tie (and a tie keeps the lower index first). Scores are finite; NaN is unordered.
__device__ __forceinline__ std::uint32_t descending_key(float x) {
  const std::uint32_t u = __float_as_uint(x == 0.0f ? 0.0f : x);
  const std::uint32_t ascending = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  return ~ascending;
}

// order[g * len + r] = the position j of the element of rank r in segment g, ranking
// scores[g * len + j] descending with ties toward the lower j: a stable radix sort on
// (segment, descending_key). Scratch is stream-ordered. Defined in routing_cuda.cu.
void order_by_score(const float* scores, std::int64_t segments, std::int64_t len, std::int32_t* order,
                    cudaStream_t stream);

}  // namespace ringcast::kernels::cuda::detail
