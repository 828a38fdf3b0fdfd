// Constants of the layer tests (helpers: tests/support/test_util.hpp).
#pragma once

#include "test_util.hpp"

#include <ringcast/kernels/layers.hpp>

namespace ringcast::test {

inline const kernels::ExecContext kCpu{};

// fp32 kernel against float64: forward values and gradients (DESIGN.md §7).
inline constexpr double kKernelTol = 1e-5;
// float64 central differences against the float64 analytic gradient.
inline constexpr double kFiniteDiffTol = 1e-6;

}  // namespace ringcast::test
