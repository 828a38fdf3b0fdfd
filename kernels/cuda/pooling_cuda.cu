// CUDA successive-halving pooling (pooling.hpp). A round orders tokens by score with a stable radix
// sort (the CPU's stable_sort), plans its slots (rank i with m-1-i; with sort_back, slots in input
// order of their top member, by an exclusive scan) and merges, a thread per output element. The
// backward replays the rounds into stream-ordered scratch and walks them back, a block per slot: each
// input belongs to one slot, so there are no races, and dot products are fixed-order block sums.
#include <ringcast/cuda_check.hpp>
#include <ringcast/error.hpp>

#include <cub/device/device_scan.cuh>
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>
#include <vector>

#include "layers_cuda.cuh"
#include "seed_cuda.hpp"
#include "seed_device.cuh"
#include "selection_launch.hpp"

namespace ringcast::kernels::cuda {
namespace {

using detail::Scratch;

constexpr int kSlotThreads = 128;  // threads per output slot in the backward

// Output slot `pos` of a round (in output order) merges round inputs first[pos] and second[pos];
// second = -1: first passes through. [B, m_out] each.
struct Plan {
  std::int32_t* first;
  std::int32_t* second;
};

// flags[b, j] = 1 when token j of sequence b is the top member of a slot: its rank is below m_out.
__global__ void top_member_flags_kernel(const std::int32_t* __restrict__ order, std::int64_t m, std::int64_t m_out,
                                        std::int64_t count, std::int32_t* __restrict__ flags) {
  for (std::int64_t i = blockIdx.x * std::int64_t{blockDim.x} + threadIdx.x; i < count;
       i += std::int64_t{gridDim.x} * blockDim.x)
    flags[i / m * m + order[i]] = i % m < m_out ? 1 : 0;
}

// Slot o pairs ranks o and m-1-o (the median, o = m/2 with m odd, passes through). With sort_back it
// goes where its top member's index ranks among the top members: position[b, first] - b m_out, as
// every sequence has exactly m_out top members; otherwise it stays at o.
__global__ void plan_kernel(const std::int32_t* __restrict__ order, const std::int32_t* __restrict__ position,
                            std::int64_t m, std::int64_t m_out, std::int64_t slots, Plan plan) {
  for (std::int64_t i = blockIdx.x * std::int64_t{blockDim.x} + threadIdx.x; i < slots;
       i += std::int64_t{gridDim.x} * blockDim.x) {
    const std::int64_t b = i / m_out, o = i % m_out;
    const std::int32_t* ob = order + b * m;
    const std::int32_t first = ob[o];
    const std::int64_t pos = position ? position[b * m + first] - b * m_out : o;
    plan.first[b * m_out + pos] = first;
    plan.second[b * m_out + pos] = o < m / 2 ? ob[m - 1 - o] : -1;
  }
}

// softmax(s_a ln β, s_b ln β) as two sigmoids, each accurate when the other is close to 1.
struct PairWeights {
  float a;
  float b;
};
__device__ PairWeights pair_weights(float s_a, float s_b, float log_beta) {
  const float x = __fmul_rn(__fsub_rn(s_a, s_b), log_beta);
  return {__fdiv_rn(1.0f, __fadd_rn(1.0f, expf(-x))), __fdiv_rn(1.0f, __fadd_rn(1.0f, expf(x)))};
}

// Geometry of one round of B sequences: m inputs and m_out outputs each, dim channels.
struct RoundShape {
  int batch;
  std::int64_t m, m_out;
  int dim;
  float log_beta;
};

__global__ void merge_kernel(const RoundShape r, const float* __restrict__ e, const float* __restrict__ s,
                             const Plan plan, float* __restrict__ e_out, float* __restrict__ s_out) {
  const std::int64_t total = r.batch * r.m_out * r.dim;
  for (std::int64_t i = blockIdx.x * std::int64_t{blockDim.x} + threadIdx.x; i < total;
       i += std::int64_t{gridDim.x} * blockDim.x) {
    const int c = static_cast<int>(i % r.dim);
    const std::int64_t slot = i / r.dim;
    const std::int64_t b = slot / r.m_out;
    const float* sb = s + b * r.m;
    const float* eb = e + b * r.m * r.dim;
    const std::int64_t ia = plan.first[slot], ib = plan.second[slot];
    if (ib < 0) {
      e_out[i] = eb[ia * r.dim + c];
      if (c == 0) s_out[slot] = sb[ia];
      continue;
    }
    const PairWeights w = pair_weights(sb[ia], sb[ib], r.log_beta);
    e_out[i] = __fadd_rn(__fmul_rn(w.a, eb[ia * r.dim + c]), __fmul_rn(w.b, eb[ib * r.dim + c]));
    if (c == 0) s_out[slot] = __fadd_rn(__fmul_rn(w.a, sb[ia]), __fmul_rn(w.b, sb[ib]));
  }
}

// Adds the gradients of a round's inputs (d_e, d_s) given those of its outputs; one block per slot.
__global__ void merge_backward_kernel(const RoundShape r, const float* __restrict__ e, const float* __restrict__ s,
                                      const Plan plan, const float* __restrict__ d_e_out,
                                      const float* __restrict__ d_s_out, float* __restrict__ d_e,
                                      float* __restrict__ d_s) {
  __shared__ float shared[kWarp];
  const std::int64_t slots = r.batch * r.m_out;
  for (std::int64_t slot = blockIdx.x; slot < slots; slot += gridDim.x) {  // block-uniform
    const std::int64_t b = slot / r.m_out;
    const std::int64_t ia = b * r.m + plan.first[slot];
    const float* deo = d_e_out + slot * r.dim;
    float* dea = d_e + ia * r.dim;
    if (plan.second[slot] < 0) {
      for (int c = threadIdx.x; c < r.dim; c += blockDim.x) dea[c] = __fadd_rn(dea[c], deo[c]);
      if (threadIdx.x == 0) d_s[ia] = __fadd_rn(d_s[ia], d_s_out[slot]);
      continue;
    }
    const std::int64_t ib = b * r.m + plan.second[slot];
    const float* ea = e + ia * r.dim;
    const float* eb = e + ib * r.dim;
    float* deb = d_e + ib * r.dim;
    const PairWeights w = pair_weights(s[ia], s[ib], r.log_beta);
    float dot_a = 0.0f, dot_b = 0.0f;
    for (int c = threadIdx.x; c < r.dim; c += blockDim.x) {
      dot_a = __fadd_rn(dot_a, __fmul_rn(deo[c], ea[c]));
      dot_b = __fadd_rn(dot_b, __fmul_rn(deo[c], eb[c]));
      dea[c] = __fadd_rn(dea[c], __fmul_rn(w.a, deo[c]));
      deb[c] = __fadd_rn(deb[c], __fmul_rn(w.b, deo[c]));
    }
    dot_a = block_sum(dot_a, shared);
    dot_b = block_sum(dot_b, shared);
    if (threadIdx.x == 0) {
      const float dso = d_s_out[slot];
      const float dwa = __fadd_rn(__fmul_rn(dso, s[ia]), dot_a);
      const float dwb = __fadd_rn(__fmul_rn(dso, s[ib]), dot_b);
      // w_a = σ(x), w_b = σ(-x), x = (s_a - s_b) ln β.
      const float dx = __fmul_rn(__fmul_rn(__fsub_rn(dwa, dwb), w.a), w.b);
      d_s[ia] = __fadd_rn(d_s[ia], __fadd_rn(__fmul_rn(w.a, dso), __fmul_rn(dx, r.log_beta)));
      d_s[ib] = __fadd_rn(d_s[ib], __fsub_rn(__fmul_rn(w.b, dso), __fmul_rn(dx, r.log_beta)));
    }
  }
}

// Sizes m_0 = n, m_{r+1} = ceil(m_r / 2) of every round's input, and the last round's output.
std::vector<std::int64_t> round_sizes(const HalvingShape& sh) {
  std::vector<std::int64_t> m{sh.seq};
  for (int r = 0; r < sh.rounds; ++r) m.push_back((m.back() + 1) / 2);
  return m;
}

void plan_round(const float* s, const RoundShape& r, bool sort_back, const Plan& plan, cudaStream_t stream) {
  const std::int64_t count = r.batch * r.m;
  RINGCAST_CHECK(count <= INT32_MAX, "halving_pool on CUDA: {} x {} tokens exceed 32-bit positions", r.batch, r.m);
  const Scratch<std::int32_t> order(static_cast<std::size_t>(count), stream);
  detail::order_by_score(s, r.batch, r.m, order.get(), stream);
  const Scratch<std::int32_t> flags(sort_back ? static_cast<std::size_t>(count) : 0, stream);
  const Scratch<std::int32_t> position(sort_back ? static_cast<std::size_t>(count) : 0, stream);
  if (sort_back) {
    top_member_flags_kernel<<<grid_for(count), kThreads, 0, stream>>>(order.get(), r.m, r.m_out, count, flags.get());
    RINGCAST_CUDA_CHECK_LAUNCH();
    std::size_t bytes = 0;
    RINGCAST_CUDA_CHECK(cub::DeviceScan::ExclusiveSum(nullptr, bytes, flags.get(), position.get(), count, stream));
    const Scratch<unsigned char> temp(bytes, stream);
    RINGCAST_CUDA_CHECK(
        cub::DeviceScan::ExclusiveSum(temp.get(), bytes, flags.get(), position.get(), count, stream));
  }
  const std::int64_t slots = r.batch * r.m_out;
  plan_kernel<<<grid_for(slots), kThreads, 0, stream>>>(order.get(), sort_back ? position.get() : nullptr, r.m,
                                                        r.m_out, slots, plan);
  RINGCAST_CUDA_CHECK_LAUNCH();
}

void merge(const RoundShape& r, const float* e, const float* s, const Plan& plan, float* e_out, float* s_out,
           cudaStream_t stream) {
  merge_kernel<<<grid_for(r.batch * r.m_out * r.dim), kThreads, 0, stream>>>(r, e, s, plan, e_out, s_out);
  RINGCAST_CUDA_CHECK_LAUNCH();
}

RoundShape round_shape(const HalvingShape& sh, const std::vector<std::int64_t>& m, int round) {
  return {sh.batch, m[round], m[round + 1], sh.dim, std::log(sh.beta)};
}

}  // namespace

void halving_pool(const HalvingParams& p, const ExecContext& ctx) {
  const HalvingShape& sh = p.shape;
  const auto stream = static_cast<cudaStream_t>(ctx.stream);
  const std::vector<std::int64_t> m = round_sizes(sh);
  // Intermediate rounds alternate between two buffers of the first round's output size.
  const auto tokens = static_cast<std::size_t>(sh.batch * (sh.rounds > 1 ? m[1] : 0));
  const Scratch<float> e_buf(2 * tokens * sh.dim, stream), s_buf(2 * tokens, stream);
  const Scratch<std::int32_t> first(static_cast<std::size_t>(sh.batch * m[1]), stream);
  const Scratch<std::int32_t> second(static_cast<std::size_t>(sh.batch * m[1]), stream);
  const Plan plan{first.get(), second.get()};
  const float* e = p.e;
  const float* s = p.s;
  for (int r = 0; r < sh.rounds; ++r) {
    const RoundShape rs = round_shape(sh, m, r);
    const bool last = r + 1 == sh.rounds;
    float* e_out = last ? p.e_out : e_buf.get() + (r % 2) * tokens * sh.dim;
    float* s_out = last ? p.s_out : s_buf.get() + (r % 2) * tokens;
    plan_round(s, rs, sh.sort_back, plan, stream);
    merge(rs, e, s, plan, e_out, s_out, stream);
    e = e_out;
    s = s_out;
  }
}

void halving_pool_backward(const HalvingBackwardParams& p, const ExecContext& ctx) {
  const HalvingShape& sh = p.shape;
  const auto stream = static_cast<cudaStream_t>(ctx.stream);
  const int dim = sh.dim;
  const std::vector<std::int64_t> m = round_sizes(sh);
  // Replay: every round's plan, and the inputs of rounds 1.. (round 0 reads p.e, p.s), packed.
  std::vector<std::int64_t> plan_at{0}, input_at{0};
  for (int r = 0; r < sh.rounds; ++r) {
    plan_at.push_back(plan_at.back() + sh.batch * m[r + 1]);
    input_at.push_back(input_at.back() + (r > 0 ? sh.batch * m[r] : 0));
  }
  const Scratch<std::int32_t> first(static_cast<std::size_t>(plan_at.back()), stream);
  const Scratch<std::int32_t> second(static_cast<std::size_t>(plan_at.back()), stream);
  const Scratch<float> e_in(static_cast<std::size_t>(input_at.back() * dim), stream);
  const Scratch<float> s_in(static_cast<std::size_t>(input_at.back()), stream);
  const auto plan = [&](int r) { return Plan{first.get() + plan_at[r], second.get() + plan_at[r]}; };
  const auto round_e = [&](int r) { return r == 0 ? p.e : e_in.get() + input_at[r] * dim; };
  const auto round_s = [&](int r) { return r == 0 ? p.s : s_in.get() + input_at[r]; };
  for (int r = 0; r < sh.rounds; ++r) {
    const RoundShape rs = round_shape(sh, m, r);
    plan_round(round_s(r), rs, sh.sort_back, plan(r), stream);
    if (r + 1 < sh.rounds)
      merge(rs, round_e(r), round_s(r), plan(r), e_in.get() + input_at[r + 1] * dim, s_in.get() + input_at[r + 1],
            stream);
  }

  // Walk back: round r > 0 writes its inputs' gradients into a zeroed buffer (two alternate, each of the
  // first round's output size); round 0 adds into the caller's.
  const auto tokens = static_cast<std::size_t>(sh.batch * (sh.rounds > 1 ? m[1] : 0));
  const Scratch<float> d_e_buf(2 * tokens * dim, stream), d_s_buf(2 * tokens, stream);
  const float* d_e_out = p.d_e_out;
  const float* d_s_out = p.d_s_out;
  for (int r = sh.rounds - 1; r >= 0; --r) {
    const RoundShape rs = round_shape(sh, m, r);
    float* d_e = p.d_e;
    float* d_s = p.d_s;
    if (r > 0) {
      d_e = d_e_buf.get() + (r % 2) * tokens * dim;
      d_s = d_s_buf.get() + (r % 2) * tokens;
      const auto count = static_cast<std::size_t>(sh.batch * m[r]);
      RINGCAST_CUDA_CHECK(cudaMemsetAsync(d_e, 0, count * dim * sizeof(float), stream));
      RINGCAST_CUDA_CHECK(cudaMemsetAsync(d_s, 0, count * sizeof(float), stream));
    }
    const std::int64_t slots = sh.batch * m[r + 1];
    merge_backward_kernel<<<static_cast<unsigned>(std::min<std::int64_t>(slots, std::int64_t{1} << 16)),
                            kSlotThreads, 0, stream>>>(rs, round_e(r), round_s(r), plan(r), d_e_out, d_s_out, d_e,
                                                       d_s);
    RINGCAST_CUDA_CHECK_LAUNCH();
    d_e_out = d_e;
    d_s_out = d_s;
  }
}

}  // namespace ringcast::kernels::cuda
