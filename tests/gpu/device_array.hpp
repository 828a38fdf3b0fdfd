// Helpers of the GPU test suites that compare a CUDA kernel with the CPU backend: device arrays that
// start poisoned (every byte 0xFF: NaN for floats, -1 for integers), so an element the kernel should
// have written and did not fails the comparison, the skip when the machine has no CUDA device, and
// the rounding of fp32 inputs to bf16 values (the storage precision of activations).
#pragma once

#include <ringcast/kernels/attention.hpp>
#include <ringcast/storage_bits.hpp>

#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cstddef>
#include <stdexcept>
#include <string>
#include <vector>

namespace ringcast::test {

inline bool have_cuda_device() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}

#define RINGCAST_SKIP_WITHOUT_CUDA() \
  if (!::ringcast::test::have_cuda_device()) GTEST_SKIP() << "no CUDA device"

inline kernels::ExecContext cuda_context() { return {{DeviceKind::kCuda, 0}, nullptr}; }

inline void cuda_require(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(e));
}

// Every element rounded to the nearest bf16 value (kept as fp32): the inputs both backends see.
inline std::vector<float> bf16_values(std::vector<float> x) {
  for (float& v : x) v = bf16_value(bf16_bits(v));
  return x;
}

template <typename T>
class DeviceArray {
 public:
  explicit DeviceArray(std::size_t count) : count_(count) {
    cuda_require(cudaMalloc(&ptr_, std::max<std::size_t>(count * sizeof(T), 16)), "cudaMalloc");
    cuda_require(cudaMemset(ptr_, 0xFF, count * sizeof(T)), "cudaMemset");
    ready();
  }
  explicit DeviceArray(const std::vector<T>& host) : DeviceArray(host.size()) { upload(host); }
  DeviceArray(const DeviceArray&) = delete;
  DeviceArray& operator=(const DeviceArray&) = delete;
  ~DeviceArray() { cudaFree(ptr_); }

  void upload(const std::vector<T>& host) {
    cuda_require(host.size() == count_ ? cudaSuccess : cudaErrorInvalidValue, "DeviceArray::upload size");
    cuda_require(cudaMemcpy(ptr_, host.data(), count_ * sizeof(T), cudaMemcpyHostToDevice), "cudaMemcpy H2D");
    ready();
  }
  std::vector<T> download() const {
    std::vector<T> host(count_);
    cuda_require(cudaDeviceSynchronize(), "cudaDeviceSynchronize");
    cuda_require(cudaMemcpy(host.data(), ptr_, count_ * sizeof(T), cudaMemcpyDeviceToHost), "cudaMemcpy D2H");
    return host;
  }
  T* get() const { return static_cast<T*>(ptr_); }
  std::size_t size() const { return count_; }

 private:
  // The poison and the upload run on the legacy default stream: cudaMemset returns before it lands and
  // a cudaMemcpy from pageable memory may return before its DMA does, and nothing orders that stream
  // with the non-blocking streams of a Session. Waiting here makes the array ready for any stream.
  static void ready() { cuda_require(cudaDeviceSynchronize(), "cudaDeviceSynchronize"); }

  void* ptr_ = nullptr;
  std::size_t count_;
};

}  // namespace ringcast::test
