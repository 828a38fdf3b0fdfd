// CUDA backend of the input checks (checks.hpp), enqueued on the given stream.
#pragma once

#include <ringcast/kernels/checks.hpp>

namespace ringcast::kernels::cuda {

void count_nonfinite(const void* x, DType dtype, std::int64_t n, std::int64_t* counter, Stream stream);

}  // namespace ringcast::kernels::cuda
