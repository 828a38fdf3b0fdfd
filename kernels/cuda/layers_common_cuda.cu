// The per-(device, stream) resources of the CUDA layers (a cuBLAS handle bound to the stream and a
// grow-only scratch block), the row-major product on cuBLAS, bf16 rounding and the second pass of the
// column sums. One handle per stream keeps cuBLAS results bitwise repeatable (its guarantee holds for
// a handle used from one stream) and needs no cublasSetStream per call.
#include "layers_cuda.cuh"

#include <map>
#include <memory>
#include <utility>

namespace ringcast::kernels::cuda {

struct StreamResources {
  std::mutex mutex;
  cudaStream_t stream = nullptr;
  cublasHandle_t blas = nullptr;
  void* scratch = nullptr;
  std::size_t scratch_bytes = 0;
};

namespace {

// Scratch grows in steps of this size, so calls whose needs creep up do not reallocate each time.
constexpr std::size_t kScratchGranule = std::size_t{2} << 20;

StreamResources& resources_of(const ExecContext& ctx) {
  int current = -1;
  RINGCAST_CUDA_CHECK(cudaGetDevice(&current));
  RINGCAST_CHECK(current == ctx.device.index,
                 "CUDA layers: the context names device {} but device {} is current (set it before the call)",
                 ctx.device.index, current);
  // Its handle value names a different stream in each thread, which one entry cannot serve.
  RINGCAST_CHECK(static_cast<cudaStream_t>(ctx.stream) != cudaStreamPerThread,
                 "CUDA layers: pass a stream of its own or the default stream, not cudaStreamPerThread");
  // Never destroyed: handles released during static destruction would race the CUDA runtime's own
  // teardown. Entries are few (one per stream that runs layers).
  static auto* mutex = new std::mutex;
  static auto* table = new std::map<std::pair<int, std::uintptr_t>, std::unique_ptr<StreamResources>>;
  const std::lock_guard<std::mutex> lock(*mutex);
  auto& slot = (*table)[{ctx.device.index, reinterpret_cast<std::uintptr_t>(ctx.stream)}];
  if (!slot) {
    auto res = std::make_unique<StreamResources>();
    res->stream = static_cast<cudaStream_t>(ctx.stream);
    RINGCAST_CUBLAS_CHECK(cublasCreate(&res->blas));
    RINGCAST_CUBLAS_CHECK(cublasSetStream(res->blas, res->stream));
    slot = std::move(res);
  }
  return *slot;
}

cublasOperation_t op(bool trans) { return trans ? CUBLAS_OP_T : CUBLAS_OP_N; }

__global__ void round_to_bf16_kernel(const float* __restrict__ x, std::int64_t count, __nv_bfloat16* __restrict__ out) {
  for (std::int64_t i = blockIdx.x * std::int64_t{blockDim.x} + threadIdx.x; i < count;
       i += std::int64_t{gridDim.x} * blockDim.x)
    out[i] = __float2bfloat16_rn(x[i]);
}

constexpr int kFinishLanes = 8;  // partials of one column summed by 8 threads, then across them in order

__global__ void finish_column_sums_kernel(const float* __restrict__ partial, std::int64_t chunks, int cols, float scale,
                                          bool accumulate, float* __restrict__ out) {
  __shared__ float lanes[kFinishLanes][kWarp];
  const int c = blockIdx.x * kWarp + threadIdx.x;
  const std::int64_t b = blockIdx.y;
  float acc = 0.0f;
  if (c < cols)
    for (std::int64_t k = threadIdx.y; k < chunks; k += kFinishLanes) acc += partial[(b * chunks + k) * cols + c];
  lanes[threadIdx.y][threadIdx.x] = acc;
  __syncthreads();
  if (threadIdx.y != 0 || c >= cols) return;
  float sum = 0.0f;
  for (int lane = 0; lane < kFinishLanes; ++lane) sum += lanes[lane][threadIdx.x];
  float& o = out[b * cols + c];
  o = accumulate ? o + scale * sum : scale * sum;
}

}  // namespace

StreamLease::StreamLease(const ExecContext& ctx) : res_(resources_of(ctx)), lock_(res_.mutex) {}

cudaStream_t StreamLease::stream() const { return res_.stream; }
cublasHandle_t StreamLease::blas() const { return res_.blas; }

std::byte* StreamLease::scratch(std::size_t bytes) {
  if (bytes > res_.scratch_bytes) {
    const std::size_t grown = (bytes + kScratchGranule - 1) / kScratchGranule * kScratchGranule;
    if (res_.scratch) RINGCAST_CUDA_CHECK(cudaFreeAsync(res_.scratch, res_.stream));
    res_.scratch = nullptr;
    res_.scratch_bytes = 0;
    RINGCAST_CUDA_CHECK(cudaMallocAsync(&res_.scratch, grown, res_.stream));
    res_.scratch_bytes = grown;
  }
  return static_cast<std::byte*>(res_.scratch);
}

// cuBLAS is column-major: a row-major C[m, n] is a column-major Cᵀ[n, m], so the product is computed
// as Cᵀ = op(B)ᵀ op(A)ᵀ, which swaps the operands and keeps each one's transpose flag.
void matmul(const StreamLease& lease, Math math, bool trans_a, bool trans_b, std::int64_t m, std::int64_t n,
            std::int64_t k, const void* a, std::int64_t lda, const void* b, std::int64_t ldb, float beta, float* c,
            std::int64_t ldc) {
  RINGCAST_CHECK(k > 0 || beta == 1.0f, "matmul on CUDA: an empty product (k = 0) must leave C as it is");
  if (m == 0 || n == 0 || k == 0) return;
  const float alpha = 1.0f;
  const cudaDataType operand = math == Math::kBF16 ? CUDA_R_16BF : CUDA_R_32F;
  const cublasComputeType_t compute = math == Math::kF32    ? CUBLAS_COMPUTE_32F_PEDANTIC
                                      : math == Math::kTF32 ? CUBLAS_COMPUTE_32F_FAST_TF32
                                                            : CUBLAS_COMPUTE_32F;
  RINGCAST_CUBLAS_CHECK(cublasGemmEx(lease.blas(), op(trans_b), op(trans_a), static_cast<int>(n), static_cast<int>(m),
                                     static_cast<int>(k), &alpha, b, operand, static_cast<int>(ldb), a, operand,
                                     static_cast<int>(lda), &beta, c, CUDA_R_32F, static_cast<int>(ldc), compute,
                                     CUBLAS_GEMM_DEFAULT));
}

void round_to_bf16(const float* x, std::int64_t count, __nv_bfloat16* out, cudaStream_t stream) {
  if (count == 0) return;
  round_to_bf16_kernel<<<grid_for(count), kThreads, 0, stream>>>(x, count, out);
  RINGCAST_CUDA_CHECK_LAUNCH();
}

void finish_column_sums(const float* partial, int batch, std::int64_t chunks, int cols, float scale, bool accumulate,
                        float* out, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((cols + kWarp - 1) / kWarp), static_cast<unsigned>(batch));
  finish_column_sums_kernel<<<grid, dim3(kWarp, kFinishLanes), 0, stream>>>(partial, chunks, cols, scale, accumulate,
                                                                            out);
  RINGCAST_CUDA_CHECK_LAUNCH();
}

}  // namespace ringcast::kernels::cuda
