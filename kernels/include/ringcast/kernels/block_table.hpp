// Host-side block tables: owning containers behind the BlockTable / TransposedTable views of
// attention.hpp, the transpose that the backward pass needs, and the builders for the exact modes
// (dense, sliding window). Everything here is host memory and deterministic; a CUDA caller copies
// the vectors to the device and builds the views over the copies.
#pragma once

#include <ringcast/kernels/attention.hpp>

#include <array>
#include <cstdint>
#include <span>
#include <vector>

namespace ringcast::kernels {

// A forward table that owns its storage. offsets has num_units() + 1 elements (CSR over units
// u = (b * num_tiles + tile) * kv_heads + kv_head); a new table holds offsets {0}, so units are
// built in order by appending their entries, then the new entry count. key_meta may be empty when
// no entry uses it. view() points into the vectors: valid while the table lives and is not resized.
struct HostBlockTable {
  std::vector<std::int64_t> offsets{0};
  std::vector<BlockEntry> entries;
  std::vector<KeyMeta> key_meta;
  bool rows_vary = false;  // BlockTable::rows_vary

  BlockTable view() const;
};

struct HostTransposedTable {
  std::vector<std::int64_t> offsets;  // [kv_heads * num_pages + 1]
  std::vector<PageRef> refs;

  TransposedTable view() const;
};

// Page -> entries: refs of (kv_head, page) list, in increasing forward entry order (hence in unit
// order), every entry of the table that references that page. Counting sort, O(units + entries).
// Throws Error when the table does not fit the shape (offsets size, page ids out of range).
HostTransposedTable transpose(const HostBlockTable& table, const AttentionShape& shape);

// Rows of query tile `tile` that exist: kQueryTile, or fewer for the last tile when seq_q is not a
// multiple of kQueryTile.
int tile_rows(const AttentionShape& shape, std::int64_t tile);

// Row mask with bits [0, rows) set, 0 <= rows <= kQueryTile. Rows past the end of a partial last tile
// must have no bit: use full_row_mask(tile_rows(shape, tile)) for "every row of the tile".
std::array<std::uint64_t, 2> full_row_mask(int rows);

// Appends the entry of a summary page (DESIGN.md §2: each key its own row mask and the pool's +log(count)
// bias): key j is seen by the tile rows key_rows[j] (no bit: key j is not taken). The entry's row mask is
// the union, its key mask the taken keys, and when taken keys are seen by different rows it points at
// page_size KeyMeta records appended to the table. Nothing is appended when no key is taken.
void append_summary_entry(HostBlockTable& t, std::int64_t page, std::span<const std::array<std::uint64_t, 2>> key_rows,
                          int page_size);

// Keys stored in consecutive pages of every KV head's pool: key j of the range is in page
// first_page + j / page_size, slot j % page_size, at global position pos0 + j. A range starts at a
// page boundary; its last page may be partial (the entry's key_count says how many keys are valid).
// A zigzag shard is two ranges; a ring step's K/V block is one or two.
struct KeyRange {
  std::int64_t first_page = 0;
  std::int64_t count = 0;
  std::int32_t pos0 = 0;
};

// Exact attention over `keys` for every query row (q_pos: [seq_q] global positions of the rows):
// each tile gets one entry per page of the ranges, in range then page order, identical for every
// batch element and KV head, bias 0, no KeyMeta. Causal: row t sees keys at positions <= q_pos[t].
// A page is omitted from a tile when none of the tile's rows sees any of its keys; its row mask
// holds the rows that see at least one of its keys; kEntryCausal is set only when the position mask
// cuts keys of some row in that mask (the page straddles the diagonal).
HostBlockTable dense_table(const AttentionShape& shape, std::span<const KeyRange> keys,
                           std::span<const std::int32_t> q_pos, bool causal);

// As dense_table, restricted per tile to the pages that overlap the positions
// [t0 - before, t1 + after), where [t0, t1) spans the positions of the tile's rows (t0 the least,
// t1 - 1 the greatest). The window is tile-granular, as in DESIGN.md §4.1: every row of a tile sees
// the same pages, cut only by the causal mask (with causal, keys past a row are masked anyway, so
// `after` matters only for bidirectional attention).
HostBlockTable sliding_window_table(const AttentionShape& shape, std::span<const KeyRange> keys,
                                    std::span<const std::int32_t> q_pos, bool causal,
                                    std::int64_t before, std::int64_t after);

}  // namespace ringcast::kernels
