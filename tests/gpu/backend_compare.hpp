// Comparisons of a CUDA result with the CPU backend's on the same inputs, for the GPU suites of the
// seed methods' kernels (CAST, routing, pooling) and the per-token layers: bitwise equality where both backends do the same
// arithmetic in the same order (indices, copies, ordered sums), a relative L2 bound elsewhere. Every
// comparison prints its outcome; a failure names the first (or worst) differing element, the NaN
// count (poisoned outputs the kernel never wrote), and both values.
#pragma once

#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>

#include "device_array.hpp"
#include "test_util.hpp"

namespace ringcast::test {

// Integer outputs whose padding is -1 (DeviceArray's poison) start as 0x5A5A5A5A instead, so a slot
// the kernel never wrote cannot pass for padding.
template <typename T>
void poison_bytes(DeviceArray<T>& a, int byte = 0x5A) {
  cuda_require(cudaMemset(a.get(), byte, a.size() * sizeof(T)), "cudaMemset");
}

// The CUDA result must be the CPU backend's, bit for bit.
template <typename T>
void expect_bitwise(const std::string& what, const std::vector<T>& gpu, const std::vector<T>& cpu) {
  ASSERT_EQ(gpu.size(), cpu.size()) << what;
  std::size_t diffs = 0, first = 0;
  for (std::size_t i = 0; i < gpu.size(); ++i) {
    if (std::memcmp(&gpu[i], &cpu[i], sizeof(T)) == 0) continue;
    if (diffs++ == 0) first = i;
  }
  std::printf("    %-52s %s\n", what.c_str(), diffs == 0 ? "bitwise equal" : "DIFFERENT");
  EXPECT_EQ(diffs, 0u) << what << ": " << diffs << " of " << gpu.size() << " elements differ; first [" << first
                       << "]: " << gpu[first] << " (CUDA) vs " << cpu[first] << " (CPU)";
}

// ||gpu - cpu|| / ||cpu|| <= tol (NaN never passes), with the worst element when it fails.
template <typename T>
void expect_near_cpu(const std::string& what, const std::vector<T>& gpu, const Vec& cpu, double tol) {
  expect_close(what + " vs CPU", gpu, cpu, tol);
  // A size mismatch has failed above; the scan below would read past the shorter vector.
  if (gpu.size() != cpu.size() || relative_error(gpu, cpu) <= tol) return;
  std::size_t worst = 0, nans = 0;
  double worst_diff = -1.0;
  for (std::size_t i = 0; i < cpu.size(); ++i) {
    const double diff = std::abs(double(gpu[i]) - cpu[i]);
    nans += std::isnan(double(gpu[i]));
    if (!(diff <= worst_diff)) {
      worst = i;
      worst_diff = diff;
    }
  }
  ADD_FAILURE() << what << ": worst element [" << worst << "] = " << double(gpu[worst]) << " (CUDA) vs " << cpu[worst]
                << " (CPU); " << nans << " NaN of " << cpu.size();
}

inline void expect_near_cpu(const std::string& what, const std::vector<float>& gpu, const std::vector<float>& cpu,
                            double tol) {
  expect_near_cpu(what, gpu, to_double(cpu), tol);
}

}  // namespace ringcast::test
