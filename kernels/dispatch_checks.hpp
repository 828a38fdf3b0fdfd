// What every kernel dispatcher shares: the routing of a call to the backend its context names (a build
// without the CUDA backend reports so instead of running somewhere else) and named null-buffer checks.
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

// A dispatcher's last statement, once its checks have passed: returns cpu::fn cpu_args or
// cuda::fn cuda_args, for the backend that ctx names (a CUDA kernel takes the context or only its
// stream). RINGCAST_ON_CUDA is the CUDA call alone, for a dispatcher whose CPU path is written out
// (or absent). Arguments are parenthesized lists: RINGCAST_ROUTE(ctx, rope_forward, (p), (p, ctx)).
#if RINGCAST_WITH_CUDA
#define RINGCAST_ROUTE(ctx, fn, cpu_args, cuda_args) \
  return (ctx).device.kind == DeviceKind::kCpu ? cpu::fn cpu_args : cuda::fn cuda_args
#define RINGCAST_ON_CUDA(fn, cuda_args) return cuda::fn cuda_args
#else
#define RINGCAST_ROUTE(ctx, fn, cpu_args, cuda_args)                 \
  do {                                                               \
    if ((ctx).device.kind != DeviceKind::kCpu) no_cuda_backend(#fn); \
    return cpu::fn cpu_args;                                         \
  } while (false)
#define RINGCAST_ON_CUDA(fn, cuda_args) no_cuda_backend(#fn)
#endif
