// Clustered attention on one rank (DESIGN.md §4.1 steps 4-6, docs/clustered-design.md): the page pool
// of a rank's layer, the rank-level top-R of remote coarse blocks, the coarse-to-fine selection of
// pages per unit (tile or row), and the block table that turns selections into attention entries.
// Everything is per (batch element, KV head); positions are global; a tile is kQueryTile rows of the
// rank; ties in every top-k break toward the lower global index (blocks by id, pages by position).
// Top-R and selection run on either backend; the layout, geometry and table builder are host code
// (selection_device.hpp keeps the selection and the table on a CUDA device instead).
#pragma once

#include <ringcast/kernels/attention.hpp>
#include <ringcast/kernels/block_table.hpp>

#include <cstdint>
#include <span>
#include <vector>

namespace ringcast::kernels {

// The page pool of one rank's layer for one (batch element, KV head), in region order:
//   local (n_loc / page_size) | halo (coarse_pages per halo block) | fetched (fetch_capacity blocks)
//   | page summaries (one key per resident page, pool order) | coarse summaries (one key per block).
// Resident pages are the local, halo and fetched pages; a resident page's pool index is also the
// index of its page summary (key j of summary page s stands for resident page page_size * s + j), and
// key j of coarse-summary page s stands for global block page_size * s + j. Every KV head of a call
// shares one pool shape, so fetch_capacity (>= fetched.size()) is the same for all of them; slots past
// fetched.size() are padding. Key positions: global page p holds positions [p * page_size, (p+1) * page_size).
struct ClusteredLayout {
  int page_size = 64;        // <= 64: summary entries pick keys with a 64-bit key_mask
  int coarse_pages = 16;     // pages per coarse block
  std::int64_t n = 0;        // keys of the whole sequence (a multiple of block_keys())
  std::int64_t first_pos = 0;  // this rank's first position (contiguous placement)
  std::int64_t n_loc = 0;      // this rank's keys and queries (a multiple of block_keys())
  std::int64_t halo_before = -1;  // global block id of the previous rank's last block, or -1
  std::int64_t halo_after = -1;   // bidirectional: the next rank's first block, or -1
  std::vector<std::int64_t> fetched;  // global ids of the fetched remote blocks, in pool order
  std::int64_t fetch_capacity = 0;    // blocks in the fetched region

  // Throws Error when the fields are inconsistent (shapes, halo next to the shard, fetched blocks
  // remote and distinct, capacity).
  void validate() const;

  std::int64_t block_keys() const { return std::int64_t{page_size} * coarse_pages; }
  std::int64_t num_blocks() const { return n / block_keys(); }
  std::int64_t first_block() const { return first_pos / block_keys(); }
  std::int64_t local_blocks() const { return n_loc / block_keys(); }
  std::int64_t num_tiles() const { return (n_loc + kQueryTile - 1) / kQueryTile; }

  std::int64_t local_pages() const { return n_loc / page_size; }
  std::int64_t halo_first_page() const { return local_pages(); }
  std::int64_t halo_pages() const { return coarse_pages * ((halo_before >= 0) + (halo_after >= 0)); }
  std::int64_t fetched_first_page() const { return halo_first_page() + halo_pages(); }
  std::int64_t fetched_pages() const { return coarse_pages * fetch_capacity; }
  std::int64_t resident_pages() const { return fetched_first_page() + fetched_pages(); }
  std::int64_t page_summary_first_page() const { return resident_pages(); }
  std::int64_t page_summary_pages() const { return (resident_pages() + page_size - 1) / page_size; }
  std::int64_t coarse_summary_first_page() const { return page_summary_first_page() + page_summary_pages(); }
  std::int64_t coarse_summary_pages() const { return (num_blocks() + page_size - 1) / page_size; }
  std::int64_t num_pages() const { return coarse_summary_first_page() + coarse_summary_pages(); }

  bool is_local_block(std::int64_t block) const;
  // First pool page of a resident block, or -1.
  std::int64_t block_pool_page(std::int64_t block) const;
  // Pool page of a resident global page, or -1.
  std::int64_t page_pool_page(std::int64_t page) const;
  // Global page held by resident pool page `pool_page`, or -1 (padding slots, summary pages).
  std::int64_t pool_page_global(std::int64_t pool_page) const;
};

enum class SelectUnit { kTile, kRow };     // one choice per query tile, or per query row
enum class SelectScore { kBound, kMean };  // Quest bound q+.k_max + q-.k_min, or q.k_mean (MoBA)

struct SelectionOptions {
  bool causal = true;
  SelectUnit unit = SelectUnit::kRow;
  SelectScore score = SelectScore::kBound;
  int top_k = 16;          // pages per unit
  int coarse_k = 4;        // coarse blocks per unit
  int window = 256;        // causal: pages overlapping [t0 - window, t1); bidirectional: window / 2 each side
  int remote_blocks = 8;   // R (step 4)
  int remote_cap = 16;     // causal: at most this many fetched blocks (2R by default)
  // Rows of the attention's query tiles per query token, read by the table builders only. 1: tile T
  // is the 128 tokens of selection tile T, one query head. G (a power of two <= kQueryTile; GQA group
  // size, row mode): the token's G query heads of the KV head are consecutive rows (row t * G + j is
  // token t's head j, NSA's layout), so attention tile T holds the 128 / G tokens from local token
  // T * 128 / G on, every head of a token sees what the token selected, and a tile's list is the union
  // of fewer tokens' choices. Window and eligibility stay those of the selection tile (T / G).
  int rows_per_token = 1;
};

// Where tile T's rows [t0, t1) look (global positions): window pages overlap [window_lo, window_hi);
// causal, a page or block is eligible iff it ends at or before eligible_end (= t0 - window; blocks are
// whole); bidirectional, iff none of its keys lies in the window.
struct TileGeometry {
  std::int64_t t0 = 0, t1 = 0;
  std::int64_t window_lo = 0, window_hi = 0;  // clipped to [0, n)
  bool causal = true;
  std::int64_t eligible_end = 0;

  bool page_eligible(std::int64_t page, int page_size) const { return keys_eligible(page * page_size, page_size); }
  bool block_eligible(std::int64_t block, std::int64_t block_keys) const {
    return keys_eligible(block * block_keys, block_keys);
  }
  bool keys_eligible(std::int64_t pos0, std::int64_t count) const {
    return causal ? pos0 + count <= eligible_end : pos0 + count <= window_lo || pos0 >= window_hi;
  }
};
TileGeometry tile_geometry(const ClusteredLayout& layout, const SelectionOptions& options, std::int64_t tile);

// Queries and summaries of one (batch element, KV head). Summary rows are [count, head_dim] fp32
// (the bound score reads min / max, the mean score reads means; the others may be null).
struct SelectionQueries {
  const float* q = nullptr;  // [n_loc, heads, head_dim]: the rank's queries of the batch element
  int heads = 1;
  int kv_heads = 1;
  int head_dim = 64;
  int kv_head = 0;  // query heads kv_head * G .. kv_head * G + G - 1 (G = heads / kv_heads) share it
};
struct SummaryRows {
  const float* mean = nullptr;
  const float* min = nullptr;
  const float* max = nullptr;
};

// Step 4. Remote blocks are those neither local nor halo. Bidirectional: a block's score is its max
// over the rank's tiles of the score with the tile's mean query; the best R are fetched and every
// tile uses them all. Causal: tile T scores with its lagged query (see select_pages), a block's score
// for T is the running max over tiles 0..T, T may use the R best of the blocks eligible for T, and the
// union is admitted in tile order (within a tile, best first) up to remote_cap; T keeps the usable
// blocks that made it into the fetch list.
struct RemoteSelectionParams {
  const ClusteredLayout* layout = nullptr;  // its fetched list is ignored
  SelectionOptions options;
  SelectionQueries queries;
  SummaryRows coarse;  // [num_blocks, head_dim]: the whole sequence
};
struct RemoteSelection {
  std::vector<std::int64_t> fetch;               // global block ids, in admission (pool) order
  std::vector<std::int64_t> usable_offsets{0};   // CSR over tiles
  std::vector<std::int64_t> usable;              // per tile: global block ids, ascending
};
RemoteSelection select_remote_blocks(const RemoteSelectionParams& p, const ExecContext& ctx);

// Step 5, for every unit of the rank (tiles, or rows in row mode). The selection query q̂ is summed
// over the group's heads: row mode, the row's query; tile mode, bidirectional, the tile's mean query;
// tile mode, causal, the lagged query: the mean of the rank's queries at positions [t0 - 127, t0]
// (the first tile of a rank has only row t0 of them; rows after t0 never decide for the tile).
// Coarse candidates: the eligible blocks the tile may use (local, halo, fetched and usable) that hold
// no window page; the best coarse_k are kept; page candidates: their eligible pages plus the eligible
// pages of usable blocks that hold window pages; the best top_k are kept.
struct SelectionParams {
  const ClusteredLayout* layout = nullptr;
  SelectionOptions options;
  SelectionQueries queries;
  SummaryRows coarse;  // [num_blocks, head_dim]: the whole sequence
  SummaryRows pages;   // [resident_pages, head_dim]: the resident pages, in pool order
  std::span<const std::int64_t> usable_offsets;  // per tile, fetched blocks it may use (RemoteSelection)
  std::span<const std::int64_t> usable;
};
// Per unit u: pages[page_offsets[u], page_offsets[u + 1]) are pool pages in ascending global position;
// blocks[block_offsets[u], ...) the chosen coarse blocks, ascending. Units: tiles, or rows (row mode).
struct ClusteredSelection {
  SelectUnit unit = SelectUnit::kRow;
  std::vector<std::int64_t> page_offsets{0};
  std::vector<std::int32_t> pages;
  std::vector<std::int64_t> block_offsets{0};
  std::vector<std::int64_t> blocks;
};
ClusteredSelection select_pages(const SelectionParams& p, const ExecContext& ctx);

// The rows_per_token of per-row selection over `heads` query heads sharing `kv_heads` KV heads, as the
// clustered mode runs it: G = heads / kv_heads when that is a power of two <= kQueryTile, else 1.
inline int grouped_rows_per_token(int heads, int kv_heads) {
  const int g = heads / kv_heads;
  return g > 1 && g <= kQueryTile && (g & (g - 1)) == 0 ? g : 1;
}

// The attention tiles of a rank's table: ceil(n_loc * rows_per_token / kQueryTile).
inline std::int64_t attention_tiles(const ClusteredLayout& layout, const SelectionOptions& options) {
  return (layout.n_loc * options.rows_per_token + kQueryTile - 1) / kQueryTile;
}

// Step 6: the forward table of one batch element over its pool, units (tile * kv_heads + kv_head)
// with layouts[g] and selections[g] of KV head g (one pool shape for all); attention_tiles() tiles.
// Per tile, in order: window pages (kEntryCausal when causal; with rows_per_token > 1 causal, none
// that starts after the tile's last token), selected pages (row mask: the rows that chose them), page-summary
// entries and coarse-summary entries (kEntryKeyBias, key_mask: the keys they stand for; KeyMeta row
// masks where rows of the tile see different keys), so every key a row may see counts once.
HostBlockTable build_clustered_table(std::span<const ClusteredLayout> layouts, const SelectionOptions& options,
                                     std::span<const ClusteredSelection> selections);

// One KV head's key_bias slice [num_pages, page_size]: log(count) on the summary keys (page_counts:
// [resident_pages] in pool order, block_counts: [num_blocks]; count 0 marks padding), 0 elsewhere.
void fill_summary_key_bias(const ClusteredLayout& layout, std::span<const std::int32_t> page_counts,
                           std::span<const std::int32_t> block_counts, std::span<float> key_bias);

}  // namespace ringcast::kernels
