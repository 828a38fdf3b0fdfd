// Helpers of the GPU tests that run one distributed attention layer on a CUDA session and on the CPU
// backend with the same global inputs: a layer tensor in the session's memory and storage dtype
// (uploaded from fp32, read back as fp32), this rank's rows of a global tensor, and the comparison of
// attended entries.
#pragma once

#include <ringcast/attention.hpp>
#include <ringcast/memory.hpp>
#include <ringcast/session.hpp>

#include <cuda_bf16.h>

#include <cstdint>
#include <initializer_list>
#include <span>
#include <vector>

namespace ringcast::test {

// One tensor of the layer on the session's device, in its storage dtype; read back as fp32.
class Tensor {
 public:
  Tensor(const Session& s, DType dtype, const std::vector<float>& host, std::initializer_list<std::int64_t> shape)
      : dtype_(dtype), count_(host.size()), buf_(host.size() * dtype_size(dtype), s.device()),
        view_(TensorView::contiguous(buf_.data(), dtype, shape, s.device())) {
    if (dtype == DType::kF32) {
      buf_.copy_from_host(host.data(), host.size() * sizeof(float));
      return;
    }
    std::vector<__nv_bfloat16> b(host.size());
    for (std::size_t i = 0; i < host.size(); ++i) b[i] = __float2bfloat16_rn(host[i]);
    buf_.copy_from_host(b.data(), b.size() * sizeof(__nv_bfloat16));
  }
  const TensorView& view() const { return view_; }
  std::vector<float> read(Stream stream) const {
    std::vector<float> out(count_);
    if (dtype_ == DType::kF32) {
      buf_.copy_to_host(out.data(), out.size() * sizeof(float), 0, stream);
      return out;
    }
    std::vector<__nv_bfloat16> b(count_);
    buf_.copy_to_host(b.data(), b.size() * sizeof(__nv_bfloat16), 0, stream);
    for (std::size_t i = 0; i < count_; ++i) out[i] = __bfloat162float(b[i]);
    return out;
  }

 private:
  DType dtype_;
  std::size_t count_;
  DeviceBuffer buf_;
  TensorView view_;
};

// This rank's rows of a global [B, n, width] tensor, at the layer's positions.
inline std::vector<float> rows(const std::vector<float>& x, const LayerShape& s, int heads,
                        std::span<const std::int32_t> pos) {
  const std::int64_t width = std::int64_t{heads} * s.head_dim;
  std::vector<float> out;
  for (int b = 0; b < s.batch; ++b)
    for (const std::int32_t t : pos) {
      const float* row = x.data() + (std::int64_t{b} * s.seq_len + t) * width;
      out.insert(out.end(), row, row + width);
    }
  return out;
}

inline bool same_entry(const AttendedEntry& a, const AttendedEntry& b) {
  return a.batch == b.batch && a.tile == b.tile && a.first_row_pos == b.first_row_pos && a.kv_head == b.kv_head &&
         a.kind == b.kind && a.global_id == b.global_id && a.row_mask[0] == b.row_mask[0] &&
         a.row_mask[1] == b.row_mask[1] && a.causal == b.causal;
}

}  // namespace ringcast::test
