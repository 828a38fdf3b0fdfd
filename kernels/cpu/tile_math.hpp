// Building blocks shared by the CPU attention passes: the problem geometry, per-thread scratch carved
// from the caller's workspace, row masks, the logits of one (entry, row), a vectorizable exp and
// thin cblas_sgemm wrappers. All matrices are fp32 row-major; a tile's rows of one head are read in
// from [B, n, heads, head_dim] (leading dimension heads * head_dim) and gathered, per entry, into
// blocks of the rows it reaches (EntryRows, kRowBlock).
#pragma once

#include "blas.hpp"

#include <ringcast/kernels/attention.hpp>

#include <omp.h>

#include <algorithm>
#include <bit>
#include <cstddef>
#include <cstdint>
#include <limits>

namespace ringcast::kernels::cpu {

// The softmax row loops (tile_math's row_logits, max_of and fast_exp inlined into them) compiled twice
// on x86-64 with GCC 11 or later, for the baseline and for x86-64-v3 (AVX2, FMA), the version chosen
// once at load time by the CPU that runs them (function multiversioning): twice the vector width and
// fused multiply-adds where the CPU has them, a library that still runs where it has not. Elsewhere
// (other architectures, other compilers) the baseline build alone. The two versions round differently (FMA),
// so results are reproducible on one CPU type, as with OpenBLAS, which picks its kernels the same way.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 11
#define RINGCAST_ROW_LOOP __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define RINGCAST_ROW_LOOP
#endif

// exp(x) to about 1e-7 relative on [-87.3, 88.3], 0 below (so exp(-inf) = 0, a masked key), NaN
// kept. Plain arithmetic so that the softmax loops vectorize, which libm's expf does not without
// -ffast-math (the sources that use it build with -fno-trapping-math, see CMakeLists.txt).
// Cephes expf: x = n ln2 + r, |r| <= ln2 / 2, degree-6 polynomial, times 2^n.
inline float fast_exp(float x) {
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kRoundToInt = 12582912.0f;  // 1.5 * 2^23: adding and subtracting rounds to an integer
  constexpr float kLo = -87.3f;               // keeps 2^n normal
  constexpr float kHi = 88.3f;
  const float xc = std::min(std::max(x, kLo), kHi);
  const float n = (xc * kLog2e + kRoundToInt) - kRoundToInt;
  const float r = (xc - n * 0.693359375f) + n * 2.12194440e-4f;  // ln2 split in two for exact n ln2
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const float two_n = std::bit_cast<float>((static_cast<std::int32_t>(n) + 127) << 23);
  return x < kLo ? 0.0f : p * two_n;
}

// max(x[0, n)), -inf when n = 0; NaNs are passed over, as std::max(m, NaN) does. Eight independent
// running maxima: one chain (a reduction GCC does not vectorize without -ffast-math) waits a max's
// latency per key.
inline float max_of(const float* x, int n) {
  constexpr int kLanes = 8;
  float lane[kLanes];
  std::fill(lane, lane + kLanes, -std::numeric_limits<float>::infinity());
  int j = 0;
  for (; j + kLanes <= n; j += kLanes)
    for (int l = 0; l < kLanes; ++l) lane[l] = std::max(lane[l], x[j + l]);
  for (; j < n; ++j) lane[0] = std::max(lane[0], x[j]);
  float m = lane[0];
  for (int l = 1; l < kLanes; ++l) m = std::max(m, lane[l]);
  return m;
}

inline bool row_bit(const std::uint64_t (&mask)[2], int r) { return (mask[r >> 6] >> (r & 63)) & 1u; }

// The tile rows an entry reaches among the tile's `rows` valid rows, in increasing order.
struct EntryRows {
  int count = 0;
  int index[kQueryTile];

  EntryRows(const BlockEntry& e, int rows) {
    for (int word = 0; word < 2; ++word) {
      const int valid = std::clamp(rows - 64 * word, 0, 64);
      std::uint64_t bits = valid == 64 ? e.row_mask[word] : e.row_mask[word] & ((std::uint64_t{1} << valid) - 1);
      for (; bits; bits &= bits - 1) index[count++] = 64 * word + std::countr_zero(bits);
    }
  }
  bool contiguous() const { return count > 0 && index[count - 1] - index[0] == count - 1; }
};

// Gathered rows go in blocks of exactly kRowBlock (the last one padded with zero rows): BLAS results of
// a row depend on the product's row count (OpenBLAS picks kernels by shape), and a reduction over rows
// changes when rows are added; with a fixed count and rows in increasing order, a row's results and
// its contributions to dK, dV never depend on the rows after it, whichever later rows an entry reaches
// (the causal leak check holds bitwise).
inline constexpr int kRowBlock = 32;

// One product's rows: index[0, n) (tile rows, increasing), m the product's row count. In place: the
// rows index[0] .. index[0] + n - 1 read from the tile itself, m = n. Gathered: copied into a compact
// block (gather_tile_rows), m = kRowBlock, rows n..m zero.
struct RowBlock {
  const int* index;
  int n, m;
  bool in_place;
};

// The products of an entry run over the rows it reaches, not the span from its first to its last
// (per-row selection leaves a few scattered rows per entry): in place, as one block, when the entry's
// rows are contiguous and the table's rows do not vary per row (exact modes, tile selection: whole
// tiles); otherwise gathered, in blocks of kRowBlock (BlockTable::rows_vary: always, so that no row's
// result depends on which later rows an entry reaches).
template <typename F>
void for_each_row_block(const EntryRows& er, bool rows_vary, F&& f) {
  if (!rows_vary && er.contiguous()) return f(RowBlock{er.index, er.count, er.count, true});
  for (int c0 = 0; c0 < er.count; c0 += kRowBlock)
    f(RowBlock{er.index + c0, std::min(kRowBlock, er.count - c0), kRowBlock, false});
}

// dst[i] = src[index[i]] for i < n, rows n..kRowBlock zero: `cols` floats per row, source rows `ld`
// apart, destination rows packed (stride cols).
inline void gather_tile_rows(float* dst, const float* src, std::int64_t ld, const int* index, int n, int cols) {
  for (int i = 0; i < n; ++i) std::copy_n(src + index[i] * ld, cols, dst + std::int64_t{i} * cols);
  std::fill(dst + std::int64_t{n} * cols, dst + std::int64_t{kRowBlock} * cols, 0.f);
}

// A block's rows of a tile matrix (rows `ld` apart) as a product reads them: in place, or gathered into
// `scratch` (stride cols). Returns the rows and sets their leading dimension.
inline const float* block_rows(const RowBlock& blk, const float* tile, std::int64_t ld, float* scratch, int cols,
                               std::int64_t& lda) {
  if (blk.in_place) {
    lda = ld;
    return tile + blk.index[0] * ld;
  }
  gather_tile_rows(scratch, tile, ld, blk.index, blk.n, cols);
  lda = cols;
  return scratch;
}

// dst[index[i]] += src[i] for i < n.
inline void scatter_add_tile_rows(float* dst, std::int64_t ld, const float* src, const int* index, int n, int cols) {
  for (int i = 0; i < n; ++i) {
    float* d = dst + index[i] * ld;
    const float* x = src + std::int64_t{i} * cols;
#pragma omp simd
    for (int c = 0; c < cols; ++c) d[c] += x[c];
  }
}

// A run of a unit's entries computed as one: consecutive entries that read consecutive whole pages of
// the pool (contiguous keys) with the same rows, flags and bias and no per-key masks (a dense or
// windowed table's pages) become one entry of up to kRunKeys keys, so each product is one wider
// cblas_sgemm (OpenBLAS runs 128 x 64 x 64 products far below its rate at 512 keys). `entry` is the
// first entry with key_count = the run's keys (its key_pos0 and the pool's key_bias stay valid: the
// keys are consecutive); `count` entries of the table are consumed. Runs depend on the table alone, so
// a row's result still never depends on data after it.
inline constexpr int kRunKeys = 512;

struct EntryRun {
  BlockEntry entry;
  std::int64_t count;
};

inline EntryRun entry_run(const BlockEntry* entries, std::int64_t i, std::int64_t end, int page_size) {
  EntryRun run{entries[i], 1};
  BlockEntry& r = run.entry;
  const auto plain = [](const BlockEntry& e) { return e.key_meta < 0 && e.key_mask == ~std::uint64_t{0}; };
  if (!plain(r)) return run;
  for (; i + run.count < end && r.key_count % page_size == 0 && r.key_count + page_size <= kRunKeys; ++run.count) {
    const BlockEntry& last = entries[i + run.count - 1];
    const BlockEntry& next = entries[i + run.count];
    const bool continues = plain(next) && next.page == last.page + 1 && next.flags == r.flags &&
                           next.bias == r.bias && next.row_mask[0] == r.row_mask[0] &&
                           next.row_mask[1] == r.row_mask[1] &&
                           (!(r.flags & kEntryCausal) || next.key_pos0 == last.key_pos0 + page_size);
    if (!continues) break;
    r.key_count += next.key_count;
  }
  return run;
}

// Geometry and inputs of one call, and the addressing of tiles, pages and rows.
struct Problem {
  const AttentionShape& shape;
  float scale;
  const float* q;
  const float* k;
  const float* v;
  const std::int32_t* q_pos;
  const float* key_bias;  // [kv_heads, num_pages, page_size], read by kEntryKeyBias entries
  BlockTable table;
  int group;  // query heads per KV head
  std::int64_t num_tiles;

  explicit Problem(const AttentionForwardParams& p)
      : shape(p.shape), scale(p.softmax_scale), q(static_cast<const float*>(p.q)),
        k(static_cast<const float*>(p.k_pages)), v(static_cast<const float*>(p.v_pages)), q_pos(p.q_pos),
        key_bias(p.key_bias), table(p.table), group(p.shape.heads / p.shape.kv_heads),
        num_tiles(p.shape.num_tiles()) {}

  std::int64_t ld() const { return std::int64_t{shape.heads} * shape.head_dim; }
  // Offset of row t0 of head h in a [B, n, heads, head_dim] tensor.
  std::int64_t row_offset(std::int64_t b, std::int64_t t0, int h) const {
    return ((b * shape.seq_q + t0) * shape.heads + h) * shape.head_dim;
  }
  // Offset of (b, h, t0) in a [B, heads, n] tensor (LSE, D).
  std::int64_t stat_offset(std::int64_t b, int h, std::int64_t t0) const {
    return (b * shape.heads + h) * shape.seq_q + t0;
  }
  std::int64_t page_offset(std::int64_t kvh, std::int64_t page) const {
    return (kvh * shape.num_pages + page) * shape.page_size * shape.head_dim;
  }
  std::int64_t unit(std::int64_t b, std::int64_t tile, std::int64_t kvh) const {
    return (b * num_tiles + tile) * shape.kv_heads + kvh;
  }
  const KeyMeta* key_meta(const BlockEntry& e) const { return e.key_meta >= 0 ? table.key_meta + e.key_meta : nullptr; }
  // The per-key biases of the entry's page, or null when the entry does not read them.
  const float* key_bias_of(const BlockEntry& e, std::int64_t kvh) const {
    return (e.flags & kEntryKeyBias) ? key_bias + (kvh * shape.num_pages + e.page) * shape.page_size : nullptr;
  }
};

// Turns row r's scores s[0, key_count) (already scale * q.k) into logits in place: + the entry's
// bias (+ the key's KeyMeta bias, + the pool's key_bias when flagged), -inf for keys the row may not
// see (key_mask, KeyMeta row mask). Returns n: the keys [n, key_count) lie past the row's causal
// limit and are left unwritten. key_bias: the page's per-key biases or null.
inline int row_logits(float* s, const BlockEntry& e, const KeyMeta* meta, const float* key_bias, int r,
                      std::int32_t q_pos) {
  int n = e.key_count;
  if (e.flags & kEntryCausal) {
    n = static_cast<int>(std::clamp<std::int64_t>(std::int64_t{q_pos} - e.key_pos0 + 1, 0, n));
  }
  const float bias = e.bias;
  if (meta || key_bias || e.key_mask != ~std::uint64_t{0}) {  // per-key terms: validate() caps masks at 64 keys
    constexpr float kMasked = -std::numeric_limits<float>::infinity();
    for (int j = 0; j < n; ++j) {
      const bool seen = ((e.key_mask >> (j & 63)) & 1u) && (!meta || row_bit(meta[j].row_mask, r));
      s[j] = seen ? s[j] + bias + (meta ? meta[j].bias : 0.f) + (key_bias ? key_bias[j] : 0.f) : kMasked;
    }
  } else {
#pragma omp simd
    for (int j = 0; j < n; ++j) s[j] += bias;
  }
  return n;
}

// Per-thread scratch: a thread's block of `floats_per_thread` floats, 64-byte aligned, after an
// optional shared block of `shared_floats`. The workspace query and the pass use the same layout.
struct ScratchLayout {
  static constexpr std::size_t kAlignFloats = 16;  // 64 bytes
  static constexpr std::size_t round_up(std::size_t n) { return (n + kAlignFloats - 1) / kAlignFloats * kAlignFloats; }

  std::size_t shared_floats = 0;
  std::size_t floats_per_thread = 0;

  std::size_t bytes(int threads) const {
    return (round_up(shared_floats) + floats_per_thread * static_cast<std::size_t>(threads)) * sizeof(float) + 64;
  }
  // As many threads as OpenMP offers and the workspace holds (the query sized it for
  // omp_get_max_threads(); fewer if that has grown since).
  int threads(std::size_t workspace_bytes) const {
    const std::size_t fixed = round_up(shared_floats) * sizeof(float) + 64;
    const std::size_t fit = workspace_bytes > fixed ? (workspace_bytes - fixed) / (floats_per_thread * sizeof(float)) : 0;
    return static_cast<int>(std::clamp<std::size_t>(fit, 1, static_cast<std::size_t>(omp_get_max_threads())));
  }
  float* shared(void* workspace) const {
    const auto addr = reinterpret_cast<std::uintptr_t>(workspace);
    return reinterpret_cast<float*>((addr + 63) / 64 * 64);
  }
  float* thread(void* workspace, int t) const {
    return shared(workspace) + round_up(shared_floats) + floats_per_thread * static_cast<std::size_t>(t);
  }
};

// C = alpha * op(A) op(B) + beta * C, row-major, op = transpose when the flag says so.
inline void gemm(bool trans_a, bool trans_b, int m, int n, int k, float alpha, const float* a, std::int64_t lda,
                 const float* b, std::int64_t ldb, float beta, float* c, std::int64_t ldc) {
  cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans, m, n, k,
              alpha, a, static_cast<int>(lda), b, static_cast<int>(ldb), beta, c, static_cast<int>(ldc));
}

}  // namespace ringcast::kernels::cpu
