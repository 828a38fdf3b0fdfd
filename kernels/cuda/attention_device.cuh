// Device building blocks shared by the attention kernels: PTX wrappers (cp.async, ldmatrix,
// mma.sync m16n8k16), the swizzled shared-memory tile layout, tile loads, and the one mask function
// every kernel applies. Shared tiles are [rows][kHeadDim] of 16-byte chunks; chunk c of row r is
// stored at chunk c ^ (r % 8), so the eight row addresses of every ldmatrix hit distinct banks.
// Fragment layouts follow the PTX ISA for mma.m16n8k16 (lane = 4 * group + quad):
//   A 16x16: a0 (g, 2q..2q+1), a1 (g+8, 2q..), a2 (g, 2q+8..), a3 (g+8, 2q+8..)
//   B 16x8:  b0 (k 2q..2q+1, n g), b1 (k 2q+8.., n g);  C 16x8: c0,c1 (g, 2q..), c2,c3 (g+8, 2q..)
#pragma once

#include <ringcast/kernels/attention.hpp>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

namespace ringcast::kernels::cuda::detail {

inline constexpr int kPageSize = 64;  // keys per page: one page is one 64-key block of every kernel
inline constexpr float kLog2e = 1.4426950408889634f;
inline constexpr float kLn2 = 0.6931471805599453f;

// ---- PTX wrappers -------------------------------------------------------------------------------

__device__ __forceinline__ std::uint32_t smem_addr(const void* p) {
  return static_cast<std::uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global->shared copy; when !valid the destination is zero-filled (src-size 0) and src is not read.
__device__ __forceinline__ void cp_async_16(std::uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(valid ? 16 : 0)
               : "memory");
}

__device__ __forceinline__ void cp_async_4(std::uint32_t dst, const void* src, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src),
               "r"(valid ? 4 : 0)
               : "memory");
}

__device__ __forceinline__ void cp_async_8(std::uint32_t dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 8;\n" ::"r"(dst), "l"(src) : "memory");
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(std::uint32_t (&r)[4], std::uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

__device__ __forceinline__ void ldmatrix_x4_trans(std::uint32_t (&r)[4], std::uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const std::uint32_t (&a)[4], std::uint32_t b0,
                                          std::uint32_t b1) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    static_assert(std::is_same_v<T, __half>);
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// Two floats -> one register of two 16-bit values, round to nearest; lo lands in the low half
// (the lower column index of an A fragment).
template <typename T>
__device__ __forceinline__ std::uint32_t pack2(float lo, float hi) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<std::uint32_t*>(&v);
  } else {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<std::uint32_t*>(&v);
  }
}

template <typename T>
__device__ __forceinline__ float to_float(T x) {
  if constexpr (std::is_same_v<T, float>) {
    return x;
  } else if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __bfloat162float(x);
  } else {
    return __half2float(x);
  }
}

// 2^x on the SFU (MUFU.EX2) whatever the fast-math flags; ex2.approx(-inf) = +0, which the
// online softmax relies on for masked scores.
__device__ __forceinline__ float fast_exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}

// Stores two adjacent output elements (a 4- or 8-byte store; the address is even-aligned).
template <typename OT>
__device__ __forceinline__ void store2(OT* p, float x, float y) {
  if constexpr (std::is_same_v<OT, float>) {
    *reinterpret_cast<float2*>(p) = make_float2(x, y);
  } else {
    *reinterpret_cast<std::uint32_t*>(p) = pack2<OT>(x, y);
  }
}

__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// ---- swizzled shared tiles -----------------------------------------------------------------------

// Element offset of 16-byte chunk `chunk` of row `row` in a [rows][kHeadDim] tile.
template <int kHeadDim>
__device__ __forceinline__ int swizzle(int row, int chunk) {
  return row * kHeadDim + ((chunk ^ (row & 7)) << 3);
}

// Copies rows [0, kRows) of a row-major global tile (row stride in elements) into a swizzled shared
// tile with cp.async; rows >= valid_rows are zero-filled (never read), so padding rows of a partial
// query tile and keys past a page's valid prefix contribute exact zeros whatever memory holds there.
template <int kHeadDim, int kRows, int kThreads, typename T>
__device__ __forceinline__ void load_tile(T* smem, const T* gmem, std::int64_t row_stride, int valid_rows,
                                          int tid) {
  constexpr int kChunksPerRow = kHeadDim / 8;
  constexpr int kChunks = kRows * kChunksPerRow;
  static_assert(kChunks % kThreads == 0);
#pragma unroll
  for (int i = 0; i < kChunks / kThreads; ++i) {
    const int c = tid + i * kThreads;
    const int row = c / kChunksPerRow;
    const int chunk = c % kChunksPerRow;
    const bool valid = row < valid_rows;
    const T* src = valid ? gmem + row * row_stride + chunk * 8 : gmem;
    cp_async_16(smem_addr(smem + swizzle<kHeadDim>(row, chunk)), src, valid);
  }
}

// Copies the page_size KeyMeta records of a summary page (8-byte pieces: records are 24 bytes).
template <int kThreads>
__device__ __forceinline__ void load_key_meta(KeyMeta* smem, const KeyMeta* gmem, int tid) {
  constexpr int kWords = kPageSize * static_cast<int>(sizeof(KeyMeta)) / 8;
  static_assert(sizeof(KeyMeta) % 8 == 0);
  const auto* src = reinterpret_cast<const std::uint64_t*>(gmem);
  auto* dst = reinterpret_cast<std::uint64_t*>(smem);
  for (int w = tid; w < kWords; w += kThreads) cp_async_8(smem_addr(dst + w), src + w);
}

// ---- kernel arguments ------------------------------------------------------------------------------

// The public parameters flattened to what the kernels index with (no CUDA types, passed by value).
struct AttentionArgs {
  const void* q = nullptr;
  const void* k_pages = nullptr;
  const void* v_pages = nullptr;
  void* o = nullptr;  // written by the forward, read (for D = rowsum(dO * O)) by the backward
  float* lse = nullptr;
  const std::int32_t* q_pos = nullptr;
  const std::int64_t* offsets = nullptr;
  const BlockEntry* entries = nullptr;
  const KeyMeta* key_meta = nullptr;
  const float* key_bias = nullptr;  // [kv_heads, num_pages, kPageSize], read by kEntryKeyBias entries
  std::int64_t seq_q = 0;
  std::int64_t num_tiles = 0;
  std::int64_t num_pages = 0;
  int batch = 1;
  int heads = 1;
  int kv_heads = 1;
  float scale = 0.f;
  // backward only
  const void* d_o = nullptr;
  const std::int64_t* ref_offsets = nullptr;
  const PageRef* refs = nullptr;
  float* d_q = nullptr;
  float* d_k = nullptr;
  float* d_v = nullptr;
  float* delta = nullptr;  // workspace: D = rowsum(dO * O), [B, heads, n_q] like LSE
  bool accumulate = false;
};

// The query tile of a forward or dQ block (blockIdx.x = tile * heads + h, blockIdx.y = b): its unit's
// entries [e0, e0 + n); its valid_rows rows from row0, whose query head h starts at head_off in q, o and
// d_o (rows of row_stride elements) and at stat_off in LSE and D; its KV head's pools at pool_off.
struct QueryTile {
  int h, b, kvh;
  std::int64_t e0;
  int n;
  std::int64_t row0;
  int valid_rows;
  std::int64_t row_stride, head_off, stat_off, pool_off;
};

template <int D>
__device__ __forceinline__ QueryTile query_tile(const AttentionArgs& a) {
  QueryTile t;
  const std::int64_t tile = blockIdx.x / a.heads;
  t.h = blockIdx.x % a.heads;
  t.b = blockIdx.y;
  t.kvh = t.h / (a.heads / a.kv_heads);
  const std::int64_t unit = (t.b * a.num_tiles + tile) * a.kv_heads + t.kvh;
  t.e0 = a.offsets[unit];
  t.n = static_cast<int>(a.offsets[unit + 1] - t.e0);
  t.row0 = tile * kQueryTile;
  t.valid_rows = static_cast<int>(min(static_cast<std::int64_t>(kQueryTile), a.seq_q - t.row0));
  t.row_stride = static_cast<std::int64_t>(a.heads) * D;
  t.head_off = (t.b * a.seq_q + t.row0) * t.row_stride + t.h * D;
  t.stat_off = (static_cast<std::int64_t>(t.b) * a.heads + t.h) * a.seq_q + t.row0;
  t.pool_off = static_cast<std::int64_t>(t.kvh) * a.num_pages * kPageSize * D;
  return t;
}

// ---- the page pipeline ---------------------------------------------------------------------------
// Kernels that stream pages (forward, dQ) keep `stages` shared buffers and issue entry i + L while
// computing entry i, L = max(stages - 1, 1): with 2 or 3 stages one __syncthreads per page both
// publishes page i and frees the buffer of page i - 1 for the next copy; one stage needs a second.

// What a page copy needs from an entry, loaded one page ahead of its copy so that no global load
// sits right in front of the cp.async it feeds.
struct PageLoad {
  std::int32_t page = 0;
  std::int32_t key_count = 0;
  std::int32_t key_meta = -1;
};
__device__ __forceinline__ PageLoad page_load(const BlockEntry& e) { return {e.page, e.key_count, e.key_meta}; }

// Issues the cp.async copies of one entry's K and V page (and its KeyMeta records) into pipeline
// buffer `buf`; k_head / v_head are the KV head's pools. Shared by the forward and the dQ pass.
template <int D, int kThreads, typename T>
__device__ __forceinline__ void issue_page_copy(T* sK, T* sV, KeyMeta* sMeta, const T* k_head, const T* v_head,
                                                const KeyMeta* key_meta, const PageLoad& e, int buf, int tid) {
  const std::int64_t off = static_cast<std::int64_t>(e.page) * kPageSize * D;
  load_tile<D, kPageSize, kThreads>(sK + buf * kPageSize * D, k_head + off, D, e.key_count, tid);
  load_tile<D, kPageSize, kThreads>(sV + buf * kPageSize * D, v_head + off, D, e.key_count, tid);
  if (e.key_meta >= 0) load_key_meta<kThreads>(sMeta + buf * kPageSize, key_meta + e.key_meta, tid);
}

// How a kernel computes a page for a warp: every key visible to every row at hand (no per-element
// test, see page_fully_visible), masked, or masked with per-key KeyMeta.
enum PageMode : int { kPageFull, kPageMasked, kPageMeta };

// Waits until entry i's copy has landed: with 3 stages the copy of entry i + 1 may stay in flight.
__device__ __forceinline__ void wait_page(int stages) {
  if (stages == 3) {
    cp_async_wait<1>();
  } else {
    cp_async_wait<0>();
  }
}

// ---- the mask ------------------------------------------------------------------------------------
// Tile row r sees key j of entry e iff: bit r of e.row_mask (and r is a row of the tile), j <
// e.key_count, bit j of e.key_mask, with kEntryCausal key_pos0 + j <= q_pos[r], and for a summary
// page (key_meta >= 0) bit r of its key's row mask. The logit, in log2 units, is scale * log2(e) * q.k
// + log2(e) * (e.bias + key_bias[j] (kEntryKeyBias) + meta.bias). Every kernel decides visibility
// with row_key_limit (as row_key_bits or key_seen) + masked_logit2, or skips both where
// page_fully_visible proves that every key is visible to every row at hand, so forward and backward
// agree exactly on what a row sees.

// The last key of entry e that row r may see by position and key_count (-1: none); row_on is the
// row's bit of the entry's mask, already restricted to rows that exist.
__device__ __forceinline__ int row_key_limit(bool row_on, std::int32_t q_pos, const BlockEntry& e) {
  if (!row_on) return -1;
  int limit = e.key_count - 1;
  if (e.flags & kEntryCausal) {
    const long long d = static_cast<long long>(q_pos) - e.key_pos0;
    limit = d < limit ? static_cast<int>(d < -1 ? -1 : d) : limit;
  }
  return limit;
}

// Row r sees key j (before KeyMeta) iff j <= row_key_limit and bit j of e.key_mask. Kernels whose
// thread holds many keys of one row test all of them at once with this bit set (bit j: key j)...
__device__ __forceinline__ std::uint64_t row_key_bits(bool row_on, std::int32_t q_pos, const BlockEntry& e) {
  const int limit = row_key_limit(row_on, q_pos, e);  // <= kPageSize - 1 = 63
  return (limit < 0 ? 0 : ~0ull >> (63 - limit)) & e.key_mask;
}

// ... and kernels whose thread holds few keys of many rows test key j with its key_mask bit taken
// once per entry: key_on = bit j of e.key_mask.
__device__ __forceinline__ bool key_seen(int j, bool key_on, int limit) { return key_on && j <= limit; }

// True when row_key_bits is all ones for every row that sees e and has q_pos >= min_pos, and e has
// no per-key terms (KeyMeta, key_bias): such a page is computed without any per-element test.
__device__ __forceinline__ bool page_fully_visible(const BlockEntry& e, std::int32_t min_pos) {
  return e.key_meta < 0 && e.key_count == kPageSize && e.key_mask == ~0ull && !(e.flags & kEntryKeyBias) &&
         (!(e.flags & kEntryCausal) || static_cast<long long>(min_pos) - e.key_pos0 >= kPageSize - 1);
}

// log2-domain logit of raw score s of key j for row `row`, or -inf when masked. seen: bit j of the
// row's row_key_bits (or key_seen); c = scale * log2(e); bias2 = log2(e) * (entry bias + key_bias[j]). meta: the
// page's KeyMeta in shared memory (compile-time kMeta selects the variant so the common path carries
// no meta test).
template <bool kMeta>
__device__ __forceinline__ float masked_logit2(float s, bool seen, int j, int row, float c, float bias2,
                                               const KeyMeta* meta) {
  if constexpr (kMeta) {
    seen = seen && ((meta[j].row_mask[row >> 6] >> (row & 63)) & 1u);
    bias2 = fmaf(meta[j].bias, kLog2e, bias2);
  }
  return seen ? fmaf(s, c, bias2) : -INFINITY;
}

// log2(e) * key_bias[j] of the entry's page for key j, 0 without kEntryKeyBias. page_bias points at
// the page's page_size biases of this KV head (read only when flagged, so it may be null otherwise).
__device__ __forceinline__ float key_bias2(const BlockEntry& e, const float* page_bias, int j) {
  return (e.flags & kEntryKeyBias) ? __ldg(page_bias + j) * kLog2e : 0.f;
}

// Row bits [first, first + count) of a 128-bit row mask, count in {16, 32, 64}, first a multiple of count.
__device__ __forceinline__ std::uint64_t mask_bits(const std::uint64_t (&mask)[2], int first, int count) {
  const std::uint64_t word = first < 64 ? mask[0] : mask[1];  // a select: no local-memory array
  return count == 64 ? word : (word >> (first & 63)) & ((1ull << count) - 1);
}

// Bits [first, first + count) of the rows that exist in a tile with valid_rows rows.
__device__ __forceinline__ std::uint64_t valid_bits(int valid_rows, int first, int count) {
  const int n = valid_rows - first;
  if (n <= 0) return 0;
  if (n >= count) return count == 64 ? ~0ull : (1ull << count) - 1;
  return (1ull << n) - 1;
}

// The pipeline's main loop over the tile's entries, once the kernel has issued entries [0, ahead = L)
// and loaded entry L into next_load: waits for entry i's page, issues entry i + L, and computes entry i
// for the warp's rows that see it (wvalid: the warp's rows that exist; a warp none of whose rows see
// the entry skips it) with compute_page(mode, entry, row bits, buffer), mode a
// std::integral_constant<int, PageMode>. Shared by the forward and the dQ pass.
template <typename Traits, typename IssuePage, typename ComputePage>
__device__ __forceinline__ void run_pages(const AttentionArgs& a, const QueryTile& t, int stages, int ahead,
                                          PageLoad& next_load, int wrow0, std::uint64_t wvalid, int wmin_pos,
                                          const IssuePage& issue_page, const ComputePage& compute_page) {
  int buf = 0;                                  // stage of entry i
  int issue_buf = stages > 1 ? stages - 1 : 0;  // stage of entry i + L: the one entry i - 1 used
  for (int i = 0; i < t.n; ++i) {
    // Entry i's fields are needed right after the barrier; it was read when its copy was issued, so
    // this load hits L1 while the wait and the barrier run.
    const BlockEntry cur = a.entries[t.e0 + i];
    wait_page(stages);
    __syncthreads();  // page i visible to all; every warp is done with page i - 1
    if (stages > 1) {
      if (i + ahead < t.n) issue_page(next_load, issue_buf);
      cp_async_commit();
      if (i + ahead + 1 < t.n) next_load = page_load(a.entries[t.e0 + i + ahead + 1]);
    }
    const std::uint64_t bits = mask_bits(cur.row_mask, wrow0, Traits::kRowsPerWarp) & wvalid;
    if (bits == Traits::kAllRows && page_fully_visible(cur, wmin_pos)) {  // warp-uniform branches
      compute_page(std::integral_constant<int, kPageFull>{}, cur, bits, buf);
    } else if (bits != 0) {
      if (cur.key_meta >= 0) {
        compute_page(std::integral_constant<int, kPageMeta>{}, cur, bits, buf);
      } else {
        compute_page(std::integral_constant<int, kPageMasked>{}, cur, bits, buf);
      }
    }
    if (stages == 1) {
      __syncthreads();  // the single buffer is refilled only after every warp is done with it
      if (i + 1 < t.n) issue_page(next_load, 0);
      cp_async_commit();
      if (i + 2 < t.n) next_load = page_load(a.entries[t.e0 + i + 2]);
    } else {
      issue_buf = buf;
      buf = buf + 1 == stages ? 0 : buf + 1;
    }
  }
}

}  // namespace ringcast::kernels::cuda::detail
