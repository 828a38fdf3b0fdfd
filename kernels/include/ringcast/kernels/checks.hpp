// Input checks that run on the device holding the data: counting non-finite values (NaN, +-Inf)
// so that bad inputs are reported before they spread through a collective.
#pragma once

#include <ringcast/dtype.hpp>
#include <ringcast/kernels/attention.hpp>

#include <cstdint>

namespace ringcast::kernels {

// *counter += the number of NaN or infinite elements among n elements of x (f32, bf16 or f16).
// `counter` lives where x does (device memory on CUDA, enqueued on ctx.stream).
void count_nonfinite(const void* x, DType dtype, std::int64_t n, std::int64_t* counter, const ExecContext& ctx);

}  // namespace ringcast::kernels
