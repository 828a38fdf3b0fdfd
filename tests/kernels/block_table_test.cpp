// Host block tables: row masks, the transpose (every entry exactly once, under its page, in entry
// order), and the dense / sliding-window builders (which pages each tile gets, which entries carry
// the causal flag, which rows each entry's mask holds), checked against brute-force definitions.
#include "attention_reference.hpp"

#include <ringcast/error.hpp>
#include <ringcast/kernels/block_table.hpp>

#include <gtest/gtest.h>

#include <algorithm>
#include <numeric>
#include <set>
#include <vector>

namespace ringcast::kernels {
namespace {

AttentionShape make_shape(int batch, std::int64_t seq_q, int kv_heads, int page_size, std::int64_t num_pages) {
  AttentionShape s;
  s.batch = batch;
  s.seq_q = seq_q;
  s.heads = 2 * kv_heads;
  s.kv_heads = kv_heads;
  s.head_dim = 64;
  s.page_size = page_size;
  s.num_pages = num_pages;
  return s;
}

std::vector<std::int32_t> positions(std::int64_t n, std::int32_t first = 0) {
  std::vector<std::int32_t> p(static_cast<std::size_t>(n));
  std::iota(p.begin(), p.end(), first);
  return p;
}

bool has_row(const BlockEntry& e, int r) { return (e.row_mask[r / 64] >> (r % 64)) & 1u; }

TEST(BlockTable, FullRowMaskAndTileRows) {
  using Mask = std::array<std::uint64_t, 2>;
  EXPECT_EQ(full_row_mask(0), (Mask{0, 0}));
  EXPECT_EQ(full_row_mask(1), (Mask{1, 0}));
  EXPECT_EQ(full_row_mask(64), (Mask{~0ull, 0}));
  EXPECT_EQ(full_row_mask(100), (Mask{~0ull, (1ull << 36) - 1}));
  EXPECT_EQ(full_row_mask(128), (Mask{~0ull, ~0ull}));
  EXPECT_THROW(full_row_mask(129), Error);
  const AttentionShape s = make_shape(1, 300, 1, 64, 1);
  EXPECT_EQ(s.num_tiles(), 3);
  EXPECT_EQ(tile_rows(s, 0), 128);
  EXPECT_EQ(tile_rows(s, 2), 44);
}

TEST(BlockTable, TransposeListsEveryEntryOnceUnderItsPage) {
  const AttentionShape s = make_shape(2, 300, 3, 64, 5);
  test::RandomTableOptions opt;
  opt.max_entries = 6;  // pages with replacement: repeated pages within a unit
  const HostBlockTable t = test::random_block_table(s, positions(s.seq_q), opt, 3);
  const HostTransposedTable tt = transpose(t, s);

  ASSERT_EQ(tt.offsets.size(), static_cast<std::size_t>(s.kv_heads * s.num_pages + 1));
  ASSERT_EQ(tt.refs.size(), t.entries.size());
  std::vector<int> seen(t.entries.size(), 0);
  for (std::int64_t slot = 0; slot < s.kv_heads * s.num_pages; ++slot) {
    for (std::int64_t i = tt.offsets[slot]; i < tt.offsets[slot + 1]; ++i) {
      const PageRef& ref = tt.refs[i];
      ASSERT_GE(ref.unit, 0);
      ASSERT_LT(ref.unit, s.num_units());
      EXPECT_EQ(ref.unit % s.kv_heads, slot / s.num_pages);
      EXPECT_EQ(t.entries[ref.entry].page, slot % s.num_pages);
      EXPECT_GE(ref.entry, t.offsets[ref.unit]);
      EXPECT_LT(ref.entry, t.offsets[ref.unit + 1]);
      if (i > tt.offsets[slot]) {
        EXPECT_LT(tt.refs[i - 1].entry, ref.entry) << "refs not in entry order";
      }
      ++seen[ref.entry];
    }
  }
  EXPECT_TRUE(std::all_of(seen.begin(), seen.end(), [](int n) { return n == 1; }));

  const HostTransposedTable again = transpose(t, s);
  EXPECT_EQ(again.offsets, tt.offsets);
  const TransposedTable view = tt.view();
  EXPECT_EQ(view.num_refs, static_cast<std::int64_t>(tt.refs.size()));
}

TEST(BlockTable, TransposeRejectsTablesThatDoNotFit) {
  const AttentionShape s = make_shape(1, 100, 1, 64, 2);
  HostBlockTable t = dense_table(s, std::vector<KeyRange>{{0, 128, 0}}, positions(100), false);
  t.entries[1].page = 2;
  EXPECT_THROW(transpose(t, s), Error);
  t.offsets.push_back(2);
  EXPECT_THROW(transpose(t, s), Error);
}

// Brute force of the builders' contract (block_table.hpp), unit by unit.
void expect_builder_contract(const AttentionShape& s, const HostBlockTable& t, const std::vector<KeyRange>& keys,
                             const std::vector<std::int32_t>& q_pos, bool causal, std::int64_t before,
                             std::int64_t after) {
  ASSERT_EQ(t.offsets.size(), static_cast<std::size_t>(s.num_units() + 1));
  EXPECT_TRUE(t.key_meta.empty());
  for (std::int64_t u = 0; u < s.num_units(); ++u) {
    const std::int64_t tile = (u / s.kv_heads) % s.num_tiles();
    const int rows = tile_rows(s, tile);
    const auto* pos = q_pos.data() + tile * kQueryTile;
    const std::int64_t t0 = *std::min_element(pos, pos + rows);
    const std::int64_t t1 = *std::max_element(pos, pos + rows) + 1;
    std::vector<BlockEntry> expected;
    for (const KeyRange& range : keys) {
      for (std::int64_t first = 0; first < range.count; first += s.page_size) {
        const int kc = static_cast<int>(std::min<std::int64_t>(s.page_size, range.count - first));
        const std::int64_t k0 = range.pos0 + first, k1 = k0 + kc - 1;
        if (k1 < t0 - before || k0 >= t1 + after) continue;
        BlockEntry e{};
        bool cut = false;
        for (int r = 0; r < rows; ++r) {
          if (causal && pos[r] < k0) continue;
          e.row_mask[r / 64] |= 1ull << (r % 64);
          cut = cut || (causal && pos[r] < k1);
        }
        if (!e.row_mask[0] && !e.row_mask[1]) continue;
        e.page = static_cast<std::int32_t>(range.first_page + first / s.page_size);
        e.key_pos0 = static_cast<std::int32_t>(k0);
        e.key_count = kc;
        e.flags = cut ? kEntryCausal : 0u;
        expected.push_back(e);
      }
    }
    ASSERT_EQ(t.offsets[u + 1] - t.offsets[u], static_cast<std::int64_t>(expected.size())) << "unit " << u;
    for (std::size_t i = 0; i < expected.size(); ++i) {
      const BlockEntry& got = t.entries[t.offsets[u] + i];
      const BlockEntry& want = expected[i];
      EXPECT_EQ(got.page, want.page) << "unit " << u << " entry " << i;
      EXPECT_EQ(got.key_pos0, want.key_pos0);
      EXPECT_EQ(got.key_count, want.key_count);
      EXPECT_EQ(got.flags, want.flags) << "unit " << u << " page " << got.page;
      EXPECT_EQ(got.row_mask[0], want.row_mask[0]);
      EXPECT_EQ(got.row_mask[1], want.row_mask[1]);
      EXPECT_EQ(got.key_meta, -1);
      EXPECT_EQ(got.bias, 0.f);
    }
  }
}

constexpr std::int64_t kUnbounded = std::int64_t{1} << 40;

TEST(BlockTable, DenseBidirectionalSeesEveryPage) {
  const AttentionShape s = make_shape(2, 300, 2, 64, 5);
  const std::vector<KeyRange> keys{{0, 300, 0}};
  const auto q_pos = positions(s.seq_q);
  const HostBlockTable t = dense_table(s, keys, q_pos, false);
  expect_builder_contract(s, t, keys, q_pos, false, kUnbounded, kUnbounded);
  EXPECT_EQ(t.entries.size(), static_cast<std::size_t>(s.num_units() * 5));
  EXPECT_EQ(t.entries.back().key_count, 300 - 4 * 64);
  const auto last_tile = full_row_mask(tile_rows(s, 2));
  EXPECT_EQ(t.entries.back().row_mask[0], last_tile[0]);
  EXPECT_EQ(t.entries.back().row_mask[1], last_tile[1]);
}

TEST(BlockTable, DenseCausalFlagsOnlyPagesOnTheDiagonal) {
  const AttentionShape s = make_shape(1, 256, 1, 64, 4);
  const std::vector<KeyRange> keys{{0, 256, 0}};
  const auto q_pos = positions(s.seq_q);
  const HostBlockTable t = dense_table(s, keys, q_pos, true);
  expect_builder_contract(s, t, keys, q_pos, true, kUnbounded, kUnbounded);
  // Tile 0 (rows 0..127): pages 0 and 1, both on the diagonal; pages 2, 3 lie after every row.
  // Tile 1 (rows 128..255): pages 0, 1 wholly before it (no mask), pages 2, 3 on the diagonal.
  ASSERT_EQ(t.offsets, (std::vector<std::int64_t>{0, 2, 6}));
  EXPECT_EQ(t.entries[0].flags, kEntryCausal);
  EXPECT_EQ(t.entries[1].row_mask[0], 0u);  // page 1 (keys 64..127) is seen by rows 64..127 only
  EXPECT_EQ(t.entries[1].row_mask[1], ~0ull);
  EXPECT_EQ(t.entries[2].flags, 0u);
  EXPECT_EQ(t.entries[3].flags, 0u);
  EXPECT_EQ(t.entries[4].flags, kEntryCausal);
  EXPECT_EQ(t.entries[5].flags, kEntryCausal);
  EXPECT_FALSE(has_row(t.entries[5], 63));
  EXPECT_TRUE(has_row(t.entries[5], 64));
}

TEST(BlockTable, DenseCausalRingSteps) {
  const AttentionShape s = make_shape(1, 200, 1, 32, 7);
  const auto q_pos = positions(s.seq_q, 1000);
  const std::vector<KeyRange> before{{0, 200, 0}};  // keys of an earlier shard: no mask at all
  const HostBlockTable t = dense_table(s, before, q_pos, true);
  expect_builder_contract(s, t, before, q_pos, true, kUnbounded, kUnbounded);
  EXPECT_TRUE(std::all_of(t.entries.begin(), t.entries.end(), [](const BlockEntry& e) { return e.flags == 0; }));
  const std::vector<KeyRange> after{{0, 200, 5000}};  // keys of a later shard: nothing to see
  EXPECT_TRUE(dense_table(s, after, q_pos, true).entries.empty());
}

TEST(BlockTable, DenseCausalZigzagRanges) {
  const AttentionShape s = make_shape(2, 192, 2, 32, 6);
  const std::vector<KeyRange> keys{{0, 96, 0}, {3, 96, 416}};
  auto q_pos = positions(96);
  const auto second = positions(96, 416);
  q_pos.insert(q_pos.end(), second.begin(), second.end());
  expect_builder_contract(s, dense_table(s, keys, q_pos, true), keys, q_pos, true, kUnbounded, kUnbounded);
}

TEST(BlockTable, SlidingWindows) {
  const AttentionShape s = make_shape(1, 700, 2, 64, 11);
  const std::vector<KeyRange> keys{{0, 700, 0}};
  const auto q_pos = positions(s.seq_q);
  const HostBlockTable causal = sliding_window_table(s, keys, q_pos, true, 256, 0);
  expect_builder_contract(s, causal, keys, q_pos, true, 256, 0);
  // Tile 3 (positions 384..511) sees pages overlapping [128, 512): pages 2..7.
  const std::int64_t u = 3 * s.kv_heads;
  std::set<std::int32_t> pages;
  for (std::int64_t i = causal.offsets[u]; i < causal.offsets[u + 1]; ++i) pages.insert(causal.entries[i].page);
  EXPECT_EQ(pages, (std::set<std::int32_t>{2, 3, 4, 5, 6, 7}));
  expect_builder_contract(s, sliding_window_table(s, keys, q_pos, false, 128, 128), keys, q_pos, false, 128, 128);
  EXPECT_THROW(sliding_window_table(s, keys, q_pos, false, -1, 0), Error);
}

TEST(BlockTable, BuildersRejectInputsThatDoNotFit) {
  const AttentionShape s = make_shape(1, 100, 1, 64, 2);
  const auto q_pos = positions(s.seq_q);
  EXPECT_THROW(dense_table(s, std::vector<KeyRange>{{1, 100, 0}}, q_pos, false), Error);  // past the pool
  EXPECT_THROW(dense_table(s, std::vector<KeyRange>{{0, 100, 0}}, positions(99), false), Error);
}

}  // namespace
}  // namespace ringcast::kernels
