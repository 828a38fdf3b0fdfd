// DeviceBuffer: an owning allocation on a Device (host memory on the CPU backend, cudaMalloc on CUDA),
// with explicit host<->device copies. Used by the runtime and the launcher; the kernels never allocate.
#pragma once

#include <ringcast/tensor.hpp>

#include <cstddef>
#include <cstdint>
#include <span>

namespace ringcast {

class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  DeviceBuffer(std::size_t bytes, Device device);
  DeviceBuffer(DeviceBuffer&& other) noexcept;
  DeviceBuffer& operator=(DeviceBuffer&& other) noexcept;
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  ~DeviceBuffer();

  void* data() const { return data_; }
  template <typename T> T* as() const { return static_cast<T*>(data_); }
  std::size_t bytes() const { return bytes_; }
  const Device& device() const { return device_; }

  // Synchronous copies (the stream, if any, is synchronised first).
  void copy_from_host(const void* src, std::size_t bytes, std::size_t offset = 0, Stream stream = nullptr);
  void copy_to_host(void* dst, std::size_t bytes, std::size_t offset = 0, Stream stream = nullptr) const;
  template <typename T> void upload(std::span<const T> src, Stream stream = nullptr) {
    copy_from_host(src.data(), src.size_bytes(), 0, stream);
  }
  template <typename T> void download(std::span<T> dst, Stream stream = nullptr) const {
    copy_to_host(dst.data(), dst.size_bytes(), 0, stream);
  }

 private:
  void release() noexcept;
  void* data_ = nullptr;
  std::size_t bytes_ = 0;
  Device device_{};
};

// Synchronous copies between host memory and memory on `device` (the stream is synchronised first).
void copy_to_host(void* dst, const void* src, std::size_t bytes, const Device& device, Stream stream = nullptr);
void copy_from_host(void* dst, const void* src, std::size_t bytes, const Device& device, Stream stream = nullptr);

// Waits for the work enqueued on `stream` (nothing to wait for on the CPU backend).
void synchronize(const Device& device, Stream stream);

// Peak bytes of device memory this process allocated through DeviceBuffer (host bytes on the CPU
// backend), and a reset of that high-water mark.
std::size_t peak_allocated_bytes();
void reset_peak_allocated_bytes();

}  // namespace ringcast
