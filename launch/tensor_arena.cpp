// TensorArena: uploads go through an fp32 staging buffer on the device and one strided copy that
// converts to the storage dtype (and back for downloads).
#include "tensor_arena.hpp"

#include <ringcast/error.hpp>
#include <ringcast/kernels/layout.hpp>

namespace ringcast::launch {
namespace {

kernels::StridedCopy convert(const void* src, DType st, void* dst, DType dt, std::int64_t n) {
  kernels::StridedCopy c;
  c.ndim = 1;
  c.shape[0] = n;
  c.src_strides[0] = c.dst_strides[0] = 1;
  c.src = src;
  c.src_dtype = st;
  c.dst = dst;
  c.dst_dtype = dt;
  return c;
}

}  // namespace

TensorView TensorArena::make(std::initializer_list<std::int64_t> shape, DType dtype, const std::vector<float>* host) {
  const Device dev = session_.device();
  TensorView v = TensorView::contiguous(nullptr, dtype, shape, dev);
  auto& buf = buffers_.emplace_back(v.bytes(), dev);
  v.data = buf.data();
  if (!host) return v;
  RINGCAST_CHECK(static_cast<std::int64_t>(host->size()) == v.numel(), "upload of {} values into a tensor of {}",
                 host->size(), v.numel());
  if (dtype == DType::kF32) {
    buf.copy_from_host(host->data(), v.bytes(), 0, session_.stream());
    return v;
  }
  DeviceBuffer staging(host->size() * sizeof(float), dev);
  staging.copy_from_host(host->data(), staging.bytes(), 0, session_.stream());
  kernels::copy_strided(convert(staging.data(), DType::kF32, v.data, dtype, v.numel()), {dev, session_.stream()});
  synchronize(dev, session_.stream());  // the conversion reads staging, which goes out of scope
  return v;
}

std::vector<float> TensorArena::download(const TensorView& view) {
  std::vector<float> out(static_cast<std::size_t>(view.numel()));
  const Device dev = session_.device();
  if (view.dtype == DType::kF32) {
    copy_to_host(out.data(), view.data, out.size() * sizeof(float), dev, session_.stream());
    return out;
  }
  DeviceBuffer f32(out.size() * sizeof(float), dev);
  kernels::copy_strided(convert(view.data, view.dtype, f32.data(), DType::kF32, view.numel()), {dev, session_.stream()});
  f32.copy_to_host(out.data(), f32.bytes(), 0, session_.stream());
  return out;
}

}  // namespace ringcast::launch
