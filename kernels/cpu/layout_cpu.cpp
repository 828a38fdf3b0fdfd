// CPU layout primitives: the strided copy walks the outer dimensions with an index vector and runs
// the innermost dimension as a tight loop (contiguous in the common case); threads split the
// outermost dimensions.
#include "layout_cpu.hpp"

#include <ringcast/error.hpp>
#include <ringcast/storage_bits.hpp>

#include <cstring>

namespace ringcast::kernels::cpu {
namespace {

float load(const void* base, std::int64_t i, DType t) {
  if (t == DType::kF32) return static_cast<const float*>(base)[i];
  return bf16_value(static_cast<const std::uint16_t*>(base)[i]);
}

void store(void* base, std::int64_t i, DType t, float x, bool accumulate) {
  if (t == DType::kF32) {
    float* p = static_cast<float*>(base) + i;
    *p = accumulate ? *p + x : x;
    return;
  }
  static_cast<std::uint16_t*>(base)[i] = bf16_bits(x);  // bf16
}

}  // namespace

void copy_strided(const StridedCopy& c) {
  for (DType t : {c.src_dtype, c.dst_dtype})
    RINGCAST_CHECK(t == DType::kF32 || t == DType::kBF16, "copy_strided on the CPU: dtype {} (f32 or bf16)",
                   dtype_name(t));
  RINGCAST_CHECK(!c.accumulate || c.dst_dtype == DType::kF32, "copy_strided: accumulation needs an f32 destination");
  RINGCAST_CHECK(c.ndim >= 1 && c.ndim <= StridedCopy::kMaxDims, "copy_strided: {} dimensions", c.ndim);
  const int last = c.ndim - 1;
  std::int64_t outer = 1;
  for (int d = 0; d < last; ++d) outer *= c.shape[d];
  const std::int64_t inner = c.shape[last];
  if (outer == 0 || inner == 0) return;
#pragma omp parallel for schedule(static)
  for (std::int64_t o = 0; o < outer; ++o) {
    std::int64_t src = 0, dst = 0, rest = o;
    for (int d = last - 1; d >= 0; --d) {
      const std::int64_t i = rest % c.shape[d];
      rest /= c.shape[d];
      src += i * c.src_strides[d];
      dst += i * c.dst_strides[d];
    }
    if (!c.accumulate && c.src_dtype == c.dst_dtype && c.src_strides[last] == 1 && c.dst_strides[last] == 1) {
      const std::size_t elt = dtype_size(c.src_dtype);
      std::memcpy(static_cast<char*>(c.dst) + dst * elt, static_cast<const char*>(c.src) + src * elt, inner * elt);
      continue;
    }
    for (std::int64_t j = 0; j < inner; ++j)
      store(c.dst, dst + j * c.dst_strides[last], c.dst_dtype, load(c.src, src + j * c.src_strides[last], c.src_dtype),
            c.accumulate);
  }
}

}  // namespace ringcast::kernels::cpu
