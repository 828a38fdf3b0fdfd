// fp32 <-> the 16-bit storage types (bf16, fp16) on the host, rounding as the GPU's conversions do:
// to nearest, ties to even; overflow to infinity; NaN stays NaN (quiet). The CPU backend's bf16
// copies, and the tests and benchmarks that prepare or read 16-bit data, all convert through here.
#pragma once

#include "dtype.hpp"

#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>

namespace ringcast {

inline std::uint16_t bf16_bits(float x) {
  const std::uint32_t bits = std::bit_cast<std::uint32_t>(x);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<std::uint16_t>((bits >> 16) | 0x40u);
  return static_cast<std::uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}

inline float bf16_value(std::uint16_t bits) { return std::bit_cast<float>(std::uint32_t{bits} << 16); }

inline std::uint16_t fp16_bits(float x) {
  const std::uint32_t bits = std::bit_cast<std::uint32_t>(x);
  const auto sign = static_cast<std::uint16_t>((bits >> 16) & 0x8000u);
  const std::uint32_t abs = bits & 0x7fffffffu;
  if (abs > 0x7f800000u) return sign | 0x7e00u;   // NaN
  if (abs >= 0x47800000u) return sign | 0x7c00u;  // |x| >= 65536: infinity
  if (abs < 0x38800000u) {                        // |x| < 2^-14: a subnormal count of 2^-24
    // |x| * 2^24 < 1024 is exact; nearbyint rounds it to an integer in the default mode, ties to even
    // (1024 is the smallest normal's encoding).
    return sign | static_cast<std::uint16_t>(std::nearbyint(std::bit_cast<float>(abs) * 16777216.0f));
  }
  // Normal: rebias the exponent (127 -> 15) and round the 23-bit mantissa to 10 bits; a carry moves
  // into the exponent (65520 <= |x| < 65536 becomes infinity).
  return sign | static_cast<std::uint16_t>((abs + 0xfffu + ((abs >> 13) & 1u) - 0x38000000u) >> 13);
}

inline float fp16_value(std::uint16_t bits) {
  const std::uint32_t exponent = (bits >> 10) & 0x1fu, mantissa = bits & 0x3ffu;
  float v;
  if (exponent == 0) {
    v = static_cast<float>(mantissa) * (1.0f / 16777216.0f);  // subnormal: mantissa * 2^-24
  } else if (exponent == 31) {
    v = mantissa ? std::numeric_limits<float>::quiet_NaN() : std::numeric_limits<float>::infinity();
  } else {
    v = std::bit_cast<float>((exponent + 112) << 23 | mantissa << 13);
  }
  return (bits & 0x8000u) ? -v : v;
}

// t: kBF16 or kF16.
inline std::uint16_t storage_bits(float x, DType t) { return t == DType::kBF16 ? bf16_bits(x) : fp16_bits(x); }
inline float storage_value(std::uint16_t bits, DType t) {
  return t == DType::kBF16 ? bf16_value(bits) : fp16_value(bits);
}

}  // namespace ringcast
