// CPU non-finite count: an OpenMP reduction over the elements (bf16 widened by its bit pattern).
#include "checks_cpu.hpp"

#include <ringcast/error.hpp>

#include <bit>
#include <cmath>

namespace ringcast::kernels::cpu {

void count_nonfinite(const void* x, DType dtype, std::int64_t n, std::int64_t* counter) {
  std::int64_t bad = 0;
  if (dtype == DType::kF32) {
    const auto* p = static_cast<const float*>(x);
#pragma omp parallel for reduction(+ : bad) schedule(static)
    for (std::int64_t i = 0; i < n; ++i) bad += !std::isfinite(p[i]);
  } else if (dtype == DType::kBF16) {
    const auto* p = static_cast<const std::uint16_t*>(x);
#pragma omp parallel for reduction(+ : bad) schedule(static)
    for (std::int64_t i = 0; i < n; ++i) bad += (p[i] & 0x7f80u) == 0x7f80u;  // exponent all ones
  } else {
    RINGCAST_THROW("count_nonfinite on the CPU: dtype {} (f32 or bf16)", dtype_name(dtype));
  }
  *counter += bad;
}

}  // namespace ringcast::kernels::cpu
