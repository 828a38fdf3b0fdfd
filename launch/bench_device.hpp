// Device-side helpers of `ringcast bench kernels` (bench_kernels.cpp: the attention patterns;
// bench_selection.cpp: the selection patterns), CUDA builds only: an owning device array, inputs filled
// by repeating one random chunk (timing does not depend on the values), and median timers.
#pragma once

#include "bench_kernels.hpp"

#include <ringcast/cuda_check.hpp>
#include <ringcast/kernels/attention.hpp>

#include <cuda_runtime_api.h>

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstdint>
#include <vector>

namespace ringcast::launch::bench {

inline constexpr int kPageSize = 64;

// An owning cudaMalloc'd array (at least 16 bytes, so that empty buffers still have an address).
class DeviceArray {
 public:
  explicit DeviceArray(std::size_t bytes) : bytes_(bytes) {
    RINGCAST_CUDA_CHECK(cudaMalloc(&ptr_, std::max<std::size_t>(bytes, 16)));
  }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;
  ~DeviceArray() { cudaFree(ptr_); }
  template <typename T>
  static DeviceArray from(const std::vector<T>& host) {
    DeviceArray d(host.size() * sizeof(T));
    if (!host.empty()) RINGCAST_CUDA_CHECK(cudaMemcpy(d.ptr_, host.data(), d.bytes_, cudaMemcpyHostToDevice));
    return d;
  }
  DeviceArray(DeviceArray&& o) noexcept : ptr_(o.ptr_), bytes_(o.bytes_) { o.ptr_ = nullptr; }
  template <typename T>
  T* as() const { return static_cast<T*>(ptr_); }
  template <typename T>
  std::vector<T> download() const {
    std::vector<T> h(bytes_ / sizeof(T));
    RINGCAST_CUDA_CHECK(cudaMemcpy(h.data(), ptr_, bytes_, cudaMemcpyDeviceToHost));
    return h;
  }
  std::size_t bytes() const { return bytes_; }

 private:
  void* ptr_ = nullptr;
  std::size_t bytes_ = 0;
};

// Fills a device buffer of 16-bit values by repeating one chunk of N(0, 1) draws.
void fill_repeating(const DeviceArray& d, DType t, std::uint64_t seed);
// The same for fp32 values, with an odd period so that pages differ.
void fill_repeating_f32(const DeviceArray& d, std::uint64_t seed);

// One causal-capable self-attention shape over 64-key pages, and the positions 0 .. seq - 1.
kernels::AttentionShape make_shape(int batch, std::int64_t seq, int heads, int kv_heads, int head_dim);
std::vector<std::int32_t> positions(std::int64_t seq);

inline kernels::ExecContext cuda_context(cudaStream_t stream = nullptr) { return {{DeviceKind::kCuda, 0}, stream}; }

template <typename F>
double median_ms(int warmup, int repeats, cudaStream_t stream, F&& run) {
  for (int i = 0; i < warmup; ++i) run();
  cudaEvent_t start, stop;
  RINGCAST_CUDA_CHECK(cudaEventCreate(&start));
  RINGCAST_CUDA_CHECK(cudaEventCreate(&stop));
  std::vector<double> times;
  for (int i = 0; i < repeats; ++i) {
    RINGCAST_CUDA_CHECK(cudaEventRecord(start, stream));
    run();
    RINGCAST_CUDA_CHECK(cudaEventRecord(stop, stream));
    RINGCAST_CUDA_CHECK(cudaEventSynchronize(stop));
    float ms = 0;
    RINGCAST_CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
    times.push_back(ms);
  }
  RINGCAST_CUDA_CHECK(cudaEventDestroy(start));
  RINGCAST_CUDA_CHECK(cudaEventDestroy(stop));
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}


// Median wall time of fn (which synchronizes what it times); two runs once one takes over a second.
template <typename F>
double median_wall_ms(int warmup, int repeats, F&& fn) {
  for (int i = 0; i < warmup; ++i) fn();
  std::vector<double> times;
  for (int i = 0; i < repeats; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    fn();
    times.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
    if (times.front() > 1000.0 && times.size() >= 2) break;
  }
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}


// The selection patterns (selection-tile, selection-row): bench_selection.cpp.
int bench_selection(const BenchKernelsOptions& opt, DType dtype, const cudaDeviceProp& prop);

}  // namespace ringcast::launch::bench
