// Host-side block tables: views, the page -> entries transpose, and the dense / sliding-window
// builders (see block_table.hpp for the exact semantics). Host memory only; deterministic.
#include <ringcast/error.hpp>
#include <ringcast/kernels/block_table.hpp>

#include <algorithm>
#include <limits>
#include <optional>

namespace ringcast::kernels {
namespace {

// A tile keeps the pages overlapping [t0 - before, t1 + after); dense tables have no window.
struct PositionWindow {
  std::int64_t before = 0;
  std::int64_t after = 0;
};

void check_table_inputs(const AttentionShape& shape, std::span<const KeyRange> keys,
                        std::span<const std::int32_t> q_pos) {
  RINGCAST_CHECK(shape.seq_q > 0 && shape.batch > 0 && shape.kv_heads > 0 && shape.page_size > 0,
                 "block table: shape needs seq_q, batch, kv_heads and page_size > 0");
  RINGCAST_CHECK(static_cast<std::int64_t>(q_pos.size()) == shape.seq_q,
                 "block table: q_pos has {} positions for seq_q = {}", q_pos.size(), shape.seq_q);
  for (const KeyRange& r : keys) {
    const std::int64_t pages = (r.count + shape.page_size - 1) / shape.page_size;
    RINGCAST_CHECK(r.count > 0 && r.first_page >= 0 && r.first_page + pages <= shape.num_pages,
                   "block table: key range (first_page {}, count {}) does not fit {} pages of {} keys",
                   r.first_page, r.count, shape.num_pages, shape.page_size);
    RINGCAST_CHECK(r.pos0 + r.count - 1 <= std::numeric_limits<std::int32_t>::max(),
                   "block table: key positions of a range overflow int32");
  }
}

// The one builder behind dense_table and sliding_window_table: the entries of a tile depend only
// on the tile's rows, so they are built once per tile and copied for every batch element and head.
HostBlockTable build_table(const AttentionShape& shape, std::span<const KeyRange> keys,
                           std::span<const std::int32_t> q_pos, bool causal,
                           std::optional<PositionWindow> window) {
  check_table_inputs(shape, keys, q_pos);
  const std::int64_t num_tiles = shape.num_tiles();
  const int ps = shape.page_size;

  std::vector<std::vector<BlockEntry>> tile_entries(static_cast<std::size_t>(num_tiles));
  for (std::int64_t tile = 0; tile < num_tiles; ++tile) {
    const int rows = tile_rows(shape, tile);
    const std::int32_t* pos = q_pos.data() + tile * kQueryTile;
    const auto [lo_it, hi_it] = std::minmax_element(pos, pos + rows);
    const std::int64_t t0 = *lo_it;
    const std::int64_t t1 = std::int64_t{*hi_it} + 1;
    for (const KeyRange& range : keys) {
      for (std::int64_t first = 0; first < range.count; first += ps) {
        const int key_count = static_cast<int>(std::min<std::int64_t>(ps, range.count - first));
        const std::int64_t k0 = range.pos0 + first;       // position of the page's first key
        const std::int64_t k1 = k0 + key_count - 1;       // and of its last valid key
        if (window && (k1 < t0 - window->before || k0 >= t1 + window->after)) continue;
        BlockEntry e{};
        bool cut = false;
        for (int r = 0; r < rows; ++r) {
          if (causal && pos[r] < k0) continue;  // row sees none of the page's keys
          e.row_mask[r / 64] |= std::uint64_t{1} << (r % 64);
          cut = cut || (causal && pos[r] < k1);
        }
        if (e.row_mask[0] == 0 && e.row_mask[1] == 0) continue;
        e.page = static_cast<std::int32_t>(range.first_page + first / ps);
        e.key_pos0 = static_cast<std::int32_t>(k0);
        e.bias = 0.f;
        e.key_meta = -1;
        e.key_count = key_count;
        e.flags = cut ? kEntryCausal : 0u;
        tile_entries[static_cast<std::size_t>(tile)].push_back(e);
      }
    }
  }

  HostBlockTable table;
  table.offsets.reserve(static_cast<std::size_t>(shape.num_units()) + 1);
  for (int b = 0; b < shape.batch; ++b) {
    for (const auto& entries : tile_entries) {
      for (int kvh = 0; kvh < shape.kv_heads; ++kvh) {
        table.entries.insert(table.entries.end(), entries.begin(), entries.end());
        table.offsets.push_back(static_cast<std::int64_t>(table.entries.size()));
      }
    }
  }
  return table;
}

}  // namespace

BlockTable HostBlockTable::view() const {
  return BlockTable{offsets.data(), entries.data(), key_meta.empty() ? nullptr : key_meta.data(),
                    static_cast<std::int64_t>(entries.size()), rows_vary};
}

TransposedTable HostTransposedTable::view() const {
  return TransposedTable{offsets.data(), refs.data(), static_cast<std::int64_t>(refs.size())};
}

HostTransposedTable transpose(const HostBlockTable& table, const AttentionShape& shape) {
  const std::int64_t units = shape.num_units();
  RINGCAST_CHECK(static_cast<std::int64_t>(table.offsets.size()) == units + 1,
                 "transpose: table has {} offsets, the shape needs {} units + 1", table.offsets.size(), units);
  RINGCAST_CHECK(table.offsets.front() == 0 &&
                     table.offsets.back() == static_cast<std::int64_t>(table.entries.size()),
                 "transpose: offsets must run from 0 to the number of entries ({})", table.entries.size());
  const std::int64_t slots = shape.kv_heads * shape.num_pages;

  HostTransposedTable out;
  out.offsets.assign(static_cast<std::size_t>(slots) + 1, 0);
  for (std::int64_t u = 0; u < units; ++u) {
    RINGCAST_CHECK(table.offsets[u] <= table.offsets[u + 1], "transpose: offsets decrease at unit {}", u);
    const std::int64_t kvh = u % shape.kv_heads;
    for (std::int64_t e = table.offsets[u]; e < table.offsets[u + 1]; ++e) {
      const std::int32_t page = table.entries[e].page;
      RINGCAST_CHECK(page >= 0 && page < shape.num_pages, "transpose: entry {} names page {} of {}", e,
                     page, shape.num_pages);
      ++out.offsets[kvh * shape.num_pages + page + 1];
    }
  }
  for (std::int64_t s = 0; s < slots; ++s) out.offsets[s + 1] += out.offsets[s];

  out.refs.resize(table.entries.size());
  std::vector<std::int64_t> cursor(out.offsets.begin(), out.offsets.end() - 1);
  for (std::int64_t u = 0; u < units; ++u) {
    const std::int64_t kvh = u % shape.kv_heads;
    for (std::int64_t e = table.offsets[u]; e < table.offsets[u + 1]; ++e) {
      out.refs[cursor[kvh * shape.num_pages + table.entries[e].page]++] = PageRef{u, e};
    }
  }
  return out;
}

int tile_rows(const AttentionShape& shape, std::int64_t tile) {
  return static_cast<int>(std::min<std::int64_t>(kQueryTile, shape.seq_q - tile * kQueryTile));
}

std::array<std::uint64_t, 2> full_row_mask(int rows) {
  RINGCAST_CHECK(rows >= 0 && rows <= kQueryTile, "full_row_mask: {} rows is outside [0, {}]", rows, kQueryTile);
  const auto low_bits = [](int n) { return n >= 64 ? ~std::uint64_t{0} : (std::uint64_t{1} << n) - 1; };
  return {low_bits(std::min(rows, 64)), low_bits(std::max(rows - 64, 0))};
}

void append_summary_entry(HostBlockTable& t, std::int64_t page, std::span<const std::array<std::uint64_t, 2>> key_rows,
                          int page_size) {
  BlockEntry e{};
  e.page = static_cast<std::int32_t>(page);
  e.key_meta = -1;
  e.key_count = page_size;
  e.flags = kEntryKeyBias;
  e.key_mask = 0;
  bool uniform = true;
  for (int j = 0; j < page_size; ++j) {
    const auto& m = key_rows[static_cast<std::size_t>(j)];
    if (m[0] == 0 && m[1] == 0) continue;
    if (e.key_mask != 0) uniform = uniform && m[0] == e.row_mask[0] && m[1] == e.row_mask[1];
    e.key_mask |= std::uint64_t{1} << j;
    e.row_mask[0] |= m[0];
    e.row_mask[1] |= m[1];
  }
  if (e.key_mask == 0) return;
  if (!uniform) {
    e.key_meta = static_cast<std::int32_t>(t.key_meta.size());
    for (const auto& m : key_rows.first(static_cast<std::size_t>(page_size)))
      t.key_meta.push_back(KeyMeta{{m[0], m[1]}, 0.f, 0});
  }
  t.entries.push_back(e);
}

HostBlockTable dense_table(const AttentionShape& shape, std::span<const KeyRange> keys,
                           std::span<const std::int32_t> q_pos, bool causal) {
  return build_table(shape, keys, q_pos, causal, std::nullopt);
}

HostBlockTable sliding_window_table(const AttentionShape& shape, std::span<const KeyRange> keys,
                                    std::span<const std::int32_t> q_pos, bool causal,
                                    std::int64_t before, std::int64_t after) {
  RINGCAST_CHECK(before >= 0 && after >= 0, "sliding_window_table: before ({}) and after ({}) must be >= 0",
                 before, after);
  return build_table(shape, keys, q_pos, causal, PositionWindow{before, after});
}

}  // namespace ringcast::kernels
