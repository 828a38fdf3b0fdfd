// TensorArena: uploads go through an fp32 staging buffer on the device and one strided copy that
// converts to the storage dtype (and back for downloads).
#include "tensor_arena.hpp"

#include <ringcast/error.hpp>
#include <ringcast/kernels/layout.hpp>

namespace ringcast::launch {

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
  kernels::copy_strided(kernels::StridedCopy::flat(staging.data(), DType::kF32, v.data, dtype, v.numel()), {dev, session_.stream()});
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
  kernels::copy_strided(kernels::StridedCopy::flat(view.data, view.dtype, f32.data(), DType::kF32, view.numel()), {dev, session_.stream()});
  f32.copy_to_host(out.data(), f32.bytes(), 0, session_.stream());
  return out;
}

LayerTensors TensorArena::layer(const LayerShape& s, const LayerInputs& in) {
  const std::int64_t n = s.local_len();
  LayerTensors t;
  t.q = make({s.batch, n, s.heads, s.head_dim}, s.dtype, &in.q);
  t.k = make({s.batch, n, s.kv_heads, s.head_dim}, s.dtype, &in.k);
  t.v = make({s.batch, n, s.kv_heads, s.head_dim}, s.dtype, &in.v);
  t.d_o = make({s.batch, n, s.heads, s.head_dim}, s.dtype, &in.d_o);
  t.o = make({s.batch, n, s.heads, s.head_dim}, s.dtype);
  t.lse = make({s.batch, s.heads, n}, DType::kF32);
  t.d_q = make({s.batch, n, s.heads, s.head_dim}, s.dtype);
  t.d_k = make({s.batch, n, s.kv_heads, s.head_dim}, s.dtype);
  t.d_v = make({s.batch, n, s.kv_heads, s.head_dim}, s.dtype);
  return t;
}

}  // namespace ringcast::launch
