// CUDA build of the clustered forward table (selection_device.hpp), equal to build_clustered_table
// entry for entry. One thread block per unit (tile, KV head) runs twice: counting its entries and
// KeyMeta records, then, once a scan has given every unit its offsets, writing them. A unit marks the global pages its rows selected in a shared bitmap
// (rank = prefix popcount) with each page's row mask beside it, so the union over rows, the rows
// that chose from a block and the per-key masks of summary pages are lookups; no tile x page matrix
// exists. Entries follow the host order: window pages, selected pages by global position, page
// summaries by summary page, coarse summaries by block; summary pages are emitted by one warp.
#include <ringcast/cuda_check.hpp>
#include <ringcast/error.hpp>

#include <cub/cub.cuh>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "selection_cuda.hpp"
#include "selection_launch.hpp"

namespace ringcast::kernels::cuda {
namespace {

using detail::Geometry;
using detail::kFullMask;
using detail::LayoutArgs;
using detail::Scratch;

constexpr int kThreads = 256;

struct HeadArgs {
  const std::int32_t* block_pool;  // [num_blocks]: first pool page of a resident block, or -1
  const std::int32_t* pool_block;  // [resident_pages / coarse_pages]: global block of a pool block, or -1
  const std::int32_t* pages;       // SelectionSlots of this KV head
  const std::int32_t* counts;
};

struct TableArgs {
  LayoutArgs L;
  const HeadArgs* heads;  // [kv_heads]
  std::int64_t global_pages, resident_pages, page_summary_first, page_summary_pages, coarse_summary_first;
  int kv_heads, top_k, rows_per_token;
  int bitmap_words, summary_words, mask_capacity;
  bool rows;
  std::int64_t* entry_counts;  // counting pass: [units]
  std::int64_t* meta_counts;
  const std::int64_t* entry_offsets;  // writing pass: [units + 1]
  const std::int64_t* meta_offsets;
  BlockEntry* entries;
  KeyMeta* key_meta;
  int* error;  // set when a selection names a page that is not an eligible resident page
};

struct RowMask {
  std::uint64_t lo, hi;
  __device__ bool any() const { return (lo | hi) != 0; }
  __device__ bool operator==(const RowMask& o) const { return lo == o.lo && hi == o.hi; }
};

__device__ RowMask full_rows(int rows) {
  return {rows >= 64 ? ~std::uint64_t{0} : (std::uint64_t{1} << rows) - 1,
          rows >= 128 ? ~std::uint64_t{0} : rows > 64 ? (std::uint64_t{1} << (rows - 64)) - 1 : 0};
}

// The rows of token t of a tile with g rows per token (g a power of two <= 128).
__device__ RowMask token_rows(int t, int g) {
  if (g >= 64) return {t * g < 64 ? ~std::uint64_t{0} : 0, t * g + g > 64 ? ~std::uint64_t{0} : 0};
  const std::uint64_t bits = ((std::uint64_t{1} << g) - 1) << ((t * g) & 63);
  return t * g < 64 ? RowMask{bits, 0} : RowMask{0, bits};
}

// Shared state of one unit.
struct Unit {
  const TableArgs& a;
  const HeadArgs& h;
  Geometry g;
  std::uint32_t* bits;    // selected global pages
  std::int32_t* prefix;   // set bits before each word
  std::uint32_t* sbits;   // page-summary pages (pool order) to visit
  RowMask* masks;         // rows that selected each selected page, by rank
  RowMask full;
  std::int64_t window_first, window_end;  // window pages [first, end)
  std::int64_t window_entries;            // causal: those that start before the tile's last token ends
  std::int64_t first_unit;                // row mode: the tile's first token (rank-local), else its selection tile

  __device__ bool selected(std::int64_t page) const { return (bits[page >> 5] >> (page & 31)) & 1u; }
  __device__ int rank(std::int64_t page) const {
    return prefix[page >> 5] + __popc(bits[page >> 5] & ((1u << (page & 31)) - 1u));
  }
  __device__ RowMask selected_rows(std::int64_t page) const {
    return selected(page) ? masks[rank(page)] : RowMask{0, 0};
  }
  // Pool page of a resident global page, or -1.
  __device__ std::int64_t pool_page(std::int64_t page) const {
    const std::int32_t first = h.block_pool[page / a.L.coarse_pages];
    return first < 0 ? -1 : first + page % a.L.coarse_pages;
  }
  // Global page of a resident pool page, or -1 (padding of the fetched region).
  __device__ std::int64_t global_page(std::int64_t pool) const {
    if (pool < 0 || pool >= a.resident_pages) return -1;
    const std::int32_t block = h.pool_block[pool / a.L.coarse_pages];
    return block < 0 ? -1 : std::int64_t{block} * a.L.coarse_pages + pool % a.L.coarse_pages;
  }
  __device__ bool window_block(std::int64_t block) const {
    return block >= window_first / a.L.coarse_pages && block <= (window_end - 1) / a.L.coarse_pages;
  }
  // The rows that chose pages of `block` (their union).
  __device__ RowMask chose_from(std::int64_t block) const {
    RowMask m{0, 0};
    for (std::int64_t p = block * a.L.coarse_pages; p < (block + 1) * a.L.coarse_pages; ++p) {
      const RowMask r = selected_rows(p);
      m.lo |= r.lo;
      m.hi |= r.hi;
    }
    return m;
  }
};

__device__ void report_error(const TableArgs& a) { atomicCAS(a.error, 0, 1); }

// Visits the (selection unit, pool page) pairs of the tile's tokens (or of its selection tile); the
// unit's index in the tile is its token's.
template <typename F>
__device__ void for_each_selected(const TableArgs& a, const HeadArgs& h, std::int64_t first_unit, int tokens, F&& f) {
  const int units = a.rows ? tokens : 1;
  for (int i = threadIdx.x; i < units * a.top_k; i += blockDim.x) {
    const int r = i / a.top_k, j = i % a.top_k;
    const std::int64_t u = first_unit + r;
    if (j < h.counts[2 * u]) f(r, h.pages[u * a.top_k + j]);
  }
}

// One summary entry: key j (of page_size) is seen by key_rows(j), none = not taken. Called by a whole
// warp with lane holding keys lane and lane + 32. Appends at *entry / *meta (warp-uniform counters).
template <bool kWrite>
__device__ void summary_entry(const TableArgs& a, std::int64_t page, const RowMask (&keys)[2], std::int64_t& entry,
                              std::int64_t& meta) {
  const int lane = threadIdx.x & 31;
  const int ps = a.L.page_size;
  const std::uint64_t taken = std::uint64_t{__ballot_sync(kFullMask, keys[0].any())} |
                              std::uint64_t{__ballot_sync(kFullMask, keys[1].any())} << 32;
  if (taken == 0) return;
  RowMask all{keys[0].lo | keys[1].lo, keys[0].hi | keys[1].hi};
  for (int offset = 16; offset > 0; offset /= 2) {
    all.lo |= __shfl_xor_sync(kFullMask, all.lo, offset);
    all.hi |= __shfl_xor_sync(kFullMask, all.hi, offset);
  }
  const int first = __ffsll(static_cast<long long>(taken)) - 1;
  const RowMask own = first < 32 ? keys[0] : keys[1];
  const RowMask ref{__shfl_sync(kFullMask, own.lo, first & 31), __shfl_sync(kFullMask, own.hi, first & 31)};
  const bool uniform = __all_sync(kFullMask, (!keys[0].any() || keys[0] == ref) && (!keys[1].any() || keys[1] == ref));
  if (kWrite) {
    if (!uniform) {
      for (int s = 0; s < 2; ++s) {
        const int j = lane + 32 * s;
        if (j < ps) a.key_meta[meta + j] = KeyMeta{{keys[s].lo, keys[s].hi}, 0.0f, 0};
      }
    }
    if (lane == 0) {
      BlockEntry e;
      e.row_mask[0] = all.lo;
      e.row_mask[1] = all.hi;
      e.page = static_cast<std::int32_t>(page);
      e.key_pos0 = 0;
      e.bias = 0.0f;
      e.key_meta = uniform ? -1 : static_cast<std::int32_t>(meta);
      e.key_count = ps;
      e.flags = kEntryKeyBias;
      e.key_mask = taken;
      a.entries[entry] = e;
    }
  }
  ++entry;
  if (!uniform) meta += ps;
}

template <bool kWrite>
__global__ void __launch_bounds__(kThreads) clustered_table_kernel(const TableArgs a) {
  extern __shared__ std::uint64_t smem[];
  using BlockScan = cub::BlockScan<int, kThreads>;
  __shared__ typename BlockScan::TempStorage scan_storage;

  // Attention tile `tile`: tokens [t0, t0 + tokens) of G rows each, in selection tile tile / G.
  const std::int64_t unit = blockIdx.x;
  const std::int64_t tile = unit / a.kv_heads;
  const int G = a.rows_per_token;
  const HeadArgs& h = a.heads[unit % a.kv_heads];
  Unit U{a, h, Geometry(a.L, tile / G)};
  U.masks = reinterpret_cast<RowMask*>(smem);
  U.bits = reinterpret_cast<std::uint32_t*>(U.masks + a.mask_capacity);
  U.prefix = reinterpret_cast<std::int32_t*>(U.bits + a.bitmap_words);
  U.sbits = reinterpret_cast<std::uint32_t*>(U.prefix + a.bitmap_words);
  const std::int64_t t0 = a.L.first_pos + tile * (kQueryTile / G);
  const int tokens = static_cast<int>(min(t0 + kQueryTile / G, a.L.first_pos + a.L.n_loc) - t0);
  U.full = full_rows(tokens * G);
  const std::int64_t ps = a.L.page_size;
  U.window_first = U.g.window_lo / ps;
  U.window_end = (U.g.window_hi + ps - 1) / ps;
  U.window_entries =
      (a.L.causal ? min(U.window_end, (t0 + tokens + ps - 1) / ps) : U.window_end) - U.window_first;
  U.first_unit = a.rows ? t0 - a.L.first_pos : tile / G;

  for (int w = threadIdx.x; w < a.bitmap_words; w += blockDim.x) U.bits[w] = 0;
  for (int w = threadIdx.x; w < a.summary_words; w += blockDim.x) U.sbits[w] = 0;
  __syncthreads();
  for_each_selected(a, h, U.first_unit, tokens, [&](int, std::int32_t pool) {
    const std::int64_t page = U.global_page(pool);
    if (page < 0 || !U.g.keys_eligible(page * ps, ps)) return report_error(a);
    atomicOr(&U.bits[page >> 5], 1u << (page & 31));
  });
  __syncthreads();

  // Ranks: an exclusive scan of the words' popcounts, each thread over a contiguous run of words.
  const int per_thread = (a.bitmap_words + kThreads - 1) / kThreads;
  const int w0 = min(static_cast<int>(threadIdx.x) * per_thread, a.bitmap_words);
  const int w1 = min(w0 + per_thread, a.bitmap_words);
  int run = 0;
  for (int w = w0; w < w1; ++w) run += __popc(U.bits[w]);
  int total = 0;
  BlockScan(scan_storage).ExclusiveSum(run, run, total);
  for (int w = w0; w < w1; ++w) {
    U.prefix[w] = run;
    run += __popc(U.bits[w]);
  }
  for (int i = threadIdx.x; i < total; i += blockDim.x) U.masks[i] = RowMask{0, 0};
  __syncthreads();
  for_each_selected(a, h, U.first_unit, tokens, [&](int t, std::int32_t pool) {
    const std::int64_t page = U.global_page(pool);
    if (page < 0 || !U.g.keys_eligible(page * ps, ps)) return;
    RowMask& m = U.masks[U.rank(page)];
    if (!a.rows) {
      m = U.full;
      return;
    }
    const RowMask rows = token_rows(t, G);
    if (rows.lo != 0) atomicOr(reinterpret_cast<unsigned long long*>(&m.lo), rows.lo);
    if (rows.hi != 0) atomicOr(reinterpret_cast<unsigned long long*>(&m.hi), rows.hi);
  });
  // Page-summary pages to visit: those of window blocks and of blocks rows chose pages from.
  const auto mark_block = [&](std::int64_t block) {
    const std::int32_t first = h.block_pool[block];
    if (first < 0) return report_error(a);
    for (std::int64_t s = first / ps; s <= (first + a.L.coarse_pages - 1) / ps; ++s) {
      atomicOr(&U.sbits[s >> 5], 1u << (s & 31));
    }
  };
  const std::int64_t window_block0 = U.window_first / a.L.coarse_pages;
  for (std::int64_t b = window_block0 + threadIdx.x; b <= (U.window_end - 1) / a.L.coarse_pages; b += blockDim.x) {
    mark_block(b);
  }
  for (int w = threadIdx.x; w < a.bitmap_words; w += blockDim.x) {
    for (std::uint32_t word = U.bits[w]; word != 0; word &= word - 1) {
      const std::int64_t block = (std::int64_t{w} * 32 + __ffs(word) - 1) / a.L.coarse_pages;
      if (!U.window_block(block)) mark_block(block);
    }
  }
  __syncthreads();

  const std::int64_t window_count = U.window_entries;
  const std::int64_t base = kWrite ? a.entry_offsets[unit] : 0;
  if (kWrite) {
    for (std::int64_t i = threadIdx.x; i < window_count; i += blockDim.x) {
      const std::int64_t page = U.window_first + i;
      const std::int64_t pool = U.pool_page(page);  // resident: the counting pass checked the window blocks
      BlockEntry e;
      e.row_mask[0] = U.full.lo;
      e.row_mask[1] = U.full.hi;
      e.page = static_cast<std::int32_t>(pool);
      e.key_pos0 = static_cast<std::int32_t>(page * ps);
      e.bias = 0.0f;
      e.key_meta = -1;
      e.key_count = static_cast<std::int32_t>(ps);
      e.flags = a.L.causal ? kEntryCausal : 0u;
      e.key_mask = ~std::uint64_t{0};
      a.entries[base + i] = e;
    }
    for (int w = threadIdx.x; w < a.bitmap_words; w += blockDim.x) {
      int r = U.prefix[w];
      for (std::uint32_t word = U.bits[w]; word != 0; word &= word - 1, ++r) {
        const std::int64_t page = std::int64_t{w} * 32 + __ffs(word) - 1;
        BlockEntry e;
        e.row_mask[0] = U.masks[r].lo;
        e.row_mask[1] = U.masks[r].hi;
        e.page = static_cast<std::int32_t>(U.pool_page(page));
        e.key_pos0 = 0;
        e.bias = 0.0f;
        e.key_meta = -1;
        e.key_count = static_cast<std::int32_t>(ps);
        e.flags = 0u;
        e.key_mask = ~std::uint64_t{0};
        a.entries[base + window_count + r] = e;
      }
    }
  }
  if (threadIdx.x >= 32) return;

  // Summary entries, in page order, by warp 0: page summaries (key j of summary page s stands for
  // resident pool page s * page_size + j), then coarse summaries (key j of coarse page s: block s * ps + j).
  const int lane = threadIdx.x;
  std::int64_t entry = base + window_count + total;
  std::int64_t meta = kWrite ? a.meta_offsets[unit] : 0;
  for (int w = 0; w < a.summary_words; ++w) {
    for (std::uint32_t word = U.sbits[w]; word != 0; word &= word - 1) {
      const std::int64_t s = std::int64_t{w} * 32 + __ffs(word) - 1;
      RowMask keys[2] = {{0, 0}, {0, 0}};
      for (int k = 0; k < 2; ++k) {
        const std::int64_t pool = s * ps + lane + 32 * k;
        if (lane + 32 * k >= ps) continue;
        const std::int64_t page = U.global_page(pool);
        if (page < 0 || !U.g.keys_eligible(page * ps, ps)) continue;
        const std::int64_t block = page / a.L.coarse_pages;
        const RowMask block_rows = U.window_block(block) ? U.full : U.chose_from(block);
        const RowMask chose = U.selected_rows(page);
        keys[k] = {block_rows.lo & ~chose.lo, block_rows.hi & ~chose.hi};
      }
      summary_entry<kWrite>(a, a.page_summary_first + s, keys, entry, meta);
    }
  }
  const std::int64_t bk = ps * a.L.coarse_pages;
  for (std::int64_t first = 0; first < a.L.num_blocks; first += ps) {
    RowMask keys[2] = {{0, 0}, {0, 0}};
    for (int k = 0; k < 2; ++k) {
      const std::int64_t block = first + lane + 32 * k;
      if (lane + 32 * k >= ps || block >= a.L.num_blocks || !U.g.keys_eligible(block * bk, bk)) continue;
      const RowMask chose = U.chose_from(block);
      keys[k] = {U.full.lo & ~chose.lo, U.full.hi & ~chose.hi};
    }
    summary_entry<kWrite>(a, a.coarse_summary_first + first / ps, keys, entry, meta);
  }
  if (!kWrite && lane == 0) {
    a.entry_counts[unit] = entry;
    a.meta_counts[unit] = meta;
  }
}

std::size_t table_smem_bytes(const TableArgs& a) {
  return static_cast<std::size_t>(a.mask_capacity) * sizeof(RowMask) +
         (2 * static_cast<std::size_t>(a.bitmap_words) + a.summary_words) * sizeof(std::uint32_t);
}

template <bool kWrite>
void launch_table(const TableArgs& a, std::int64_t units, cudaStream_t stream) {
  const std::size_t smem = table_smem_bytes(a);
  RINGCAST_CUDA_CHECK(cudaFuncSetAttribute(clustered_table_kernel<kWrite>,
                                           cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  clustered_table_kernel<kWrite><<<static_cast<unsigned>(units), kThreads, smem, stream>>>(a);
  RINGCAST_CUDA_CHECK_LAUNCH();
}

// offsets[0] = 0, offsets[1 + u] = counts[0] + ... + counts[u].
void scan_counts(const std::int64_t* counts, std::int64_t* offsets, std::int64_t units, cudaStream_t stream) {
  RINGCAST_CUDA_CHECK(cudaMemsetAsync(offsets, 0, sizeof(std::int64_t), stream));
  std::size_t bytes = 0;
  RINGCAST_CUDA_CHECK(cub::DeviceScan::InclusiveSum(nullptr, bytes, counts, offsets + 1, units, stream));
  const Scratch<unsigned char> temp(bytes, stream);
  RINGCAST_CUDA_CHECK(cub::DeviceScan::InclusiveSum(temp.get(), bytes, counts, offsets + 1, units, stream));
}

// Global block of each pool block slot of L (resident_pages / coarse_pages of them), or -1.
std::vector<std::int32_t> pool_block_map(const ClusteredLayout& L) {
  std::vector<std::int32_t> map(static_cast<std::size_t>(L.resident_pages() / L.coarse_pages));
  for (std::size_t slot = 0; slot < map.size(); ++slot) {
    const std::int64_t page = L.pool_page_global(static_cast<std::int64_t>(slot) * L.coarse_pages);
    map[slot] = static_cast<std::int32_t>(page < 0 ? -1 : page / L.coarse_pages);
  }
  return map;
}

}  // namespace

TableSize build_clustered_table_on_device(std::span<const ClusteredLayout> layouts, const SelectionOptions& options,
                                          std::span<const SelectionSlots> selections, const DeviceTableStorage& out,
                                          Stream stream_handle) {
  const auto stream = static_cast<cudaStream_t>(stream_handle);
  const ClusteredLayout& L = layouts.front();
  const int kv_heads = static_cast<int>(layouts.size());
  RINGCAST_CHECK(options.rows_per_token >= 1 && options.rows_per_token <= kQueryTile &&
                     (options.rows_per_token & (options.rows_per_token - 1)) == 0,
                 "clustered table on CUDA: rows_per_token must be a power of two in [1, {}], got {}", kQueryTile,
                 options.rows_per_token);
  const std::int64_t units = attention_tiles(L, options) * kv_heads;

  // Per-head maps, one after the other in one scratch: block -> pool page, pool block -> block.
  std::vector<std::int32_t> maps;
  std::vector<std::size_t> map_offsets;
  for (const ClusteredLayout& layout : layouts) {
    for (const std::vector<std::int32_t>& map : {detail::block_pool_map(layout), pool_block_map(layout)}) {
      map_offsets.push_back(maps.size());
      maps.insert(maps.end(), map.begin(), map.end());
    }
  }
  const Scratch<std::int32_t> d_maps(maps, stream);
  std::vector<HeadArgs> heads;
  for (std::size_t g = 0; g < layouts.size(); ++g) {
    heads.push_back({d_maps.get() + map_offsets[2 * g], d_maps.get() + map_offsets[2 * g + 1], selections[g].pages,
                     selections[g].counts});
  }
  const Scratch<HeadArgs> d_heads(heads, stream);
  const Scratch<std::int64_t> counts(static_cast<std::size_t>(2 * units), stream);
  const Scratch<std::int64_t> meta_offsets(static_cast<std::size_t>(units + 1), stream);
  const Scratch<int> error(std::vector<int>{0}, stream);

  TableArgs a{};
  a.L = detail::layout_args(L, options);
  a.heads = d_heads.get();
  a.global_pages = L.num_blocks() * L.coarse_pages;
  a.resident_pages = L.resident_pages();
  a.page_summary_first = L.page_summary_first_page();
  a.page_summary_pages = L.page_summary_pages();
  a.coarse_summary_first = L.coarse_summary_first_page();
  a.kv_heads = kv_heads;
  a.top_k = options.top_k;
  a.rows_per_token = options.rows_per_token;
  a.rows = options.unit == SelectUnit::kRow;
  a.bitmap_words = static_cast<int>((a.global_pages + 31) / 32);
  a.summary_words = static_cast<int>((a.page_summary_pages + 31) / 32);
  a.mask_capacity = static_cast<int>(std::min<std::int64_t>(
      std::int64_t{a.rows ? kQueryTile : 1} * options.top_k, a.global_pages));
  a.entry_counts = counts.get();
  a.meta_counts = counts.get() + units;
  a.error = error.get();
  int device = 0, smem_limit = 0;
  RINGCAST_CUDA_CHECK(cudaGetDevice(&device));
  RINGCAST_CUDA_CHECK(cudaDeviceGetAttribute(&smem_limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  RINGCAST_CHECK(table_smem_bytes(a) + 4096 <= static_cast<std::size_t>(smem_limit),
                 "clustered table on CUDA: {} global pages and top_k {} need {} bytes of shared memory per unit, "
                 "the device allows {}",
                 a.global_pages, options.top_k, table_smem_bytes(a), smem_limit);

  launch_table<false>(a, units, stream);
  scan_counts(a.entry_counts, out.offsets, units, stream);
  scan_counts(a.meta_counts, meta_offsets.get(), units, stream);
  TableSize size;
  int failed = 0;
  RINGCAST_CUDA_CHECK(
      cudaMemcpyAsync(&size.entries, out.offsets + units, sizeof(std::int64_t), cudaMemcpyDeviceToHost, stream));
  RINGCAST_CUDA_CHECK(cudaMemcpyAsync(&size.key_meta, meta_offsets.get() + units, sizeof(std::int64_t),
                                      cudaMemcpyDeviceToHost, stream));
  RINGCAST_CUDA_CHECK(cudaMemcpyAsync(&failed, error.get(), sizeof(int), cudaMemcpyDeviceToHost, stream));
  RINGCAST_CUDA_CHECK(cudaStreamSynchronize(stream));
  RINGCAST_CHECK(failed == 0,
                 "clustered table on CUDA: a selection names a pool page that is not an eligible resident page, or a "
                 "window or chosen block is not resident");
  if (size.entries > out.entry_capacity || size.key_meta > out.key_meta_capacity) return size;

  a.entry_offsets = out.offsets;
  a.meta_offsets = meta_offsets.get();
  a.entries = out.entries;
  a.key_meta = out.key_meta;
  launch_table<true>(a, units, stream);
  return size;
}

}  // namespace ringcast::kernels::cuda
