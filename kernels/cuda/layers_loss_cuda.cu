// Linear head + cross-entropy on CUDA, chunk_rows tokens at a time: one cuBLAS product makes the
// chunk's logits in the stream's scratch; one block per row turns them, in place, into the row's loss
// and d logits = loss_scale (softmax - onehot) (and their bf16 copy for bf16 products); two more
// products take them to d_h and d_w, and the column sums to d_bias. Each row's loss and flags stay in
// scratch until one block sums them, in a fixed order and in float64, into the device totals.
#include "layers_cuda.hpp"
#include "layers_cuda.cuh"

#include <climits>
#include <cmath>

namespace ringcast::kernels::cuda {
namespace {

constexpr int kRowThreads = 256;
constexpr int kTotalsThreads = 1024;
constexpr std::uint8_t kCounted = 1;
constexpr std::uint8_t kCorrect = 2;

struct RowArgs {
  float* logits;                 // [n, vocab] of the chunk; becomes d logits when `grad`
  __nv_bfloat16* d_logits_bf16;  // [n, vocab] copy of d logits, or null
  const float* bias;             // [vocab], or null
  const std::int32_t* targets;   // the chunk's
  float* row_loss;               // the chunk's
  std::uint8_t* row_flags;       // the chunk's: kCounted | kCorrect
  std::int64_t vocab;
  float scale;
  bool grad;
};

// The larger value, and on ties the lower index (the CPU backend's argmax).
__device__ void keep_best(float& value, std::int64_t& index, float other_value, std::int64_t other_index) {
  if (other_value > value || (other_value == value && other_index < index)) {
    value = other_value;
    index = other_index;
  }
}

__device__ void block_argmax(float& value, std::int64_t& index, float* shared_value, std::int64_t* shared_index) {
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  for (int offset = kWarp / 2; offset > 0; offset /= 2)
    keep_best(value, index, __shfl_down_sync(0xffffffffu, value, offset),
              __shfl_down_sync(0xffffffffu, static_cast<long long>(index), offset));
  if (lane == 0) {
    shared_value[warp] = value;
    shared_index[warp] = index;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    for (int w = 1; w < kRowThreads / kWarp; ++w) keep_best(value, index, shared_value[w], shared_index[w]);
    shared_value[0] = value;
    shared_index[0] = index;
  }
  __syncthreads();
  value = shared_value[0];
  index = shared_index[0];
}

__global__ void __launch_bounds__(kRowThreads) softmax_rows_kernel(const RowArgs a) {
  __shared__ float shared_value[kWarp];
  __shared__ std::int64_t shared_index[kWarp];
  __shared__ float shared_sum[kWarp];
  const std::int64_t row = blockIdx.x;
  float* z = a.logits + row * a.vocab;
  __nv_bfloat16* z16 = a.d_logits_bf16 ? a.d_logits_bf16 + row * a.vocab : nullptr;
  const std::int32_t target = a.targets[row];
  if (target < 0) {  // ignored: no loss, zero d logits
    if (a.grad)
      for (std::int64_t j = threadIdx.x; j < a.vocab; j += blockDim.x) {
        z[j] = 0.0f;
        if (z16) z16[j] = __float2bfloat16_rn(0.0f);
      }
    if (threadIdx.x == 0) {
      a.row_loss[row] = 0.0f;
      a.row_flags[row] = 0;
    }
    return;
  }
  // Each thread keeps the first maximum of its columns j = tid, tid + blockDim, ...; the merge then
  // prefers the lower index, which makes the block's argmax the lowest index of the row's maximum.
  float best = -INFINITY;
  std::int64_t best_j = INT64_MAX;
  for (std::int64_t j = threadIdx.x; j < a.vocab; j += blockDim.x) {
    float v = z[j];
    if (a.bias) z[j] = v = v + a.bias[j];
    if (best_j == INT64_MAX || v > best) {
      best = v;
      best_j = j;
    }
  }
  block_argmax(best, best_j, shared_value, shared_index);
  float sum = 0.0f;
  for (std::int64_t j = threadIdx.x; j < a.vocab; j += blockDim.x) sum += expf(z[j] - best);
  sum = block_sum(sum, shared_sum);  // its barriers also publish the biased logits to thread 0
  const float lse = best + logf(sum);
  const bool valid = target < a.vocab;  // a bad target poisons the loss and gradients (layers.hpp)
  if (threadIdx.x == 0) {
    a.row_loss[row] = valid ? lse - z[target] : NAN;
    a.row_flags[row] = static_cast<std::uint8_t>(kCounted | (best_j == target ? kCorrect : 0));
  }
  if (!a.grad) return;
  __syncthreads();  // thread 0 has read z[target]
  for (std::int64_t j = threadIdx.x; j < a.vocab; j += blockDim.x) {
    float d = a.scale * expf(z[j] - lse);
    if (j == target) d -= a.scale;
    if (!valid) d = NAN;
    z[j] = d;
    if (z16) z16[j] = __float2bfloat16_rn(d);
  }
}

__global__ void __launch_bounds__(kTotalsThreads)
    totals_kernel(const float* __restrict__ row_loss, const std::uint8_t* __restrict__ row_flags, std::int64_t rows,
                  CrossEntropyTotals* totals) {
  __shared__ double shared_loss[kWarp];
  __shared__ long long shared_count[kWarp];
  double loss = 0.0;
  long long count = 0, correct = 0;
  for (std::int64_t r = threadIdx.x; r < rows; r += blockDim.x) {
    if (!(row_flags[r] & kCounted)) continue;
    loss += row_loss[r];
    ++count;
    correct += (row_flags[r] & kCorrect) != 0;
  }
  loss = block_sum(loss, shared_loss);
  count = block_sum(count, shared_count);
  correct = block_sum(correct, shared_count);
  if (threadIdx.x == 0) {
    totals->loss_sum = loss;
    totals->count = count;
    totals->correct = correct;
  }
}

struct BiasGradTerm {
  const float* d_logits;
  std::int64_t vocab;
  __device__ float operator()(int, std::int64_t r, int c) const { return d_logits[r * vocab + c]; }
};

}  // namespace

void linear_cross_entropy(const LinearCrossEntropyParams& p, const ExecContext& ctx) {
  StreamLease lease(ctx);
  const cudaStream_t stream = lease.stream();
  if (p.rows == 0) {
    RINGCAST_CUDA_CHECK(cudaMemsetAsync(p.totals, 0, sizeof(CrossEntropyTotals), stream));
    return;
  }
  const bool grad = p.d_h != nullptr;
  const bool bf16 = p.dtype == DType::kBF16;
  const Math math = math_of(p.dtype, p.allow_tf32);
  const std::int64_t dim = p.dim, vocab = p.vocab;
  const std::int64_t chunk = std::min(p.chunk_rows, p.rows);
  RINGCAST_CHECK(chunk <= INT_MAX, "linear_cross_entropy on CUDA: chunk_rows {} exceed the grid (one block per row)",
                 chunk);

  ScratchLayout layout;
  const auto logits_at = layout.add<float>(chunk * vocab);
  const auto loss_at = layout.add<float>(p.rows);
  const auto flags_at = layout.add<std::uint8_t>(p.rows);
  const auto partial_at =
      layout.add<float>(grad && p.d_bias ? column_partials_count(1, chunk, static_cast<int>(vocab)) : 0);
  const auto w16_at = layout.add<__nv_bfloat16>(bf16 ? vocab * dim : 0);
  const auto h16_at = layout.add<__nv_bfloat16>(bf16 ? chunk * dim : 0);
  const auto z16_at = layout.add<__nv_bfloat16>(bf16 && grad ? chunk * vocab : 0);
  std::byte* base = lease.scratch(layout.bytes());
  float* logits = ScratchLayout::at<float>(base, logits_at);
  float* row_loss = ScratchLayout::at<float>(base, loss_at);
  std::uint8_t* row_flags = ScratchLayout::at<std::uint8_t>(base, flags_at);
  auto* w16 = ScratchLayout::at<__nv_bfloat16>(base, w16_at);
  auto* h16 = ScratchLayout::at<__nv_bfloat16>(base, h16_at);
  auto* z16 = ScratchLayout::at<__nv_bfloat16>(base, z16_at);
  if (bf16) round_to_bf16(p.w, vocab * dim, w16, stream);
  const void* w = bf16 ? static_cast<const void*>(w16) : p.w;

  for (std::int64_t r0 = 0; r0 < p.rows; r0 += chunk) {
    const std::int64_t n = std::min(chunk, p.rows - r0);
    const float* h_chunk = p.h + r0 * dim;
    if (bf16) round_to_bf16(h_chunk, n * dim, h16, stream);
    const void* h = bf16 ? static_cast<const void*>(h16) : h_chunk;
    matmul(lease, math, false, true, n, vocab, dim, h, dim, w, dim, 0.0f, logits, vocab);
    const RowArgs args{.logits = logits,
                       .d_logits_bf16 = bf16 && grad ? z16 : nullptr,
                       .bias = p.bias,
                       .targets = p.targets + r0,
                       .row_loss = row_loss + r0,
                       .row_flags = row_flags + r0,
                       .vocab = vocab,
                       .scale = p.loss_scale,
                       .grad = grad};
    softmax_rows_kernel<<<static_cast<unsigned>(n), kRowThreads, 0, stream>>>(args);
    RINGCAST_CUDA_CHECK_LAUNCH();
    if (!grad) continue;
    const void* d_logits = bf16 ? static_cast<const void*>(z16) : logits;
    matmul(lease, math, false, false, n, dim, vocab, d_logits, vocab, w, dim, 1.0f, p.d_h + r0 * dim, dim);
    matmul(lease, math, true, false, vocab, dim, n, d_logits, vocab, h, dim, 1.0f, p.d_w, dim);
    if (p.d_bias)
      column_sums(BiasGradTerm{logits, vocab}, 1, n, static_cast<int>(vocab),
                  ScratchLayout::at<float>(base, partial_at), 1.0f, true, p.d_bias, stream);
  }
  totals_kernel<<<1, kTotalsThreads, 0, stream>>>(row_loss, row_flags, p.rows, p.totals);
  RINGCAST_CUDA_CHECK_LAUNCH();
}

}  // namespace ringcast::kernels::cuda
