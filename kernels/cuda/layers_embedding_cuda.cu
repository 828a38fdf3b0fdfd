// Token embedding and sequence mean pooling on CUDA (the embedding backward is a row scatter-add,
// layers_dispatch.cpp). The forward writes NaN for ids outside [0, vocab) (layers.hpp). Pooling sums
// over tokens with the deterministic column sums.
#include "layers_cuda.hpp"
#include "layers_cuda.cuh"

#include <cmath>

namespace ringcast::kernels::cuda {
namespace {

__global__ void embedding_forward_kernel(const EmbeddingParams p) {
  const std::int64_t total = p.rows * p.dim;
  for (std::int64_t i = blockIdx.x * std::int64_t{blockDim.x} + threadIdx.x; i < total;
       i += std::int64_t{gridDim.x} * blockDim.x) {
    const std::int64_t t = i / p.dim;
    const std::int32_t id = p.ids[t];
    p.y[i] = id >= 0 && id < p.vocab ? p.table[std::int64_t{id} * p.dim + i % p.dim] : NAN;
  }
}

struct PoolTerm {
  const float* x;
  std::int64_t seq;
  int dim;
  __device__ float operator()(int b, std::int64_t t, int c) const { return x[(b * seq + t) * dim + c]; }
};

__global__ void token_pool_backward_kernel(const TokenPoolBackwardParams p) {
  const std::int64_t per_batch = p.seq * p.dim;
  const std::int64_t total = p.batch * per_batch;
  for (std::int64_t i = blockIdx.x * std::int64_t{blockDim.x} + threadIdx.x; i < total;
       i += std::int64_t{gridDim.x} * blockDim.x)
    p.d_x[i] += p.scale * p.d_pooled[(i / per_batch) * p.dim + i % p.dim];
}

}  // namespace

void embedding_forward(const EmbeddingParams& p, const ExecContext& ctx) {
  if (p.rows == 0) return;
  embedding_forward_kernel<<<grid_for(p.rows * p.dim), kThreads, 0, static_cast<cudaStream_t>(ctx.stream)>>>(p);
  RINGCAST_CUDA_CHECK_LAUNCH();
}

void token_pool_forward(const TokenPoolParams& p, const ExecContext& ctx) {
  StreamLease lease(ctx);
  float* partial = reinterpret_cast<float*>(
      lease.scratch(sizeof(float) * static_cast<std::size_t>(column_partials_count(p.batch, p.seq, p.dim))));
  column_sums(PoolTerm{p.x, p.seq, p.dim}, p.batch, p.seq, p.dim, partial, p.scale, false, p.pooled, lease.stream());
}

void token_pool_backward(const TokenPoolBackwardParams& p, const ExecContext& ctx) {
  const std::int64_t total = std::int64_t{p.batch} * p.seq * p.dim;
  if (total == 0) return;
  token_pool_backward_kernel<<<grid_for(total), kThreads, 0, static_cast<cudaStream_t>(ctx.stream)>>>(p);
  RINGCAST_CUDA_CHECK_LAUNCH();
}

}  // namespace ringcast::kernels::cuda
