// Backward block-sparse paged attention: two passes over the same tables, no atomics, deterministic
// (FlexAttention's structure, kernel-craft.md §2), after a preprocess D = rowsum(dO * O).
//   dQ pass:    one CTA per (query tile, head, batch), 8 warps x 16 rows, walking the unit's entries
//               with the forward's page pipeline and page modes: P = exp2(logit2 - LSE2), dP = dO V^T,
//               dS = P (dP - D), dQ += dS K; dQ (x scale) is written once.
//   dK/dV pass: one CTA per (KV head, page), walking the page's refs (transposed table) x the query
//               heads of the GQA group; per item the tile's Q, dO, LSE, D and positions arrive by
//               cp.async (2-stage ring, one __syncthreads per item; 1 stage where shared memory is
//               short); 32-row chunks that see the whole page skip per-element masking. Warp w owns keys
//               16 (w % 4).. and query rows 64 (w / 4)..; it computes S^T = K Q^T so that P^T and dS^T
//               feed dV += P^T dO and dK += dS^T Q straight from registers. The two row halves are
//               summed through shared memory at the end; dK (x scale) and dV are written once.
// An empty row has LSE = -inf; it is read as +inf, so its P = exp2(logit - inf) = 0.
#pragma once

#include <ringcast/cuda_check.hpp>

#include <climits>
#include <type_traits>

#include "attention_device.cuh"
#include "attention_launch.hpp"

namespace ringcast::kernels::cuda::detail {

// LSE (natural log) -> log2 units; an empty row's -inf becomes +inf so every P of the row is 0.
__device__ __forceinline__ float lse_to_log2(float lse) { return lse == -INFINITY ? INFINITY : lse * kLog2e; }

// D[b, h, i] = sum_d dO[b, i, h, d] * O[b, i, h, d], one warp per (b, i, h) row, fp32.
template <typename T, int kHeadDim, typename OT>
__global__ void attention_bwd_preprocess_kernel(const AttentionArgs a) {
  const std::int64_t rows = static_cast<std::int64_t>(a.batch) * a.seq_q * a.heads;
  const std::int64_t row = (static_cast<std::int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int lane = threadIdx.x & 31;
  if (row >= rows) return;
  const T* d_o = static_cast<const T*>(a.d_o) + row * kHeadDim;
  const OT* o = static_cast<const OT*>(a.o) + row * kHeadDim;
  float sum = 0.f;
#pragma unroll
  for (int d = lane; d < kHeadDim; d += 32) sum = fmaf(to_float(d_o[d]), to_float(o[d]), sum);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
  if (lane == 0) {
    const int h = static_cast<int>(row % a.heads);
    const std::int64_t bi = row / a.heads;  // b * seq_q + i
    const std::int64_t b = bi / a.seq_q;
    a.delta[(b * a.heads + h) * a.seq_q + (bi - b * a.seq_q)] = sum;
  }
}

template <typename T, int kHeadDim>
struct BwdDqTraits {
  static constexpr int kWarps = 8;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kRowsPerWarp = kQueryTile / kWarps;  // one m16 slab
  static constexpr std::uint64_t kAllRows = (1ull << kRowsPerWarp) - 1;
  static constexpr int kMaxStages = 3;
  static constexpr std::size_t smem_bytes(int stages) {
    return (2 * kQueryTile + 2 * stages * kPageSize) * kHeadDim * sizeof(T) +
           stages * kPageSize * sizeof(KeyMeta);
  }
};

template <typename T, int kHeadDim>
__global__ void __launch_bounds__(BwdDqTraits<T, kHeadDim>::kThreads, 1)
    attention_bwd_dq_kernel(const AttentionArgs a, const int stages) {
  using Traits = BwdDqTraits<T, kHeadDim>;
  constexpr int D = kHeadDim;
  constexpr int kThreads = Traits::kThreads;
  constexpr int kDTiles = D / 8;

  extern __shared__ __align__(128) unsigned char smem[];
  T* sQ = reinterpret_cast<T*>(smem);
  T* sdO = sQ + kQueryTile * D;
  T* sK = sdO + kQueryTile * D;
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

  // Prologue: Q and dO, then entries [0, L) in groups of their own (the forward's page pipeline).
  load_tile<D, kQueryTile, kThreads>(sQ, static_cast<const T*>(a.q) + t.head_off, t.row_stride, t.valid_rows, tid);
  load_tile<D, kQueryTile, kThreads>(sdO, static_cast<const T*>(a.d_o) + t.head_off, t.row_stride, t.valid_rows, tid);
  const int ahead = stages > 1 ? stages - 1 : 1;  // L
  for (int k = 0; k < ahead; ++k) {
    if (k < t.n) issue_page(page_load(a.entries[t.e0 + k]), k);
    cp_async_commit();
  }
  PageLoad next_load = ahead < t.n ? page_load(a.entries[t.e0 + ahead]) : PageLoad{};  // entry i + L

  const int wrow0 = warp * Traits::kRowsPerWarp;
  const std::uint64_t wvalid = valid_bits(t.valid_rows, wrow0, Traits::kRowsPerWarp);
  int qpos[2];
  float lse2[2], delta[2];
  int wmin_pos = INT_MAX;  // smallest position of the warp's rows: decides causal pages it sees whole
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    const int r = wrow0 + g + 8 * hh;
    const bool valid = r < t.valid_rows;
    qpos[hh] = valid ? a.q_pos[t.row0 + r] : 0;
    lse2[hh] = valid ? lse_to_log2(a.lse[t.stat_off + r]) : INFINITY;
    delta[hh] = valid ? a.delta[t.stat_off + r] : 0.f;
    if (valid) wmin_pos = min(wmin_pos, qpos[hh]);
  }
  wmin_pos = __reduce_min_sync(0xffffffffu, wmin_pos);

  float acc[kDTiles][4];
#pragma unroll
  for (int dn = 0; dn < kDTiles; ++dn) acc[dn][0] = acc[dn][1] = acc[dn][2] = acc[dn][3] = 0.f;
  const float c = a.scale * kLog2e;

  auto compute_page = [&](auto mode, const BlockEntry& e, const std::uint64_t bits, const int buf) {
    constexpr int kMode = decltype(mode)::value;
    constexpr bool kMeta = kMode == kPageMeta;
    const T* sKb = sK + buf * kPageSize * D;
    const T* sVb = sV + buf * kPageSize * D;
    const KeyMeta* meta = sMeta + buf * kPageSize;
    const float bias2 = e.bias * kLog2e;

    // Masked pages: log2(e) * (entry bias + key_bias[j]) of the thread's keys j = 8 nt + 2 qd + i,
    // loaded before the mma so that their latency hides behind it.
    float kbias2[8][2];
    if constexpr (kMode != kPageFull) {
      const float* page_bias = (e.flags & kEntryKeyBias) ? a.key_bias + (t.kvh * a.num_pages + e.page) * kPageSize
                                                         : nullptr;
#pragma unroll
      for (int nt = 0; nt < 8; ++nt)
#pragma unroll
        for (int i = 0; i < 2; ++i) kbias2[nt][i] = bias2 + key_bias2(e, page_bias, nt * 8 + 2 * qd + i);
    }

    float s[8][4], dp[8][4];
#pragma unroll
    for (int nt = 0; nt < 8; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) s[nt][i] = dp[nt][i] = 0.f;
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
      std::uint32_t aq[4], ado[4];
      const int arow = wrow0 + (lane & 15);
      ldmatrix_x4(aq, smem_addr(sQ + swizzle<D>(arow, ks * 2 + (lane >> 4))));
      ldmatrix_x4(ado, smem_addr(sdO + swizzle<D>(arow, ks * 2 + (lane >> 4))));
#pragma unroll
      for (int np = 0; np < 4; ++np) {
        const int off = swizzle<D>(np * 16 + (lane & 7) + ((lane >> 4) << 3), ks * 2 + ((lane >> 3) & 1));
        std::uint32_t bk[4], bv[4];
        ldmatrix_x4(bk, smem_addr(sKb + off));
        ldmatrix_x4(bv, smem_addr(sVb + off));
        mma_16816<T>(s[2 * np], aq, bk[0], bk[1]);
        mma_16816<T>(s[2 * np + 1], aq, bk[2], bk[3]);
        mma_16816<T>(dp[2 * np], ado, bv[0], bv[1]);
        mma_16816<T>(dp[2 * np + 1], ado, bv[2], bv[3]);
      }
    }

#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      if constexpr (kMode == kPageFull) {
        // P = exp2(c s + bias2 - LSE2): one FFMA + one MUFU per element.
        const float off = bias2 - lse2[hh];
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
          for (int i = 0; i < 2; ++i) {
            const float p = fast_exp2(fmaf(s[nt][2 * hh + i], c, off));
            s[nt][2 * hh + i] = p * (dp[nt][2 * hh + i] - delta[hh]);  // dS
          }
        }
      } else {
        const int rl = g + 8 * hh;
        // Bit 8 nt + i of `seen` is the thread's key 8 nt + 2 qd + i: constant shifts below.
        const std::uint64_t seen = row_key_bits((bits >> rl) & 1u, qpos[hh], e) >> (2 * qd);
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
          for (int i = 0; i < 2; ++i) {
            const float t = masked_logit2<kMeta>(s[nt][2 * hh + i], (seen >> (nt * 8 + i)) & 1u,
                                                 nt * 8 + 2 * qd + i, wrow0 + rl, c, kbias2[nt][i], meta);
            const float p = fast_exp2(t - lse2[hh]);
            s[nt][2 * hh + i] = p * (dp[nt][2 * hh + i] - delta[hh]);  // dS
          }
        }
      }
    }

#pragma unroll
    for (int kk = 0; kk < kPageSize / 16; ++kk) {
      std::uint32_t ads[4];
      ads[0] = pack2<T>(s[2 * kk][0], s[2 * kk][1]);
      ads[1] = pack2<T>(s[2 * kk][2], s[2 * kk][3]);
      ads[2] = pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      ads[3] = pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
      for (int dp2 = 0; dp2 < D / 16; ++dp2) {
        std::uint32_t bk[4];
        ldmatrix_x4_trans(bk, smem_addr(sKb + swizzle<D>(kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8,
                                                         dp2 * 2 + (lane >> 4))));
        mma_16816<T>(acc[2 * dp2], ads, bk[0], bk[1]);
        mma_16816<T>(acc[2 * dp2 + 1], ads, bk[2], bk[3]);
      }
    }
  };

  run_pages<Traits>(a, t, stages, ahead, next_load, wrow0, wvalid, wmin_pos, issue_page, compute_page);
  cp_async_wait<0>();

  float* d_q = a.d_q + t.head_off;
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    const int r = wrow0 + g + 8 * hh;
    if (r >= t.valid_rows) continue;
    float* row = d_q + r * t.row_stride;
#pragma unroll
    for (int dn = 0; dn < kDTiles; ++dn) {
      float2* dst = reinterpret_cast<float2*>(row + dn * 8 + 2 * qd);
      float2 v = make_float2(acc[dn][2 * hh] * a.scale, acc[dn][2 * hh + 1] * a.scale);
      if (a.accumulate) {
        const float2 old = *dst;
        v.x += old.x;
        v.y += old.y;
      }
      *dst = v;
    }
  }
}

template <typename T, int kHeadDim>
struct BwdDkvTraits {
  static constexpr int kWarps = 8;
  static constexpr int kThreads = kWarps * 32;
  // One stage of the item ring: Q and dO tiles, then LSE, D (fp32) and q_pos (int32) rows, then KeyMeta.
  static constexpr std::size_t kTileBytes = kQueryTile * kHeadDim * sizeof(T);
  static constexpr std::size_t kStageBytes = 2 * kTileBytes + 3 * kQueryTile * 4 + kPageSize * sizeof(KeyMeta);
  static constexpr std::size_t kPageBytes = kPageSize * kHeadDim * sizeof(T);
  static constexpr std::size_t smem_bytes(int stages) { return 2 * kPageBytes + stages * kStageBytes; }
  // The final reduction of the two row halves reuses stage 0's Q and dO tiles as [2][64][D] fp32.
  static_assert(2 * kPageSize * kHeadDim * sizeof(float) <= 2 * kTileBytes);
  static_assert(kStageBytes % 16 == 0 && kPageBytes % 16 == 0);
};

template <typename T, int kHeadDim>
__global__ void __launch_bounds__(BwdDkvTraits<T, kHeadDim>::kThreads, 1)
    attention_bwd_dkdv_kernel(const AttentionArgs a, const int stages) {
  using Traits = BwdDkvTraits<T, kHeadDim>;
  constexpr int D = kHeadDim;
  constexpr int kThreads = Traits::kThreads;
  constexpr int kDTiles = D / 8;

  extern __shared__ __align__(128) unsigned char smem[];
  T* sK = reinterpret_cast<T*>(smem);
  T* sV = sK + kPageSize * D;
  unsigned char* stage_base = smem + 2 * Traits::kPageBytes;
  struct Stage {
    T* q;
    T* d_o;
    float* lse;
    float* delta;
    std::int32_t* q_pos;
    KeyMeta* meta;
  };
  auto stage = [&](int s) {
    unsigned char* p = stage_base + s * Traits::kStageBytes;
    Stage st;
    st.q = reinterpret_cast<T*>(p);
    st.d_o = reinterpret_cast<T*>(p + Traits::kTileBytes);
    st.lse = reinterpret_cast<float*>(p + 2 * Traits::kTileBytes);
    st.delta = st.lse + kQueryTile;
    st.q_pos = reinterpret_cast<std::int32_t*>(st.delta + kQueryTile);
    st.meta = reinterpret_cast<KeyMeta*>(st.q_pos + kQueryTile);
    return st;
  };

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int g = lane >> 2;
  const int qd = lane & 3;
  const int kg = warp & 3;   // keys [16 kg, 16 kg + 16) of the page
  const int rh = warp >> 2;  // query rows [64 rh, 64 rh + 64) of each tile

  const std::int64_t kv_page = blockIdx.x;  // kvh * num_pages + page
  const int kvh = static_cast<int>(kv_page / a.num_pages);
  const int group = a.heads / a.kv_heads;
  const std::int64_t ref0 = a.ref_offsets[kv_page];
  const int items = static_cast<int>(a.ref_offsets[kv_page + 1] - ref0) * group;
  if (items == 0 && a.accumulate) return;  // nothing to add; block-uniform, before any barrier

  const std::int64_t row_stride = static_cast<std::int64_t>(a.heads) * D;

  // An item is (ref, query head of the group); its tile geometry comes from the ref's unit. It holds
  // what its copy needs; the entry itself is read from global memory (L1) when the item is computed.
  struct Item {
    std::int64_t entry;     // index into the forward table's entries
    std::int64_t head_off;  // offset of (b, row0, h) in Q / dO
    std::int64_t stat_off;  // offset of (b, h, row0) in LSE / D
    std::int64_t row0;
    int valid_rows;
    int key_meta;
  };
  auto make_item = [&](const PageRef& ref, int key_meta, int it) {
    Item item;
    item.entry = ref.entry;
    item.key_meta = key_meta;
    const std::int64_t b = ref.unit / (a.num_tiles * a.kv_heads);
    const std::int64_t tile = (ref.unit / a.kv_heads) % a.num_tiles;
    const int h = kvh * group + it % group;
    item.row0 = tile * kQueryTile;
    item.valid_rows = static_cast<int>(min(static_cast<std::int64_t>(kQueryTile), a.seq_q - item.row0));
    item.head_off = (b * a.seq_q + item.row0) * row_stride + h * D;
    item.stat_off = (b * a.heads + h) * a.seq_q + item.row0;
    return item;
  };
  auto issue_item = [&](const Item& item, int buf) {
    const Stage st = stage(buf);
    load_tile<D, kQueryTile, kThreads>(st.q, static_cast<const T*>(a.q) + item.head_off, row_stride,
                                       item.valid_rows, tid);
    load_tile<D, kQueryTile, kThreads>(st.d_o, static_cast<const T*>(a.d_o) + item.head_off, row_stride,
                                       item.valid_rows, tid);
    for (int i = tid; i < 3 * kQueryTile; i += kThreads) {
      const int r = i % kQueryTile;
      const bool valid = r < item.valid_rows;
      const int which = i / kQueryTile;
      const void* src = which == 0   ? static_cast<const void*>(a.lse + item.stat_off + r)
                        : which == 1 ? static_cast<const void*>(a.delta + item.stat_off + r)
                                     : static_cast<const void*>(a.q_pos + item.row0 + r);
      cp_async_4(smem_addr(st.lse + i), valid ? src : a.lse, valid);  // lse, delta, q_pos are consecutive
    }
    if (item.key_meta >= 0) load_key_meta<kThreads>(st.meta, a.key_meta + item.key_meta, tid);
  };

  float dk[kDTiles][4], dv[kDTiles][4];
#pragma unroll
  for (int dn = 0; dn < kDTiles; ++dn)
#pragma unroll
    for (int i = 0; i < 4; ++i) dk[dn][i] = dv[dn][i] = 0.f;
  const float c = a.scale * kLog2e;

  // log2(e) * key_bias of the thread's two keys kg * 16 + g + 8 hh of this CTA's page, added by the
  // items whose entry has kEntryKeyBias (key_bias may be null when none has).
  float page_kbias2[2] = {0.f, 0.f};
  if (a.key_bias != nullptr) {
#pragma unroll
    for (int hh = 0; hh < 2; ++hh)
      page_kbias2[hh] = __ldg(a.key_bias + kv_page * kPageSize + kg * 16 + g + 8 * hh) * kLog2e;
  }

  // One 32-row chunk of an item (S^T, dP^T kept at 16 registers each): rows rbase.. of the tile
  // whose bits (bit cr: row rbase + cr sees the entry) are not all zero.
  auto compute_chunk = [&](auto mode, const BlockEntry& ent, const Stage& st, const int rbase,
                           const std::uint32_t bits) {
    constexpr int kMode = decltype(mode)::value;
    constexpr bool kMeta = kMode == kPageMeta;
    const float bias2 = ent.bias * kLog2e;
    bool key_on[2];      // masked chunks: key_mask bits of the thread's keys
    float key_bias2_[2];  // masked chunks: log2(e) * (entry bias + key_bias) of the thread's keys
    if constexpr (kMode != kPageFull) {
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        key_on[hh] = (ent.key_mask >> (kg * 16 + g + 8 * hh)) & 1u;
        key_bias2_[hh] = (ent.flags & kEntryKeyBias) ? bias2 + page_kbias2[hh] : bias2;
      }
    }
    float st_[4][4], dpt[4][4];
#pragma unroll
    for (int nt = 0; nt < 4; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) st_[nt][i] = dpt[nt][i] = 0.f;
#pragma unroll
    for (int ks = 0; ks < D / 16; ++ks) {
      std::uint32_t ak[4], av[4];
      const int aoff = swizzle<D>(kg * 16 + (lane & 15), ks * 2 + (lane >> 4));
      ldmatrix_x4(ak, smem_addr(sK + aoff));
      ldmatrix_x4(av, smem_addr(sV + aoff));
#pragma unroll
      for (int np = 0; np < 2; ++np) {
        const int boff =
            swizzle<D>(rbase + np * 16 + (lane & 7) + ((lane >> 4) << 3), ks * 2 + ((lane >> 3) & 1));
        std::uint32_t bq[4], bo[4];
        ldmatrix_x4(bq, smem_addr(st.q + boff));
        ldmatrix_x4(bo, smem_addr(st.d_o + boff));
        mma_16816<T>(st_[2 * np], ak, bq[0], bq[1]);
        mma_16816<T>(st_[2 * np + 1], ak, bq[2], bq[3]);
        mma_16816<T>(dpt[2 * np], av, bo[0], bo[1]);
        mma_16816<T>(dpt[2 * np + 1], av, bo[2], bo[3]);
      }
    }
    // Element (nt, 2 hh + e): key kg*16 + g + 8 hh, query row rbase + nt*8 + 2 qd + e.
#pragma unroll
    for (int nt = 0; nt < 4; ++nt) {
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const int cr = nt * 8 + 2 * qd + e;  // row within the chunk
        const int r = rbase + cr;
        const float lse2 = lse_to_log2(st.lse[r]);
        const float delta = st.delta[r];
        if constexpr (kMode == kPageFull) {
          // Every key of the page is loaded and seen: P = exp2(c s + bias2 - LSE2), no select.
          const float off = bias2 - lse2;
#pragma unroll
          for (int hh = 0; hh < 2; ++hh) {
            const float p = fast_exp2(fmaf(st_[nt][2 * hh + e], c, off));
            st_[nt][2 * hh + e] = p;
            dpt[nt][2 * hh + e] = p * (dpt[nt][2 * hh + e] - delta);
          }
        } else {
          const int limit = row_key_limit((bits >> cr) & 1u, st.q_pos[r], ent);
#pragma unroll
          for (int hh = 0; hh < 2; ++hh) {
            const int j = kg * 16 + g + 8 * hh;
            const float t = masked_logit2<kMeta>(st_[nt][2 * hh + e], key_seen(j, key_on[hh], limit), j, r, c,
                                                 key_bias2_[hh], st.meta);
            const float p = fast_exp2(t - lse2);
            st_[nt][2 * hh + e] = p;
            // Keys past key_count are not zero-filled here (refs differ in key_count): select, so
            // whatever V holds there cannot turn 0 * dP into NaN.
            dpt[nt][2 * hh + e] = p != 0.f ? p * (dpt[nt][2 * hh + e] - delta) : 0.f;
          }
        }
      }
    }
#pragma unroll
    for (int kk = 0; kk < 2; ++kk) {
      std::uint32_t ap[4], ads[4];
      ap[0] = pack2<T>(st_[2 * kk][0], st_[2 * kk][1]);
      ap[1] = pack2<T>(st_[2 * kk][2], st_[2 * kk][3]);
      ap[2] = pack2<T>(st_[2 * kk + 1][0], st_[2 * kk + 1][1]);
      ap[3] = pack2<T>(st_[2 * kk + 1][2], st_[2 * kk + 1][3]);
      ads[0] = pack2<T>(dpt[2 * kk][0], dpt[2 * kk][1]);
      ads[1] = pack2<T>(dpt[2 * kk][2], dpt[2 * kk][3]);
      ads[2] = pack2<T>(dpt[2 * kk + 1][0], dpt[2 * kk + 1][1]);
      ads[3] = pack2<T>(dpt[2 * kk + 1][2], dpt[2 * kk + 1][3]);
#pragma unroll
      for (int dp2 = 0; dp2 < D / 16; ++dp2) {
        const int off = swizzle<D>(rbase + kk * 16 + (lane & 7) + ((lane >> 3) & 1) * 8, dp2 * 2 + (lane >> 4));
        std::uint32_t bo[4], bq[4];
        ldmatrix_x4_trans(bo, smem_addr(st.d_o + off));
        ldmatrix_x4_trans(bq, smem_addr(st.q + off));
        mma_16816<T>(dv[2 * dp2], ap, bo[0], bo[1]);
        mma_16816<T>(dv[2 * dp2 + 1], ap, bo[2], bo[3]);
        mma_16816<T>(dk[2 * dp2], ads, bq[0], bq[1]);
        mma_16816<T>(dk[2 * dp2 + 1], ads, bq[2], bq[3]);
      }
    }
  };

  auto compute_item = [&](const BlockEntry& ent, const int valid_rows, const Stage& st) {
    const std::uint64_t bits64 = mask_bits(ent.row_mask, rh * 64, 64) & valid_bits(valid_rows, rh * 64, 64);
#pragma unroll 1  // one copy of each chunk variant
    for (int kc = 0; kc < 2; ++kc) {
      const std::uint32_t bits = static_cast<std::uint32_t>(bits64 >> (kc * 32));
      if (bits == 0) continue;  // warp-uniform
      const int rbase = rh * 64 + kc * 32;
      // Smallest position of the chunk's rows (lane l reads row rbase + l): decides causal pages.
      const int pos = rbase + lane < valid_rows ? st.q_pos[rbase + lane] : INT_MAX;
      const int min_pos = __reduce_min_sync(0xffffffffu, pos);
      if (bits == 0xffffffffu && page_fully_visible(ent, min_pos)) {  // warp-uniform branches
        compute_chunk(std::integral_constant<int, kPageFull>{}, ent, st, rbase, bits);
      } else if (ent.key_meta >= 0) {
        compute_chunk(std::integral_constant<int, kPageMeta>{}, ent, st, rbase, bits);
      } else {
        compute_chunk(std::integral_constant<int, kPageMasked>{}, ent, st, rbase, bits);
      }
    }
  };

  if (items > 0) {
    const std::int64_t page_off = kv_page * kPageSize * D;
    load_tile<D, kPageSize, kThreads>(sK, static_cast<const T*>(a.k_pages) + page_off, D, kPageSize, tid);
    load_tile<D, kPageSize, kThreads>(sV, static_cast<const T*>(a.v_pages) + page_off, D, kPageSize, tid);
    // Items ahead: cur (computing), nxt (its copy issued at the top of this iteration), and item
    // i + 2, whose ref was loaded one iteration earlier and whose key_meta is loaded before the
    // compute: no global load sits right before its use.
    auto item_ref = [&](int it) { return it < items ? a.refs[ref0 + it / group] : PageRef{}; };
    PageRef ref = item_ref(0);
    Item cur = make_item(ref, a.entries[ref.entry].key_meta, 0);
    issue_item(cur, 0);
    cp_async_commit();
    Item nxt{};
    if (items > 1) {
      ref = item_ref(1);
      nxt = make_item(ref, a.entries[ref.entry].key_meta, 1);
    }
    PageRef ref2 = item_ref(2);
    int buf = 0;
    for (int i = 0; i < items; ++i) {
      const BlockEntry ent = a.entries[cur.entry];  // read at its copy's issue: an L1 hit under the barrier
      cp_async_wait<0>();
      __syncthreads();  // item i (and, at i = 0, the page) visible to all; every warp is done with item i - 1
      if (stages == 2) {
        if (i + 1 < items) issue_item(nxt, buf ^ 1);  // into item i - 1's stage
        cp_async_commit();
      }
      const int key_meta2 = i + 2 < items ? a.entries[ref2.entry].key_meta : -1;
      const PageRef ref3 = item_ref(i + 3);
      compute_item(ent, cur.valid_rows, stage(buf));
      if (stages == 1) {
        __syncthreads();  // the single stage is refilled only after every warp is done with it
        if (i + 1 < items) issue_item(nxt, 0);
        cp_async_commit();
      } else {
        buf ^= 1;
      }
      if (i + 1 < items) {
        cur = nxt;
        if (i + 2 < items) nxt = make_item(ref2, key_meta2, i + 2);
      }
      ref2 = ref3;
    }
    __syncthreads();  // the reduction below reuses stage 0
  }

  // Sum the two row halves: warps 4..7 park their accumulators in shared memory, warps 0..3 add and store.
  float* red_k = reinterpret_cast<float*>(stage_base);
  float* red_v = red_k + kPageSize * D;
  if (rh == 1) {
#pragma unroll
    for (int dn = 0; dn < kDTiles; ++dn) {
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        const int idx = (kg * 16 + g + 8 * hh) * D + dn * 8 + 2 * qd;
        *reinterpret_cast<float2*>(red_k + idx) = make_float2(dk[dn][2 * hh], dk[dn][2 * hh + 1]);
        *reinterpret_cast<float2*>(red_v + idx) = make_float2(dv[dn][2 * hh], dv[dn][2 * hh + 1]);
      }
    }
  }
  __syncthreads();
  if (rh == 0) {
    float* d_k = a.d_k + kv_page * kPageSize * D;
    float* d_v = a.d_v + kv_page * kPageSize * D;
#pragma unroll
    for (int dn = 0; dn < kDTiles; ++dn) {
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        const int idx = (kg * 16 + g + 8 * hh) * D + dn * 8 + 2 * qd;
        const float2 pk = *reinterpret_cast<const float2*>(red_k + idx);
        const float2 pv = *reinterpret_cast<const float2*>(red_v + idx);
        float2 vk = make_float2((dk[dn][2 * hh] + pk.x) * a.scale, (dk[dn][2 * hh + 1] + pk.y) * a.scale);
        float2 vv = make_float2(dv[dn][2 * hh] + pv.x, dv[dn][2 * hh + 1] + pv.y);
        if (a.accumulate) {
          const float2 ok = *reinterpret_cast<const float2*>(d_k + idx);
          const float2 ov = *reinterpret_cast<const float2*>(d_v + idx);
          vk.x += ok.x;
          vk.y += ok.y;
          vv.x += ov.x;
          vv.y += ov.y;
        }
        *reinterpret_cast<float2*>(d_k + idx) = vk;
        *reinterpret_cast<float2*>(d_v + idx) = vv;
      }
    }
  }
}

template <typename T, int kHeadDim>
void launch_attention_backward(const AttentionBackwardParams& p, cudaStream_t stream) {
  const AttentionArgs a = backward_args(p);
  const unsigned tiles_heads = static_cast<unsigned>(a.num_tiles * a.heads);

  constexpr int kPreThreads = 256;  // 8 rows per block, one warp each
  const std::int64_t rows = static_cast<std::int64_t>(a.batch) * a.seq_q * a.heads;
  const auto pre = p.fwd.o_dtype == DType::kF32 ? attention_bwd_preprocess_kernel<T, kHeadDim, float>
                                                : attention_bwd_preprocess_kernel<T, kHeadDim, T>;
  pre<<<static_cast<unsigned>((rows + kPreThreads / 32 - 1) / (kPreThreads / 32)), kPreThreads, 0, stream>>>(a);
  RINGCAST_CUDA_CHECK_LAUNCH();

  using Dq = BwdDqTraits<T, kHeadDim>;
  const int dq_stages = pick_stages("attention backward (dQ)", &Dq::smem_bytes, Dq::kMaxStages);
  const std::size_t dq_smem = Dq::smem_bytes(dq_stages);
  set_smem_limit(reinterpret_cast<const void*>(attention_bwd_dq_kernel<T, kHeadDim>), dq_smem);
  attention_bwd_dq_kernel<T, kHeadDim>
      <<<dim3(tiles_heads, static_cast<unsigned>(a.batch)), Dq::kThreads, dq_smem, stream>>>(a, dq_stages);
  RINGCAST_CUDA_CHECK_LAUNCH();

  using Dkv = BwdDkvTraits<T, kHeadDim>;
  const int dkv_stages = pick_stages("attention backward (dK/dV)", &Dkv::smem_bytes, 2);
  const std::size_t dkv_smem = Dkv::smem_bytes(dkv_stages);
  set_smem_limit(reinterpret_cast<const void*>(attention_bwd_dkdv_kernel<T, kHeadDim>), dkv_smem);
  attention_bwd_dkdv_kernel<T, kHeadDim>
      <<<static_cast<unsigned>(a.kv_heads * a.num_pages), Dkv::kThreads, dkv_smem, stream>>>(a, dkv_stages);
  RINGCAST_CUDA_CHECK_LAUNCH();
}

}  // namespace ringcast::kernels::cuda::detail
