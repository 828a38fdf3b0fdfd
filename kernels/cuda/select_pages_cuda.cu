// CUDA coarse-to-fine page selection (selection.hpp select_pages, DESIGN.md §4.1 step 5), scoring
// fused with the top-k: one warp per unit scores its candidates one by one into two warp top-k lists
// (coarse blocks, then pages), so no score ever reaches memory. Row units: a block takes one tile and
// its warps share the tile's candidates through L1; tile units: one warp per tile. Each unit writes
// fixed slots (pool pages ascending by global position, blocks ascending: SelectionSlots), which stay
// on the device or which the host compacts in unit order; the result is the CPU backend's whenever
// the scores compare the same.
#include <ringcast/cuda_check.hpp>
#include <ringcast/error.hpp>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "selection_cuda.hpp"
#include "selection_launch.hpp"

namespace ringcast::kernels::cuda {
namespace {

using detail::Geometry;
using detail::LayoutArgs;
using detail::Scratch;
using detail::SummaryArgs;
using detail::WarpTopK;

constexpr int kWarps = 8;  // warps per block

struct SelectArgs {
  LayoutArgs L;
  SummaryArgs coarse;  // [num_blocks, d]
  SummaryArgs pages;   // [resident_pages, d], pool order
  const float* q;                      // row units: [n_loc, heads, d]
  const float* tile_q;                 // tile units: [tiles, d]
  const std::int32_t* block_pool;      // [num_blocks]: first pool page of a resident block, or -1
  const std::int64_t* usable_offsets;  // [tiles + 1], or null: no fetched block is usable
  const std::int64_t* usable;
  std::int32_t* page_slots;   // [units, top_k]
  std::int64_t* block_slots;  // [units, coarse_k]
  std::int32_t* counts;       // [units, 2]: pages, blocks
  std::int64_t tiles;
  int heads, group, head_dim, kv_head;
  int top_k, coarse_k;
  bool rows, bound;
};

template <int kPerLane, int kSlots>
__device__ __forceinline__ void select_unit(const SelectArgs& a, std::int64_t unit, std::int64_t tile) {
  const int lane = threadIdx.x & 31;
  const int d = a.head_dim;
  const int cp = a.L.coarse_pages;
  const std::int64_t ps = a.L.page_size;
  const std::int64_t bk = ps * cp;

  float q[kPerLane];
#pragma unroll
  for (int i = 0; i < kPerLane; ++i) {
    const int c = lane + 32 * i;
    q[i] = 0.0f;
    if (c >= d) continue;
    if (a.rows) {  // the row's query summed over the group's heads, in head order as on the CPU
      const float* row = a.q + (unit * a.heads + std::int64_t{a.kv_head} * a.group) * d + c;
      for (int h = 0; h < a.group; ++h) q[i] = __fadd_rn(q[i], row[std::int64_t{h} * d]);
    } else {
      q[i] = a.tile_q[tile * d + c];
    }
  }

  const Geometry g(a.L, tile);
  WarpTopK<1> coarse(a.coarse_k);
  WarpTopK<kSlots> fine(a.top_k);
  // Usable blocks, in no particular order (the top-k does not depend on it): local, halo, then the
  // fetched blocks this tile may use. Eligible whole, a block competes as a coarse block; else (it
  // holds window pages) its eligible pages compete directly. Causal eligibility is a page prefix.
  const std::int64_t halo_first = a.L.local_blocks;
  const std::int64_t fetched_first = halo_first + (a.L.halo_before >= 0) + (a.L.halo_after >= 0);
  const std::int64_t usable_first = a.usable_offsets != nullptr ? a.usable_offsets[tile] : 0;
  const std::int64_t usable_count = a.usable_offsets != nullptr ? a.usable_offsets[tile + 1] - usable_first : 0;
  for (std::int64_t i = 0; i < fetched_first + usable_count; ++i) {
    const std::int64_t b = i < halo_first             ? a.L.first_block + i
                           : i >= fetched_first       ? a.usable[usable_first + i - fetched_first]
                           : i == halo_first && a.L.halo_before >= 0 ? a.L.halo_before
                                                                      : a.L.halo_after;
    if (g.keys_eligible(b * bk, bk)) {
      if (a.coarse_k > 0) coarse.push(detail::warp_score(a.bound, q, a.coarse, b, d), static_cast<int>(b));
      continue;
    }
    const std::int64_t first = a.block_pool[b];
    for (int j = 0; j < cp; ++j) {
      const std::int64_t page = b * cp + j;
      if (!g.keys_eligible(page * ps, ps)) {
        if (g.causal) break;
        continue;
      }
      fine.push(detail::warp_score(a.bound, q, a.pages, first + j, d), static_cast<int>(page));
    }
  }
  for (int r = 0; r < coarse.count; ++r) {
    const std::int64_t b = coarse.index_at(r);
    const std::int64_t first = a.block_pool[b];
    for (int j = 0; j < cp; ++j) {
      fine.push(detail::warp_score(a.bound, q, a.pages, first + j, d), static_cast<int>(b * cp + j));
    }
  }

#pragma unroll
  for (int s = 0; s < kSlots; ++s) {
    const int pos = fine.ascending_position(s);
    if (pos >= 0) {
      const int page = fine.index[s];
      a.page_slots[unit * a.top_k + pos] = a.block_pool[page / cp] + page % cp;
    }
  }
  const int pos = coarse.ascending_position(0);
  if (pos >= 0) a.block_slots[unit * a.coarse_k + pos] = coarse.index[0];
  if (lane == 0) {
    a.counts[2 * unit] = fine.count;
    a.counts[2 * unit + 1] = coarse.count;
  }
}

template <int kPerLane, int kSlots>
__global__ void __launch_bounds__(kWarps * 32) select_pages_kernel(const SelectArgs a) {
  const int warp = threadIdx.x / 32;
  if (a.rows) {
    const std::int64_t tile = blockIdx.x;
    const std::int64_t r0 = tile * kQueryTile;
    const std::int64_t r1 = min(r0 + kQueryTile, a.L.n_loc);
    for (std::int64_t row = r0 + warp; row < r1; row += kWarps) select_unit<kPerLane, kSlots>(a, row, tile);
  } else {
    const std::int64_t tile = std::int64_t{blockIdx.x} * kWarps + warp;
    if (tile < a.tiles) select_unit<kPerLane, kSlots>(a, tile, tile);
  }
}

template <int kPerLane, int kSlots>
void launch(const SelectArgs& a, cudaStream_t stream) {
  const std::int64_t blocks = a.rows ? a.tiles : (a.tiles + kWarps - 1) / kWarps;
  select_pages_kernel<kPerLane, kSlots><<<static_cast<unsigned>(blocks), kWarps * 32, 0, stream>>>(a);
  RINGCAST_CUDA_CHECK_LAUNCH();
}

// Channels per lane x top-k slots per lane, onto compile-time instances.
template <int kPerLane>
void launch_for_k(const SelectArgs& a, cudaStream_t stream) {
  if (a.top_k <= 32) return launch<kPerLane, 1>(a, stream);
  if (a.top_k <= 64) return launch<kPerLane, 2>(a, stream);
  launch<kPerLane, 4>(a, stream);
}

void launch_select(const SelectArgs& a, cudaStream_t stream) {
  if (a.head_dim <= 64) return launch_for_k<2>(a, stream);
  if (a.head_dim <= 128) return launch_for_k<4>(a, stream);
  launch_for_k<8>(a, stream);
}

}  // namespace

void select_pages_to_slots(const SelectionParams& p, const SelectionSlots& out, Stream stream_handle) {
  const ClusteredLayout& L = *p.layout;
  const SelectionOptions& opt = p.options;
  const SelectionQueries& sq = p.queries;
  RINGCAST_CHECK(sq.head_dim <= detail::kMaxHeadDim && opt.top_k <= detail::kMaxTopK && opt.coarse_k <= 32,
                 "select_pages on CUDA: head_dim {} (at most {}), top_k {} (at most {}) or coarse_k {} (at most 32) "
                 "is not supported",
                 sq.head_dim, detail::kMaxHeadDim, opt.top_k, detail::kMaxTopK, opt.coarse_k);
  const auto stream = static_cast<cudaStream_t>(stream_handle);
  const bool rows = opt.unit == SelectUnit::kRow;
  const std::int64_t tiles = L.num_tiles();

  const Scratch<std::int32_t> block_pool(detail::block_pool_map(L), stream);
  const Scratch<std::int64_t> usable_offsets(std::vector<std::int64_t>(p.usable_offsets.begin(), p.usable_offsets.end()),
                                             stream);
  const Scratch<std::int64_t> usable(std::vector<std::int64_t>(p.usable.begin(), p.usable.end()), stream);
  const Scratch<float> tile_q(rows ? 0 : static_cast<std::size_t>(tiles * sq.head_dim), stream);

  const LayoutArgs layout = detail::layout_args(L, opt);
  if (!rows) detail::launch_tile_queries(layout, sq, tiles, tile_q.get(), stream);
  SelectArgs a{};
  a.L = layout;
  a.coarse = {p.coarse.mean, p.coarse.min, p.coarse.max};
  a.pages = {p.pages.mean, p.pages.min, p.pages.max};
  a.q = sq.q;
  a.tile_q = tile_q.get();
  a.block_pool = block_pool.get();
  a.usable_offsets = p.usable_offsets.empty() ? nullptr : usable_offsets.get();
  a.usable = usable.get();
  a.page_slots = out.pages;
  a.block_slots = out.blocks;
  a.counts = out.counts;
  a.tiles = tiles;
  a.heads = sq.heads;
  a.group = sq.heads / sq.kv_heads;
  a.head_dim = sq.head_dim;
  a.kv_head = sq.kv_head;
  a.top_k = opt.top_k;
  a.coarse_k = opt.coarse_k;
  a.rows = rows;
  a.bound = opt.score == SelectScore::kBound;
  launch_select(a, stream);
}

ClusteredSelection select_pages(const SelectionParams& p, Stream stream_handle) {
  const SelectionOptions& opt = p.options;
  const auto stream = static_cast<cudaStream_t>(stream_handle);
  const std::int64_t units = opt.unit == SelectUnit::kRow ? p.layout->n_loc : p.layout->num_tiles();
  const Scratch<std::int32_t> page_slots(static_cast<std::size_t>(units * opt.top_k), stream);
  const Scratch<std::int64_t> block_slots(static_cast<std::size_t>(units * opt.coarse_k), stream);
  const Scratch<std::int32_t> counts(static_cast<std::size_t>(2 * units), stream);
  select_pages_to_slots(p, {page_slots.get(), block_slots.get(), counts.get()}, stream_handle);

  std::vector<std::int32_t> pages, unit_counts;
  std::vector<std::int64_t> blocks;
  page_slots.download(pages);
  block_slots.download(blocks);
  counts.download(unit_counts);
  RINGCAST_CUDA_CHECK(cudaStreamSynchronize(stream));

  ClusteredSelection out;
  out.unit = opt.unit;
  out.page_offsets.reserve(static_cast<std::size_t>(units) + 1);
  out.block_offsets.reserve(static_cast<std::size_t>(units) + 1);
  for (std::int64_t u = 0; u < units; ++u) {
    const auto page_begin = pages.begin() + u * opt.top_k;
    const auto block_begin = blocks.begin() + u * opt.coarse_k;
    out.pages.insert(out.pages.end(), page_begin, page_begin + unit_counts[2 * u]);
    out.blocks.insert(out.blocks.end(), block_begin, block_begin + unit_counts[2 * u + 1]);
    out.page_offsets.push_back(static_cast<std::int64_t>(out.pages.size()));
    out.block_offsets.push_back(static_cast<std::int64_t>(out.blocks.size()));
  }
  return out;
}

}  // namespace ringcast::kernels::cuda
