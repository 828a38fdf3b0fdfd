// The joint combine of surrogate (CAST) clusters, per rank, batch element and KV head (DESIGN.md §4.1
// with clusters = surrogate, docs/clustered-design.md "Surrogate clusters"): the query rows in cluster
// order, the rank-level top-R of remote coarse blocks, the per-unit top-k of clusters, the block
// table, and that table read back in global terms. Cluster pages live in a kernels::ClusteredLayout
// over cluster slots: rank q's cluster cl is global page q * c + cl and lies in global block
// (q * c + cl) / coarse_pages; there is no halo. Clusters hold count <= page_size members in slots
// [0, count); a count of 0 (an empty cluster) takes part nowhere. Ties in every top-k break toward
// the lower global id. Host code over host copies of the cluster metadata, summaries and selection
// queries (attention_cast_joint.cpp downloads them on CUDA); activations never pass through here.
#pragma once

#include <ringcast/attention.hpp>
#include <ringcast/kernels/block_table.hpp>
#include <ringcast/kernels/selection.hpp>

#include <cstdint>
#include <span>
#include <vector>

namespace ringcast {

// The query rows of one (element, KV head): a permutation of the rank's tokens that puts the
// members of a cluster next to each other, so that a query tile meets few clusters.
struct SurrogateRows {
  std::vector<std::int32_t> order;           // row -> local token: by first cluster (ascending), then token
  std::vector<std::int64_t> own_offsets{0};  // CSR over rows: the clusters (local pool pages) the row's token
  std::vector<std::int32_t> own;             // is a member of, ascending; none for a token in no cluster
};

// members [c, page_size] (local token ids, -1 padding) and counts [c] of one (element, KV head).
SurrogateRows surrogate_rows(std::span<const std::int32_t> members, std::span<const std::int32_t> counts,
                             std::int64_t n_loc, int page_size);

// What selection reads for one (element, KV head), in host memory. Units are over the rows in
// SurrogateRows order.
struct SurrogateSelectionParams {
  const kernels::ClusteredLayout* layout = nullptr;
  kernels::SelectionOptions options;  // unit, score, top_k, coarse_k, remote_blocks
  int head_dim = 0;
  // Selection queries (kernels::unit_queries over the rows): [tiles, d] the mean query of each tile,
  // [units, d] the unit's (the tile queries in tile mode, the rows' own in row mode).
  const float* tile_queries = nullptr;
  const float* unit_queries = nullptr;
  const SurrogateRows* rows = nullptr;
  std::span<const std::int32_t> page_counts;   // [resident_pages] members per resident cluster
  std::span<const std::int32_t> block_counts;  // [num_blocks] members per block, the whole sequence
  kernels::SummaryRows coarse;                 // [num_blocks, d]
  kernels::SummaryRows pages;                  // [resident_pages, d] (select_surrogate_clusters only)
};

// Step 4, bidirectional: a remote block's score is its best over the rank's tiles (tile query: the
// mean of the tile's rows); the best remote_blocks non-empty remote blocks, best first.
std::vector<std::int64_t> select_remote_surrogate_blocks(const SurrogateSelectionParams& p);

// Step 5 per unit (tile of rows, or row). Window clusters of a unit: those of its rows; blocks that
// hold one are not coarse candidates, their other clusters are scored directly. Candidates exclude the
// clusters every row of the unit belongs to (a row unit: its own). The best coarse_k coarse candidates
// (local and fetched blocks), then the best top_k of their clusters and the direct candidates.
struct SurrogateSelection {
  std::vector<std::int64_t> offsets{0};  // CSR over units
  std::vector<std::int32_t> pages;       // pool pages, ascending global id
};
SurrogateSelection select_surrogate_clusters(const SurrogateSelectionParams& p);

// One KV head of an element as the table builder reads it.
struct SurrogateHead {
  const kernels::ClusteredLayout* layout = nullptr;
  const SurrogateRows* rows = nullptr;
  const SurrogateSelection* selection = nullptr;
  std::span<const std::int32_t> page_counts;
  std::span<const std::int32_t> block_counts;
};

// Step 6 for one element, units tile * kv_heads + g over the rows: per tile, window entries (a row's
// own clusters), selected clusters (for the rows they are not the window of), page summaries of the
// other clusters of every block in which a row sees a cluster exactly, and the coarse summaries of the
// other blocks (kEntryKeyBias; KeyMeta where the tile's rows see different keys), so that every
// non-empty cluster counts once for every row, at one resolution.
kernels::HostBlockTable build_surrogate_table(std::span<const SurrogateHead> heads, kernels::SelectUnit unit);

// The table of element `batch` read back per row in global terms and regrouped by the tiles of the
// rank's token order (rows of tile t: local tokens [128 t, 128 t + 128)): own clusters are kWindow,
// other exact clusters kSelected; global ids are those of the layouts. positions: the rank's.
void append_surrogate_entries(std::vector<AttendedEntry>& out, int batch, std::span<const SurrogateHead> heads,
                              const kernels::HostBlockTable& table, std::span<const std::int32_t> positions);

}  // namespace ringcast
