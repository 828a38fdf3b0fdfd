// CUDA CoLT5 routing (routing.hpp): router scores, the soft top-k and its exact backward, the hard
// top-k (a stable radix sort: the CPU's, ties to the lower index). Arithmetic mirrors routing_cpu.cpp
// (_rn intrinsics, exp terms summed in double) in a fixed order: chunks of kChunk tokens, then the
// chunks in order, so runs repeat bitwise. The reduction hook gets device pointers between launches on
// ctx.stream and enqueues its all-reduce there (routing.hpp): T iterations enqueue without a host sync,
// where staging through the host would drain the stream and idle the GPU T times per call.
#include <ringcast/cuda_check.hpp>
#include <ringcast/error.hpp>

#include <cub/device/device_radix_sort.cuh>
#include <cub/device/device_scan.cuh>
#include <cuda_runtime.h>

#include <bit>
#include <climits>
#include <cmath>
#include <cstdint>

#include "layers_cuda.cuh"
#include "seed_cuda.hpp"
#include "seed_device.cuh"
#include "selection_launch.hpp"

namespace ringcast::kernels::cuda {
namespace detail {

namespace {

__global__ void score_keys_kernel(const float* __restrict__ scores, std::int64_t len, std::int64_t count,
                                  std::uint64_t* __restrict__ keys, std::int32_t* __restrict__ positions) {
  for (std::int64_t i = blockIdx.x * std::int64_t{blockDim.x} + threadIdx.x; i < count;
       i += std::int64_t{gridDim.x} * blockDim.x) {
    keys[i] = static_cast<std::uint64_t>(i / len) << 32 | descending_key(scores[i]);
    positions[i] = static_cast<std::int32_t>(i % len);
  }
}

}  // namespace

void order_by_score(const float* scores, std::int64_t segments, std::int64_t len, std::int32_t* order,
                    cudaStream_t stream) {
  const std::int64_t count = segments * len;
  RINGCAST_CHECK(len <= INT32_MAX && segments < (std::int64_t{1} << 31),
                 "order_by_score on CUDA: {} segments of {} scores exceed the 32-bit sort keys", segments, len);
  const Scratch<std::uint64_t> keys(static_cast<std::size_t>(2 * count), stream);
  const Scratch<std::int32_t> positions(static_cast<std::size_t>(count), stream);
  score_keys_kernel<<<grid_for(count), kThreads, 0, stream>>>(scores, len, count, keys.get(), positions.get());
  RINGCAST_CUDA_CHECK_LAUNCH();
  const int end_bit = 32 + static_cast<int>(std::bit_width(static_cast<std::uint64_t>(segments - 1)));
  std::size_t bytes = 0;
  RINGCAST_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, bytes, keys.get(), keys.get() + count,
                                                      positions.get(), order, count, 0, end_bit, stream));
  const Scratch<unsigned char> temp(bytes, stream);
  RINGCAST_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(temp.get(), bytes, keys.get(), keys.get() + count,
                                                      positions.get(), order, count, 0, end_bit, stream));
}

}  // namespace detail

namespace {

using detail::Scratch;

// Tokens per block of the soft top-k: a sequence's sums are taken per chunk, then over the chunks in
// order. A constant, so the summation order (and the result) does not depend on the GPU.
constexpr std::int64_t kChunk = 2048;

std::int64_t chunks_of(std::int64_t n) { return (n + kChunk - 1) / kChunk; }

__device__ __forceinline__ float relu(float x) { return x > 0.0f ? x : 0.0f; }
__device__ __forceinline__ float min_of(float a, float b) { return b < a ? b : a; }  // std::min

__device__ float block_max(float v, float* shared) {
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  __syncthreads();
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = shared[0];
  for (int w = 1; w < static_cast<int>(blockDim.x) / kWarp; ++w) v = fmaxf(v, shared[w]);
  return v;
}

// --- Router scores ---

// s[i] = x[i] . u: a warp per row, lanes over channels, then the warp's fixed tree.
__global__ void router_scores_kernel(const float* __restrict__ x, const float* __restrict__ u, std::int64_t rows,
                                     int dim, float* __restrict__ s) {
  const int lane = threadIdx.x % kWarp;
  const std::int64_t warps = std::int64_t{gridDim.x} * blockDim.x / kWarp;
  for (std::int64_t r = (blockIdx.x * std::int64_t{blockDim.x} + threadIdx.x) / kWarp; r < rows; r += warps) {
    const float* xr = x + r * dim;
    float acc = 0.0f;
    for (int c = lane; c < dim; c += kWarp) acc = __fadd_rn(acc, __fmul_rn(xr[c], u[c]));
    acc = warp_sum(acc);
    if (lane == 0) s[r] = acc;
  }
}

// d_x[i, c] += d_s[i] u[c].
__global__ void router_input_grad_kernel(const float* __restrict__ u, const float* __restrict__ d_s,
                                         std::int64_t count, int dim, float* __restrict__ d_x) {
  for (std::int64_t i = blockIdx.x * std::int64_t{blockDim.x} + threadIdx.x; i < count;
       i += std::int64_t{gridDim.x} * blockDim.x)
    d_x[i] = __fadd_rn(d_x[i], __fmul_rn(d_s[i / dim], u[i % dim]));
}

// Term (row r, channel c) of d u = Xᵀ d s, summed by column_sums in a fixed order.
struct RouterWeightGrad {
  const float* x;
  const float* d_s;
  int dim;
  __device__ float operator()(int, std::int64_t r, int c) const { return __fmul_rn(x[r * dim + c], d_s[r]); }
};

// --- Soft top-k ---

struct TopkArgs {
  const float* s;  // [B, n]
  std::int64_t n;
  int iterations;  // T
  float epsilon;
  float log_k;     // std::log(float(k)), taken on the host as the CPU backend takes it
};

// a_t of sequence b (CPU: a = ε(log k - (shift_t + log Σ))), from the all-reduced sum of iteration t and,
// for t > 0, a_{t-1} in the history. Every block computes it from the same values: all agree bitwise.
__device__ float a_at(const TopkArgs& a, int b, int t, const float* s_max, const float* sums,
                      const float* history) {
  const float shift =
      t == 0 ? 0.0f : __fdiv_rn(min_of(s_max[b], -history[b * a.iterations + t - 1]), a.epsilon);
  return __fmul_rn(a.epsilon, __fsub_rn(a.log_k, __fadd_rn(shift, logf(sums[b]))));
}

// Iteration t's per-chunk sums of exp((s_j + b_j)/ε - shift_t), b = -s first and -relu(s + a_{t-1})
// after, and in iteration 0 the chunk maxima of s. From t = 1 on, block 0 also records a_{t-1}.
__global__ void soft_topk_sum_kernel(const TopkArgs a, int t, const float* __restrict__ s_max,
                                     const float* __restrict__ sums, float* __restrict__ history,
                                     double* __restrict__ partial_sum, float* __restrict__ partial_max) {
  __shared__ double shared_sum[kWarp];
  __shared__ float shared_max[kWarp];
  const int b = blockIdx.y;
  const float* s = a.s + b * a.n;
  const std::int64_t j1 = min(std::int64_t{blockIdx.x + 1} * kChunk, a.n);
  float a_prev = 0.0f;
  float shift = 0.0f;
  if (t > 0) {
    a_prev = a_at(a, b, t - 1, s_max, sums, history);
    if (blockIdx.x == 0 && threadIdx.x == 0) history[b * a.iterations + t - 1] = a_prev;
    shift = __fdiv_rn(min_of(s_max[b], -a_prev), a.epsilon);
  }
  double sum = 0.0;
  float mx = -INFINITY;
  for (std::int64_t j = std::int64_t{blockIdx.x} * kChunk + threadIdx.x; j < j1; j += blockDim.x) {
    const float sj = s[j];
    const float bj = t == 0 ? -sj : -relu(__fadd_rn(sj, a_prev));
    sum += static_cast<double>(expf(__fsub_rn(__fdiv_rn(__fadd_rn(sj, bj), a.epsilon), shift)));
    if (t == 0) mx = fmaxf(mx, sj);
  }
  sum = block_sum(sum, shared_sum);
  if (t == 0) mx = block_max(mx, shared_max);
  if (threadIdx.x != 0) return;
  partial_sum[b * gridDim.x + blockIdx.x] = sum;
  if (t == 0) partial_max[b * gridDim.x + blockIdx.x] = mx;
}

// Per sequence b (a warp each): sums[b] = (first ? float(Σ first) : 0) + float(Σ second) over the chunks
// in order (the CPU's float(double sum) per accumulator), and s_max[b] = the maximum of max_part.
__global__ void soft_topk_finish_kernel(const double* __restrict__ first, const double* __restrict__ second,
                                        const float* __restrict__ max_part, int chunks, int batch,
                                        float* __restrict__ sums, float* __restrict__ s_max) {
  const int lane = threadIdx.x % kWarp;
  const int b = (blockIdx.x * blockDim.x + threadIdx.x) / kWarp;
  if (b >= batch) return;
  double f = 0.0, g = 0.0;
  float mx = -INFINITY;
  for (int c = lane; c < chunks; c += kWarp) {
    if (first) f += first[b * chunks + c];
    g += second[b * chunks + c];
    if (max_part) mx = fmaxf(mx, max_part[b * chunks + c]);
  }
  f = warp_sum(f);
  g = warp_sum(g);
  for (int offset = kWarp / 2; offset > 0; offset /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, offset));
  if (lane != 0) return;
  sums[b] = __fadd_rn(first ? static_cast<float>(f) : 0.0f, static_cast<float>(g));
  if (max_part) s_max[b] = mx;
}

// s̃_j = exp((s_j + a_T + b_j)/ε), b_j = -relu(s_j + a_T); block 0 records a_T.
__global__ void soft_topk_output_kernel(const TopkArgs a, const float* __restrict__ s_max,
                                        const float* __restrict__ sums, float* __restrict__ history,
                                        float* __restrict__ s_tilde) {
  const int b = blockIdx.y;
  const int last = a.iterations - 1;
  const float at = a_at(a, b, last, s_max, sums, history);
  if (blockIdx.x == 0 && threadIdx.x == 0) history[b * a.iterations + last] = at;
  const std::int64_t j1 = min(std::int64_t{blockIdx.x + 1} * kChunk, a.n);
  for (std::int64_t j = std::int64_t{blockIdx.x} * kChunk + threadIdx.x; j < j1; j += blockDim.x) {
    const float sj = a.s[b * a.n + j];
    const float bj = -relu(__fadd_rn(sj, at));
    s_tilde[b * a.n + j] = expf(__fdiv_rn(__fadd_rn(__fadd_rn(sj, at), bj), a.epsilon));
  }
}

// Backward state: ds (the adjoint of s so far) and db (of b^t), [B, n] each; the last step adds ds
// into d_s instead of storing it.
struct TopkGrad {
  const float* history;  // a_t at [b * T + t - 1]
  float* ds;
  float* db;
  float* d_s;
};

// Adjoints from the output (ds = db = d s̃ · s̃ / ε) and the relu step of iteration T; per-chunk sums of
// those adjoints and of the relu step's share of the adjoint of a_T.
__global__ void soft_topk_backward_first_kernel(const TopkArgs a, const float* __restrict__ d_s_tilde,
                                                const TopkGrad g, double* __restrict__ partial_du,
                                                double* __restrict__ partial_relu) {
  __shared__ double shared[kWarp];
  const int b = blockIdx.y;
  const int T = a.iterations;
  const float aT = g.history[b * T + T - 1];
  const std::int64_t j1 = min(std::int64_t{blockIdx.x + 1} * kChunk, a.n);
  double sum_du = 0.0, sum_relu = 0.0;
  for (std::int64_t j = std::int64_t{blockIdx.x} * kChunk + threadIdx.x; j < j1; j += blockDim.x) {
    const std::int64_t i = b * a.n + j;
    const float x = __fadd_rn(a.s[i], aT);
    const float st = expf(__fdiv_rn(__fsub_rn(x, relu(x)), a.epsilon));
    const float du = __fdiv_rn(__fmul_rn(d_s_tilde[i], st), a.epsilon);
    float ds = du;
    sum_du += du;
    if (x > 0.0f) {
      ds = __fsub_rn(ds, du);
      sum_relu -= du;
    }
    if (T == 1) {
      g.d_s[i] = __fadd_rn(g.d_s[i], ds);
    } else {
      g.ds[i] = ds;
      g.db[i] = du;
    }
  }
  sum_du = block_sum(sum_du, shared);
  sum_relu = block_sum(sum_relu, shared);
  if (threadIdx.x == 0) {
    partial_du[b * gridDim.x + blockIdx.x] = sum_du;
    partial_relu[b * gridDim.x + blockIdx.x] = sum_relu;
  }
}

// Iteration t (T >= t >= 2): the all-reduced adjoint of a^t reaches s and b^{t-1} through the softmax,
// then the relu step of iteration t - 1; per-chunk sums of that step's share of the adjoint of a^{t-1}.
// For t = 2 the recursion ends (a^1 is constant) and ds is added into d_s.
__global__ void soft_topk_backward_step_kernel(const TopkArgs a, int t, const float* __restrict__ sums,
                                               const TopkGrad g, double* __restrict__ partial) {
  __shared__ double shared[kWarp];
  const int b = blockIdx.y;
  const int T = a.iterations;
  const float da = sums[b];
  const float prev = g.history[b * T + t - 2];
  const float lse = __fsub_rn(a.log_k, __fdiv_rn(g.history[b * T + t - 1], a.epsilon));
  const bool last = t == 2;
  const std::int64_t j1 = min(std::int64_t{blockIdx.x + 1} * kChunk, a.n);
  double sum = 0.0;
  for (std::int64_t j = std::int64_t{blockIdx.x} * kChunk + threadIdx.x; j < j1; j += blockDim.x) {
    const std::int64_t i = b * a.n + j;
    const float sj = a.s[i];
    const float x = __fadd_rn(sj, prev);
    const float pj = expf(__fsub_rn(__fdiv_rn(__fsub_rn(sj, relu(x)), a.epsilon), lse));
    const float dp = __fmul_rn(da, pj);
    float ds = __fsub_rn(g.ds[i], dp);
    const float db = -dp;
    if (x > 0.0f) {
      ds = __fsub_rn(ds, db);
      sum -= db;
    }
    if (last) {
      g.d_s[i] = __fadd_rn(g.d_s[i], ds);
    } else {
      g.ds[i] = ds;
      g.db[i] = db;
    }
  }
  if (last) return;
  sum = block_sum(sum, shared);
  if (threadIdx.x == 0) partial[b * gridDim.x + blockIdx.x] = sum;
}

// --- Hard top-k ---

// flags[b, j] = 1 for the k best tokens of each sequence (the first k of its order).
__global__ void mark_top_kernel(const std::int32_t* __restrict__ order, std::int64_t n, int k, std::int64_t count,
                                std::int32_t* __restrict__ flags) {
  for (std::int64_t i = blockIdx.x * std::int64_t{blockDim.x} + threadIdx.x; i < count;
       i += std::int64_t{gridDim.x} * blockDim.x)
    if (i % n < k) flags[i / n * n + order[i]] = 1;
}

// Every sequence has exactly k flags, so the exclusive scan over all of them puts sequence b's tokens
// at [b k, (b + 1) k), in increasing token order.
__global__ void scatter_top_kernel(const std::int32_t* __restrict__ flags, const std::int32_t* __restrict__ position,
                                   std::int64_t n, std::int64_t count, std::int32_t* __restrict__ top) {
  for (std::int64_t i = blockIdx.x * std::int64_t{blockDim.x} + threadIdx.x; i < count;
       i += std::int64_t{gridDim.x} * blockDim.x)
    if (flags[i]) top[position[i]] = static_cast<std::int32_t>(i % n);
}

void hard_topk(const float* s, int batch, std::int64_t n, int k, std::int32_t* top, cudaStream_t stream) {
  const std::int64_t count = std::int64_t{batch} * n;
  RINGCAST_CHECK(count <= INT32_MAX, "soft_topk on CUDA: the hard top-k of {} x {} tokens exceeds 32-bit positions",
                 batch, n);
  const Scratch<std::int32_t> order(static_cast<std::size_t>(count), stream);
  const Scratch<std::int32_t> flags(static_cast<std::size_t>(count), stream);
  const Scratch<std::int32_t> position(static_cast<std::size_t>(count), stream);
  detail::order_by_score(s, batch, n, order.get(), stream);
  RINGCAST_CUDA_CHECK(cudaMemsetAsync(flags.get(), 0, static_cast<std::size_t>(count) * sizeof(std::int32_t), stream));
  mark_top_kernel<<<grid_for(count), kThreads, 0, stream>>>(order.get(), n, k, count, flags.get());
  RINGCAST_CUDA_CHECK_LAUNCH();
  std::size_t bytes = 0;
  RINGCAST_CUDA_CHECK(cub::DeviceScan::ExclusiveSum(nullptr, bytes, flags.get(), position.get(), count, stream));
  const Scratch<unsigned char> temp(bytes, stream);
  RINGCAST_CUDA_CHECK(cub::DeviceScan::ExclusiveSum(temp.get(), bytes, flags.get(), position.get(), count, stream));
  scatter_top_kernel<<<grid_for(count), kThreads, 0, stream>>>(flags.get(), position.get(), n, count, top);
  RINGCAST_CUDA_CHECK_LAUNCH();
}

void all_reduce(const SliceAllReduce& r, float* values, int count, ReduceOp op) {
  if (r.fn) r.fn(values, count, op, r.user);
}

dim3 topk_grid(int batch, std::int64_t n) {
  RINGCAST_CHECK(batch <= 65535 && chunks_of(n) <= INT_MAX, "soft_topk on CUDA: {} sequences of {} tokens exceed the grid",
                 batch, n);
  return {static_cast<unsigned>(chunks_of(n)), static_cast<unsigned>(batch)};
}

void finish(const double* first, const double* second, const float* max_part, int chunks, int batch, float* sums,
            float* s_max, cudaStream_t stream) {
  const int warps_per_block = kThreads / kWarp;
  soft_topk_finish_kernel<<<(batch + warps_per_block - 1) / warps_per_block, kThreads, 0, stream>>>(
      first, second, max_part, chunks, batch, sums, s_max);
  RINGCAST_CUDA_CHECK_LAUNCH();
}

}  // namespace

void router_scores(const RouterScoreParams& p, const ExecContext& ctx) {
  const auto stream = static_cast<cudaStream_t>(ctx.stream);
  const std::int64_t rows = p.batch * p.seq;
  router_scores_kernel<<<grid_for(rows * kWarp), kThreads, 0, stream>>>(p.x, p.u, rows, p.dim, p.s);
  RINGCAST_CUDA_CHECK_LAUNCH();
}

void router_scores_backward(const RouterScoreBackwardParams& p, const ExecContext& ctx) {
  const auto stream = static_cast<cudaStream_t>(ctx.stream);
  const std::int64_t rows = p.batch * p.seq;
  router_input_grad_kernel<<<grid_for(rows * p.dim), kThreads, 0, stream>>>(p.u, p.d_s, rows * p.dim, p.dim, p.d_x);
  RINGCAST_CUDA_CHECK_LAUNCH();
  const Scratch<float> partial(static_cast<std::size_t>(column_partials_count(1, rows, p.dim)), stream);
  column_sums(RouterWeightGrad{p.x, p.d_s, p.dim}, 1, rows, p.dim, partial.get(), 1.0f, true, p.d_u, stream);
}

void soft_topk(const SoftTopkParams& p, const ExecContext& ctx) {
  const auto stream = static_cast<cudaStream_t>(ctx.stream);
  const dim3 grid = topk_grid(p.batch, p.seq);
  const int chunks = static_cast<int>(grid.x);
  const TopkArgs a{p.s, p.seq, p.iterations, p.epsilon, std::log(static_cast<float>(p.k))};
  const auto per_chunk = static_cast<std::size_t>(p.batch) * chunks;
  const Scratch<double> partial_sum(per_chunk, stream);
  const Scratch<float> partial_max(per_chunk, stream);
  const Scratch<float> sums(static_cast<std::size_t>(p.batch), stream);
  const Scratch<float> s_max(static_cast<std::size_t>(p.batch), stream);
  for (int t = 0; t < p.iterations; ++t) {
    soft_topk_sum_kernel<<<grid, kThreads, 0, stream>>>(a, t, s_max.get(), sums.get(), p.a_history,
                                                        partial_sum.get(), partial_max.get());
    RINGCAST_CUDA_CHECK_LAUNCH();
    finish(nullptr, partial_sum.get(), t == 0 ? partial_max.get() : nullptr, chunks, p.batch, sums.get(),
           s_max.get(), stream);
    if (t == 0) all_reduce(p.reduce, s_max.get(), p.batch, ReduceOp::kMax);
    all_reduce(p.reduce, sums.get(), p.batch, ReduceOp::kSum);
  }
  soft_topk_output_kernel<<<grid, kThreads, 0, stream>>>(a, s_max.get(), sums.get(), p.a_history, p.s_tilde);
  RINGCAST_CUDA_CHECK_LAUNCH();
  if (p.top_indices) hard_topk(p.s, p.batch, p.seq, p.k, p.top_indices, stream);
}

void soft_topk_backward(const SoftTopkBackwardParams& p, const ExecContext& ctx) {
  const auto stream = static_cast<cudaStream_t>(ctx.stream);
  const dim3 grid = topk_grid(p.batch, p.seq);
  const int chunks = static_cast<int>(grid.x);
  const TopkArgs a{p.s, p.seq, p.iterations, p.epsilon, std::log(static_cast<float>(p.k))};
  const auto tokens = static_cast<std::size_t>(p.batch * p.seq);
  const auto per_chunk = static_cast<std::size_t>(p.batch) * chunks;
  const bool steps = p.iterations > 1;  // T = 1: the first kernel finishes the gradient
  const Scratch<float> ds(steps ? tokens : 0, stream);
  const Scratch<float> db(steps ? tokens : 0, stream);
  const Scratch<double> partial_du(per_chunk, stream);
  const Scratch<double> partial(per_chunk, stream);
  const Scratch<float> sums(static_cast<std::size_t>(p.batch), stream);
  const TopkGrad g{p.a_history, ds.get(), db.get(), p.d_s};
  soft_topk_backward_first_kernel<<<grid, kThreads, 0, stream>>>(a, p.d_s_tilde, g, partial_du.get(), partial.get());
  RINGCAST_CUDA_CHECK_LAUNCH();
  for (int t = p.iterations; t >= 2; --t) {
    finish(t == p.iterations ? partial_du.get() : nullptr, partial.get(), nullptr, chunks, p.batch, sums.get(),
           nullptr, stream);
    all_reduce(p.reduce, sums.get(), p.batch, ReduceOp::kSum);
    soft_topk_backward_step_kernel<<<grid, kThreads, 0, stream>>>(a, t, sums.get(), g, partial.get());
    RINGCAST_CUDA_CHECK_LAUNCH();
  }
}

}  // namespace ringcast::kernels::cuda
