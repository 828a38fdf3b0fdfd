// The clustered page pool (selection.hpp, docs/clustered-design.md): region arithmetic, the map
// between global blocks / pages and pool pages, tile geometry (windows and eligibility, DESIGN.md
// §4.1 "Visibility rules") and the summary keys' log(count) biases. Host code, backend-independent.
#include <ringcast/error.hpp>
#include <ringcast/kernels/selection.hpp>

#include <algorithm>
#include <cmath>

namespace ringcast::kernels {

void ClusteredLayout::validate() const {
  RINGCAST_CHECK(page_size >= 1 && page_size <= 64 && coarse_pages >= 1,
                 "clustered layout: page_size ({}) must be in [1, 64] and coarse_pages ({}) positive", page_size,
                 coarse_pages);
  const std::int64_t bk = block_keys();
  RINGCAST_CHECK(n_loc >= bk && n_loc % bk == 0 && n % bk == 0 && first_pos % bk == 0 && first_pos + n_loc <= n,
                 "clustered layout: the shard [{}, {}) of n = {} must be whole coarse blocks of {} keys", first_pos,
                 first_pos + n_loc, n, bk);
  RINGCAST_CHECK(halo_before == -1 || halo_before == first_block() - 1,
                 "clustered layout: halo_before ({}) must be block {} (the previous rank's last) or -1", halo_before,
                 first_block() - 1);
  RINGCAST_CHECK(halo_after == -1 || (halo_after == first_block() + local_blocks() && halo_after < num_blocks()),
                 "clustered layout: halo_after ({}) must be block {} (the next rank's first) or -1", halo_after,
                 first_block() + local_blocks());
  RINGCAST_CHECK(fetch_capacity >= static_cast<std::int64_t>(fetched.size()),
                 "clustered layout: {} fetched blocks exceed fetch_capacity {}", fetched.size(), fetch_capacity);
  for (std::size_t i = 0; i < fetched.size(); ++i) {
    const std::int64_t b = fetched[i];
    RINGCAST_CHECK(b >= 0 && b < num_blocks() && !is_local_block(b) && b != halo_before && b != halo_after,
                   "clustered layout: fetched block {} is not a remote block", b);
    RINGCAST_CHECK(std::find(fetched.begin(), fetched.begin() + static_cast<std::ptrdiff_t>(i), b) ==
                       fetched.begin() + static_cast<std::ptrdiff_t>(i),
                   "clustered layout: block {} is fetched twice", b);
  }
}

bool ClusteredLayout::is_local_block(std::int64_t block) const {
  return block >= first_block() && block < first_block() + local_blocks();
}

std::int64_t ClusteredLayout::block_pool_page(std::int64_t block) const {
  if (is_local_block(block)) return (block - first_block()) * coarse_pages;
  if (block >= 0 && block == halo_before) return halo_first_page();
  if (block >= 0 && block == halo_after) return halo_first_page() + (halo_before >= 0 ? coarse_pages : 0);
  const auto it = std::find(fetched.begin(), fetched.end(), block);
  return it == fetched.end() ? -1 : fetched_first_page() + (it - fetched.begin()) * coarse_pages;
}

std::int64_t ClusteredLayout::page_pool_page(std::int64_t page) const {
  const std::int64_t first = block_pool_page(page / coarse_pages);
  return first < 0 ? -1 : first + page % coarse_pages;
}

std::int64_t ClusteredLayout::pool_page_global(std::int64_t pool_page) const {
  if (pool_page < 0 || pool_page >= resident_pages()) return -1;
  const std::int64_t offset = pool_page % coarse_pages;
  if (pool_page < local_pages()) return first_block() * coarse_pages + pool_page;
  std::int64_t slot = (pool_page - halo_first_page()) / coarse_pages;  // block slot after the local ones
  for (const std::int64_t halo : {halo_before, halo_after}) {
    if (halo < 0) continue;
    if (slot == 0) return halo * coarse_pages + offset;
    --slot;
  }
  return slot < static_cast<std::int64_t>(fetched.size()) ? fetched[slot] * coarse_pages + offset : -1;
}

TileGeometry tile_geometry(const ClusteredLayout& layout, const SelectionOptions& options, std::int64_t tile) {
  TileGeometry g;
  g.causal = options.causal;
  g.t0 = layout.first_pos + tile * kQueryTile;
  g.t1 = std::min(g.t0 + kQueryTile, layout.first_pos + layout.n_loc);
  const std::int64_t before = options.causal ? options.window : options.window / 2;
  const std::int64_t after = options.causal ? 0 : options.window / 2;
  g.window_lo = std::max<std::int64_t>(0, g.t0 - before);
  g.window_hi = std::min(layout.n, g.t1 + after);
  g.eligible_end = g.t0 - before;
  return g;
}

void fill_summary_key_bias(const ClusteredLayout& layout, std::span<const std::int32_t> page_counts,
                           std::span<const std::int32_t> block_counts, std::span<float> key_bias) {
  const std::int64_t ps = layout.page_size;
  RINGCAST_CHECK(static_cast<std::int64_t>(page_counts.size()) == layout.resident_pages() &&
                     static_cast<std::int64_t>(block_counts.size()) == layout.num_blocks() &&
                     static_cast<std::int64_t>(key_bias.size()) == layout.num_pages() * ps,
                 "fill_summary_key_bias: expected {} page counts, {} block counts and {} biases; got {}, {}, {}",
                 layout.resident_pages(), layout.num_blocks(), layout.num_pages() * ps, page_counts.size(),
                 block_counts.size(), key_bias.size());
  const auto log_count = [](std::int32_t c) { return c > 0 ? std::log(static_cast<float>(c)) : 0.f; };
  std::fill(key_bias.begin(), key_bias.end(), 0.f);
  float* page_keys = key_bias.data() + layout.page_summary_first_page() * ps;
  std::transform(page_counts.begin(), page_counts.end(), page_keys, log_count);
  float* block_keys = key_bias.data() + layout.coarse_summary_first_page() * ps;
  std::transform(block_counts.begin(), block_counts.end(), block_keys, log_count);
}

}  // namespace ringcast::kernels
