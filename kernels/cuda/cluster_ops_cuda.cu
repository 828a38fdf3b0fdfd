// CUDA surrogate-cluster operations (cluster_ops.hpp): grid-stride loops, one thread per output
// element (page or block channel, unit channel) or per cluster. Sums run in the CPU backend's order
// with explicit rounding (__fadd_rn / __fmul_rn, no contraction) and min / max compare as std::min /
// std::max do, so bounds, blocks and unit queries equal the CPU's bitwise; member_lse(_merge_backward)
// round expf / logf differently from the CPU's libm (relative differences of the order of 1e-7).
#include "cluster_ops_cuda.hpp"

#include <ringcast/cuda_check.hpp>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

namespace ringcast::kernels::cuda {
namespace {

constexpr int kThreads = 256;

unsigned grid_for(std::int64_t work) {
  return static_cast<unsigned>(std::clamp<std::int64_t>((work + kThreads - 1) / kThreads, 1, 1 << 20));
}

__device__ __forceinline__ std::int64_t thread_index() { return blockIdx.x * std::int64_t{blockDim.x} + threadIdx.x; }
__device__ __forceinline__ std::int64_t thread_stride() { return std::int64_t{gridDim.x} * blockDim.x; }

// std::min / std::max: the first argument unless the second compares strictly smaller / larger.
__device__ __forceinline__ float min_as_std(float a, float b) { return b < a ? b : a; }
__device__ __forceinline__ float max_as_std(float a, float b) { return a < b ? b : a; }

__global__ void page_key_bounds_kernel(const PageBoundsParams p) {
  const int d = p.head_dim;
  for (std::int64_t x = thread_index(); x < p.pages * d; x += thread_stride()) {
    const std::int64_t page = x / d;
    const int e = static_cast<int>(x % d);
    const std::int32_t count = p.counts[page];
    float mn = count > 0 ? INFINITY : 0.f, mx = count > 0 ? -INFINITY : 0.f;
    for (std::int32_t s = 0; s < count; ++s) {
      const float k = p.keys[(page * p.page_size + s) * d + e];
      mn = min_as_std(mn, k);
      mx = max_as_std(mx, k);
    }
    p.key_min[x] = mn;
    p.key_max[x] = mx;
  }
}

__global__ void cluster_blocks_kernel(const ClusterBlockParams p) {
  const int d = p.head_dim, cp = p.coarse_pages;
  for (std::int64_t x = thread_index(); x < p.blocks * d; x += thread_stride()) {
    const std::int64_t l = x / d;
    const int e = static_cast<int>(x % d);
    float km = 0.f, vm = 0.f, mn = 0.f, mx = 0.f;
    std::int32_t total = 0;
    for (std::int64_t cl = l * cp; cl < (l + 1) * cp; ++cl) {
      const std::int32_t count = p.counts[cl];
      if (count == 0) continue;
      const std::int64_t at = cl * d + e;
      km = __fadd_rn(km, __fmul_rn(static_cast<float>(count), p.key_mean[at]));
      vm = __fadd_rn(vm, __fmul_rn(static_cast<float>(count), p.value_mean[at]));
      mn = total == 0 ? p.key_min[at] : min_as_std(mn, p.key_min[at]);
      mx = total == 0 ? p.key_max[at] : max_as_std(mx, p.key_max[at]);
      total += count;
    }
    const float inv = total > 0 ? __fdiv_rn(1.f, static_cast<float>(total)) : 0.f;
    p.block_key_mean[x] = __fmul_rn(km, inv);
    p.block_value_mean[x] = __fmul_rn(vm, inv);
    p.block_key_min[x] = mn;
    p.block_key_max[x] = mx;
  }
}

__global__ void cluster_blocks_backward_kernel(const ClusterBlockBackwardParams p) {
  const int d = p.head_dim, cp = p.coarse_pages;
  for (std::int64_t x = thread_index(); x < p.blocks * cp * d; x += thread_stride()) {
    const std::int64_t cl = x / d, l = cl / cp;
    const int e = static_cast<int>(x % d);
    std::int32_t total = 0;
    for (std::int64_t i = l * cp; i < (l + 1) * cp; ++i) total += p.counts[i];
    if (total == 0) continue;
    const float w = __fdiv_rn(static_cast<float>(p.counts[cl]), static_cast<float>(total));
    p.d_key_mean[x] = __fadd_rn(p.d_key_mean[x], __fmul_rn(w, p.d_block_key_mean[l * d + e]));
    p.d_value_mean[x] = __fadd_rn(p.d_value_mean[x], __fmul_rn(w, p.d_block_value_mean[l * d + e]));
  }
}

__global__ void unit_queries_kernel(const UnitQueryParams p) {
  const int d = p.head_dim, group = p.heads / p.kv_heads;
  const std::int64_t units = (p.rows + p.unit_rows - 1) / p.unit_rows;
  for (std::int64_t x = thread_index(); x < units * d; x += thread_stride()) {
    const std::int64_t r0 = (x / d) * p.unit_rows, r1 = min(p.rows, r0 + p.unit_rows);
    const int c = static_cast<int>(x % d);
    float acc = 0.f;
    for (std::int64_t r = r0; r < r1; ++r) {
      const float* q = p.q + (std::int64_t{p.order[r]} * p.heads + std::int64_t{p.kv_head} * group) * d + c;
      for (int h = 0; h < group; ++h) acc = __fadd_rn(acc, q[std::int64_t{h} * d]);
    }
    p.out[x] = __fmul_rn(acc, __fdiv_rn(1.f, static_cast<float>(r1 - r0)));
  }
}

// Cluster `x` of the [B, kv_heads, clusters] grid: its members, count, A_k of (b, g) and its slot
// g * B * clusters + b * clusters + cl in the per-cluster scalars.
struct Cluster {
  const std::int32_t* members;
  std::int32_t count;
  std::int64_t a;  // offset of A_k of (b, g)
  std::int64_t slot;
  int b, cl;
};
__device__ Cluster cluster_at(const ClusterMembers& m, std::int64_t x) {
  const int cl = static_cast<int>(x % m.clusters);
  const std::int64_t unit = x / m.clusters;  // b * kv_heads + g
  const int g = static_cast<int>(unit % m.kv_heads), b = static_cast<int>(unit / m.kv_heads);
  return {m.members + x * m.page_size, m.counts[x], unit * m.seq * m.clusters,
          (std::int64_t{g} * m.batch + b) * m.clusters + cl, b, cl};
}

__global__ void member_lse_kernel(const MemberLseParams p) {
  const ClusterMembers& m = p.m;
  for (std::int64_t x = thread_index(); x < std::int64_t{m.batch} * m.kv_heads * m.clusters; x += thread_stride()) {
    const Cluster k = cluster_at(m, x);
    const float* a = p.a_k + k.a;
    float mx = -INFINITY;
    for (std::int32_t s = 0; s < k.count; ++s) mx = max_as_std(mx, a[std::int64_t{k.members[s]} * m.clusters + k.cl]);
    float sum = 0.f;
    for (std::int32_t s = 0; s < k.count; ++s)
      sum = __fadd_rn(sum, expf(a[std::int64_t{k.members[s]} * m.clusters + k.cl] - mx));
    p.lse[k.slot] = k.count == 0 ? mx : mx + logf(sum);
  }
}

// One thread per cluster: its dlse needs the whole channel sum; clusters of (b, g) write disjoint
// entries of dA_k (column cl), so no two threads add to one.
__global__ void member_lse_merge_backward_kernel(const MemberLseMergeBackwardParams p) {
  const ClusterMembers& m = p.m;
  const int d = p.head_dim;
  for (std::int64_t x = thread_index(); x < std::int64_t{m.batch} * m.kv_heads * m.clusters; x += thread_stride()) {
    const Cluster k = cluster_at(m, x);
    if (k.count == 0) continue;
    const float lse_r = p.lse[k.slot];
    const float alpha = expf(lse_r - p.merged_lse[k.slot]);
    const std::int64_t g = k.slot / (std::int64_t{m.batch} * m.clusters);
    const std::int64_t row = (g * p.summary_rows + std::int64_t{k.b} * m.clusters + k.cl) * d;
    float d_lse = 0.f;
    for (int e = 0; e < d; ++e) {
      const float dr = p.d_merged_value[row + e];
      p.d_local_value[row + e] = alpha * dr;
      d_lse += alpha * (p.local_value[row + e] - p.merged_value[row + e]) * dr;
    }
    for (std::int32_t s = 0; s < k.count; ++s) {
      const std::int64_t at = k.a + std::int64_t{k.members[s]} * m.clusters + k.cl;
      p.d_a_k[at] += expf(p.a_k[at] - lse_r) * d_lse;
    }
  }
}

cudaStream_t stream_of(const ExecContext& ctx) { return static_cast<cudaStream_t>(ctx.stream); }

}  // namespace

void page_key_bounds(const PageBoundsParams& p, const ExecContext& ctx) {
  page_key_bounds_kernel<<<grid_for(p.pages * p.head_dim), kThreads, 0, stream_of(ctx)>>>(p);
  RINGCAST_CUDA_CHECK_LAUNCH();
}

void cluster_blocks(const ClusterBlockParams& p, const ExecContext& ctx) {
  cluster_blocks_kernel<<<grid_for(p.blocks * p.head_dim), kThreads, 0, stream_of(ctx)>>>(p);
  RINGCAST_CUDA_CHECK_LAUNCH();
}

void cluster_blocks_backward(const ClusterBlockBackwardParams& p, const ExecContext& ctx) {
  cluster_blocks_backward_kernel<<<grid_for(p.blocks * p.coarse_pages * p.head_dim), kThreads, 0, stream_of(ctx)>>>(p);
  RINGCAST_CUDA_CHECK_LAUNCH();
}

void unit_queries(const UnitQueryParams& p, const ExecContext& ctx) {
  const std::int64_t units = (p.rows + p.unit_rows - 1) / p.unit_rows;
  unit_queries_kernel<<<grid_for(units * p.head_dim), kThreads, 0, stream_of(ctx)>>>(p);
  RINGCAST_CUDA_CHECK_LAUNCH();
}

void member_lse(const MemberLseParams& p, const ExecContext& ctx) {
  member_lse_kernel<<<grid_for(std::int64_t{p.m.batch} * p.m.kv_heads * p.m.clusters), kThreads, 0, stream_of(ctx)>>>(p);
  RINGCAST_CUDA_CHECK_LAUNCH();
}

void member_lse_merge_backward(const MemberLseMergeBackwardParams& p, const ExecContext& ctx) {
  member_lse_merge_backward_kernel<<<grid_for(std::int64_t{p.m.batch} * p.m.kv_heads * p.m.clusters), kThreads, 0,
                                     stream_of(ctx)>>>(p);
  RINGCAST_CUDA_CHECK_LAUNCH();
}

}  // namespace ringcast::kernels::cuda
