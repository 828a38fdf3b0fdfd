// CUDA CAST building blocks (cast.hpp). Products over all tokens (affinities, the mix's W·R_inter and
// their gradients) are exact-fp32 cuBLAS calls in the CPU backend's order. Membership work runs a warp
// per cluster or per token; a token finds its clusters in increasing order by binary search in the
// (increasing) member lists, so sums over memberships take the CPU's order with no atomics. The
// assignment repeats the CPU's arithmetic (exp in double, rounded: glibc's expf but in vanishingly rare
// cases), so it is the CPU's; the single-assignment greedy is sequential, a warp per (b, KV head).
#include <ringcast/cuda_check.hpp>
#include <ringcast/error.hpp>

#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <cmath>
#include <cstdint>

#include "layers_cuda.cuh"
#include "seed_cuda.hpp"
#include "seed_device.cuh"
#include "selection_launch.hpp"

namespace ringcast::kernels::cuda {
namespace {

using detail::Scratch;

constexpr unsigned kFull = 0xffffffffu;
constexpr int kWarpsPerBlock = kThreads / kWarp;
// The single-assignment greedy keeps each cluster's fill in shared memory, the summaries a warp's
// member softmax (three floats or indices per member, kWarpsPerBlock warps); 48 KiB bound both.
constexpr int kMaxClusters = 12288;
constexpr int kMaxPageSize = 512;

// CastShape with the addressing of cast_cpu.cpp's CastIndex, usable on the device. (b, KV head) pairs
// are numbered seg = b * kv_heads + hk.
struct Cast {
  std::int64_t n, summary_rows;
  int batch, heads, kv_heads, d, c, ps, g;

  __host__ __device__ std::int64_t q_ld() const { return std::int64_t{heads} * d; }
  __host__ __device__ std::int64_t kv_ld() const { return std::int64_t{kv_heads} * d; }
  __host__ __device__ std::int64_t q_row(std::int64_t b, std::int64_t i, int h) const {
    return ((b * n + i) * heads + h) * d;
  }
  __host__ __device__ std::int64_t kv_row(std::int64_t b, std::int64_t i, int hk) const {
    return ((b * n + i) * kv_heads + hk) * d;
  }
  __host__ __device__ std::int64_t a_q(std::int64_t b, int h) const { return (b * heads + h) * n * c; }
  __host__ __device__ std::int64_t a_k(std::int64_t b, int hk) const { return (b * kv_heads + hk) * n * c; }
  __host__ __device__ std::int64_t surrogates(int hk) const { return std::int64_t{hk} * c * d; }
  __host__ __device__ std::int64_t cluster(std::int64_t seg, int cl) const { return seg * c + cl; }
  __host__ __device__ std::int64_t member(std::int64_t seg, int cl) const { return cluster(seg, cl) * ps; }
  __host__ __device__ std::int64_t gathered_q_row(std::int64_t b, int cl, int slot, int h) const {
    return ((b * c * std::int64_t{ps} + std::int64_t{cl} * ps + slot) * heads + h) * d;
  }
  __host__ __device__ std::int64_t page_row(std::int64_t b, int hk, int cl, int slot) const {
    return (((std::int64_t{hk} * batch + b) * c + cl) * ps + slot) * d;
  }
  // First of the c summary rows of (b, hk).
  __host__ __device__ std::int64_t summary(std::int64_t b, int hk) const {
    return (hk * summary_rows + b * c) * d;
  }
};

Cast cast_of(const CastShape& s) {
  RINGCAST_CHECK(s.seq <= INT32_MAX && std::int64_t{s.clusters} * s.page_size <= INT32_MAX,
                 "CAST on CUDA: {} tokens or {} x {} member slots exceed 32-bit indices", s.seq, s.clusters,
                 s.page_size);
  return {s.seq, s.summary_rows(), s.batch, s.heads, s.kv_heads, s.head_dim, s.clusters, s.page_size, s.group()};
}

// Blocks of kThreads for a loop of warps over `units`.
unsigned warp_grid(std::int64_t units) {
  return static_cast<unsigned>(std::clamp<std::int64_t>((units + kWarpsPerBlock - 1) / kWarpsPerBlock, 1, 1 << 16));
}

__device__ __forceinline__ int lane_id() { return threadIdx.x % kWarp; }
__device__ __forceinline__ std::int64_t warp_id() {
  return (blockIdx.x * std::int64_t{blockDim.x} + threadIdx.x) / kWarp;
}
__device__ __forceinline__ std::int64_t warp_count() { return std::int64_t{gridDim.x} * blockDim.x / kWarp; }

__device__ float warp_max(float v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2) v = fmaxf(v, __shfl_xor_sync(kFull, v, offset));
  return v;
}

// Calls f(cl, slot) for every cluster of segment `seg` whose member list holds token j, in increasing
// cluster order; a lane binary-searches one cluster's (increasing) list. Whole warp, j warp-uniform.
template <typename F>
__device__ void for_each_membership(const Cast& s, const std::int32_t* members, const std::int32_t* counts,
                                    std::int64_t seg, std::int32_t j, F&& f) {
  for (int cl0 = 0; cl0 < s.c; cl0 += kWarp) {
    const int cl = cl0 + lane_id();
    int slot = -1;
    if (cl < s.c) {
      const std::int32_t* list = members + s.member(seg, cl);
      const int count = counts[s.cluster(seg, cl)];
      int lo = 0, hi = count;
      while (lo < hi) {
        const int mid = (lo + hi) / 2;
        if (list[mid] < j) lo = mid + 1;
        else hi = mid;
      }
      if (lo < count && list[lo] == j) slot = lo;
    }
    for (unsigned hits = __ballot_sync(kFull, slot >= 0); hits != 0; hits &= hits - 1) {
      const int src = __ffs(hits) - 1;
      f(cl0 + src, __shfl_sync(kFull, slot, src));
    }
  }
}

// --- Assignment ---

// The correctly rounded exp, as glibc's expf returns it but in vanishingly rare cases.
__device__ __forceinline__ float exp_rounded(float x) { return static_cast<float>(exp(static_cast<double>(x))); }

// cast_cpu.cpp softmax_row: the first maximum, the exps summed in order, one reciprocal.
struct RowSoftmax {
  float max;
  float inv;
};
__device__ RowSoftmax row_softmax(const float* a, int c) {
  float m = a[0];
  for (int i = 1; i < c; ++i)
    if (m < a[i]) m = a[i];
  float sum = 0.0f;
  for (int i = 0; i < c; ++i) sum = __fadd_rn(sum, exp_rounded(__fsub_rn(a[i], m)));
  return {m, __fdiv_rn(1.0f, sum)};
}

// A_g of token j of segment seg, as cast_cpu.cpp assignment_affinity computes it, into column j of
// ag_t [segments, c, n] (a thread per token, so the writes coalesce), and, when `best` is given, its
// first maximum and that cluster (the best cluster in stable descending order).
__global__ void assignment_affinity_kernel(const Cast s, const float* __restrict__ a_q, const float* __restrict__ a_k,
                                           float* __restrict__ ag_t, float* __restrict__ best,
                                           std::int32_t* __restrict__ best_cluster) {
  const std::int64_t tokens = std::int64_t{s.batch} * s.kv_heads * s.n;
  const float inv_g = __fdiv_rn(1.0f, static_cast<float>(s.g));
  for (std::int64_t i = blockIdx.x * std::int64_t{blockDim.x} + threadIdx.x; i < tokens;
       i += std::int64_t{gridDim.x} * blockDim.x) {
    const std::int64_t seg = i / s.n, j = i % s.n;
    const std::int64_t b = seg / s.kv_heads;
    const int hk = static_cast<int>(seg % s.kv_heads);
    float* ag = ag_t + seg * s.c * s.n + j;
    const float* ak = a_k + s.a_k(b, hk) + j * s.c;
    const RowSoftmax sk = row_softmax(ak, s.c);
    for (int cl = 0; cl < s.c; ++cl) ag[cl * s.n] = __fmul_rn(exp_rounded(__fsub_rn(ak[cl], sk.max)), sk.inv);
    for (int h = hk * s.g; h < (hk + 1) * s.g; ++h) {
      const float* aq = a_q + s.a_q(b, h) + j * s.c;
      const RowSoftmax sq = row_softmax(aq, s.c);
      for (int cl = 0; cl < s.c; ++cl) {
        const float w = __fmul_rn(exp_rounded(__fsub_rn(aq[cl], sq.max)), sq.inv);
        ag[cl * s.n] = __fadd_rn(ag[cl * s.n], __fmul_rn(inv_g, w));
      }
    }
    if (!best) continue;
    float top = ag[0];
    int top_cl = 0;
    for (int cl = 1; cl < s.c; ++cl) {
      if (top < ag[cl * s.n]) {
        top = ag[cl * s.n];
        top_cl = cl;
      }
    }
    best[i] = top;
    best_cluster[i] = top_cl;
  }
}

// Top-K: a warp per cluster keeps its min(page_size, n) best tokens (detail::WarpTopK: higher
// affinity first, ties to the lower token) while reading the cluster's column of A_g 32 tokens at a
// time; only tokens that beat the current worst are pushed. Members are written in increasing order.
template <int kSlots>
__global__ void topk_assign_kernel(const Cast s, const float* __restrict__ ag_t, std::int32_t* __restrict__ members,
                                   std::int32_t* __restrict__ counts) {
  const int lane = lane_id();
  const int take = static_cast<int>(min(std::int64_t{s.ps}, s.n));
  const std::int64_t units = std::int64_t{s.batch} * s.kv_heads * s.c;  // seg * c + cl
  for (std::int64_t unit = warp_id(); unit < units; unit += warp_count()) {
    const float* column = ag_t + unit * s.n;
    detail::WarpTopK<kSlots> top(take);
    for (std::int64_t j0 = 0; j0 < s.n; j0 += kWarp) {
      const std::int64_t j = j0 + lane;
      const float v = j < s.n ? column[j] : 0.0f;
      const bool candidate =
          j < s.n && (top.count < take || detail::better(v, static_cast<int>(j), top.worst_score, top.worst_index));
      for (unsigned pending = __ballot_sync(kFull, candidate); pending != 0; pending &= pending - 1) {
        const int src = __ffs(pending) - 1;
        top.push(__shfl_sync(kFull, v, src), static_cast<int>(j0) + src);
      }
    }
    std::int32_t* out = members + unit * s.ps;
#pragma unroll
    for (int slot = 0; slot < kSlots; ++slot) {
      const int pos = top.ascending_position(slot);
      if (pos >= 0) out[pos] = top.index[slot];
    }
    for (int slot = take + lane; slot < s.ps; slot += kWarp) out[slot] = -1;
    if (lane == 0) counts[unit] = take;
  }
}

// The cluster with room that token j likes best, ties to the lower cluster; -1 when all are full.
__device__ int best_open_cluster(const Cast& s, const float* ag, const std::int32_t* fill, std::int32_t j) {
  float best = 0.0f;
  int best_cl = -1;
  for (int cl = lane_id(); cl < s.c; cl += kWarp) {
    if (fill[cl] >= s.ps) continue;
    const float v = ag[cl * s.n + j];
    if (best_cl < 0 || v > best) {
      best = v;
      best_cl = cl;
    }
  }
  for (int offset = kWarp / 2; offset > 0; offset /= 2) {
    const float other = __shfl_xor_sync(kFull, best, offset);
    const int other_cl = __shfl_xor_sync(kFull, best_cl, offset);
    if (other_cl >= 0 && (best_cl < 0 || other > best || (other == best && other_cl < best_cl))) {
      best = other;
      best_cl = other_cl;
    }
  }
  return best_cl;
}

// Single-assignment Top-K, one warp per segment: the greedy of cast_cpu.cpp is sequential by
// definition (a token sees the fills its predecessors left). Tokens come in `order` (best affinity
// descending, stable); a token whose best cluster has room takes it at once, otherwise the warp
// searches the open clusters. Then members are listed in increasing token order.
__global__ void single_assign_kernel(const Cast s, const float* __restrict__ ag_t, const std::int32_t* __restrict__ order,
                                     const std::int32_t* __restrict__ best_cluster, std::int32_t* __restrict__ assigned,
                                     std::int32_t* __restrict__ members, std::int32_t* __restrict__ counts) {
  extern __shared__ std::int32_t fill[];  // [c]
  const int lane = lane_id();
  const std::int64_t seg = blockIdx.x;
  const float* ag = ag_t + seg * s.c * s.n;
  const std::int32_t* seg_order = order + seg * s.n;
  const std::int32_t* seg_best = best_cluster + seg * s.n;
  std::int32_t* seg_assigned = assigned + seg * s.n;
  for (int cl = lane; cl < s.c; cl += kWarp) fill[cl] = 0;
  __syncwarp();
  for (std::int64_t r0 = 0; r0 < s.n; r0 += kWarp) {
    // Each lane fetches one token of the next 32 and its best cluster; the warp then takes them in turn.
    const bool mine = r0 + lane < s.n;
    const std::int32_t my_token = mine ? seg_order[r0 + lane] : 0;
    const std::int32_t my_best = mine ? seg_best[my_token] : 0;
    std::int32_t my_choice = -1;
    const int turn_count = static_cast<int>(min(std::int64_t{kWarp}, s.n - r0));
    for (int turn = 0; turn < turn_count; ++turn) {
      const std::int32_t j = __shfl_sync(kFull, my_token, turn);
      const std::int32_t first = __shfl_sync(kFull, my_best, turn);
      const int choice = fill[first] < s.ps ? first : best_open_cluster(s, ag, fill, j);
      __syncwarp();  // every lane has read the fills
      if (lane == 0 && choice >= 0) ++fill[choice];
      if (lane == turn) my_choice = choice;
      __syncwarp();
    }
    if (mine) seg_assigned[my_token] = my_choice;
  }
  __syncwarp();
  for (int cl = lane; cl < s.c; cl += kWarp) fill[cl] = 0;
  __syncwarp();
  for (std::int64_t j0 = 0; j0 < s.n; j0 += kWarp) {
    const std::int64_t j = j0 + lane;
    const int cl = j < s.n ? seg_assigned[j] : -1;
    const unsigned peers = __match_any_sync(kFull, cl);  // lanes whose token joins the same cluster
    if (cl >= 0) members[s.member(seg, cl) + fill[cl] + __popc(peers & ((1u << lane) - 1))] = static_cast<std::int32_t>(j);
    __syncwarp();
    if (cl >= 0 && lane == 31 - __clz(peers)) fill[cl] += __popc(peers);
    __syncwarp();
  }
  for (int cl = lane; cl < s.c; cl += kWarp) counts[s.cluster(seg, cl)] = fill[cl];
  for (std::int64_t i = lane; i < std::int64_t{s.c} * s.ps; i += kWarp)
    if (i % s.ps >= fill[i / s.ps]) members[s.member(seg, 0) + i] = -1;
}

// --- Gather and its adjoint ---

// The member of slot `slot` of (b, hk, cl), or -1 for padding.
__device__ __forceinline__ std::int32_t member_at(const Cast& s, const std::int32_t* members, const std::int32_t* counts,
                                                  std::int64_t b, int hk, int cl, int slot) {
  const std::int64_t seg = b * s.kv_heads + hk;
  return slot < counts[s.cluster(seg, cl)] ? members[s.member(seg, cl) + slot] : -1;
}

// One thread per element of the page pools [kv_heads, B * c, page_size, d].
__global__ void gather_pages_kernel(const Cast s, const CastGatherParams p) {
  const std::int64_t total = std::int64_t{s.kv_heads} * s.batch * s.c * s.ps * s.d;
  for (std::int64_t i = blockIdx.x * std::int64_t{blockDim.x} + threadIdx.x; i < total;
       i += std::int64_t{gridDim.x} * blockDim.x) {
    const int e = static_cast<int>(i % s.d);
    std::int64_t r = i / s.d;
    const int slot = static_cast<int>(r % s.ps);
    r /= s.ps;
    const int cl = static_cast<int>(r % s.c);
    r /= s.c;
    const std::int64_t b = r % s.batch;
    const int hk = static_cast<int>(r / s.batch);
    const std::int32_t j = member_at(s, p.members, p.counts, b, hk, cl, slot);
    p.k_pages[i] = j >= 0 ? p.k[s.kv_row(b, j, hk) + e] : 0.0f;
    p.v_pages[i] = j >= 0 ? p.v[s.kv_row(b, j, hk) + e] : 0.0f;
  }
}

// One thread per element of the gathered queries [B, c * page_size, heads, d]; head h reads the
// clusters of its KV head.
__global__ void gather_queries_kernel(const Cast s, const CastGatherParams p) {
  const std::int64_t total = std::int64_t{s.batch} * s.c * s.ps * s.heads * s.d;
  for (std::int64_t i = blockIdx.x * std::int64_t{blockDim.x} + threadIdx.x; i < total;
       i += std::int64_t{gridDim.x} * blockDim.x) {
    const int e = static_cast<int>(i % s.d);
    const int h = static_cast<int>(i / s.d % s.heads);
    const std::int64_t row = i / (std::int64_t{s.d} * s.heads);
    const std::int64_t b = row / (std::int64_t{s.c} * s.ps);
    const int cl = static_cast<int>(row / s.ps % s.c);
    const int slot = static_cast<int>(row % s.ps);
    const std::int32_t j = member_at(s, p.members, p.counts, b, h / s.g, cl, slot);
    p.q_gathered[i] = j >= 0 ? p.q[s.q_row(b, j, h) + e] : 0.0f;
  }
}

// A warp per (b, token, KV head), unit = (b * n + j) * kv_heads + hk: adds the token's rows of the
// page and gathered-query gradients over its memberships, in cluster order.
__global__ void gather_backward_kernel(const Cast s, const CastGatherBackwardParams p) {
  const int lane = lane_id();
  const std::int64_t units = std::int64_t{s.batch} * s.n * s.kv_heads;
  for (std::int64_t unit = warp_id(); unit < units; unit += warp_count()) {
    const int hk = static_cast<int>(unit % s.kv_heads);
    const std::int64_t token = unit / s.kv_heads;
    const std::int64_t b = token / s.n;
    const auto j = static_cast<std::int32_t>(token % s.n);
    float* dk = p.d_k + unit * s.d;
    float* dv = p.d_v + unit * s.d;
    for_each_membership(s, p.members, p.counts, b * s.kv_heads + hk, j, [&](int cl, int slot) {
      const float* kp = p.d_k_pages + s.page_row(b, hk, cl, slot);
      const float* vp = p.d_v_pages + s.page_row(b, hk, cl, slot);
      for (int e = lane; e < s.d; e += kWarp) {
        dk[e] = __fadd_rn(dk[e], kp[e]);
        dv[e] = __fadd_rn(dv[e], vp[e]);
      }
      for (int h = hk * s.g; h < (hk + 1) * s.g; ++h) {
        float* dq = p.d_q + s.q_row(b, j, h);
        const float* src = p.d_q_gathered + s.gathered_q_row(b, cl, slot, h);
        for (int e = lane; e < s.d; e += kWarp) dq[e] = __fadd_rn(dq[e], src[e]);
      }
    });
  }
}

// --- Cluster summaries ---

// A warp's shared slices for one cluster: its members and their softmax weights (and, in the
// backward, their dot products).
struct MemberScratch {
  std::int32_t* mem;
  float* pi;
  float* dot;
};

__device__ MemberScratch member_scratch(int ps) {
  extern __shared__ float smem[];
  float* base = smem + 3 * ps * (threadIdx.x / kWarp);
  return {reinterpret_cast<std::int32_t*>(base), base + ps, base + 2 * ps};
}

// cast_cpu.cpp member_softmax: pi = softmax over the members of (seg, cl) of A_k[member, cl]. Whole
// warp; returns the member count, with members and weights in m.mem, m.pi.
__device__ int member_softmax(const Cast& s, const float* a_k, const std::int32_t* members, const std::int32_t* counts,
                              std::int64_t seg, int cl, const MemberScratch& m) {
  const int lane = lane_id();
  const int count = counts[s.cluster(seg, cl)];
  const std::int32_t* list = members + s.member(seg, cl);
  const float* a = a_k + seg * s.n * s.c + cl;  // A_k of (b, hk), column cl
  float mx = -INFINITY;
  for (int t = lane; t < count; t += kWarp) {
    m.mem[t] = list[t];
    m.pi[t] = a[std::int64_t{list[t]} * s.c];
    mx = fmaxf(mx, m.pi[t]);
  }
  mx = warp_max(mx);
  float sum = 0.0f;
  for (int t = lane; t < count; t += kWarp) {
    m.pi[t] = expf(__fsub_rn(m.pi[t], mx));
    sum = __fadd_rn(sum, m.pi[t]);
  }
  sum = warp_sum(sum);
  for (int t = lane; t < count; t += kWarp) m.pi[t] = __fdiv_rn(m.pi[t], sum);
  __syncwarp();
  return count;
}

// A warp per summary row (kv head, row) of the pools; rows past B * c are padding (zero).
__global__ void summaries_kernel(const Cast s, const CastSummaryParams p) {
  const int lane = lane_id();
  const std::int64_t unit = blockIdx.x * std::int64_t{kWarpsPerBlock} + threadIdx.x / kWarp;
  if (unit >= s.kv_heads * s.summary_rows) return;
  const int hk = static_cast<int>(unit / s.summary_rows);
  const std::int64_t row = unit % s.summary_rows;
  float* ks = p.key_summary + unit * s.d;
  float* vs = p.value_summary + unit * s.d;
  if (row >= std::int64_t{s.batch} * s.c) {
    for (int e = lane; e < s.d; e += kWarp) ks[e] = vs[e] = 0.0f;
    return;
  }
  const std::int64_t b = row / s.c;
  const int cl = static_cast<int>(row % s.c);
  const MemberScratch m = member_scratch(s.ps);
  const int count = member_softmax(s, p.a_k, p.members, p.counts, b * s.kv_heads + hk, cl, m);
  for (int e = lane; e < s.d; e += kWarp) {
    float k_acc = 0.0f, v_acc = 0.0f;
    for (int t = 0; t < count; ++t) {
      const std::int64_t at = s.kv_row(b, m.mem[t], hk) + e;
      k_acc = __fadd_rn(k_acc, __fmul_rn(m.pi[t], p.k[at]));
      v_acc = __fadd_rn(v_acc, __fmul_rn(m.pi[t], p.v[at]));
    }
    ks[e] = k_acc;
    vs[e] = v_acc;
  }
}

// Backward, per cluster (a warp each, unit = seg * c + cl): the softmax weights (kept in pi_out
// [segments, c, page_size] for the per-token pass), dpi_t = dK̄·k_t + dV̄·v_t, and
// d A_k[t, cl] += pi_t (dpi_t - Σ pi dpi), which no other cluster touches.
__global__ void summaries_backward_cluster_kernel(const Cast s, const CastSummaryBackwardParams p,
                                                  float* __restrict__ pi_out) {
  const int lane = lane_id();
  const std::int64_t unit = blockIdx.x * std::int64_t{kWarpsPerBlock} + threadIdx.x / kWarp;
  if (unit >= std::int64_t{s.batch} * s.kv_heads * s.c) return;
  const std::int64_t seg = unit / s.c;
  const int cl = static_cast<int>(unit % s.c);
  const std::int64_t b = seg / s.kv_heads;
  const int hk = static_cast<int>(seg % s.kv_heads);
  const MemberScratch m = member_scratch(s.ps);
  const int count = member_softmax(s, p.a_k, p.members, p.counts, seg, cl, m);
  const float* dks = p.d_key_summary + s.summary(b, hk) + std::int64_t{cl} * s.d;
  const float* dvs = p.d_value_summary + s.summary(b, hk) + std::int64_t{cl} * s.d;
  for (int t = 0; t < count; ++t) {
    const std::int64_t at = s.kv_row(b, m.mem[t], hk);
    float dot = 0.0f;
    for (int e = lane; e < s.d; e += kWarp)
      dot = __fadd_rn(dot, __fadd_rn(__fmul_rn(dks[e], p.k[at + e]), __fmul_rn(dvs[e], p.v[at + e])));
    dot = warp_sum(dot);
    if (lane == 0) m.dot[t] = dot;
  }
  __syncwarp();
  float pi_dpi = 0.0f;
  for (int t = lane; t < count; t += kWarp) pi_dpi = __fadd_rn(pi_dpi, __fmul_rn(m.pi[t], m.dot[t]));
  pi_dpi = warp_sum(pi_dpi);
  for (int t = lane; t < count; t += kWarp) {
    float* da = p.d_a_k + (seg * s.n + m.mem[t]) * s.c + cl;
    *da = __fadd_rn(*da, __fmul_rn(m.pi[t], __fsub_rn(m.dot[t], pi_dpi)));
    pi_out[s.member(seg, cl) + t] = m.pi[t];
  }
}

// Backward, per token (a warp per (b, token, KV head)): d k += pi dK̄, d v += pi dV̄ over the
// token's clusters in increasing order, as the CPU adds them.
__global__ void summaries_backward_token_kernel(const Cast s, const CastSummaryBackwardParams p,
                                                const float* __restrict__ pi) {
  const int lane = lane_id();
  const std::int64_t units = std::int64_t{s.batch} * s.n * s.kv_heads;
  for (std::int64_t unit = warp_id(); unit < units; unit += warp_count()) {
    const int hk = static_cast<int>(unit % s.kv_heads);
    const std::int64_t token = unit / s.kv_heads;
    const std::int64_t b = token / s.n;
    const std::int64_t seg = b * s.kv_heads + hk;
    float* dk = p.d_k + unit * s.d;
    float* dv = p.d_v + unit * s.d;
    for_each_membership(s, p.members, p.counts, seg, static_cast<std::int32_t>(token % s.n), [&](int cl, int slot) {
      const float w = pi[s.member(seg, cl) + slot];
      const float* dks = p.d_key_summary + s.summary(b, hk) + std::int64_t{cl} * s.d;
      const float* dvs = p.d_value_summary + s.summary(b, hk) + std::int64_t{cl} * s.d;
      for (int e = lane; e < s.d; e += kWarp) {
        dk[e] = __fadd_rn(dk[e], __fmul_rn(w, dks[e]));
        dv[e] = __fadd_rn(dv[e], __fmul_rn(w, dvs[e]));
      }
    });
  }
}

// --- Mixing ---

// w = softmax of every row of a [rows, c] (a warp per row).
__global__ void softmax_rows_kernel(const float* __restrict__ a, std::int64_t rows, int c, float* __restrict__ w) {
  const int lane = lane_id();
  for (std::int64_t r = warp_id(); r < rows; r += warp_count()) {
    const float* ar = a + r * c;
    float* wr = w + r * c;
    float mx = -INFINITY;
    for (int cl = lane; cl < c; cl += kWarp) mx = fmaxf(mx, ar[cl]);
    mx = warp_max(mx);
    float sum = 0.0f;
    for (int cl = lane; cl < c; cl += kWarp) {
      wr[cl] = expf(__fsub_rn(ar[cl], mx));
      sum = __fadd_rn(sum, wr[cl]);
    }
    const float inv = __fdiv_rn(1.0f, warp_sum(sum));
    for (int cl = lane; cl < c; cl += kWarp) wr[cl] = __fmul_rn(wr[cl], inv);
  }
}

// Members swap R_inter[cl] for their intra row, for the g query heads of (b, hk): a warp per token,
// o_j += w[j, cl] (intra - R_inter[cl]) over j's clusters in increasing order. w: [g, n, c].
__global__ void mix_members_kernel(const Cast s, const CastMixParams p, std::int64_t b, int hk,
                                   const float* __restrict__ w) {
  const int lane = lane_id();
  const std::int64_t seg = b * s.kv_heads + hk;
  const float* r = p.value_summary + s.summary(b, hk);
  for (std::int64_t j = warp_id(); j < s.n; j += warp_count()) {
    for_each_membership(s, p.members, p.counts, seg, static_cast<std::int32_t>(j), [&](int cl, int slot) {
      const float* rc = r + std::int64_t{cl} * s.d;
      for (int hh = 0; hh < s.g; ++hh) {
        const int h = hk * s.g + hh;
        const float wj = w[(hh * s.n + j) * s.c + cl];
        const float* x = p.intra + s.gathered_q_row(b, cl, slot, h);
        float* o = p.o + s.q_row(b, j, h);
        for (int e = lane; e < s.d; e += kWarp) o[e] = __fadd_rn(o[e], __fmul_rn(wj, __fsub_rn(x[e], rc[e])));
      }
    });
  }
}

// The members' part of the mix backward for query head h of batch b: a warp per cluster walks its
// members in slot order (the CPU's), so d R_inter[cl] has one writer; d intra rows and dw[j, cl]
// (w_h, dw: [n, c]) are per membership.
__global__ void mix_backward_members_kernel(const Cast s, const CastMixBackwardParams p, std::int64_t b, int h,
                                            const float* __restrict__ w, float* __restrict__ dw) {
  const int lane = lane_id();
  const int hk = h / s.g;
  const std::int64_t seg = b * s.kv_heads + hk;
  for (std::int64_t cl = warp_id(); cl < s.c; cl += warp_count()) {
    const int count = p.counts[s.cluster(seg, static_cast<int>(cl))];
    const std::int32_t* list = p.members + s.member(seg, static_cast<int>(cl));
    const float* rc = p.value_summary + s.summary(b, hk) + cl * s.d;
    float* drc = p.d_value_summary + s.summary(b, hk) + cl * s.d;
    for (int slot = 0; slot < count; ++slot) {
      const std::int64_t j = list[slot];
      const float wj = w[j * s.c + cl];
      const float* x = p.intra + s.gathered_q_row(b, static_cast<int>(cl), slot, h);
      float* dx = p.d_intra + s.gathered_q_row(b, static_cast<int>(cl), slot, h);
      const float* d_o = p.d_o + s.q_row(b, j, h);
      float dot = 0.0f;
      for (int e = lane; e < s.d; e += kWarp) {
        const float g = __fmul_rn(wj, d_o[e]);
        dot = __fadd_rn(dot, __fmul_rn(d_o[e], __fsub_rn(x[e], rc[e])));
        dx[e] = __fadd_rn(dx[e], g);
        drc[e] = __fsub_rn(drc[e], g);
      }
      dot = warp_sum(dot);
      if (lane == 0) dw[j * s.c + cl] = __fadd_rn(dw[j * s.c + cl], dot);
    }
  }
}

// Softmax backward of every row: d a += w ⊙ (dw - <w, dw>) (a warp per row).
__global__ void softmax_rows_backward_kernel(const float* __restrict__ w, const float* __restrict__ dw,
                                             std::int64_t rows, int c, float* __restrict__ d_a) {
  const int lane = lane_id();
  for (std::int64_t r = warp_id(); r < rows; r += warp_count()) {
    const float* wr = w + r * c;
    const float* dwr = dw + r * c;
    float dot = 0.0f;
    for (int cl = lane; cl < c; cl += kWarp) dot = __fadd_rn(dot, __fmul_rn(wr[cl], dwr[cl]));
    dot = warp_sum(dot);
    for (int cl = lane; cl < c; cl += kWarp)
      d_a[r * c + cl] = __fadd_rn(d_a[r * c + cl], __fmul_rn(wr[cl], __fsub_rn(dwr[cl], dot)));
  }
}

void softmax_rows(const float* a, std::int64_t rows, int c, float* w, cudaStream_t stream) {
  softmax_rows_kernel<<<warp_grid(rows), kThreads, 0, stream>>>(a, rows, c, w);
  RINGCAST_CUDA_CHECK_LAUNCH();
}

std::size_t member_scratch_bytes(const Cast& s) { return std::size_t{3} * s.ps * sizeof(float) * kWarpsPerBlock; }

void require_page_size(const Cast& s, const char* op) {
  RINGCAST_CHECK(s.ps <= kMaxPageSize, "{} on CUDA: page_size {} is not supported (at most {})", op, s.ps,
                 kMaxPageSize);
}

}  // namespace

void cast_affinities(const CastAffinityParams& p, const ExecContext& ctx) {
  const Cast s = cast_of(p.shape);
  const StreamLease lease(ctx);
  for (int b = 0; b < s.batch; ++b) {
    for (int h = 0; h < s.heads; ++h) {
      matmul(lease, Math::kF32, false, true, s.n, s.c, s.d, p.q + s.q_row(b, 0, h), s.q_ld(),
             p.surrogates + s.surrogates(h / s.g), s.d, 0.0f, p.a_q + s.a_q(b, h), s.c);
    }
    for (int hk = 0; hk < s.kv_heads; ++hk) {
      matmul(lease, Math::kF32, false, true, s.n, s.c, s.d, p.k + s.kv_row(b, 0, hk), s.kv_ld(),
             p.surrogates + s.surrogates(hk), s.d, 0.0f, p.a_k + s.a_k(b, hk), s.c);
    }
  }
}

void cast_affinities_backward(const CastAffinityBackwardParams& p, const ExecContext& ctx) {
  const Cast s = cast_of(p.shape);
  const StreamLease lease(ctx);
  // dQ = dA_q S, dK = dA_k S.
  for (int b = 0; b < s.batch; ++b) {
    for (int h = 0; h < s.heads; ++h) {
      matmul(lease, Math::kF32, false, false, s.n, s.d, s.c, p.d_a_q + s.a_q(b, h), s.c,
             p.surrogates + s.surrogates(h / s.g), s.d, 1.0f, p.d_q + s.q_row(b, 0, h), s.q_ld());
    }
    for (int hk = 0; hk < s.kv_heads; ++hk) {
      matmul(lease, Math::kF32, false, false, s.n, s.d, s.c, p.d_a_k + s.a_k(b, hk), s.c,
             p.surrogates + s.surrogates(hk), s.d, 1.0f, p.d_k + s.kv_row(b, 0, hk), s.kv_ld());
    }
  }
  // dS = Σ dA_qᵀ Q + dA_kᵀ K, over the batch and the group's heads in the CPU's order.
  for (int hk = 0; hk < s.kv_heads; ++hk) {
    float* ds = p.d_surrogates + s.surrogates(hk);
    for (int b = 0; b < s.batch; ++b) {
      for (int h = hk * s.g; h < (hk + 1) * s.g; ++h) {
        matmul(lease, Math::kF32, true, false, s.c, s.d, s.n, p.d_a_q + s.a_q(b, h), s.c, p.q + s.q_row(b, 0, h),
               s.q_ld(), 1.0f, ds, s.d);
      }
      matmul(lease, Math::kF32, true, false, s.c, s.d, s.n, p.d_a_k + s.a_k(b, hk), s.c, p.k + s.kv_row(b, 0, hk),
             s.kv_ld(), 1.0f, ds, s.d);
    }
  }
}

void cast_assign(const CastAssignParams& p, const ExecContext& ctx) {
  const Cast s = cast_of(p.shape);
  const auto stream = static_cast<cudaStream_t>(ctx.stream);
  const std::int64_t segments = std::int64_t{s.batch} * s.kv_heads;
  const bool single = p.rule == CastAssignment::kSingleTopK;
  const int take = static_cast<int>(std::min<std::int64_t>(s.ps, s.n));
  RINGCAST_CHECK(single || take <= detail::kMaxTopK,
                 "cast_assign on CUDA: Top-K keeps at most {} tokens per cluster (page_size {} with {} tokens is not "
                 "supported)",
                 detail::kMaxTopK, s.ps, s.n);
  RINGCAST_CHECK(!single || s.c <= kMaxClusters,
                 "cast_assign on CUDA: single-assignment Top-K over {} clusters is not supported (at most {})", s.c,
                 kMaxClusters);
  const std::int64_t tokens = segments * s.n;
  const Scratch<float> ag_t(static_cast<std::size_t>(tokens * s.c), stream);
  const Scratch<float> best(single ? static_cast<std::size_t>(tokens) : 0, stream);
  const Scratch<std::int32_t> best_cluster(single ? static_cast<std::size_t>(tokens) : 0, stream);
  assignment_affinity_kernel<<<grid_for(tokens), kThreads, 0, stream>>>(s, p.a_q, p.a_k, ag_t.get(), best.get(),
                                                                         best_cluster.get());
  RINGCAST_CUDA_CHECK_LAUNCH();
  if (!single) {
    const unsigned grid = warp_grid(segments * s.c);
    if (take <= 32) topk_assign_kernel<1><<<grid, kThreads, 0, stream>>>(s, ag_t.get(), p.members, p.counts);
    else if (take <= 64) topk_assign_kernel<2><<<grid, kThreads, 0, stream>>>(s, ag_t.get(), p.members, p.counts);
    else topk_assign_kernel<4><<<grid, kThreads, 0, stream>>>(s, ag_t.get(), p.members, p.counts);
    RINGCAST_CUDA_CHECK_LAUNCH();
    return;
  }
  const Scratch<std::int32_t> order(static_cast<std::size_t>(tokens), stream);
  const Scratch<std::int32_t> assigned(static_cast<std::size_t>(tokens), stream);
  detail::order_by_score(best.get(), segments, s.n, order.get(), stream);
  single_assign_kernel<<<static_cast<unsigned>(segments), kWarp, s.c * sizeof(std::int32_t), stream>>>(
      s, ag_t.get(), order.get(), best_cluster.get(), assigned.get(), p.members, p.counts);
  RINGCAST_CUDA_CHECK_LAUNCH();
}

void cast_gather(const CastGatherParams& p, const ExecContext& ctx) {
  const Cast s = cast_of(p.shape);
  const auto stream = static_cast<cudaStream_t>(ctx.stream);
  gather_pages_kernel<<<grid_for(std::int64_t{s.kv_heads} * s.batch * s.c * s.ps * s.d), kThreads, 0, stream>>>(s, p);
  RINGCAST_CUDA_CHECK_LAUNCH();
  gather_queries_kernel<<<grid_for(std::int64_t{s.batch} * s.c * s.ps * s.heads * s.d), kThreads, 0, stream>>>(s, p);
  RINGCAST_CUDA_CHECK_LAUNCH();
}

void cast_gather_backward(const CastGatherBackwardParams& p, const ExecContext& ctx) {
  const Cast s = cast_of(p.shape);
  const auto stream = static_cast<cudaStream_t>(ctx.stream);
  gather_backward_kernel<<<warp_grid(std::int64_t{s.batch} * s.n * s.kv_heads), kThreads, 0, stream>>>(s, p);
  RINGCAST_CUDA_CHECK_LAUNCH();
}

void cast_summaries(const CastSummaryParams& p, const ExecContext& ctx) {
  const Cast s = cast_of(p.shape);
  require_page_size(s, "cast_summaries");
  const auto stream = static_cast<cudaStream_t>(ctx.stream);
  const std::int64_t units = s.kv_heads * s.summary_rows;
  summaries_kernel<<<static_cast<unsigned>((units + kWarpsPerBlock - 1) / kWarpsPerBlock), kThreads,
                     member_scratch_bytes(s), stream>>>(s, p);
  RINGCAST_CUDA_CHECK_LAUNCH();
}

void cast_summaries_backward(const CastSummaryBackwardParams& p, const ExecContext& ctx) {
  const Cast s = cast_of(p.shape);
  require_page_size(s, "cast_summaries_backward");
  const auto stream = static_cast<cudaStream_t>(ctx.stream);
  const std::int64_t clusters = std::int64_t{s.batch} * s.kv_heads * s.c;
  const Scratch<float> pi(static_cast<std::size_t>(clusters * s.ps), stream);
  summaries_backward_cluster_kernel<<<static_cast<unsigned>((clusters + kWarpsPerBlock - 1) / kWarpsPerBlock),
                                      kThreads, member_scratch_bytes(s), stream>>>(s, p, pi.get());
  RINGCAST_CUDA_CHECK_LAUNCH();
  summaries_backward_token_kernel<<<warp_grid(std::int64_t{s.batch} * s.n * s.kv_heads), kThreads, 0, stream>>>(
      s, p, pi.get());
  RINGCAST_CUDA_CHECK_LAUNCH();
}

// Per (b, KV head): the group's softmax weights, then per query head O = W R_inter (cuBLAS), then the
// members' corrections. W is [g, n, c] scratch reused across (b, KV head) in stream order.
void cast_mix(const CastMixParams& p, const ExecContext& ctx) {
  const Cast s = cast_of(p.shape);
  const StreamLease lease(ctx);
  const cudaStream_t stream = lease.stream();
  const std::int64_t rows = std::int64_t{s.g} * s.n;
  const Scratch<float> w(static_cast<std::size_t>(rows * s.c), stream);
  for (int b = 0; b < s.batch; ++b) {
    for (int hk = 0; hk < s.kv_heads; ++hk) {
      softmax_rows(p.a_q + s.a_q(b, hk * s.g), rows, s.c, w.get(), stream);
      for (int hh = 0; hh < s.g; ++hh) {
        const int h = hk * s.g + hh;
        matmul(lease, Math::kF32, false, false, s.n, s.d, s.c, w.get() + hh * s.n * s.c, s.c,
               p.value_summary + s.summary(b, hk), s.d, 0.0f, p.o + s.q_row(b, 0, h), s.q_ld());
      }
      mix_members_kernel<<<warp_grid(s.n), kThreads, 0, stream>>>(s, p, b, hk, w.get());
      RINGCAST_CUDA_CHECK_LAUNCH();
    }
  }
}

// Per query head, in the CPU's order: dw = d_o R_interᵀ, d R_inter += Wᵀ d_o (cuBLAS), the members'
// corrections, then the softmax backward into d A_q.
void cast_mix_backward(const CastMixBackwardParams& p, const ExecContext& ctx) {
  const Cast s = cast_of(p.shape);
  const StreamLease lease(ctx);
  const cudaStream_t stream = lease.stream();
  const std::int64_t rows = std::int64_t{s.g} * s.n;
  const Scratch<float> w(static_cast<std::size_t>(rows * s.c), stream);
  const Scratch<float> dw(static_cast<std::size_t>(s.n * s.c), stream);
  for (int b = 0; b < s.batch; ++b) {
    for (int hk = 0; hk < s.kv_heads; ++hk) {
      const float* r = p.value_summary + s.summary(b, hk);
      float* dr = p.d_value_summary + s.summary(b, hk);
      softmax_rows(p.a_q + s.a_q(b, hk * s.g), rows, s.c, w.get(), stream);
      for (int hh = 0; hh < s.g; ++hh) {
        const int h = hk * s.g + hh;
        const float* wh = w.get() + hh * s.n * s.c;
        const float* d_o = p.d_o + s.q_row(b, 0, h);
        matmul(lease, Math::kF32, false, true, s.n, s.c, s.d, d_o, s.q_ld(), r, s.d, 0.0f, dw.get(), s.c);
        matmul(lease, Math::kF32, true, false, s.c, s.d, s.n, wh, s.c, d_o, s.q_ld(), 1.0f, dr, s.d);
        mix_backward_members_kernel<<<warp_grid(s.c), kThreads, 0, stream>>>(s, p, b, h, wh, dw.get());
        RINGCAST_CUDA_CHECK_LAUNCH();
        softmax_rows_backward_kernel<<<warp_grid(s.n), kThreads, 0, stream>>>(wh, dw.get(), s.n, s.c,
                                                                             p.d_a_q + s.a_q(b, h));
        RINGCAST_CUDA_CHECK_LAUNCH();
      }
    }
  }
}

}  // namespace ringcast::kernels::cuda
