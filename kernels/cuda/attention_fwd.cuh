// Forward block-sparse paged attention (FlashAttention-2 structure over a block table).
// One CTA = one 128-row query tile of one query head of one batch element; 8 warps own 16 rows each
// (one m16 slab), so row statistics never leave a warp (4 warps x 32 rows spill at d = 128: 255
// registers; 8 x 16 need ~230, one CTA of 8 warps per SM). Q stays in shared memory (re-read with
// ldmatrix per page); the unit's entries are walked in table order, each entry's 64-key K and V page
// arriving by cp.async into a ring of up to 3 stages (2 in flight while one is computed; fewer where
// shared memory is short, e.g. sm_89), one __syncthreads per page. A page that every row of a warp
// sees whole takes a path without per-element masking. Online softmax in registers in log2 units; P
// goes from the S accumulators to the PV mma without shared memory. Writes O (o_dtype) and LSE (ln).
#pragma once

#include <ringcast/cuda_check.hpp>

#include <climits>
#include <type_traits>

#include "attention_device.cuh"
#include "attention_launch.hpp"

namespace ringcast::kernels::cuda::detail {

template <typename T, int kHeadDim>
struct FwdTraits {
  static constexpr int kWarps = 8;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kRowsPerWarp = kQueryTile / kWarps;
  static constexpr int kSlabs = kRowsPerWarp / 16;  // m16 slabs per warp
  static constexpr std::uint64_t kAllRows = (1ull << kRowsPerWarp) - 1;
  static constexpr int kMaxStages = 3;
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

  const QueryTile t = query_tile<D>(a);
  const T* k_head = static_cast<const T*>(a.k_pages) + t.pool_off;
  const T* v_head = static_cast<const T*>(a.v_pages) + t.pool_off;

  auto issue_page = [&](const PageLoad& e, int buf) {
    issue_page_copy<D, kThreads>(sK, sV, sMeta, k_head, v_head, a.key_meta, e, buf, tid);
  };

  // Prologue: Q, then entries [0, L) in groups of their own (see the page pipeline in attention_device.cuh).
  load_tile<D, kQueryTile, kThreads>(sQ, static_cast<const T*>(a.q) + t.head_off, t.row_stride, t.valid_rows, tid);
  const int ahead = stages > 1 ? stages - 1 : 1;  // L
  for (int k = 0; k < ahead; ++k) {
    if (k < t.n) issue_page(page_load(a.entries[t.e0 + k]), k);
    cp_async_commit();
  }
  PageLoad next_load = ahead < t.n ? page_load(a.entries[t.e0 + ahead]) : PageLoad{};  // entry i + L

  const int wrow0 = warp * Traits::kRowsPerWarp;
  const std::uint64_t wvalid = valid_bits(t.valid_rows, wrow0, Traits::kRowsPerWarp);
  int qpos[kSlabs][2];
  int wmin_pos = INT_MAX;  // smallest position of the warp's rows: decides causal pages it sees whole
#pragma unroll
  for (int mt = 0; mt < kSlabs; ++mt) {
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      const int r = wrow0 + mt * 16 + g + 8 * hh;
      qpos[mt][hh] = r < t.valid_rows ? a.q_pos[t.row0 + r] : 0;
      if (r < t.valid_rows) wmin_pos = min(wmin_pos, qpos[mt][hh]);
    }
  }
  wmin_pos = __reduce_min_sync(0xffffffffu, wmin_pos);

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
  auto compute_page = [&](auto mode, const BlockEntry& e, const std::uint64_t bits, const int buf) {
    constexpr int kMode = decltype(mode)::value;
    constexpr bool kMeta = kMode == kPageMeta;
    const T* sKb = sK + buf * kPageSize * D;
    const T* sVb = sV + buf * kPageSize * D;
    const KeyMeta* meta = sMeta + buf * kPageSize;
    const float bias2 = e.bias * kLog2e;

    // Masked pages: the thread's keys j = 8 nt + 2 qd + i carry log2(e) * (entry bias + key_bias[j]);
    // loaded before the S mma so that the loads' latency hides behind it.
    float kbias2[8][2];
    if constexpr (kMode != kPageFull) {
      const float* page_bias = (e.flags & kEntryKeyBias) ? a.key_bias + (t.kvh * a.num_pages + e.page) * kPageSize
                                                         : nullptr;
#pragma unroll
      for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int i = 0; i < 2; ++i) kbias2[nt][i] = bias2 + key_bias2(e, page_bias, nt * 8 + 2 * qd + i);
    }

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

#pragma unroll
    for (int mt = 0; mt < kSlabs; ++mt) {
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        float mx = -INFINITY;
        float m_new, m_use;
        if constexpr (kMode == kPageFull) {
          // The max of the raw scores gives the max logit (c > 0, fmaf is monotone in s), and
          // P = exp2(c s + (bias2 - m)) is one FFMA + one MUFU per element, as in FlashAttention-2.
#pragma unroll
          for (int nt = 0; nt < 8; ++nt) mx = fmaxf(mx, fmaxf(s[mt][nt][2 * hh], s[mt][nt][2 * hh + 1]));
          mx = quad_max(mx);
          m_new = fmaxf(row_max[mt][hh], fmaf(mx, c, bias2));
          m_use = m_new == -INFINITY ? 0.f : m_new;  // no (-inf) - (-inf)
          const float off = bias2 - m_use;
#pragma unroll
          for (int nt = 0; nt < 8; ++nt)
#pragma unroll
            for (int i = 0; i < 2; ++i) s[mt][nt][2 * hh + i] = fast_exp2(fmaf(s[mt][nt][2 * hh + i], c, off));
        } else {
          const int rl = mt * 16 + g + 8 * hh;  // row within the warp's rows
          // Bit 8 nt + i of `seen` is the thread's key 8 nt + 2 qd + i: constant shifts below.
          const std::uint64_t seen = row_key_bits((bits >> rl) & 1u, qpos[mt][hh], e) >> (2 * qd);
#pragma unroll
          for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
            for (int i = 0; i < 2; ++i) {
              float& x = s[mt][nt][2 * hh + i];
              x = masked_logit2<kMeta>(x, (seen >> (nt * 8 + i)) & 1u, nt * 8 + 2 * qd + i, wrow0 + rl, c,
                                       kbias2[nt][i], meta);
              mx = fmaxf(mx, x);
            }
          }
          mx = quad_max(mx);
          m_new = fmaxf(row_max[mt][hh], mx);
          m_use = m_new == -INFINITY ? 0.f : m_new;
#pragma unroll
          for (int nt = 0; nt < 8; ++nt)
#pragma unroll
            for (int i = 0; i < 2; ++i) s[mt][nt][2 * hh + i] = fast_exp2(s[mt][nt][2 * hh + i] - m_use);
        }
        const float alpha = fast_exp2(row_max[mt][hh] - m_use);
        row_max[mt][hh] = m_new;
        float sum = 0.f;
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) sum += s[mt][nt][2 * hh] + s[mt][nt][2 * hh + 1];
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

  run_pages<Traits>(a, t, stages, ahead, next_load, wrow0, wvalid, wmin_pos, issue_page, compute_page);
  cp_async_wait<0>();

  OT* o = static_cast<OT*>(a.o) + t.head_off;
  // LSE rows at t.stat_off, recomputed here: reading t.stat_off instead changes the compiled forward
  float* lse = a.lse + (static_cast<std::int64_t>(t.b) * a.heads + t.h) * a.seq_q + t.row0;
#pragma unroll
  for (int mt = 0; mt < kSlabs; ++mt) {
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      const float sum = quad_sum(row_sum[mt][hh]);
      const int r = wrow0 + mt * 16 + g + 8 * hh;
      if (r >= t.valid_rows) continue;
      const bool seen = sum > 0.f;  // a row that saw no key: O = 0, LSE = -inf
      const float inv = seen ? 1.f / sum : 0.f;
      OT* orow = o + r * t.row_stride;
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
  const int stages = pick_stages("attention forward", &Traits::smem_bytes, Traits::kMaxStages);
  const std::size_t smem = Traits::smem_bytes(stages);
  const auto kernel = p.o_dtype == DType::kF32 ? attention_fwd_kernel<T, kHeadDim, float>
                                               : attention_fwd_kernel<T, kHeadDim, T>;
  set_smem_limit(reinterpret_cast<const void*>(kernel), smem);
  const dim3 grid(static_cast<unsigned>(a.num_tiles * a.heads), static_cast<unsigned>(a.batch));
  kernel<<<grid, Traits::kThreads, smem, stream>>>(a, stages);
  RINGCAST_CUDA_CHECK_LAUNCH();
}

}  // namespace ringcast::kernels::cuda::detail
