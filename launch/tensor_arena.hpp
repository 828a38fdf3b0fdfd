// TensorArena: device tensors for the commands that run layers (check, run). It owns the memory of
// every view it hands out, uploads host fp32 data converted to the storage dtype, and downloads
// views back to host fp32.
#pragma once

#include <ringcast/attention_options.hpp>
#include <ringcast/memory.hpp>
#include <ringcast/session.hpp>
#include <ringcast/tensor.hpp>

#include <initializer_list>
#include <list>
#include <vector>

namespace ringcast::launch {

// The views one attention layer's forward and backward take.
struct LayerTensors {
  TensorView q, k, v, o, lse, d_o, d_q, d_k, d_v;
};

// Host fp32 values of a rank's inputs (token layout).
struct LayerInputs {
  std::vector<float> q, k, v, d_o;
};

class TensorArena {
 public:
  explicit TensorArena(const Session& session) : session_(session) {}

  // A new tensor of `dtype`, filled from host fp32 data when `host` is given (sizes must match).
  TensorView make(std::initializer_list<std::int64_t> shape, DType dtype, const std::vector<float>* host = nullptr);
  std::vector<float> download(const TensorView& view);
  // Inputs uploaded in the shape's dtype, outputs allocated (o, lse, d_q, d_k, d_v).
  LayerTensors layer(const LayerShape& shape, const LayerInputs& inputs);

 private:
  const Session& session_;
  std::list<DeviceBuffer> buffers_;
};

}  // namespace ringcast::launch
