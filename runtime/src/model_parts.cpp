// ParameterTable layout, the shared Scratch buffers, Geometry's device positions and the fp32 layer
// adapter of the model stack (model_parts.hpp).
#include "model_parts.hpp"

#include <ringcast/error.hpp>
#include <ringcast/kernels/layout.hpp>

#include <algorithm>

namespace ringcast::model {

ParamRef ParameterTable::add(std::string name, std::int64_t rows, std::int64_t cols, bool decay, Init init) {
  RINGCAST_CHECK(!final_, "ParameterTable: '{}' declared after the table was laid out", name);
  RINGCAST_CHECK(rows > 0 && cols > 0, "ParameterTable: '{}' has shape [{}, {}]", name, rows, cols);
  for (const ParameterInfo& t : infos_) RINGCAST_CHECK(t.name != name, "ParameterTable: '{}' declared twice", name);
  infos_.push_back({std::move(name), -1, rows, cols, decay});
  inits_.push_back(init);
  slot_.push_back(static_cast<std::int32_t>(slot_.size()));
  return {static_cast<std::int32_t>(infos_.size() - 1)};
}

void ParameterTable::finalize() {
  RINGCAST_CHECK(!final_, "ParameterTable: laid out twice");
  std::int64_t offset = 0;
  for (const bool decay : {true, false}) {
    for (ParameterInfo& t : infos_) {
      if (t.decay != decay) continue;
      t.offset = offset;
      offset += t.numel();
    }
    if (decay) decayed_ = offset;
  }
  total_ = offset;
  // Reorder into layout order; slot_ keeps every ParamRef pointing at its tensor.
  std::vector<std::int32_t> order(infos_.size());
  for (std::size_t i = 0; i < order.size(); ++i) order[i] = static_cast<std::int32_t>(i);
  std::sort(order.begin(), order.end(), [&](std::int32_t a, std::int32_t b) { return infos_[a].offset < infos_[b].offset; });
  std::vector<ParameterInfo> infos;
  std::vector<Init> inits;
  for (std::size_t i = 0; i < order.size(); ++i) {
    infos.push_back(std::move(infos_[static_cast<std::size_t>(order[i])]));
    inits.push_back(inits_[static_cast<std::size_t>(order[i])]);
    slot_[static_cast<std::size_t>(order[i])] = static_cast<std::int32_t>(i);
  }
  infos_ = std::move(infos);
  inits_ = std::move(inits);
  final_ = true;
}

const ParameterInfo& ParameterTable::find(std::string_view name) const {
  for (const ParameterInfo& t : infos_)
    if (t.name == name) return t;
  RINGCAST_THROW("Model: no parameter named '{}'", name);
}

void Scratch::reserve(const std::string& key, std::int64_t floats) {
  RINGCAST_CHECK(buffers_.empty(), "Scratch: '{}' reserved after binding", key);
  std::int64_t& size = sizes_[key];
  size = std::max(size, floats);
}

void Scratch::bind(const Device& device) {
  RINGCAST_CHECK(buffers_.empty(), "Scratch: bound twice");
  for (const auto& [key, floats] : sizes_)
    buffers_.emplace(key, DeviceBuffer(static_cast<std::size_t>(std::max<std::int64_t>(floats, 1)) * sizeof(float), device));
}

float* Scratch::get(std::string_view key) const {
  const auto it = buffers_.find(key);
  RINGCAST_CHECK(it != buffers_.end(), "Scratch: no buffer '{}' (reserve it while building, bind before use)", key);
  return it->second.as<float>();
}

std::int64_t Scratch::floats(std::string_view key) const {
  const auto it = sizes_.find(key);
  RINGCAST_CHECK(it != sizes_.end(), "Scratch: no buffer '{}'", key);
  return it->second;
}

void Geometry::bind_positions(const Device& device, Stream stream) {
  if (device.kind == DeviceKind::kCpu) return;
  auto copy = std::make_shared<DeviceBuffer>(std::max<std::size_t>(positions.size(), 1) * sizeof(std::int32_t), device);
  copy->copy_from_host(positions.data(), positions.size() * sizeof(std::int32_t), 0, stream);
  device_positions = std::move(copy);
}

const std::int32_t* Geometry::kernel_positions(const Device& device) const {
  if (device.kind == DeviceKind::kCpu) return positions.data();
  RINGCAST_CHECK(device_positions, "Geometry: the positions were not copied to the device (bind_positions())");
  return device_positions->as<const std::int32_t>();
}

Fp32Layer::Fp32Layer(std::unique_ptr<Layer> layer, Scratch& scratch, int dim, DType activations)
    : layer_(std::move(layer)), dim_(dim), activations_(activations) {
  if (activations_ == DType::kF32) return;
  scratch.reserve("stage.in", layer_->in_geometry().rows() * dim_);
  scratch.reserve("stage.out", layer_->out_geometry().rows() * dim_);
}

void convert(const void* src, DType from, void* dst, DType to, std::int64_t n, const kernels::ExecContext& exec) {
  kernels::copy_strided(kernels::StridedCopy::flat(src, from, dst, to, n), exec);
}

void Fp32Layer::forward(const RunContext& rc, const void* in, void* out) {
  if (activations_ == DType::kF32) {
    layer_->forward(rc, static_cast<const float*>(in), static_cast<float*>(out));
    return;
  }
  float *in32 = rc.scratch.get("stage.in"), *out32 = rc.scratch.get("stage.out");
  const std::int64_t in_count = in_geometry().rows() * dim_, out_count = out_geometry().rows() * dim_;
  convert(in, activations_, in32, DType::kF32, in_count, rc.exec);
  layer_->forward(rc, in32, out32);
  convert(out32, DType::kF32, out, activations_, out_count, rc.exec);
}

void Fp32Layer::backward(const RunContext& rc, const void* in, const float* d_out, float* d_in) {
  if (activations_ == DType::kF32) {
    layer_->backward(rc, static_cast<const float*>(in), d_out, d_in);
    return;
  }
  float* in32 = rc.scratch.get("stage.in");
  convert(in, activations_, in32, DType::kF32, in_geometry().rows() * dim_, rc.exec);
  layer_->backward(rc, in32, d_out, d_in);
}

}  // namespace ringcast::model
