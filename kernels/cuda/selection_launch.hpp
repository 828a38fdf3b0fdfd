// Host side shared by the CUDA selection entry points (select_pages_cuda.cu, select_remote_cuda.cu,
// clustered_table_cuda.cu): stream-ordered scratch, the layout's block map, the tile selection
// queries, and the limits of the warp top-k. Included only by CUDA sources of this folder.
#pragma once

#include <ringcast/cuda_check.hpp>
#include <ringcast/kernels/selection.hpp>
#include <ringcast/log.hpp>

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <vector>

#include "selection_device.cuh"

namespace ringcast::kernels::cuda::detail {

// The warp top-k keeps at most 32 * kMaxSlots pairs per unit, and a warp holds at most
// kMaxPerLane channels per lane of a query.
inline constexpr int kMaxTopK = 128;
inline constexpr int kMaxHeadDim = 256;

// `count` elements of device scratch, allocated and freed in the order of `stream` (the selection
// interfaces have no workspace argument; the stream-ordered pool makes repeated calls cheap).
template <typename T>
class Scratch {
 public:
  Scratch(std::size_t count, cudaStream_t stream) : count_(count), stream_(stream) {
    if (count_ > 0) RINGCAST_CUDA_CHECK(cudaMallocAsync(reinterpret_cast<void**>(&ptr_), count_ * sizeof(T), stream_));
  }
  Scratch(const std::vector<T>& host, cudaStream_t stream) : Scratch(host.size(), stream) {
    if (count_ > 0) {
      RINGCAST_CUDA_CHECK(
          cudaMemcpyAsync(ptr_, host.data(), count_ * sizeof(T), cudaMemcpyHostToDevice, stream_));
    }
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  ~Scratch() {
    if (ptr_ == nullptr) return;
    const cudaError_t e = cudaFreeAsync(ptr_, stream_);
    if (e != cudaSuccess) log::error("cudaFreeAsync of selection scratch failed: {}", cudaGetErrorString(e));
  }

  T* get() const { return ptr_; }
  // Enqueues the copy to the host; the caller synchronizes the stream before reading `host`.
  void download(std::vector<T>& host) const {
    host.resize(count_);
    if (count_ > 0) {
      RINGCAST_CUDA_CHECK(cudaMemcpyAsync(host.data(), ptr_, count_ * sizeof(T), cudaMemcpyDeviceToHost, stream_));
    }
  }

 private:
  T* ptr_ = nullptr;
  std::size_t count_;
  cudaStream_t stream_;
};

// First pool page of each global block of L, or -1 where the block is not resident.
inline std::vector<std::int32_t> block_pool_map(const ClusteredLayout& L) {
  std::vector<std::int32_t> map(static_cast<std::size_t>(L.num_blocks()));
  for (std::int64_t b = 0; b < L.num_blocks(); ++b) map[b] = static_cast<std::int32_t>(L.block_pool_page(b));
  return map;
}

// out [tiles, head_dim]: each tile's query for shared choices (selection.hpp): causal, the mean of
// the rank's rows [t0 - 127, t0]; bidirectional, the tile's mean; summed over the KV head's group.
// Same summation order as the CPU backend, so the queries are bitwise equal to its.
void launch_tile_queries(const LayoutArgs& layout, const SelectionQueries& queries, std::int64_t tiles, float* out,
                         cudaStream_t stream);

}  // namespace ringcast::kernels::cuda::detail
