// Matrix products of the CPU layers: one blocked sgemm driver and the Linear layer built on it.
// C is split along its longer side into one block per OpenMP thread; each block is an independent
// single-threaded sgemm, so no two threads write the same element and nothing is reduced across
// threads (dW = dYᵀ X splits over the rows of dW, each summing over every token itself).
#include "cpu/layers_cpu.hpp"
#include "cpu/blas.hpp"

#include <omp.h>

#include <algorithm>

namespace ringcast::kernels::cpu {
namespace {

// Below this many multiply-adds a product runs as one call: a parallel region costs more.
constexpr std::int64_t kSerialWork = std::int64_t{1} << 18;

}  // namespace

void parallel_gemm(bool trans_a, bool trans_b, std::int64_t m, std::int64_t n, std::int64_t k, const float* a,
                   std::int64_t lda, const float* b, std::int64_t ldb, float beta, float* c, std::int64_t ldc) {
  if (m == 0 || n == 0) return;
  use_single_threaded_blas();
  const auto ta = trans_a ? CblasTrans : CblasNoTrans;
  const auto tb = trans_b ? CblasTrans : CblasNoTrans;
  const bool split_rows = m >= n;
  const std::int64_t extent = split_rows ? m : n;
#pragma omp parallel if (m * n * k > kSerialWork)
  {
    const std::int64_t threads = omp_get_num_threads();
    const std::int64_t t = omp_get_thread_num();
    const std::int64_t begin = extent * t / threads;
    const std::int64_t end = extent * (t + 1) / threads;
    if (begin < end) {
      if (split_rows) {
        // Rows [begin, end) of op(A): rows of A, or columns of the stored Aᵀ.
        const float* a_block = trans_a ? a + begin : a + begin * lda;
        cblas_sgemm(CblasRowMajor, ta, tb, int(end - begin), int(n), int(k), 1.0f, a_block, int(lda), b, int(ldb), beta,
                    c + begin * ldc, int(ldc));
      } else {
        // Columns [begin, end) of op(B): columns of B, or rows of the stored Bᵀ.
        const float* b_block = trans_b ? b + begin * ldb : b + begin;
        cblas_sgemm(CblasRowMajor, ta, tb, int(m), int(end - begin), int(k), 1.0f, a, int(lda), b_block, int(ldb), beta,
                    c + begin, int(ldc));
      }
    }
  }
}

void linear_forward(const LinearParams& p) {
  parallel_gemm(false, true, p.rows, p.out_dim, p.in_dim, p.x, p.in_dim, p.w, p.in_dim, p.accumulate ? 1.0f : 0.0f, p.y,
                p.out_dim);
}

void linear_backward(const LinearBackwardParams& p) {
  parallel_gemm(false, false, p.rows, p.in_dim, p.out_dim, p.d_y, p.out_dim, p.w, p.in_dim, 1.0f, p.d_x, p.in_dim);
  parallel_gemm(true, false, p.out_dim, p.in_dim, p.rows, p.d_y, p.out_dim, p.x, p.in_dim, 1.0f, p.d_w, p.in_dim);
}

}  // namespace ringcast::kernels::cpu
