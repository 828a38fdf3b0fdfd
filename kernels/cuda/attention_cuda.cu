// CUDA backend entry points (attention_cuda.hpp): validation of what the kernels support, the
// dtype x head-dim switch onto the per-instance launch functions, workspace sizes, and the LSE merge.
// Everything is enqueued on the caller's stream; nothing allocates (the backward's D buffer is the
// caller's workspace).
#include "attention_cuda.hpp"

#include <ringcast/cuda_check.hpp>
#include <ringcast/error.hpp>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>

#include "attention_launch.hpp"

namespace ringcast::kernels::cuda {
namespace detail {

AttentionArgs forward_args(const AttentionForwardParams& p) {
  AttentionArgs a;
  a.q = p.q;
  a.k_pages = p.k_pages;
  a.v_pages = p.v_pages;
  a.o = p.o;
  a.lse = p.lse;
  a.q_pos = p.q_pos;
  a.offsets = p.table.offsets;
  a.entries = p.table.entries;
  a.key_meta = p.table.key_meta;
  a.key_bias = p.key_bias;
  a.seq_q = p.shape.seq_q;
  a.num_tiles = p.shape.num_tiles();
  a.num_pages = p.shape.num_pages;
  a.batch = p.shape.batch;
  a.heads = p.shape.heads;
  a.kv_heads = p.shape.kv_heads;
  a.scale = p.softmax_scale;
  return a;
}

AttentionArgs backward_args(const AttentionBackwardParams& p) {
  AttentionArgs a = forward_args(p.fwd);
  a.d_o = p.d_o;
  a.ref_offsets = p.transposed.offsets;
  a.refs = p.transposed.refs;
  a.d_q = p.d_q;
  a.d_k = p.d_k_pages;
  a.d_v = p.d_v_pages;
  a.delta = static_cast<float*>(p.workspace);
  a.accumulate = p.accumulate;
  return a;
}

namespace {

// RINGCAST_CUDA_SMEM_LIMIT, read once: bytes of shared memory per block that the pipelines may use
// below the device's own opt-in limit; 0 where unset.
int smem_cap() {
  static const int cap = [] {
    const char* env = std::getenv("RINGCAST_CUDA_SMEM_LIMIT");
    if (env == nullptr || *env == '\0') return 0;
    char* end = nullptr;
    const long bytes = std::strtol(env, &end, 10);
    RINGCAST_CHECK(*end == '\0' && bytes > 0 && bytes <= (1L << 30),
                   "RINGCAST_CUDA_SMEM_LIMIT={}: expected a positive number of bytes", env);
    return static_cast<int>(bytes);
  }();
  return cap;
}

}  // namespace

int pick_stages(const char* kernel, std::size_t (*bytes)(int), int max_stages) {
  int device = 0;
  int limit = 0;
  RINGCAST_CUDA_CHECK(cudaGetDevice(&device));
  RINGCAST_CUDA_CHECK(cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  if (smem_cap() > 0) limit = std::min(limit, smem_cap());
  for (int stages = max_stages; stages > 1; --stages) {
    if (bytes(stages) <= static_cast<std::size_t>(limit)) return stages;
  }
  RINGCAST_CHECK(bytes(1) <= static_cast<std::size_t>(limit),
                 "{}: needs {} bytes of shared memory per block, the device allows {}", kernel, bytes(1),
                 limit);
  return 1;
}

void set_smem_limit(const void* kernel, std::size_t bytes) {
  RINGCAST_CUDA_CHECK(
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
}

namespace {

// One warp per (b, i, h) row; every lane reads both LSEs before lane 0 overwrites lse_acc.
__global__ void merge_by_lse_kernel(const MergeParams p) {
  const std::int64_t rows = static_cast<std::int64_t>(p.batch) * p.seq * p.heads;
  const std::int64_t row = (static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (row >= rows) return;
  const int h = static_cast<int>(row % p.heads);
  const std::int64_t bi = row / p.heads;
  const std::int64_t b = bi / p.seq;
  const std::int64_t stat = (b * p.heads + h) * p.seq + (bi - b * p.seq);
  const float la = p.lse_acc[stat];
  const float lp = p.lse_part[stat];
  const float m = fmaxf(la, lp);
  float lse = -INFINITY, wa = 0.f, wp = 0.f;
  if (m != -INFINITY) {
    lse = m + logf(expf(la - m) + expf(lp - m));
    wa = expf(la - lse);
    wp = expf(lp - lse);
  }
  float* o_acc = p.o_acc + row * p.head_dim;
  const float* o_part = p.o_part + row * p.head_dim;
  // Selects, not products, for a side that contributes nothing: its O may hold anything.
  for (int d = lane; d < p.head_dim; d += 32)
    o_acc[d] = (la != -INFINITY ? wa * o_acc[d] : 0.f) + (lp != -INFINITY ? wp * o_part[d] : 0.f);
  __syncwarp();
  if (lane == 0) p.lse_acc[stat] = lse;
}

}  // namespace
}  // namespace detail

namespace {

constexpr std::size_t kWorkspaceAlign = 256;

bool aligned16(const void* p) { return (reinterpret_cast<std::uintptr_t>(p) & 15u) == 0; }

// What the CUDA kernels support beyond validate(): storage dtypes, head dims, the page size, and
// 16-byte alignment for cp.async.
void check_supported(const AttentionForwardParams& p) {
  const AttentionShape& s = p.shape;
  RINGCAST_CHECK(p.dtype == DType::kBF16 || p.dtype == DType::kF16,
                 "CUDA attention: storage dtype must be bf16 or f16, got {}", dtype_name(p.dtype));
  RINGCAST_CHECK(p.o_dtype == p.dtype || p.o_dtype == DType::kF32,
                 "CUDA attention: o_dtype must be the storage dtype or f32, got {}", dtype_name(p.o_dtype));
  RINGCAST_CHECK(s.head_dim == 64 || s.head_dim == 128, "CUDA attention: head_dim must be 64 or 128, got {}",
                 s.head_dim);
  RINGCAST_CHECK(s.page_size == detail::kPageSize, "CUDA attention: page_size must be {}, got {}",
                 detail::kPageSize, s.page_size);
  RINGCAST_CHECK(s.kv_heads > 0 && s.heads % s.kv_heads == 0,
                 "CUDA attention: heads ({}) must be a multiple of kv_heads ({})", s.heads, s.kv_heads);
  RINGCAST_CHECK(s.batch <= 65535, "CUDA attention: batch {} exceeds 65535", s.batch);
  RINGCAST_CHECK(s.num_tiles() * s.heads < (std::int64_t{1} << 31) &&
                     s.kv_heads * s.num_pages < (std::int64_t{1} << 31),
                 "CUDA attention: too many tiles x heads or pages x kv_heads for one grid");
  RINGCAST_CHECK(aligned16(p.q) && aligned16(p.k_pages) && aligned16(p.v_pages) && aligned16(p.o),
                 "CUDA attention: q, k_pages, v_pages and o must be 16-byte aligned");
}

template <typename T>
void forward_dtype(const AttentionForwardParams& p, cudaStream_t stream) {
  if (p.shape.head_dim == 64) {
    detail::launch_attention_forward<T, 64>(p, stream);
  } else {
    detail::launch_attention_forward<T, 128>(p, stream);
  }
}

template <typename T>
void backward_dtype(const AttentionBackwardParams& p, cudaStream_t stream) {
  if (p.fwd.shape.head_dim == 64) {
    detail::launch_attention_backward<T, 64>(p, stream);
  } else {
    detail::launch_attention_backward<T, 128>(p, stream);
  }
}

}  // namespace

std::size_t attention_forward_workspace_bytes(const AttentionShape&) { return 0; }

std::size_t attention_backward_workspace_bytes(const AttentionShape& shape) {
  const std::size_t delta = static_cast<std::size_t>(shape.batch) * shape.heads * shape.seq_q * sizeof(float);
  return (delta + kWorkspaceAlign - 1) / kWorkspaceAlign * kWorkspaceAlign;
}

void attention_forward(const AttentionForwardParams& p, Stream stream) {
  check_supported(p);
  if (p.shape.batch == 0 || p.shape.seq_q == 0) return;
  const auto s = static_cast<cudaStream_t>(stream);
  if (p.dtype == DType::kBF16) {
    forward_dtype<__nv_bfloat16>(p, s);
  } else {
    forward_dtype<__half>(p, s);
  }
}

void attention_backward(const AttentionBackwardParams& p, Stream stream) {
  check_supported(p.fwd);
  RINGCAST_CHECK(aligned16(p.d_o) && aligned16(p.d_q) && aligned16(p.d_k_pages) && aligned16(p.d_v_pages) &&
                     aligned16(p.workspace),
                 "CUDA attention backward: d_o, d_q, d_k_pages, d_v_pages and workspace must be 16-byte aligned");
  if (p.fwd.shape.batch == 0 || p.fwd.shape.seq_q == 0) {
    RINGCAST_CHECK(p.accumulate || p.fwd.shape.num_pages == 0,
                   "CUDA attention backward: no query rows; dK/dV would be left unwritten");
    return;
  }
  const auto s = static_cast<cudaStream_t>(stream);
  if (p.fwd.dtype == DType::kBF16) {
    backward_dtype<__nv_bfloat16>(p, s);
  } else {
    backward_dtype<__half>(p, s);
  }
}

void merge_by_lse(const MergeParams& p, Stream stream) {
  const std::int64_t rows = static_cast<std::int64_t>(p.batch) * p.seq * p.heads;
  if (rows == 0) return;
  constexpr int kThreads = 256;
  constexpr int kRowsPerBlock = kThreads / 32;
  detail::merge_by_lse_kernel<<<static_cast<unsigned>((rows + kRowsPerBlock - 1) / kRowsPerBlock), kThreads, 0,
                                static_cast<cudaStream_t>(stream)>>>(p);
  RINGCAST_CUDA_CHECK_LAUNCH();
}

}  // namespace ringcast::kernels::cuda
