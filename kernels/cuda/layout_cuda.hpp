// CUDA backend of the layout primitives (layout.hpp), enqueued on the given stream.
#pragma once

#include <ringcast/kernels/layout.hpp>

namespace ringcast::kernels::cuda {

void copy_strided(const StridedCopy& c, Stream stream);
void fill_zero(void* dst, std::size_t bytes, Stream stream);

}  // namespace ringcast::kernels::cuda
