// RINGCAST_CUDA_CHECK: every CUDA runtime call and every launch is checked; failures become Errors
// with file:line. Only included by CUDA-backend sources (needs the CUDA runtime headers).
#pragma once

#include <ringcast/error.hpp>

#include <cuda_runtime_api.h>

#define RINGCAST_CUDA_CHECK(call)                                                           \
  do {                                                                                      \
    cudaError_t ringcast_cuda_status_ = (call);                                             \
    if (ringcast_cuda_status_ != cudaSuccess) [[unlikely]] {                                \
      RINGCAST_THROW("CUDA error {} ({}) in {}", cudaGetErrorName(ringcast_cuda_status_),   \
                     cudaGetErrorString(ringcast_cuda_status_), #call);                     \
    }                                                                                       \
  } while (0)

// After a kernel launch: catches launch-configuration errors without synchronizing.
#define RINGCAST_CUDA_CHECK_LAUNCH() RINGCAST_CUDA_CHECK(cudaGetLastError())
