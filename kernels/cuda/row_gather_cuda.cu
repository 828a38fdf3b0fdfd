// Indexed row movement on CUDA (row_gather.hpp). The gather runs a thread per output element, its terms
// in index order with each operation rounded explicitly (__fadd_rn / __fmul_rn: no contraction into
// fused multiply-adds), the CPU backend's arithmetic, so results equal the CPU's bitwise. The scatter
// builds the inverse index (row_gather_inverse.hpp) in the stream's scratch: bucket keys sorted by a
// stable radix sort, bucket starts found by binary search, no atomics; then it gathers. The row dot
// runs a warp per row with a fixed shuffle tree.
#include <ringcast/cuda_check.hpp>

#include <cub/device/device_radix_sort.cuh>
#include <cuda_runtime.h>

#include <algorithm>
#include <bit>
#include <cstdint>

#include "../row_gather_inverse.hpp"
#include "layers_cuda.cuh"
#include "seed_rows_cuda.hpp"

namespace ringcast::kernels::cuda {
namespace {

__device__ __forceinline__ std::int64_t entry(const RowIndex& index, std::int64_t k) {
  return index.wide ? static_cast<const std::int64_t*>(index.data)[k] : static_cast<const std::int32_t*>(index.data)[k];
}

__device__ __forceinline__ std::int64_t grid_index() { return blockIdx.x * std::int64_t{blockDim.x} + threadIdx.x; }
__device__ __forceinline__ std::int64_t grid_stride() { return std::int64_t{gridDim.x} * blockDim.x; }

// Output element x of the [heads][rows][width] grid: its row o, head h, element e.
struct Element {
  std::int64_t o, e;
  int h;
};
__device__ __forceinline__ Element element_at(const RowGather& p, std::int64_t x) {
  return {(x / p.width) % p.rows, x % p.width, static_cast<int>(x / (p.width * p.rows))};
}

__global__ void gather_rows_f32_kernel(const RowGather p, std::int64_t src_rs, std::int64_t dst_rs) {
  const float* src = static_cast<const float*>(p.src);
  float* dst_base = static_cast<float*>(p.dst);
  for (std::int64_t x = grid_index(); x < p.heads * p.rows * p.width; x += grid_stride()) {
    const Element at = element_at(p, x);
    const std::int64_t list = at.h / p.group;
    const std::int64_t* segment = p.offsets ? p.offsets + list * (p.rows + 1) + at.o : nullptr;
    const std::int64_t begin = segment ? segment[0] : at.o, end = segment ? segment[1] : at.o + 1;
    const float* x_h = src + at.h * p.src_head_stride + at.e;
    float* dst =
        dst_base + (p.dst_rows.data ? entry(p.dst_rows, at.o) : at.o) * dst_rs + at.h * p.dst_head_stride + at.e;
    const float w = p.weights ? p.weights[at.o] : p.scale;
    float acc = p.accumulate ? *dst : p.fill;
    bool first = true;
    for (std::int64_t k = begin; k < end; ++k) {
      const std::int64_t j = p.index.data ? entry(p.index, list * p.index_stride + k) : k;
      if (j < 0) continue;
      const float v = x_h[j * src_rs];
      if (p.accumulate) {
        acc = __fadd_rn(acc, __fmul_rn(w, v));
      } else {
        acc = first ? v : __fadd_rn(acc, v);
      }
      first = false;
    }
    *dst = p.accumulate ? acc : __fmul_rn(w, acc);
  }
}

// bf16 / f16 bits, one term per row (seed_rows_dispatch.cpp): zero bits for a negative index.
__global__ void gather_rows_16_kernel(const RowGather p, std::int64_t src_rs, std::int64_t dst_rs) {
  const auto* src = static_cast<const std::uint16_t*>(p.src);
  auto* dst = static_cast<std::uint16_t*>(p.dst);
  for (std::int64_t x = grid_index(); x < p.heads * p.rows * p.width; x += grid_stride()) {
    const Element at = element_at(p, x);
    const std::int64_t j = p.index.data ? entry(p.index, (at.h / p.group) * p.index_stride + at.o) : at.o;
    const std::int64_t y = p.dst_rows.data ? entry(p.dst_rows, at.o) : at.o;
    dst[y * dst_rs + at.h * p.dst_head_stride + at.e] =
        j >= 0 ? src[j * src_rs + at.h * p.src_head_stride + at.e] : std::uint16_t{0};
  }
}

void launch_gather(const RowGather& p, cudaStream_t stream) {
  const std::int64_t src_rs = p.src_row_stride ? p.src_row_stride : p.width;
  const std::int64_t dst_rs = p.dst_row_stride ? p.dst_row_stride : p.width;
  const unsigned blocks = grid_for(p.heads * p.rows * p.width);
  if (p.dtype == DType::kF32) {
    gather_rows_f32_kernel<<<blocks, kThreads, 0, stream>>>(p, src_rs, dst_rs);
  } else {
    gather_rows_16_kernel<<<blocks, kThreads, 0, stream>>>(p, src_rs, dst_rs);
  }
  RINGCAST_CUDA_CHECK_LAUNCH();
}

// Entry i of list g: key g (out_rows + 1) + bucket (0 for an entry outside [0, out_rows), t + 1 for t),
// value i.
__global__ void inverse_keys_kernel(const RowScatter p, std::uint64_t* keys, std::int64_t* sources) {
  for (std::int64_t x = grid_index(); x < (p.heads / p.group) * p.rows; x += grid_stride()) {
    const std::int64_t list = x / p.rows, i = x % p.rows;
    const std::int64_t j = entry(p.index, list * p.index_stride + i);
    keys[x] = static_cast<std::uint64_t>(list * (p.out_rows + 1) + (j < 0 || j >= p.out_rows ? 0 : j + 1));
    sources[x] = i;
  }
}

// offsets[g][t], entry x = g (out_rows + 1) + t: the first sorted position whose key is at least
// (g, bucket t + 1)'s, g (out_rows + 1) + t + 1 = x + 1.
__global__ void inverse_offsets_kernel(const std::uint64_t* keys, std::int64_t count, std::int64_t entries,
                                       std::int64_t* offsets) {
  for (std::int64_t x = grid_index(); x < entries; x += grid_stride()) {
    const auto key = static_cast<std::uint64_t>(x + 1);
    std::int64_t lo = 0, hi = count;
    while (lo < hi) {
      const std::int64_t mid = lo + (hi - lo) / 2;
      if (keys[mid] < key) {
        lo = mid + 1;
      } else {
        hi = mid;
      }
    }
    offsets[x] = lo;
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

void gather_rows(const RowGather& p, const ExecContext& ctx) {
  launch_gather(p, static_cast<cudaStream_t>(ctx.stream));
}

void scatter_add_rows(const RowScatter& p, const ExecContext& ctx) {
  const std::int64_t lists = inverse_lists(p), buckets = p.out_rows + 1, count = lists * p.rows;
  const int end_bit = std::max(1, static_cast<int>(std::bit_width(static_cast<std::uint64_t>(lists * buckets - 1))));
  StreamLease lease(ctx);
  const cudaStream_t stream = lease.stream();
  std::size_t sort_bytes = 0;
  RINGCAST_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(
      nullptr, sort_bytes, static_cast<const std::uint64_t*>(nullptr), static_cast<std::uint64_t*>(nullptr),
      static_cast<const std::int64_t*>(nullptr), static_cast<std::int64_t*>(nullptr), count, 0, end_bit, stream));
  ScratchLayout layout;
  const auto keys_in = layout.add<std::uint64_t>(count);
  const auto keys_out = layout.add<std::uint64_t>(count);
  const auto rows_in = layout.add<std::int64_t>(count);
  const auto sources_at = layout.add<std::int64_t>(count);
  const auto offsets_at = layout.add<std::int64_t>(lists * buckets);
  const auto sort_at = layout.add<std::byte>(static_cast<std::int64_t>(sort_bytes));
  std::byte* base = lease.scratch(layout.bytes());
  auto* keys = ScratchLayout::at<std::uint64_t>(base, keys_out);
  auto* sources = ScratchLayout::at<std::int64_t>(base, sources_at);
  auto* offsets = ScratchLayout::at<std::int64_t>(base, offsets_at);
  inverse_keys_kernel<<<grid_for(count), kThreads, 0, stream>>>(p, ScratchLayout::at<std::uint64_t>(base, keys_in),
                                                                ScratchLayout::at<std::int64_t>(base, rows_in));
  RINGCAST_CUDA_CHECK_LAUNCH();
  RINGCAST_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(
      ScratchLayout::at<std::byte>(base, sort_at), sort_bytes, ScratchLayout::at<std::uint64_t>(base, keys_in), keys,
      ScratchLayout::at<std::int64_t>(base, rows_in), sources, count, 0, end_bit, stream));
  inverse_offsets_kernel<<<grid_for(lists * buckets), kThreads, 0, stream>>>(keys, count, lists * buckets, offsets);
  RINGCAST_CUDA_CHECK_LAUNCH();
  launch_gather(inverse_gather(p, offsets, sources), stream);
}

void rowwise_dot(const RowwiseDotParams& p, const ExecContext& ctx) {
  rowwise_dot_kernel<<<grid_for(p.rows * kWarp), kThreads, 0, static_cast<cudaStream_t>(ctx.stream)>>>(p);
  RINGCAST_CUDA_CHECK_LAUNCH();
}

}  // namespace ringcast::kernels::cuda
