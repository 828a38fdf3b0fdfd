// The joint combine's rows, selection and block table over cluster pages (attention_cast.hpp). Scores
// are those of kernels::select_pages (Quest's bound q+.k_max + q-.k_min, or q.k_mean) with the unit's
// query summed over the group's heads (kernels::unit_queries); everything is per (element, KV head),
// host memory and deterministic.
#include "attention_cast.hpp"

#include <ringcast/error.hpp>

#include <algorithm>
#include <array>
#include <limits>
#include <map>
#include <tuple>

namespace ringcast {
namespace {

using RowMask = std::array<std::uint64_t, 2>;
using kernels::kQueryTile;

void add_row(RowMask& m, std::int64_t r) { m[r >> 6] |= std::uint64_t{1} << (r & 63); }
bool has_row(const RowMask& m, std::int64_t r) { return (m[r >> 6] >> (r & 63)) & 1u; }
bool none(const RowMask& m) { return (m[0] | m[1]) == 0; }
RowMask minus(const RowMask& a, const RowMask& b) { return {a[0] & ~b[0], a[1] & ~b[1]}; }
RowMask operator|(const RowMask& a, const RowMask& b) { return {a[0] | b[0], a[1] | b[1]}; }

struct Scored {
  float score;
  std::int64_t id;
};
// Higher score first; ties toward the lower global id.
bool better(const Scored& a, const Scored& b) { return a.score > b.score || (a.score == b.score && a.id < b.id); }

// The best k of `items`, best first.
void keep_best(std::vector<Scored>& items, int k) {
  const auto keep = std::min<std::size_t>(items.size(), static_cast<std::size_t>(std::max(k, 0)));
  std::partial_sort(items.begin(), items.begin() + static_cast<std::ptrdiff_t>(keep), items.end(), better);
  items.resize(keep);
}

float score(kernels::SelectScore kind, const float* q, const kernels::SummaryRows& rows, std::int64_t i, int d) {
  float s = 0.f;
  if (kind == kernels::SelectScore::kMean) {
    const float* m = rows.mean + i * d;
    for (int c = 0; c < d; ++c) s += q[c] * m[c];
  } else {  // sum_c max(q_c k_max_c, q_c k_min_c) = q+.k_max + q-.k_min, since k_min <= k_max
    const float* mx = rows.max + i * d;
    const float* mn = rows.min + i * d;
    for (int c = 0; c < d; ++c) s += std::max(q[c] * mx[c], q[c] * mn[c]);
  }
  return s;
}

std::int64_t num_rows(const SurrogateRows& rows) { return static_cast<std::int64_t>(rows.order.size()); }
std::int64_t num_tiles(const SurrogateRows& rows) { return (num_rows(rows) + kQueryTile - 1) / kQueryTile; }
std::span<const std::int32_t> own_of(const SurrogateRows& rows, std::int64_t r) {
  return {rows.own.data() + rows.own_offsets[r], rows.own.data() + rows.own_offsets[r + 1]};
}

// The clusters of a unit's rows: all of them (window) and those every row owns (never candidates).
struct UnitWindow {
  std::vector<std::int32_t> any, every;  // pool pages, ascending
};
UnitWindow unit_window(const SurrogateRows& rows, std::int64_t r0, std::int64_t r1) {
  UnitWindow w;
  for (std::int64_t r = r0; r < r1; ++r) {
    const auto own = own_of(rows, r);
    std::vector<std::int32_t> merged, common;
    std::set_union(w.any.begin(), w.any.end(), own.begin(), own.end(), std::back_inserter(merged));
    w.any = std::move(merged);
    if (r == r0) {
      w.every.assign(own.begin(), own.end());
    } else {
      std::set_intersection(w.every.begin(), w.every.end(), own.begin(), own.end(), std::back_inserter(common));
      w.every = std::move(common);
    }
  }
  return w;
}

kernels::BlockEntry exact_entry(std::int64_t page, const RowMask& rows, int count) {
  kernels::BlockEntry e{};
  e.row_mask[0] = rows[0];
  e.row_mask[1] = rows[1];
  e.page = static_cast<std::int32_t>(page);
  e.key_meta = -1;
  e.key_count = count;  // members fill slots [0, count); padding slots are not keys
  return e;
}

void append_tile(kernels::HostBlockTable& t, const SurrogateHead& head, kernels::SelectUnit unit, std::int64_t tile) {
  const kernels::ClusteredLayout& L = *head.layout;
  const SurrogateRows& rows = *head.rows;
  const SurrogateSelection& sel = *head.selection;
  const int ps = L.page_size;
  const std::int64_t r0 = tile * kQueryTile, n = std::min<std::int64_t>(kQueryTile, num_rows(rows) - r0);
  const std::array<std::uint64_t, 2> full = kernels::full_row_mask(static_cast<int>(n));

  // Exact clusters by global id: pool page, the rows that own it (window), the rows that selected it.
  std::map<std::int64_t, std::tuple<std::int64_t, RowMask, RowMask>> exact;
  for (std::int64_t r = 0; r < n; ++r)
    for (const std::int32_t page : own_of(rows, r0 + r)) {
      auto& [pool, window, chosen] = exact[L.pool_page_global(page)];
      pool = page;
      add_row(window, r);
    }
  const bool row_units = unit == kernels::SelectUnit::kRow;
  for (std::int64_t r = 0; r < (row_units ? n : 1); ++r) {
    const std::int64_t u = row_units ? r0 + r : tile;
    for (std::int64_t i = sel.offsets[u]; i < sel.offsets[u + 1]; ++i) {
      auto& [pool, window, chosen] = exact[L.pool_page_global(sel.pages[i])];
      pool = sel.pages[i];
      if (row_units) {
        add_row(chosen, r);
      } else {
        chosen = full;
      }
    }
  }
  std::map<std::int64_t, RowMask> touched;  // block -> rows that see one of its clusters exactly
  for (const auto& [global, x] : exact) {
    const auto& [pool, window, chosen] = x;
    if (!none(window)) t.entries.push_back(exact_entry(pool, window, head.page_counts[pool]));
    touched[global / L.coarse_pages] = touched[global / L.coarse_pages] | window;
  }
  for (auto& [global, x] : exact) {
    auto& [pool, window, chosen] = x;
    chosen = minus(chosen, window);  // a tile's choice reaches the rows it is not the window of
    if (!none(chosen)) t.entries.push_back(exact_entry(pool, chosen, head.page_counts[pool]));
    touched[global / L.coarse_pages] = touched[global / L.coarse_pages] | chosen;
  }

  // Page summaries: the other non-empty clusters of a touched block, for the rows that touch it.
  std::map<std::int64_t, std::vector<RowMask>> summary_keys;
  for (const auto& [block, block_rows] : touched) {
    const std::int64_t first = L.block_pool_page(block);
    RINGCAST_CHECK(first >= 0, "surrogate table: block {} is seen exactly but is not resident", block);
    for (std::int64_t pool = first; pool < first + L.coarse_pages; ++pool) {
      if (head.page_counts[pool] == 0) continue;
      const auto it = exact.find(L.pool_page_global(pool));
      const RowMask seen = it == exact.end()
                               ? block_rows
                               : minus(block_rows, std::get<1>(it->second) | std::get<2>(it->second));
      if (none(seen)) continue;
      auto& keys = summary_keys[L.page_summary_first_page() + pool / ps];
      keys.resize(static_cast<std::size_t>(ps), RowMask{0, 0});
      keys[static_cast<std::size_t>(pool % ps)] = seen;
    }
  }
  for (const auto& [page, keys] : summary_keys) kernels::append_summary_entry(t, page, keys, ps);

  // Coarse summaries: every non-empty block, for the rows that see none of its clusters exactly.
  std::vector<RowMask> keys(static_cast<std::size_t>(ps));
  for (std::int64_t first = 0; first < L.num_blocks(); first += ps) {
    std::fill(keys.begin(), keys.end(), RowMask{0, 0});
    for (std::int64_t block = first; block < std::min(first + ps, L.num_blocks()); ++block) {
      if (head.block_counts[block] == 0) continue;
      const auto it = touched.find(block);
      keys[static_cast<std::size_t>(block - first)] = it == touched.end() ? full : minus(full, it->second);
    }
    kernels::append_summary_entry(t, L.coarse_summary_first_page() + first / ps, keys, ps);
  }
}

}  // namespace

SurrogateRows surrogate_rows(std::span<const std::int32_t> members, std::span<const std::int32_t> counts,
                             std::int64_t n_loc, int page_size) {
  const auto c = static_cast<std::int64_t>(counts.size());
  // Each token's clusters, ascending (clusters are visited in order).
  std::vector<std::int64_t> offsets(static_cast<std::size_t>(n_loc) + 1, 0);
  for (std::int64_t cl = 0; cl < c; ++cl)
    for (std::int32_t s = 0; s < counts[cl]; ++s) ++offsets[members[cl * page_size + s] + 1];
  for (std::int64_t j = 0; j < n_loc; ++j) offsets[j + 1] += offsets[j];
  std::vector<std::int32_t> clusters(static_cast<std::size_t>(offsets.back()));
  std::vector<std::int64_t> next(offsets.begin(), offsets.end() - 1);
  for (std::int64_t cl = 0; cl < c; ++cl)
    for (std::int32_t s = 0; s < counts[cl]; ++s) clusters[next[members[cl * page_size + s]]++] = static_cast<std::int32_t>(cl);

  SurrogateRows rows;
  rows.order.reserve(static_cast<std::size_t>(n_loc));
  for (std::int64_t cl = 0; cl < c; ++cl)
    for (std::int32_t s = 0; s < counts[cl]; ++s) {
      const std::int32_t j = members[cl * page_size + s];
      if (clusters[offsets[j]] == cl) rows.order.push_back(j);  // members ascend: tokens in order
    }
  for (std::int64_t j = 0; j < n_loc; ++j)
    if (offsets[j] == offsets[j + 1]) rows.order.push_back(static_cast<std::int32_t>(j));
  for (const std::int32_t j : rows.order) {
    rows.own.insert(rows.own.end(), clusters.begin() + offsets[j], clusters.begin() + offsets[j + 1]);
    rows.own_offsets.push_back(static_cast<std::int64_t>(rows.own.size()));
  }
  return rows;
}

std::vector<std::int64_t> select_remote_surrogate_blocks(const SurrogateSelectionParams& p) {
  const kernels::ClusteredLayout& L = *p.layout;
  const int d = p.head_dim;
  std::vector<Scored> remote;
  for (std::int64_t b = 0; b < L.num_blocks(); ++b)
    if (!L.is_local_block(b) && p.block_counts[b] > 0) remote.push_back({-std::numeric_limits<float>::infinity(), b});
  for (std::int64_t t = 0; t < num_tiles(*p.rows); ++t) {
    const float* q = p.tile_queries + t * d;
    for (Scored& s : remote) s.score = std::max(s.score, score(p.options.score, q, p.coarse, s.id, d));
  }
  keep_best(remote, p.options.remote_blocks);
  std::vector<std::int64_t> fetch;
  for (const Scored& s : remote) fetch.push_back(s.id);
  return fetch;
}

SurrogateSelection select_surrogate_clusters(const SurrogateSelectionParams& p) {
  const kernels::ClusteredLayout& L = *p.layout;
  const int d = p.head_dim;
  const bool row_units = p.options.unit == kernels::SelectUnit::kRow;
  const std::int64_t rows = num_rows(*p.rows), units = row_units ? rows : num_tiles(*p.rows);
  std::vector<std::int64_t> usable;  // local and fetched blocks that hold members
  for (std::int64_t b = L.first_block(); b < L.first_block() + L.local_blocks(); ++b) usable.push_back(b);
  usable.insert(usable.end(), L.fetched.begin(), L.fetched.end());
  std::erase_if(usable, [&](std::int64_t b) { return p.block_counts[b] == 0; });

  SurrogateSelection out;
  std::vector<Scored> coarse, fine;
  for (std::int64_t u = 0; u < units; ++u) {
    const std::int64_t r0 = row_units ? u : u * kQueryTile, r1 = row_units ? u + 1 : std::min(rows, r0 + kQueryTile);
    const UnitWindow w = unit_window(*p.rows, r0, r1);
    std::vector<std::int64_t> window_blocks;  // own clusters are local
    for (const std::int32_t page : w.any) window_blocks.push_back(L.pool_page_global(page) / L.coarse_pages);
    window_blocks.erase(std::unique(window_blocks.begin(), window_blocks.end()), window_blocks.end());
    const auto in_window = [&](std::int64_t b) {
      return std::binary_search(window_blocks.begin(), window_blocks.end(), b);
    };
    const float* q = p.unit_queries + u * d;
    coarse.clear();
    for (const std::int64_t b : usable)
      if (!in_window(b)) coarse.push_back({score(p.options.score, q, p.coarse, b, d), b});
    keep_best(coarse, p.options.coarse_k);
    std::vector<std::int64_t> blocks = window_blocks;
    for (const Scored& s : coarse) blocks.push_back(s.id);
    fine.clear();
    for (const std::int64_t b : blocks) {
      const std::int64_t first = L.block_pool_page(b);
      for (std::int64_t page = first; page < first + L.coarse_pages; ++page) {
        if (p.page_counts[page] == 0 || std::binary_search(w.every.begin(), w.every.end(), page)) continue;
        fine.push_back({score(p.options.score, q, p.pages, page, d), L.pool_page_global(page)});
      }
    }
    keep_best(fine, p.options.top_k);
    std::sort(fine.begin(), fine.end(), [](const Scored& a, const Scored& b) { return a.id < b.id; });
    for (const Scored& s : fine) out.pages.push_back(static_cast<std::int32_t>(L.page_pool_page(s.id)));
    out.offsets.push_back(static_cast<std::int64_t>(out.pages.size()));
  }
  return out;
}

kernels::HostBlockTable build_surrogate_table(std::span<const SurrogateHead> heads, kernels::SelectUnit unit) {
  RINGCAST_CHECK(!heads.empty(), "surrogate table: no KV head");
  const kernels::ClusteredLayout& first = *heads.front().layout;
  for (const SurrogateHead& h : heads)
    RINGCAST_CHECK(h.layout->num_pages() == first.num_pages() && h.rows->order.size() == heads.front().rows->order.size(),
                   "surrogate table: the KV heads of an element must share one pool shape and one row count");
  kernels::HostBlockTable t;
  t.rows_vary = unit == kernels::SelectUnit::kRow;
  for (std::int64_t tile = 0; tile < num_tiles(*heads.front().rows); ++tile)
    for (const SurrogateHead& h : heads) {
      append_tile(t, h, unit, tile);
      t.offsets.push_back(static_cast<std::int64_t>(t.entries.size()));
    }
  return t;
}

void append_surrogate_entries(std::vector<AttendedEntry>& out, int batch, std::span<const SurrogateHead> heads,
                              const kernels::HostBlockTable& table, std::span<const std::int32_t> positions) {
  const auto kv_heads = static_cast<std::int64_t>(heads.size());
  const std::int64_t tiles = num_tiles(*heads.front().rows);
  // (token tile, KV head, kind, global id) -> rows of that tile, in the order the records come out.
  std::map<std::tuple<std::int64_t, std::int64_t, int, std::int64_t>, RowMask> records;
  const auto add = [&](std::int64_t g, AttendedKind kind, std::int64_t id, std::int32_t token) {
    add_row(records[{token / kQueryTile, g, static_cast<int>(kind), id}], token % kQueryTile);
  };
  for (std::int64_t tile = 0; tile < tiles; ++tile)
    for (std::int64_t g = 0; g < kv_heads; ++g) {
      const SurrogateHead& h = heads[static_cast<std::size_t>(g)];
      const kernels::ClusteredLayout& L = *h.layout;
      const std::int64_t unit = tile * kv_heads + g, ps = L.page_size;
      for (std::int64_t i = table.offsets[unit]; i < table.offsets[unit + 1]; ++i) {
        const kernels::BlockEntry& e = table.entries[static_cast<std::size_t>(i)];
        for (int r = 0; r < kQueryTile; ++r) {
          const std::int64_t row = tile * kQueryTile + r;
          if (!has_row({e.row_mask[0], e.row_mask[1]}, r)) continue;
          const std::int32_t token = h.rows->order[static_cast<std::size_t>(row)];
          if (e.page < L.resident_pages()) {
            const auto own = own_of(*h.rows, row);
            const bool window = std::binary_search(own.begin(), own.end(), e.page);
            add(g, window ? AttendedKind::kWindow : AttendedKind::kSelected, L.pool_page_global(e.page), token);
            continue;
          }
          const bool coarse = e.page >= L.coarse_summary_first_page();
          const std::int64_t first_key =
              (e.page - (coarse ? L.coarse_summary_first_page() : L.page_summary_first_page())) * ps;
          for (int j = 0; j < ps; ++j) {
            if (!((e.key_mask >> j) & 1u)) continue;
            if (e.key_meta >= 0) {
              const kernels::KeyMeta& m = table.key_meta[static_cast<std::size_t>(e.key_meta + j)];
              if (!has_row({m.row_mask[0], m.row_mask[1]}, r)) continue;
            }
            if (coarse) {
              add(g, AttendedKind::kCoarseSummary, first_key + j, token);
            } else {
              add(g, AttendedKind::kPageSummary, L.pool_page_global(first_key + j), token);
            }
          }
        }
      }
    }
  for (const auto& [key, rows] : records) {
    const auto& [tile, g, kind, id] = key;
    AttendedEntry a;
    a.batch = batch;
    a.tile = tile;
    a.first_row_pos = positions[static_cast<std::size_t>(tile * kQueryTile)];
    a.kv_head = static_cast<int>(g);
    a.kind = static_cast<AttendedKind>(kind);
    a.global_id = id;
    a.row_mask[0] = rows[0];
    a.row_mask[1] = rows[1];
    out.push_back(a);
  }
}

}  // namespace ringcast
