// CPU backend of the layout primitives (layout.hpp).
#pragma once

#include <ringcast/kernels/layout.hpp>

namespace ringcast::kernels::cpu {

void copy_strided(const StridedCopy& c);

}  // namespace ringcast::kernels::cpu
