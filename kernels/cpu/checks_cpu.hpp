// CPU backend of the input checks (checks.hpp).
#pragma once

#include <ringcast/kernels/checks.hpp>

namespace ringcast::kernels::cpu {

void count_nonfinite(const void* x, DType dtype, std::int64_t n, std::int64_t* counter);

}  // namespace ringcast::kernels::cpu
