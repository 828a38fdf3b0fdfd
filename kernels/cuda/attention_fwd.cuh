// Forward block-sparse paged attention (FlashAttention-2 structure over a block table).
// One CTA = one 128-row query tile of one query head of one batch element; 8 warps own 16 rows each
// (one m16 slab), so row statistics never leave a warp (4 warps x 32 rows spill at d = 128: 255
// registers; 8 x 16 need ~230, one CTA of 8 warps per SM). Q stays in shared memory (re-read with
// ldmatrix per page); the unit's entries are walked in table order, each entry's 64-key K and V page
// arriving by cp.async into a 2-stage ring (1 stage where shared memory is short, e.g. sm_89) while
// the previous page is computed. Online softmax in registers in log2 units; P goes from the S
// accumulators to the PV mma without shared memory. Writes O (o_dtype) and LSE (natural log).
#pragma once

#include <ringcast/cuda_check.hpp>

#include "attention_device.cuh"
#include "attention_launch.hpp"

namespace ringcast::kernels::cuda::detail {

template <typename T, int kHeadDim>
struct FwdTraits {
  static constexpr int kWarps = 8;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kRowsPerWarp = kQueryTile / kWarps;
  static constexpr int kSlabs = kRowsPerWarp / 16;  // m16 slabs per warp
  static constexpr std::size_t smem_bytes(int stages) {
    return (kQueryTile + 2 * stages * kPageSize) * kHeadDim * sizeof(T) +
           stages * kPageSize * sizeof(KeyMeta);
  }
};

template <typename T, int kHeadDim, typename OT>
__global__ void __launch_bounds__(FwdTraits<T, kHeadDim>::kThreads, 1)
    attention_fwd_kernel(const AttentionArgs a, const int stages) {
  using Traits = FwdTraits<T, kHeadDim>;
  constexpr int D = kHeadDim;
  constexpr int kThreads = Traits::kThreads;
  constexpr int kSlabs = Traits::kSlabs;
  constexpr int kDTiles = D / 8;  // n8 tiles of the O accumulator

  extern __shared__ __align__(128) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem);
  T* sK = sQ + kQueryTile * D;
  T* sV = sK + stages * kPageSize * D;
  KeyMeta* sMeta = reinterpret_cast<KeyMeta*>(sV + stages * kPageSize * D);

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int g = lane >> 2;
  const int qd = lane & 3;

  const std::int64_t tile = blockIdx.x / a.heads;
  const int h = blockIdx.x % a.heads;
  const int b = blockIdx.y;
  const int kvh = h / (a.heads / a.kv_heads);
  const std::int64_t unit = (b * a.num_tiles + tile) * a.kv_heads + kvh;
  const std::int64_t e0 = a.offsets[unit];
  const int n = static_cast<int>(a.offsets[unit + 1] - e0);
  const std::int64_t row0 = tile * kQueryTile;
  const int valid_rows = static_cast<int>(min(static_cast<std::int64_t>(kQueryTile), a.seq_q - row0));
  const std::int64_t row_stride = static_cast<std::int64_t>(a.heads) * D;
  const std::int64_t head_off = (b * a.seq_q + row0) * row_stride + h * D;
  const std::int64_t pool_off = static_cast<std::int64_t>(kvh) * a.num_pages * kPageSize * D;
  const T* k_head = static_cast<const T*>(a.k_pages) + pool_off;
  const T* v_head = static_cast<const T*>(a.v_pages) + pool_off;

  auto issue_page = [&](const BlockEntry& e, int buf) {
    const std::int64_t off = static_cast<std::int64_t>(e.page) * kPageSize * D;
    load_tile<D, kPageSize, kThreads>(sK + buf * kPageSize * D, k_head + off, D, e.key_count, tid);
    load_tile<D, kPageSize, kThreads>(sV + buf * kPageSize * D, v_head + off, D, e.key_count, tid);
    if (e.key_meta >= 0) load_key_meta<kThreads>(sMeta + buf * kPageSize, a.key_meta + e.key_meta, tid);
  };

  load_tile<D, kQueryTile, kThreads>(sQ, static_cast<const T*>(a.q) + head_off, row_stride, valid_rows, tid);
  BlockEntry cur{}, nxt{};
  if (n > 0) {
    cur = a.entries[e0];
    issue_page(cur, 0);
  }
  cp_async_commit();
  if (n > 1) nxt = a.entries[e0 + 1];

  const int wrow0 = warp * Traits::kRowsPerWarp;
  const std::uint64_t wvalid = valid_bits(valid_rows, wrow0, Traits::kRowsPerWarp);
  int qpos[kSlabs][2];
#pragma unroll
  for (int mt = 0; mt < kSlabs; ++mt) {
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      const int r = wrow0 + mt * 16 + g + 8 * hh;
      qpos[mt][hh] = r < valid_rows ? a.q_pos[row0 + r] : 0;
    }
  }

  float acc[kSlabs][kDTiles][4];
  float row_max[kSlabs][2];  // log2 units, scale and bias included
  float row_sum[kSlabs][2];  // this thread's partial sum; quad-reduced once at the end
#pragma unroll
  for (int mt = 0; mt < kSlabs; ++mt) {
#pragma unroll
    for (int dn = 0; dn < kDTiles; ++dn) acc[mt][dn][0] = acc[mt][dn][1] = acc[mt][dn][2] = acc[mt][dn][3] = 0.f;
    row_max[mt][0] = row_max[mt][1] = -INFINITY;
    row_sum[mt][0] = row_sum[mt][1] = 0.f;
  }
  const float c = a.scale * kLog2e;

  // One page for this warp's rows: S = Q K^T, mask + bias, online softmax, acc += P V.
  auto compute_page = [&](auto has_meta, const std::uint64_t bits, const int buf) {
    constexpr bool kMeta = decltype(has_meta)::value;
    const T* sKb = sK + buf * kPageSize * D;
    const T* sVb = sV + buf * kPageSize * D;
    const KeyMeta* meta = sMeta + buf * kPageSize;

    float s[kSlabs][8][4];
#pragma unroll
    for (int mt = 0; mt < kSlabs; ++mt)
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) s[mt][nt][0] = s[mt][nt][1] = s[mt][nt][2] = s[mt][nt][3] = 0.f;
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
      std::uint32_t aq[kSlabs][4];
#pragma unroll
      for (int mt = 0; mt < kSlabs; ++mt)
        ldmatrix_x4(aq[mt], smem_addr(sQ + swizzle<D>(wrow0 + mt * 16 + (lane & 15), ks * 2 + (lane >> 4))));
#pragma unroll
      for (int np = 0; np < 4; ++np) {
        std::uint32_t bk[4];
        ldmatrix_x4(bk, smem_addr(sKb + swizzle<D>(np * 16 + (lane & 7) + ((lane >> 4) << 3),
                                                   ks * 2 + ((lane >> 3) & 1))));
#pragma unroll
        for (int mt = 0; mt < kSlabs; ++mt) {
          mma_16816<T>(s[mt][2 * np], aq[mt], bk[0], bk[1]);
          mma_16816<T>(s[mt][2 * np + 1], aq[mt], bk[2], bk[3]);
        }
      }
    }

    const float bias2 = cur.bias * kLog2e;
#pragma unroll
    for (int mt = 0; mt < kSlabs; ++mt) {
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        const int rl = mt * 16 + g + 8 * hh;  // row within the warp's rows
        const int limit = row_key_limit((bits >> rl) & 1u, qpos[mt][hh], cur);
        float mx = -INFINITY;
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            float& x = s[mt][nt][2 * hh + e];
            x = masked_logit2<kMeta>(x, nt * 8 + 2 * qd + e, limit, wrow0 + rl, c, bias2, meta);
            mx = fmaxf(mx, x);
          }
        }
        mx = quad_max(mx);
        const float m_new = fmaxf(row_max[mt][hh], mx);
        const float m_use = m_new == -INFINITY ? 0.f : m_new;  // no (-inf) - (-inf)
        const float alpha = fast_exp2(row_max[mt][hh] - m_use);
        row_max[mt][hh] = m_new;
        float sum = 0.f;
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            float& x = s[mt][nt][2 * hh + e];
            x = fast_exp2(x - m_use);
            sum += x;
          }
        }
        row_sum[mt][hh] = row_sum[mt][hh] * alpha + sum;
#pragma unroll
        for (int dn = 0; dn < kDTiles; ++dn) {
          acc[mt][dn][2 * hh] *= alpha;
          acc[mt][dn][2 * hh + 1] *= alpha;
        }
      }
    }

#pragma unroll
    for (int kk = 0; kk < kPageSize / 16; ++kk) {
      std::uint32_t ap[kSlabs][4];
#pragma unroll
      for (int mt = 0; mt < kSlabs; ++mt) {
        ap[mt][0] = pack2<T>(s[mt][2 * kk][0], s[mt][2 * kk][1]);
        ap[mt][1] = pack2<T>(s[mt][2 * kk][2], s[mt][2 * kk][3]);
        ap[mt][2] = pack2<T>(s[mt][2 * kk + 1][0], s[mt][2 * kk + 1][1]);
        ap[mt][3] = pack2<T>(s[mt][2 * kk + 1][2], s[mt][2 * kk + 1][3]);
      }
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        std::uint32_t bv[4];
        ldmatrix_x4_trans(bv, smem_addr(sVb + swizzle<D>(kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8,
                                                         dp * 2 + (lane >> 4))));
#pragma unroll
        for (int mt = 0; mt < kSlabs; ++mt) {
          mma_16816<T>(acc[mt][2 * dp], ap[mt], bv[0], bv[1]);
          mma_16816<T>(acc[mt][2 * dp + 1], ap[mt], bv[2], bv[3]);
        }
      }
    }
  };

  for (int i = 0; i < n; ++i) {
    const int buf = stages == 2 ? (i & 1) : 0;
    // The buffer being refilled was last read in iteration i - 1, which ended with __syncthreads.
    if (stages == 2 && i + 1 < n) issue_page(nxt, buf ^ 1);
    cp_async_commit();
    // Entry i + 2 is loaded a whole page of compute before its page id is needed.
    BlockEntry after{};
    if (i + 2 < n) after = a.entries[e0 + i + 2];
    if (stages == 2) {
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    const std::uint64_t bits = mask_bits(cur.row_mask, wrow0, Traits::kRowsPerWarp) & wvalid;
    if (bits != 0) {  // warp-uniform: a warp none of whose rows see the entry skips it
      if (cur.key_meta >= 0) {
        compute_page(std::true_type{}, bits, buf);
      } else {
        compute_page(std::false_type{}, bits, buf);
      }
    }
    __syncthreads();
    if (i + 1 < n) {
      if (stages == 1) issue_page(nxt, 0);
      cur = nxt;
      nxt = after;
    }
  }
  cp_async_wait<0>();

  OT* o = static_cast<OT*>(a.o) + head_off;
  float* lse = a.lse + (static_cast<std::int64_t>(b) * a.heads + h) * a.seq_q + row0;
#pragma unroll
  for (int mt = 0; mt < kSlabs; ++mt) {
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      const float sum = quad_sum(row_sum[mt][hh]);
      const int r = wrow0 + mt * 16 + g + 8 * hh;
      if (r >= valid_rows) continue;
      const bool seen = sum > 0.f;  // a row that saw no key: O = 0, LSE = -inf
      const float inv = seen ? 1.f / sum : 0.f;
      OT* orow = o + r * row_stride;
#pragma unroll
      for (int dn = 0; dn < kDTiles; ++dn)
        store2<OT>(orow + dn * 8 + 2 * qd, acc[mt][dn][2 * hh] * inv, acc[mt][dn][2 * hh + 1] * inv);
      if (qd == 0) lse[r] = seen ? row_max[mt][hh] * kLn2 + logf(sum) : -INFINITY;
    }
  }
}

template <typename T, int kHeadDim>
void launch_attention_forward(const AttentionForwardParams& p, cudaStream_t stream) {
  using Traits = FwdTraits<T, kHeadDim>;
  const AttentionArgs a = forward_args(p);
  const int stages = pick_stages("attention forward", &Traits::smem_bytes);
  const std::size_t smem = Traits::smem_bytes(stages);
  const auto kernel = p.o_dtype == DType::kF32 ? attention_fwd_kernel<T, kHeadDim, float>
                                               : attention_fwd_kernel<T, kHeadDim, T>;
  set_smem_limit(reinterpret_cast<const void*>(kernel), smem);
  const dim3 grid(static_cast<unsigned>(a.num_tiles * a.heads), static_cast<unsigned>(a.batch));
  kernel<<<grid, Traits::kThreads, smem, stream>>>(a, stages);
  RINGCAST_CUDA_CHECK_LAUNCH();
}

}  // namespace ringcast::kernels::cuda::detail
