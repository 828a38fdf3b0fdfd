// Constants of the selection building-block tests (helpers: tests/support/test_util.hpp).
#pragma once

#include "test_util.hpp"

namespace ringcast::test {

// fp32 kernel against float64 references: the 1e-5 relative budget of DESIGN.md §7.
inline constexpr double kForwardTol = 1e-5;
// fp32 analytic gradients against float64 central differences (whose own error is ~1e-9).
inline constexpr double kGradTol = 1e-4;

}  // namespace ringcast::test
