// Checks shared by the dispatchers of the selection and layer kernel families: a build without the
// CUDA backend reports so instead of running somewhere else; null buffers are named.
#pragma once

#include <ringcast/error.hpp>
#include <ringcast/kernels/attention.hpp>

#include <initializer_list>

namespace ringcast::kernels {

[[noreturn]] inline void no_cuda_backend(const char* op) {
  RINGCAST_THROW("{}: this build of ringcast has no CUDA backend (configure with -DRINGCAST_CUDA=ON)", op);
}

inline void require_pointers(const char* op, std::initializer_list<const void*> pointers) {
  for (const void* ptr : pointers) RINGCAST_CHECK(ptr != nullptr, "{}: a required buffer is null", op);
}

}  // namespace ringcast::kernels
