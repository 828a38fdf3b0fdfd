// ringcast/storage_bits.hpp: every 16-bit pattern decodes and encodes back to itself; every fp32 input
// becomes the nearest representable value (ties to even, overflow to infinity, NaN stays NaN), checked
// against the neighbours of the chosen value in float64.
#include <ringcast/storage_bits.hpp>

#include <gtest/gtest.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <limits>
#include <random>
#include <string>

namespace ringcast {
namespace {

bool is_nan_bits(std::uint16_t b, DType t) {
  return t == DType::kBF16 ? (b & 0x7f80u) == 0x7f80u && (b & 0x7fu) : (b & 0x7c00u) == 0x7c00u && (b & 0x3ffu);
}

class StorageBits : public ::testing::TestWithParam<DType> {};

TEST_P(StorageBits, EveryPatternRoundTrips) {
  const DType t = GetParam();
  for (std::uint32_t b = 0; b < 0x10000u; ++b) {
    const auto bits = static_cast<std::uint16_t>(b);
    const float v = storage_value(bits, t);
    if (is_nan_bits(bits, t)) {
      EXPECT_TRUE(std::isnan(v)) << std::hex << b;
      EXPECT_TRUE(is_nan_bits(storage_bits(v, t), t)) << std::hex << b;
      continue;
    }
    ASSERT_EQ(storage_bits(v, t), bits) << std::hex << b << " decodes to " << v;
  }
}

// The value of the next larger magnitude with the same sign (infinity past the largest finite).
double next_up(std::uint16_t bits, DType t) { return storage_value(static_cast<std::uint16_t>(bits + 1), t); }
double next_down(std::uint16_t bits, DType t) {
  return (bits & 0x7fffu) == 0 ? 0.0 : storage_value(static_cast<std::uint16_t>(bits - 1), t);
}

TEST_P(StorageBits, RoundsToNearestEven) {
  const DType t = GetParam();
  std::mt19937 rng(7);
  std::uniform_int_distribution<std::uint32_t> any;
  const auto largest_bits = static_cast<std::uint16_t>(t == DType::kBF16 ? 0x7f7fu : 0x7bffu);  // largest finite
  const double largest = storage_value(largest_bits, t);
  const double ulp = largest - storage_value(static_cast<std::uint16_t>(largest_bits - 1), t);
  for (int i = 0; i < 1000000; ++i) {
    // Random fp32 patterns, mostly within the format's range (fp16: exponents near its own).
    std::uint32_t x = any(rng);
    if (t == DType::kF16) x = (x & 0x807fffffu) | ((96u + (x >> 23) % 48u) << 23);
    const float f = std::bit_cast<float>(x);
    if (std::isnan(f)) {
      EXPECT_TRUE(is_nan_bits(storage_bits(f, t), t));
      continue;
    }
    const std::uint16_t bits = storage_bits(f, t);
    const double got = storage_value(bits, t), a = std::fabs(static_cast<double>(f));
    if (std::isinf(got)) {
      // Infinity only where the input lies at least halfway past the largest finite value.
      ASSERT_TRUE(std::isinf(f) || a >= largest + ulp / 2) << f;
      continue;
    }
    ASSERT_EQ(std::signbit(got), std::signbit(f)) << f;
    const double err = std::fabs(std::fabs(got) - a);
    const double up = std::fabs(next_up(bits, t)), down = std::fabs(next_down(bits, t));
    ASSERT_LE(err, std::fabs(up - a)) << f;
    ASSERT_LE(err, std::fabs(down - a)) << f;
    if (err == std::fabs(up - a) || (err == std::fabs(down - a) && err > 0)) {
      EXPECT_EQ(bits & 1u, 0u) << "tie not to even: " << f;
    }
  }
}

TEST_P(StorageBits, SpecialValues) {
  const DType t = GetParam();
  const float inf = std::numeric_limits<float>::infinity();
  EXPECT_EQ(storage_value(storage_bits(inf, t), t), inf);
  EXPECT_EQ(storage_value(storage_bits(-inf, t), t), -inf);
  EXPECT_TRUE(std::signbit(storage_value(storage_bits(-0.0f, t), t)));
  EXPECT_EQ(storage_value(storage_bits(1.0f, t), t), 1.0f);
  EXPECT_TRUE(std::isnan(storage_value(storage_bits(std::numeric_limits<float>::quiet_NaN(), t), t)));
  if (t == DType::kF16) {
    EXPECT_EQ(fp16_bits(65504.0f), 0x7bffu);
    EXPECT_EQ(fp16_bits(65519.0f), 0x7bffu);  // below halfway to 65536
    EXPECT_EQ(fp16_bits(65520.0f), 0x7c00u);  // halfway: ties to even, the infinity
    EXPECT_EQ(fp16_bits(std::ldexp(1.0f, -24)), 0x0001u);
    EXPECT_EQ(fp16_bits(std::ldexp(1.0f, -25)), 0x0000u);        // halfway to the smallest subnormal: even
    EXPECT_EQ(fp16_bits(std::ldexp(1.5f, -24)), 0x0002u);        // halfway between 1 and 2: even
    EXPECT_EQ(fp16_bits(std::ldexp(1023.5f, -24)), 0x0400u);     // rounds up into the smallest normal
  } else {
    EXPECT_EQ(bf16_bits(1.0f + std::ldexp(1.0f, -8)), 0x3f80u);  // halfway: even (down)
    EXPECT_EQ(bf16_bits(1.0f + std::ldexp(3.0f, -8)), 0x3f82u);  // halfway: even (up)
  }
}

INSTANTIATE_TEST_SUITE_P(Formats, StorageBits, ::testing::Values(DType::kBF16, DType::kF16),
                         [](const auto& info) { return std::string(dtype_name(info.param)); });

}  // namespace
}  // namespace ringcast
