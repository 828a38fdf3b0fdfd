// Checks shared by the dispatchers of the kernel families that only the CPU backend implements yet:
// they report "not supported on CUDA yet" instead of running somewhere else, and name null buffers.
#pragma once

#include <ringcast/error.hpp>
#include <ringcast/kernels/attention.hpp>

#include <initializer_list>

namespace ringcast::kernels {

inline void require_cpu(const ExecContext& ctx, const char* op) {
  RINGCAST_CHECK(ctx.device.kind == DeviceKind::kCpu, "{}: not supported on CUDA yet (only the CPU backend implements it)",
                 op);
}

inline void require_pointers(const char* op, std::initializer_list<const void*> pointers) {
  for (const void* ptr : pointers) RINGCAST_CHECK(ptr != nullptr, "{}: a required buffer is null", op);
}

}  // namespace ringcast::kernels
