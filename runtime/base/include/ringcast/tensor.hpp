// Tensor views: what crosses the library boundary. A view never owns memory; the caller keeps the
// buffer alive and, on a device, orders access with the stream it passes. Shapes are row-major with
// explicit strides in elements (not bytes), at most 4 dimensions.
#pragma once

#include <ringcast/dtype.hpp>

#include <array>
#include <cstdint>
#include <initializer_list>

namespace ringcast {

enum class DeviceKind : std::uint8_t { kCpu, kCuda };

struct Device {
  DeviceKind kind = DeviceKind::kCpu;
  int index = 0;
  friend bool operator==(const Device&, const Device&) = default;
};

// An opaque stream handle: a cudaStream_t on CUDA devices, ignored on the CPU.
using Stream = void*;

struct TensorView {
  static constexpr int kMaxDims = 4;

  void* data = nullptr;
  DType dtype = DType::kF32;
  Device device{};
  int ndim = 0;
  std::array<std::int64_t, kMaxDims> shape{};
  std::array<std::int64_t, kMaxDims> strides{};

  // A contiguous row-major view.
  static TensorView contiguous(void* data, DType dtype, std::initializer_list<std::int64_t> shape,
                               Device device = {});

  std::int64_t numel() const;
  std::int64_t size(int dim) const { return shape[dim]; }
  bool is_contiguous() const;
  std::size_t bytes() const { return static_cast<std::size_t>(numel()) * dtype_size(dtype); }

  template <typename T> T* as() const { return static_cast<T*>(data); }
};

}  // namespace ringcast
