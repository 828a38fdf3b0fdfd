// CUDA tile selection queries (selection_launch.hpp): one thread per (tile, channel), consecutive
// threads on consecutive channels. Rows then heads are added in ascending order from 0 and the sum
// is scaled by 1 / rows, as in the CPU backend, with no contraction: the queries equal the CPU's bitwise.
#include <ringcast/cuda_check.hpp>

#include <cuda_runtime.h>

#include <algorithm>

#include "selection_launch.hpp"

namespace ringcast::kernels::cuda::detail {
namespace {

__global__ void tile_queries_kernel(const LayoutArgs L, const SelectionQueries sq, const std::int64_t tiles,
                                    float* __restrict__ out) {
  const int d = sq.head_dim;
  const int group = sq.heads / sq.kv_heads;
  for (std::int64_t i = blockIdx.x * std::int64_t{blockDim.x} + threadIdx.x; i < tiles * d;
       i += std::int64_t{gridDim.x} * blockDim.x) {
    const int c = static_cast<int>(i % d);
    const std::int64_t r0 = (i / d) * kQueryTile;
    const std::int64_t lo = L.causal ? max(std::int64_t{0}, r0 - (kQueryTile - 1)) : r0;
    const std::int64_t hi = L.causal ? r0 : min(r0 + kQueryTile, L.n_loc) - 1;
    float acc = 0.0f;
    for (std::int64_t r = lo; r <= hi; ++r) {
      const float* q = sq.q + (r * sq.heads + std::int64_t{sq.kv_head} * group) * d + c;
      for (int h = 0; h < group; ++h) acc = __fadd_rn(acc, q[std::int64_t{h} * d]);
    }
    out[i] = __fmul_rn(acc, 1.0f / static_cast<float>(hi - lo + 1));
  }
}

}  // namespace

void launch_tile_queries(const LayoutArgs& layout, const SelectionQueries& queries, std::int64_t tiles, float* out,
                         cudaStream_t stream) {
  constexpr int kThreads = 128;
  const std::int64_t total = tiles * queries.head_dim;
  const auto blocks = static_cast<unsigned>(std::clamp<std::int64_t>((total + kThreads - 1) / kThreads, 1, 1 << 20));
  tile_queries_kernel<<<blocks, kThreads, 0, stream>>>(layout, queries, tiles, out);
  RINGCAST_CUDA_CHECK_LAUNCH();
}

}  // namespace ringcast::kernels::cuda::detail
