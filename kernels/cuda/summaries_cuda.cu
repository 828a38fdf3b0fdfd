// CUDA page and coarse summaries and their backward (summaries.hpp). One thread per output element
// (kv head, row, channel), so consecutive threads read consecutive channels of one key; every output
// element, and in the backward every key gradient, is written by exactly one thread (no atomics).
// The arithmetic mirrors the CPU backend operation for operation (same summation order, explicit
// _rn intrinsics so nvcc contracts nothing into an FMA the CPU does not have): results are bitwise
// equal to the CPU backend for the same fp32 inputs.
#include <ringcast/cuda_check.hpp>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "selection_cuda.hpp"

namespace ringcast::kernels::cuda {
namespace {

constexpr int kThreads = 256;

// SummaryShape flattened into what the kernels index with (no host member functions on the device).
struct Geometry {
  std::int64_t seq, pages, blocks, page_rows, block_rows;
  int batch, kv_heads, head_dim, page_size, coarse_pages;
};

Geometry geometry(const SummaryShape& s) {
  return {s.seq,   s.num_pages(), s.num_blocks(), s.page_rows(), s.block_rows(),
          s.batch, s.kv_heads,    s.head_dim,     s.page_size,   s.coarse_pages};
}

// std::min / std::max exactly (the first argument wins ties), so signed zeros match the CPU.
__device__ float min_of(float a, float b) { return b < a ? b : a; }
__device__ float max_of(float a, float b) { return a < b ? b : a; }

__global__ void page_summaries_kernel(const Geometry g, const float* __restrict__ k, const float* __restrict__ v,
                                      const SummaryPools out) {
  const int d = g.head_dim;
  const std::int64_t slots = g.batch * g.pages;
  const std::int64_t total = std::int64_t{g.kv_heads} * g.page_rows * d;
  const std::int64_t ld = std::int64_t{g.kv_heads} * d;  // between consecutive keys of one head
  for (std::int64_t i = blockIdx.x * std::int64_t{blockDim.x} + threadIdx.x; i < total;
       i += std::int64_t{gridDim.x} * blockDim.x) {
    const int c = static_cast<int>(i % d);
    const std::int64_t slot = (i / d) % g.page_rows;
    const int h = static_cast<int>(i / (std::int64_t{d} * g.page_rows));
    if (slot >= slots) {  // padding rows of the pool
      out.key_mean[i] = out.value_mean[i] = out.key_min[i] = out.key_max[i] = 0.0f;
      continue;
    }
    const std::int64_t b = slot / g.pages;
    const std::int64_t i0 = (slot % g.pages) * g.page_size;
    const int keys = static_cast<int>(min(std::int64_t{g.page_size}, g.seq - i0));
    const std::int64_t first = (b * g.seq + i0) * ld + std::int64_t{h} * d + c;
    float ks = k[first], vs = v[first], mn = ks, mx = ks;
    for (int j = 1; j < keys; ++j) {
      const float x = k[first + j * ld];
      ks = __fadd_rn(ks, x);
      vs = __fadd_rn(vs, v[first + j * ld]);
      mn = min_of(mn, x);
      mx = max_of(mx, x);
    }
    const float inv = 1.0f / static_cast<float>(keys);
    out.key_mean[i] = __fmul_rn(ks, inv);
    out.value_mean[i] = __fmul_rn(vs, inv);
    out.key_min[i] = mn;
    out.key_max[i] = mx;
    if (h == 0 && c == 0) out.count[slot] = keys;
  }
}

__global__ void coarse_summaries_kernel(const Geometry g, const float* __restrict__ key_mean,
                                        const float* __restrict__ value_mean, const float* __restrict__ key_min,
                                        const float* __restrict__ key_max, const std::int32_t* __restrict__ count,
                                        const SummaryPools out) {
  const int d = g.head_dim;
  const std::int64_t slots = g.batch * g.blocks;
  const std::int64_t total = std::int64_t{g.kv_heads} * g.block_rows * d;
  for (std::int64_t i = blockIdx.x * std::int64_t{blockDim.x} + threadIdx.x; i < total;
       i += std::int64_t{gridDim.x} * blockDim.x) {
    const int c = static_cast<int>(i % d);
    const std::int64_t slot = (i / d) % g.block_rows;
    const int h = static_cast<int>(i / (std::int64_t{d} * g.block_rows));
    if (slot >= slots) {
      out.key_mean[i] = out.value_mean[i] = out.key_min[i] = out.key_max[i] = 0.0f;
      continue;
    }
    const std::int64_t block = slot % g.blocks;
    const std::int64_t pg0 = (slot / g.blocks) * g.pages + block * g.coarse_pages;  // first page slot
    const int num = static_cast<int>(min((block + 1) * g.coarse_pages, g.pages) - block * g.coarse_pages);
    const std::int64_t src0 = (std::int64_t{h} * g.page_rows + pg0) * d + c;
    float km = 0.0f, vm = 0.0f, mn = key_min[src0], mx = key_max[src0];
    std::int64_t keys = 0;
    for (int j = 0; j < num; ++j) {
      const std::int64_t src = src0 + std::int64_t{j} * d;
      const float w = static_cast<float>(count[pg0 + j]);
      keys += count[pg0 + j];
      km = __fadd_rn(km, __fmul_rn(w, key_mean[src]));
      vm = __fadd_rn(vm, __fmul_rn(w, value_mean[src]));
      mn = min_of(mn, key_min[src]);
      mx = max_of(mx, key_max[src]);
    }
    const float inv = 1.0f / static_cast<float>(keys);
    out.key_mean[i] = __fmul_rn(km, inv);
    out.value_mean[i] = __fmul_rn(vm, inv);
    out.key_min[i] = mn;
    out.key_max[i] = mx;
    if (h == 0 && c == 0) out.count[slot] = static_cast<std::int32_t>(keys);
  }
}

// d k_i += d key_mean[page(i)] / count(page(i)): one thread per element of d_k / d_v.
__global__ void page_summaries_backward_kernel(const Geometry g, const float* __restrict__ d_key_mean,
                                               const float* __restrict__ d_value_mean, float* __restrict__ d_k,
                                               float* __restrict__ d_v) {
  const int d = g.head_dim;
  const std::int64_t total = g.batch * g.seq * g.kv_heads * d;
  for (std::int64_t i = blockIdx.x * std::int64_t{blockDim.x} + threadIdx.x; i < total;
       i += std::int64_t{gridDim.x} * blockDim.x) {
    const int c = static_cast<int>(i % d);
    const int h = static_cast<int>((i / d) % g.kv_heads);
    const std::int64_t token = i / (std::int64_t{d} * g.kv_heads);
    const std::int64_t page = (token % g.seq) / g.page_size;
    const std::int64_t slot = (token / g.seq) * g.pages + page;
    const float inv = 1.0f / static_cast<float>(min(std::int64_t{g.page_size}, g.seq - page * g.page_size));
    const std::int64_t src = (std::int64_t{h} * g.page_rows + slot) * d + c;
    d_k[i] = __fadd_rn(d_k[i], __fmul_rn(inv, d_key_mean[src]));
    d_v[i] = __fadd_rn(d_v[i], __fmul_rn(inv, d_value_mean[src]));
  }
}

// d page_mean[p] += keys(p) / keys(block(p)) * d block_mean[block(p)]: one thread per page element.
__global__ void coarse_summaries_backward_kernel(const Geometry g, const float* __restrict__ d_block_key_mean,
                                                 const float* __restrict__ d_block_value_mean,
                                                 float* __restrict__ d_page_key_mean,
                                                 float* __restrict__ d_page_value_mean) {
  const int d = g.head_dim;
  const std::int64_t total = std::int64_t{g.kv_heads} * g.batch * g.pages * d;
  for (std::int64_t i = blockIdx.x * std::int64_t{blockDim.x} + threadIdx.x; i < total;
       i += std::int64_t{gridDim.x} * blockDim.x) {
    const int c = static_cast<int>(i % d);
    const std::int64_t slot = (i / d) % (g.batch * g.pages);  // b * pages + page
    const int h = static_cast<int>(i / (std::int64_t{d} * g.batch * g.pages));
    const std::int64_t page = slot % g.pages;
    const std::int64_t block = page / g.coarse_pages;
    const std::int64_t pg0 = block * g.coarse_pages;
    const std::int64_t pg1 = min(pg0 + g.coarse_pages, g.pages);
    const float inv = 1.0f / static_cast<float>(min(pg1 * g.page_size, g.seq) - pg0 * g.page_size);
    const float w =
        __fmul_rn(static_cast<float>(min((page + 1) * g.page_size, g.seq) - page * g.page_size), inv);
    const std::int64_t src = (std::int64_t{h} * g.block_rows + (slot / g.pages) * g.blocks + block) * d + c;
    const std::int64_t dst = (std::int64_t{h} * g.page_rows + slot) * d + c;
    d_page_key_mean[dst] = __fadd_rn(d_page_key_mean[dst], __fmul_rn(w, d_block_key_mean[src]));
    d_page_value_mean[dst] = __fadd_rn(d_page_value_mean[dst], __fmul_rn(w, d_block_value_mean[src]));
  }
}

// Grid of a grid-stride loop over `total` elements.
unsigned grid_for(std::int64_t total) {
  return static_cast<unsigned>(std::clamp<std::int64_t>((total + kThreads - 1) / kThreads, 1, 65535LL * 16));
}

}  // namespace

void page_summaries(const PageSummaryParams& p, Stream stream) {
  const Geometry g = geometry(p.shape);
  page_summaries_kernel<<<grid_for(g.kv_heads * g.page_rows * g.head_dim), kThreads, 0,
                          static_cast<cudaStream_t>(stream)>>>(g, p.k, p.v, p.pages);
  RINGCAST_CUDA_CHECK_LAUNCH();
}

void coarse_summaries(const CoarseSummaryParams& p, Stream stream) {
  const Geometry g = geometry(p.shape);
  coarse_summaries_kernel<<<grid_for(g.kv_heads * g.block_rows * g.head_dim), kThreads, 0,
                            static_cast<cudaStream_t>(stream)>>>(g, p.page_key_mean, p.page_value_mean,
                                                                 p.page_key_min, p.page_key_max, p.page_count,
                                                                 p.blocks);
  RINGCAST_CUDA_CHECK_LAUNCH();
}

void page_summaries_backward(const PageSummaryBackwardParams& p, Stream stream) {
  const Geometry g = geometry(p.shape);
  page_summaries_backward_kernel<<<grid_for(g.batch * g.seq * g.kv_heads * g.head_dim), kThreads, 0,
                                   static_cast<cudaStream_t>(stream)>>>(g, p.d_key_mean, p.d_value_mean, p.d_k,
                                                                        p.d_v);
  RINGCAST_CUDA_CHECK_LAUNCH();
}

void coarse_summaries_backward(const CoarseSummaryBackwardParams& p, Stream stream) {
  const Geometry g = geometry(p.shape);
  coarse_summaries_backward_kernel<<<grid_for(g.kv_heads * g.batch * g.pages * g.head_dim), kThreads, 0,
                                     static_cast<cudaStream_t>(stream)>>>(
      g, p.d_block_key_mean, p.d_block_value_mean, p.d_page_key_mean, p.d_page_value_mean);
  RINGCAST_CUDA_CHECK_LAUNCH();
}

}  // namespace ringcast::kernels::cuda
