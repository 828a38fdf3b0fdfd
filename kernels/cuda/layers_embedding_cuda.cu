// Token embedding and sequence mean pooling on CUDA. The embedding backward sorts the tokens by id
// with a stable radix sort (cub), so each table row is summed by one thread per column, in token
// order, starting from the row's old value: the CPU backend's order, hence its bits, and no atomics.
// Ids outside [0, vocab) sort last and are skipped; the forward writes NaN for them (layers.hpp).
// Pooling sums over tokens with the deterministic column sums.
#include "layers_cuda.hpp"
#include "layers_cuda.cuh"

#include <cub/device/device_radix_sort.cuh>

#include <bit>
#include <climits>
#include <cmath>

namespace ringcast::kernels::cuda {
namespace {

constexpr int kColumns = 128;       // columns of the table per block of the backward
constexpr int kRunsPerBlock = 256;  // sorted positions per block of the backward

__global__ void embedding_forward_kernel(const EmbeddingParams p) {
  const std::int64_t total = p.rows * p.dim;
  for (std::int64_t i = blockIdx.x * std::int64_t{blockDim.x} + threadIdx.x; i < total;
       i += std::int64_t{gridDim.x} * blockDim.x) {
    const std::int64_t t = i / p.dim;
    const std::int32_t id = p.ids[t];
    p.y[i] = id >= 0 && id < p.vocab ? p.table[std::int64_t{id} * p.dim + i % p.dim] : NAN;
  }
}

// Sort keys: the id, or vocab (sorted last, skipped) when it is out of range; values: token indices.
__global__ void embedding_keys_kernel(const std::int32_t* __restrict__ ids, std::int32_t rows, std::int64_t vocab,
                                      std::uint32_t* __restrict__ keys, std::int32_t* __restrict__ tokens) {
  for (std::int64_t t = blockIdx.x * std::int64_t{blockDim.x} + threadIdx.x; t < rows;
       t += std::int64_t{gridDim.x} * blockDim.x) {
    const std::int32_t id = ids[t];
    keys[t] = id >= 0 && id < vocab ? static_cast<std::uint32_t>(id) : static_cast<std::uint32_t>(vocab);
    tokens[t] = static_cast<std::int32_t>(t);
  }
}

// Block (range, column block) sums, for its columns, the runs of equal ids that start among the
// kRunsPerBlock sorted positions of its range (a run may extend past the range's end), each run's d_y
// rows in token order, into that id's table row. Runs are contiguous, so the blocks' work is even but
// for ids far more frequent than the rest.
__global__ void embedding_backward_kernel(const std::uint32_t* __restrict__ keys,
                                          const std::int32_t* __restrict__ tokens, std::int64_t rows,
                                          std::int64_t vocab, int dim, const float* __restrict__ d_y,
                                          float* __restrict__ d_table) {
  const int c = blockIdx.y * kColumns + threadIdx.x;
  if (c >= dim) return;
  const std::int64_t p0 = std::int64_t{blockIdx.x} * kRunsPerBlock;
  const std::int64_t p1 = min(rows, p0 + kRunsPerBlock);
  for (std::int64_t first = p0; first < p1;) {
    const std::uint32_t id = keys[first];
    if (id >= vocab) return;  // out-of-range ids sort last
    std::int64_t j = first;
    if (first > 0 && keys[first - 1] == id) {  // the rest of a run that an earlier block sums
      while (j < p1 && keys[j] == id) ++j;
      first = j;
      continue;
    }
    float* row = d_table + std::int64_t{id} * dim + c;
    float acc = *row;
    for (; j < rows && keys[j] == id; ++j) acc += d_y[std::int64_t{tokens[j]} * dim + c];
    *row = acc;
    first = j;
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

void embedding_backward(const EmbeddingBackwardParams& p, const ExecContext& ctx) {
  RINGCAST_CHECK(p.rows <= INT_MAX, "embedding_backward on CUDA: {} tokens exceed the sort's int32 indices", p.rows);
  if (p.rows == 0) return;
  const auto rows = static_cast<std::int32_t>(p.rows);
  const int end_bit = std::bit_width(static_cast<std::uint64_t>(p.vocab));  // keys are <= vocab
  StreamLease lease(ctx);
  const cudaStream_t stream = lease.stream();
  std::size_t sort_bytes = 0;
  RINGCAST_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(
      nullptr, sort_bytes, static_cast<const std::uint32_t*>(nullptr), static_cast<std::uint32_t*>(nullptr),
      static_cast<const std::int32_t*>(nullptr), static_cast<std::int32_t*>(nullptr), rows, 0, end_bit, stream));
  ScratchLayout layout;
  const auto keys_in = layout.add<std::uint32_t>(rows);
  const auto keys_out = layout.add<std::uint32_t>(rows);
  const auto tokens_in = layout.add<std::int32_t>(rows);
  const auto tokens_out = layout.add<std::int32_t>(rows);
  const auto sort_at = layout.add<std::byte>(static_cast<std::int64_t>(sort_bytes));
  std::byte* base = lease.scratch(layout.bytes());
  auto* keys = ScratchLayout::at<std::uint32_t>(base, keys_out);
  auto* tokens = ScratchLayout::at<std::int32_t>(base, tokens_out);
  embedding_keys_kernel<<<grid_for(rows), kThreads, 0, stream>>>(p.ids, rows, p.vocab,
                                                                 ScratchLayout::at<std::uint32_t>(base, keys_in),
                                                                 ScratchLayout::at<std::int32_t>(base, tokens_in));
  RINGCAST_CUDA_CHECK_LAUNCH();
  RINGCAST_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(
      ScratchLayout::at<std::byte>(base, sort_at), sort_bytes, ScratchLayout::at<std::uint32_t>(base, keys_in), keys,
      ScratchLayout::at<std::int32_t>(base, tokens_in), tokens, rows, 0, end_bit, stream));
  const unsigned column_blocks = static_cast<unsigned>((p.dim + kColumns - 1) / kColumns);
  RINGCAST_CHECK(column_blocks <= 65535, "embedding_backward on CUDA: dim {} exceeds the grid", p.dim);
  const auto ranges = static_cast<unsigned>((p.rows + kRunsPerBlock - 1) / kRunsPerBlock);
  embedding_backward_kernel<<<dim3(ranges, column_blocks), kColumns, 0, stream>>>(keys, tokens, p.rows, p.vocab, p.dim,
                                                                                  p.d_y, p.d_table);
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
