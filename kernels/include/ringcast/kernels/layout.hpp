// Layout primitives: the one strided copy (with dtype conversion) that every layout change in the
// runtime is written with -- token layout [B, n, heads, d] to page pools [B][heads][pages][ps][d],
// head shards for Ulysses, gradients back to tokens -- and zero fill. Shapes and strides are in
// elements; dimensions with a size of 1 may carry any stride.
#pragma once

#include <ringcast/dtype.hpp>
#include <ringcast/kernels/attention.hpp>

#include <array>
#include <cstddef>
#include <cstdint>

namespace ringcast::kernels {

struct StridedCopy {
  static constexpr int kMaxDims = 6;
  int ndim = 0;
  std::array<std::int64_t, kMaxDims> shape{};
  std::array<std::int64_t, kMaxDims> src_strides{};
  std::array<std::int64_t, kMaxDims> dst_strides{};
  const void* src = nullptr;
  DType src_dtype = DType::kF32;
  void* dst = nullptr;
  DType dst_dtype = DType::kF32;
  bool accumulate = false;  // dst += src (dst must be f32) instead of dst = src

  // n contiguous elements, converted from src_dtype to dst_dtype.
  static StridedCopy flat(const void* src, DType src_dtype, void* dst, DType dst_dtype, std::int64_t n) {
    StridedCopy c;
    c.ndim = 1;
    c.shape[0] = n;
    c.src_strides[0] = c.dst_strides[0] = 1;
    c.src = src;
    c.src_dtype = src_dtype;
    c.dst = dst;
    c.dst_dtype = dst_dtype;
    return c;
  }
};

// dst[i] = convert(src[i]) (or +=) for every index i of shape. f32, bf16 and f16 on CUDA; f32 and
// bf16 on the CPU. Source and destination must not overlap.
void copy_strided(const StridedCopy& c, const ExecContext& ctx);

void fill_zero(void* dst, std::size_t bytes, const ExecContext& ctx);

}  // namespace ringcast::kernels
