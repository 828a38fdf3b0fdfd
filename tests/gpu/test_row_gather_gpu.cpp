// CUDA indexed row movement (row_gather.hpp) against the CPU backend on the seeded cases of
// tests/kernels/row_gather_cases.hpp (where the CPU is checked against float64): bitwise equal for
// every fp32 gather (segments with empty ones, weights or a scale, accumulate, head groups, negative
// entries with a fill, destination rows) and every scatter-add (repeated and negative entries, about a hundred
// sources per destination: CUDA's inverse index adds them in ascending source order,
// as the CPU does, with no atomics), and for bf16 / f16 bit copies. Destinations start from the same
// random contents on both sides, so padding and rows that receive nothing must stay untouched.
#include <ringcast/kernels/row_gather.hpp>

#include <gtest/gtest.h>

#include <cstdint>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "backend_compare.hpp"
#include "device_array.hpp"
#include "row_gather_cases.hpp"

namespace ringcast::test {
namespace {

const kernels::ExecContext kCpu{};

const auto host = [](const auto& v) { return v.data(); };

// Device copies of a case's buffers, alive as long as this object.
class Uploads {
 public:
  template <typename T>
  const T* operator()(const std::vector<T>& host_data) {
    auto copy = std::make_shared<DeviceArray<T>>(host_data);
    const T* ptr = copy->get();
    keep_.push_back(std::move(copy));
    return ptr;
  }

 private:
  std::vector<std::shared_ptr<void>> keep_;
};

// Runs case c `times` times on each backend from the same start and compares the results.
template <typename Case>
void expect_cpu_bits(const Case& c, int times) {
  std::vector<float> cpu = c.dst;
  Uploads uploads;
  DeviceArray<float> gpu(c.dst);
  const auto on_cpu = bind(c, host, cpu.data());
  const auto on_gpu = bind(c, uploads, gpu.get());
  for (int t = 0; t < times; ++t) {
    run(on_cpu, kCpu);
    run(on_gpu, cuda_context());
  }
  expect_bitwise(c.name + (times > 1 ? ", " + std::to_string(times) + " calls" : ""), gpu.download(), cpu);
}

TEST(RowGatherGpu, GatherIsBitwiseTheCpus) {
  RINGCAST_SKIP_WITHOUT_CUDA();
  for (const GatherCase& c : gather_cases()) expect_cpu_bits(c, 1);
}

// Twice: the second call adds the same sums again, so CUDA's sums must repeat bit for bit.
TEST(RowGatherGpu, ScatterIsBitwiseTheCpus) {
  RINGCAST_SKIP_WITHOUT_CUDA();
  for (const ScatterCase& c : scatter_cases()) expect_cpu_bits(c, 2);
}

TEST(RowGatherGpu, SixteenBitCopiesAreBitwiseTheCpus) {
  RINGCAST_SKIP_WITHOUT_CUDA();
  // Two heads sharing one index list, negative entries (zero bits), rows 6 apart.
  const std::int64_t rows = 29, width = 5, src_rows = 31;
  const std::vector<std::int32_t> index = random_index<std::int32_t>(rows, src_rows, 0.2, 61);
  std::vector<std::uint16_t> src(static_cast<std::size_t>(src_rows * 12));
  std::mt19937 gen(62);
  for (auto& v : src) v = static_cast<std::uint16_t>(gen());
  const std::vector<std::uint16_t> dst0(static_cast<std::size_t>(rows * 12), 0xABCD);
  for (const DType dtype : {DType::kBF16, DType::kF16}) {
    kernels::RowGather p;
    p.rows = rows;
    p.width = width;
    p.heads = 2;
    p.group = 2;
    p.dtype = dtype;
    p.src_row_stride = p.dst_row_stride = 12;
    p.src_head_stride = p.dst_head_stride = 6;
    std::vector<std::uint16_t> cpu = dst0;
    p.index = index.data();
    p.src = src.data();
    p.dst = cpu.data();
    kernels::gather_rows(p, kCpu);
    const DeviceArray<std::int32_t> g_index(index);
    const DeviceArray<std::uint16_t> g_src(src);
    DeviceArray<std::uint16_t> gpu(dst0);
    p.index = g_index.get();
    p.src = g_src.get();
    p.dst = gpu.get();
    kernels::gather_rows(p, cuda_context());
    expect_bitwise(std::string(dtype_name(dtype)) + " rows", gpu.download(), cpu);
  }
}

}  // namespace
}  // namespace ringcast::test
