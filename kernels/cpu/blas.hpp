// The CPU backend's BLAS policy: every pass runs its own OpenMP threads and calls cblas_sgemm from
// each of them, so BLAS itself runs single-threaded (set once per process; this also caps OpenBLAS
// for other callers in the process, who then get their threads from OpenMP too).
#pragma once

#include <cblas.h>

#include <mutex>

namespace ringcast::kernels::cpu {

inline void use_single_threaded_blas() {
  static std::once_flag once;
  std::call_once(once, [] { openblas_set_num_threads(1); });
}

}  // namespace ringcast::kernels::cpu
