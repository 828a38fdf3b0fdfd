// Pieces shared by the CUDA layer kernels (layers_*_cuda.cu): the cuBLAS check, the resources of one
// (device, stream) leased for the length of a call (cuBLAS handle, grow-only scratch), the row-major
// matrix product on cuBLAS, and the fixed-order reductions that keep every sum deterministic (no
// floating-point atomics). Matrices are row-major; leading dimensions count elements.
#pragma once

#include <ringcast/cuda_check.hpp>
#include <ringcast/error.hpp>
#include <ringcast/kernels/layers.hpp>

#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <mutex>

#define RINGCAST_CUBLAS_CHECK(call)                                                              \
  do {                                                                                           \
    cublasStatus_t ringcast_cublas_status_ = (call);                                             \
    if (ringcast_cublas_status_ != CUBLAS_STATUS_SUCCESS) [[unlikely]] {                         \
      RINGCAST_THROW("cuBLAS error {} ({}) in {}", cublasGetStatusName(ringcast_cublas_status_), \
                     cublasGetStatusString(ringcast_cublas_status_), #call);                     \
    }                                                                                            \
  } while (0)

namespace ringcast::kernels::cuda {

inline constexpr int kWarp = 32;
inline constexpr int kThreads = 256;  // elementwise kernels

// Blocks of kThreads for a grid-stride loop over n > 0 elements: enough to fill any GPU; beyond the
// cap the threads loop.
inline unsigned grid_for(std::int64_t n) {
  return static_cast<unsigned>(std::min<std::int64_t>((n + kThreads - 1) / kThreads, std::int64_t{1} << 16));
}

struct StreamResources;  // layers_common_cuda.cu

// Exclusive use of the resources of ctx's (device, stream) for one call. They are created on first
// use (checking that ctx.device is the current device) and kept for the process. The lease holds the
// entry's lock, so calls on one stream from several host threads take turns: the stream orders their
// work anyway, and the scratch is then never handed to two calls at once.
class StreamLease {
 public:
  explicit StreamLease(const ExecContext& ctx);
  StreamLease(const StreamLease&) = delete;
  StreamLease& operator=(const StreamLease&) = delete;

  cudaStream_t stream() const;
  cublasHandle_t blas() const;
  // At least `bytes` of device scratch, 256-byte aligned. A larger request than any before frees the
  // old block and allocates a new one, both in stream order (the work queued on this stream is the
  // only user of the old block). Call once per lease: a second, larger request invalidates the first.
  std::byte* scratch(std::size_t bytes);

 private:
  StreamResources& res_;
  std::unique_lock<std::mutex> lock_;
};

// Sub-buffers of one scratch block: sizes are added first, then the offsets resolved on the base.
class ScratchLayout {
 public:
  template <typename T>
  std::size_t add(std::int64_t count) {
    const std::size_t at = bytes_;
    bytes_ += (static_cast<std::size_t>(count) * sizeof(T) + kAlign - 1) / kAlign * kAlign;
    return at;
  }
  std::size_t bytes() const { return bytes_; }
  template <typename T>
  static T* at(std::byte* base, std::size_t offset) {
    return reinterpret_cast<T*>(base + offset);
  }

 private:
  static constexpr std::size_t kAlign = 256;
  std::size_t bytes_ = 0;
};

// How a product runs: exact fp32 (CUBLAS_COMPUTE_32F_PEDANTIC, whatever the handle's math mode or
// NVIDIA_TF32_OVERRIDE say), TF32 tensor cores on fp32 operands, or bf16 operands (already rounded)
// on tensor cores. Accumulation and C are fp32 in every case.
enum class Math { kF32, kTF32, kBF16 };

inline Math math_of(DType dtype, bool allow_tf32) {
  if (dtype == DType::kBF16) return Math::kBF16;
  return allow_tf32 ? Math::kTF32 : Math::kF32;
}

// C[m, n] = op(A) op(B) + beta C; A and B are __nv_bfloat16 with Math::kBF16, float otherwise.
// An empty product (k = 0) must have beta = 1.
void matmul(const StreamLease& lease, Math math, bool trans_a, bool trans_b, std::int64_t m, std::int64_t n,
            std::int64_t k, const void* a, std::int64_t lda, const void* b, std::int64_t ldb, float beta, float* c,
            std::int64_t ldc);

// out[i] = bf16(x[i]), round to nearest even, on `stream`.
void round_to_bf16(const float* x, std::int64_t count, __nv_bfloat16* out, cudaStream_t stream);

// --- Fixed-order block reductions. blockDim.x is a multiple of 32 (at most 1024); every thread of
// the block calls them and receives the result. `shared` holds kWarp values. ---

template <typename T>
__device__ T warp_sum(T v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v += __shfl_down_sync(0xffffffffu, v, offset);
  return __shfl_sync(0xffffffffu, v, 0);  // lane 0's tree, so every lane holds the same bits
}

template <typename T>
__device__ T block_sum(T v, T* shared) {
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  v = warp_sum(v);
  __syncthreads();  // a previous call's result in shared[0] has been read
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = warp_sum(lane < static_cast<int>(blockDim.x) / kWarp ? shared[lane] : T{});
    if (lane == 0) shared[0] = v;
  }
  __syncthreads();
  return shared[0];
}

// --- Column sums of an implicit [batch][rows][cols] matrix term(b, r, c), deterministic: each thread
// sums kPartialRows rows of one column in row order into a partial, then the partials of a column are
// summed in a fixed order. The chunking is a constant, so results do not depend on the GPU either. ---

inline constexpr int kPartialRows = 256;
inline constexpr int kPartialCols = 128;

inline std::int64_t partial_chunks(std::int64_t rows) { return (rows + kPartialRows - 1) / kPartialRows; }

// Scratch floats that column_sums needs.
inline std::int64_t column_partials_count(int batch, std::int64_t rows, int cols) {
  return std::int64_t{batch} * partial_chunks(rows) * cols;
}

template <typename Term>
__global__ void column_partials_kernel(const Term term, const std::int64_t rows, const int cols,
                                       float* __restrict__ partial) {
  const int c = blockIdx.y * kPartialCols + threadIdx.x;
  if (c >= cols) return;
  const int b = blockIdx.z;
  const std::int64_t chunk = blockIdx.x;
  const std::int64_t r0 = chunk * kPartialRows;
  const std::int64_t r1 = min(rows, r0 + kPartialRows);
  float acc = 0.0f;
  for (std::int64_t r = r0; r < r1; ++r) acc += term(b, r, c);
  partial[(b * std::int64_t{gridDim.x} + chunk) * cols + c] = acc;
}

// out[b][c] = scale · Σ_chunks partial[b][chunk][c], added to out[b][c] when `accumulate`.
void finish_column_sums(const float* partial, int batch, std::int64_t chunks, int cols, float scale, bool accumulate,
                        float* out, cudaStream_t stream);

template <typename Term>
void column_sums(const Term& term, int batch, std::int64_t rows, int cols, float* partial, float scale, bool accumulate,
                 float* out, cudaStream_t stream) {
  const std::int64_t chunks = partial_chunks(rows);
  const std::int64_t col_blocks = (cols + kPartialCols - 1) / kPartialCols;
  RINGCAST_CHECK(col_blocks <= 65535 && batch <= 65535,
                 "column sums on CUDA: {} columns x {} sequences exceed the grid", cols, batch);
  if (chunks > 0) {
    column_partials_kernel<<<dim3(static_cast<unsigned>(chunks), static_cast<unsigned>(col_blocks), batch),
                             kPartialCols, 0, stream>>>(term, rows, cols, partial);
    RINGCAST_CUDA_CHECK_LAUNCH();
  }
  finish_column_sums(partial, batch, chunks, cols, scale, accumulate, out, stream);
}

}  // namespace ringcast::kernels::cuda
