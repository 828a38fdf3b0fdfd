// CUDA transpose of a forward block table (selection_device.hpp transpose_on_device), equal to
// transpose() of block_table.hpp: every entry becomes a ref under its (KV head, page) key, and a
// stable radix sort on the keys keeps each key's refs in increasing entry order; offsets are the
// first sorted position of each key (a binary search per key). Scratch is stream-ordered.
#include <ringcast/cuda_check.hpp>

#include <cub/cub.cuh>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "selection_cuda.hpp"
#include "selection_launch.hpp"

namespace ringcast::kernels::cuda {
namespace {

using detail::Scratch;

constexpr int kThreads = 256;

// The unit of entry e: the last u with offsets[u] <= e.
__device__ std::int64_t unit_of(const std::int64_t* offsets, std::int64_t units, std::int64_t e) {
  std::int64_t lo = 0, hi = units;  // offsets[lo] <= e < offsets[hi]
  while (hi - lo > 1) {
    const std::int64_t mid = (lo + hi) / 2;
    if (offsets[mid] <= e) lo = mid;
    else hi = mid;
  }
  return lo;
}

__global__ void transpose_keys_kernel(const BlockTable t, std::int64_t units, int kv_heads, std::int64_t num_pages,
                                      std::uint64_t* keys, std::int64_t* values) {
  for (std::int64_t e = blockIdx.x * std::int64_t{blockDim.x} + threadIdx.x; e < t.num_entries;
       e += std::int64_t{gridDim.x} * blockDim.x) {
    keys[e] = static_cast<std::uint64_t>(unit_of(t.offsets, units, e) % kv_heads * num_pages + t.entries[e].page);
    values[e] = e;
  }
}

// refs[i] from the sorted entries; offsets[k] = the first sorted key >= k.
__global__ void transpose_fill_kernel(const BlockTable t, std::int64_t units, const std::uint64_t* keys,
                                      const std::int64_t* values, std::int64_t key_count, std::int64_t* offsets,
                                      PageRef* refs) {
  const std::int64_t stride = std::int64_t{gridDim.x} * blockDim.x;
  const std::int64_t first = blockIdx.x * std::int64_t{blockDim.x} + threadIdx.x;
  for (std::int64_t i = first; i < t.num_entries; i += stride) refs[i] = {unit_of(t.offsets, units, values[i]), values[i]};
  for (std::int64_t k = first; k <= key_count; k += stride) {
    std::int64_t lo = 0, hi = t.num_entries;
    while (lo < hi) {
      const std::int64_t mid = (lo + hi) / 2;
      if (keys[mid] < static_cast<std::uint64_t>(k)) lo = mid + 1;
      else hi = mid;
    }
    offsets[k] = lo;
  }
}

unsigned grid_for(std::int64_t n) {
  return static_cast<unsigned>(std::clamp<std::int64_t>((n + kThreads - 1) / kThreads, 1, 1 << 16));
}

}  // namespace

void transpose_on_device(const BlockTable& table, const AttentionShape& shape, std::int64_t* offsets, PageRef* refs,
                         Stream stream_handle) {
  const auto stream = static_cast<cudaStream_t>(stream_handle);
  const std::int64_t units = shape.num_units();
  const std::int64_t key_count = std::int64_t{shape.kv_heads} * shape.num_pages;
  const std::int64_t n = table.num_entries;
  const Scratch<std::uint64_t> keys(static_cast<std::size_t>(2 * n), stream);
  const Scratch<std::int64_t> values(static_cast<std::size_t>(2 * n), stream);
  if (n > 0) {
    transpose_keys_kernel<<<grid_for(n), kThreads, 0, stream>>>(table, units, shape.kv_heads, shape.num_pages,
                                                                keys.get(), values.get());
    RINGCAST_CUDA_CHECK_LAUNCH();
    // Stable: equal keys keep ascending entry order, as in transpose().
    int end_bit = 1;
    while ((std::uint64_t{1} << end_bit) <= static_cast<std::uint64_t>(key_count)) ++end_bit;
    std::size_t bytes = 0;
    RINGCAST_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, bytes, keys.get(), keys.get() + n, values.get(),
                                                        values.get() + n, n, 0, end_bit, stream));
    const Scratch<unsigned char> temp(bytes, stream);
    RINGCAST_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(temp.get(), bytes, keys.get(), keys.get() + n, values.get(),
                                                        values.get() + n, n, 0, end_bit, stream));
  }
  transpose_fill_kernel<<<grid_for(std::max(n, key_count + 1)), kThreads, 0, stream>>>(
      table, units, keys.get() + n, values.get() + n, key_count, offsets, refs);
  RINGCAST_CUDA_CHECK_LAUNCH();
}

}  // namespace ringcast::kernels::cuda
