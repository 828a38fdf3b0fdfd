// The clustered block table (selection.hpp, DESIGN.md §4.1 step 6 and "Visibility rules"): per tile
// and KV head, entries for the window, the selected pages, the page summaries and the coarse
// summaries, so that each key a row may see is counted once, at one resolution. Summary entries are
// built per summary page from per-key row masks: one entry with a key_mask when every taken key is
// seen by the same rows, KeyMeta row masks otherwise. With rows_per_token = G each tile row is one
// (token, head in group) pair and a token's G rows share its entries. Host code, backend-independent.
#include <ringcast/error.hpp>
#include <ringcast/kernels/selection.hpp>

#include <algorithm>
#include <array>
#include <map>

namespace ringcast::kernels {
namespace {

using RowMask = std::array<std::uint64_t, 2>;

// Rows [r0, r0 + count) of a tile, count a power of two <= 128 and r0 a multiple of it.
void add_rows(RowMask& m, int r0, int count) {
  if (count >= 64) {
    for (int w = r0 >> 6; w < (r0 + count) >> 6; ++w) m[w] = ~std::uint64_t{0};
    return;
  }
  m[r0 >> 6] |= ((std::uint64_t{1} << count) - 1) << (r0 & 63);
}
bool none(const RowMask& m) { return (m[0] | m[1]) == 0; }
RowMask minus(const RowMask& a, const RowMask& b) { return {a[0] & ~b[0], a[1] & ~b[1]}; }

BlockEntry make_entry(std::int64_t page, const RowMask& rows, int page_size) {
  BlockEntry e{};
  e.row_mask[0] = rows[0];
  e.row_mask[1] = rows[1];
  e.page = static_cast<std::int32_t>(page);
  e.key_meta = -1;
  e.key_count = page_size;
  return e;
}

// Attention tile `tile` (selection.hpp, SelectionOptions::rows_per_token): its tokens [t0, t0 + tokens)
// (global positions) with G rows each, inside selection tile tile / G.
void append_tile(HostBlockTable& t, const ClusteredLayout& L, const SelectionOptions& opt,
                 const ClusteredSelection& sel, std::int64_t tile) {
  const int G = opt.rows_per_token;
  const TileGeometry g = tile_geometry(L, opt, tile / G);
  const int ps = L.page_size;
  const std::int64_t t0 = L.first_pos + tile * (kQueryTile / G);
  const int tokens = static_cast<int>(std::min<std::int64_t>(kQueryTile / G, L.first_pos + L.n_loc - t0));
  const std::array<std::uint64_t, 2> full = full_row_mask(tokens * G);
  const bool row_units = sel.unit == SelectUnit::kRow;

  // Window: every row, the causal mask cuts it per row (pages past the tile's last token see no row).
  std::map<std::int64_t, bool> window_blocks;  // blocks holding window pages (ordered set)
  for (std::int64_t page = g.window_lo / ps; page * ps < g.window_hi; ++page) {
    window_blocks[page / L.coarse_pages] = true;
    if (opt.causal && page * ps >= t0 + tokens) continue;
    const std::int64_t pool = L.page_pool_page(page);
    RINGCAST_CHECK(pool >= 0, "clustered table: window page {} of tile {} is not resident (halo missing?)", page, tile);
    BlockEntry e = make_entry(pool, full, ps);
    e.key_pos0 = static_cast<std::int32_t>(page * ps);
    e.flags = opt.causal ? kEntryCausal : 0u;
    t.entries.push_back(e);
  }

  // Selected pages (global page -> pool page, rows) and the rows that chose from each block.
  std::map<std::int64_t, std::pair<std::int64_t, RowMask>> selected;
  std::map<std::int64_t, RowMask> chose_from;
  for (int r = 0; r < (row_units ? tokens : 1); ++r) {
    const std::int64_t u = row_units ? t0 - L.first_pos + r : tile / G;
    for (std::int64_t i = sel.page_offsets[u]; i < sel.page_offsets[u + 1]; ++i) {
      const std::int64_t global = L.pool_page_global(sel.pages[i]);
      RINGCAST_CHECK(global >= 0 && g.page_eligible(global, ps), "clustered table: unit {} selected pool page {}, "
                     "which is not an eligible resident page", u, sel.pages[i]);
      auto& [pool, mask] = selected[global];
      pool = sel.pages[i];
      RowMask& block_rows = chose_from[global / L.coarse_pages];
      if (row_units) {
        add_rows(mask, r * G, G);
        add_rows(block_rows, r * G, G);
      } else {
        mask = full;
        block_rows = full;
      }
    }
  }
  for (const auto& [global, entry] : selected) t.entries.push_back(make_entry(entry.first, entry.second, ps));

  // Page summaries: eligible pages, not selected, of blocks that are not eligible (they hold window
  // pages) for every row, or that the row chose pages from. Grouped per summary page.
  std::map<std::int64_t, std::vector<RowMask>> summary_keys;
  const auto add_page_summaries = [&](std::int64_t block, const RowMask& block_rows) {
    for (std::int64_t page = block * L.coarse_pages; page < (block + 1) * L.coarse_pages; ++page) {
      if (!g.page_eligible(page, ps)) continue;
      const auto it = selected.find(page);
      const RowMask seen = it == selected.end() ? block_rows : minus(block_rows, it->second.second);
      if (none(seen)) continue;
      const std::int64_t pool = L.page_pool_page(page);
      RINGCAST_CHECK(pool >= 0, "clustered table: page {} needs its page summary but is not resident", page);
      auto& keys = summary_keys[L.page_summary_first_page() + pool / ps];
      keys.resize(static_cast<std::size_t>(ps), RowMask{0, 0});
      keys[static_cast<std::size_t>(pool % ps)] = seen;
    }
  };
  for (const auto& [block, unused] : window_blocks) add_page_summaries(block, full);
  for (const auto& [block, block_rows] : chose_from) {
    if (!window_blocks.contains(block)) add_page_summaries(block, block_rows);
  }
  for (const auto& [page, keys] : summary_keys) append_summary_entry(t, page, keys, ps);

  // Coarse summaries: eligible blocks, for the rows that chose no page of them.
  std::vector<RowMask> keys(static_cast<std::size_t>(ps));
  for (std::int64_t first = 0; first < L.num_blocks(); first += ps) {
    std::fill(keys.begin(), keys.end(), RowMask{0, 0});
    for (std::int64_t block = first; block < std::min(first + ps, L.num_blocks()); ++block) {
      if (!g.block_eligible(block, L.block_keys())) continue;
      const auto it = chose_from.find(block);
      keys[static_cast<std::size_t>(block - first)] = it == chose_from.end() ? full : minus(full, it->second);
    }
    append_summary_entry(t, L.coarse_summary_first_page() + first / ps, keys, ps);
  }
}

}  // namespace

HostBlockTable build_clustered_table(std::span<const ClusteredLayout> layouts, const SelectionOptions& options,
                                     std::span<const ClusteredSelection> selections) {
  RINGCAST_CHECK(!layouts.empty() && layouts.size() == selections.size(),
                 "clustered table: need one layout and one selection per KV head (got {} and {})", layouts.size(),
                 selections.size());
  const ClusteredLayout& first = layouts[0];
  for (std::size_t g = 0; g < layouts.size(); ++g) {
    const ClusteredLayout& L = layouts[g];
    L.validate();
    RINGCAST_CHECK(L.n == first.n && L.first_pos == first.first_pos && L.n_loc == first.n_loc &&
                       L.page_size == first.page_size && L.coarse_pages == first.coarse_pages &&
                       L.num_pages() == first.num_pages(),
                   "clustered table: the layout of KV head {} has another pool shape than KV head 0", g);
    const std::int64_t units = selections[g].unit == SelectUnit::kRow ? L.n_loc : L.num_tiles();
    RINGCAST_CHECK(selections[g].page_offsets.size() == static_cast<std::size_t>(units) + 1,
                   "clustered table: the selection of KV head {} has {} units, expected {}", g,
                   selections[g].page_offsets.size() - 1, units);
  }
  const int G = options.rows_per_token;
  RINGCAST_CHECK(G >= 1 && G <= kQueryTile && (G & (G - 1)) == 0,
                 "clustered table: rows_per_token must be a power of two in [1, {}], got {}", kQueryTile, G);
  HostBlockTable t;
  for (std::int64_t tile = 0; tile < attention_tiles(first, options); ++tile) {
    for (std::size_t g = 0; g < layouts.size(); ++g) {
      append_tile(t, layouts[g], options, selections[g], tile);
      t.offsets.push_back(static_cast<std::int64_t>(t.entries.size()));
    }
  }
  return t;
}

}  // namespace ringcast::kernels
