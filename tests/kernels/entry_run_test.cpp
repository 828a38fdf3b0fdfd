// The CPU kernel's runs of entries (kernels/cpu/tile_math.hpp, entry_run): which consecutive entries
// of a unit are computed as one product. A run continues only over consecutive whole pages with the
// same rows, flags and bias, no KeyMeta and no key mask, with contiguous positions where the causal
// mask applies, up to kRunKeys keys; a partial page ends it. That the merged products give the same
// attention is checked against the float64 oracle by attention_cpu_test.cpp (dense and windowed
// tables form runs); here, the boundaries.
#include "cpu/tile_math.hpp"

#include <gtest/gtest.h>

#include <utility>
#include <vector>

namespace ringcast::kernels::cpu {
namespace {

constexpr int kPage = 64;

BlockEntry page(std::int32_t id, std::int32_t pos0, std::uint32_t flags = 0) {
  BlockEntry e{};
  e.row_mask[0] = e.row_mask[1] = ~std::uint64_t{0};
  e.page = id;
  e.key_pos0 = pos0;
  e.key_meta = -1;
  e.key_count = kPage;
  e.flags = flags;
  return e;
}

// The run lengths (entries) and run keys that walking `entries` from the start produces.
std::vector<std::pair<std::int64_t, int>> runs(const std::vector<BlockEntry>& entries) {
  std::vector<std::pair<std::int64_t, int>> out;
  const auto end = static_cast<std::int64_t>(entries.size());
  for (std::int64_t i = 0; i < end;) {
    const EntryRun r = entry_run(entries.data(), i, end, kPage);
    EXPECT_EQ(r.entry.page, entries[i].page) << "a run starts at its first entry's page";
    out.emplace_back(r.count, r.entry.key_count);
    i += r.count;
  }
  return out;
}

using Runs = std::vector<std::pair<std::int64_t, int>>;

TEST(EntryRun, ConsecutiveWholePagesMergeUpToTheKeyCap) {
  std::vector<BlockEntry> e;
  for (int p = 0; p < 10; ++p) e.push_back(page(p, p * kPage));
  constexpr int kMaxPages = kRunKeys / kPage;
  EXPECT_EQ(runs(e), (Runs{{kMaxPages, kRunKeys}, {10 - kMaxPages, (10 - kMaxPages) * kPage}}));
}

TEST(EntryRun, APartialPageEndsTheRun) {
  std::vector<BlockEntry> e{page(0, 0), page(1, 64), page(2, 128), page(3, 192)};
  e[1].key_count = 10;  // joins the run (the page before is whole), then nothing may follow it
  EXPECT_EQ(runs(e), (Runs{{2, kPage + 10}, {2, 2 * kPage}}));
}

TEST(EntryRun, AGapInPageIdsRowsFlagsOrBiasBreaksTheRun) {
  std::vector<BlockEntry> gap{page(0, 0), page(2, 128)};
  EXPECT_EQ(runs(gap), (Runs{{1, kPage}, {1, kPage}}));
  std::vector<BlockEntry> rows{page(0, 0), page(1, 64)};
  rows[1].row_mask[1] = 1;
  EXPECT_EQ(runs(rows), (Runs{{1, kPage}, {1, kPage}}));
  std::vector<BlockEntry> flags{page(0, 0), page(1, 64, kEntryCausal)};
  EXPECT_EQ(runs(flags), (Runs{{1, kPage}, {1, kPage}}));
  std::vector<BlockEntry> bias{page(0, 0), page(1, 64)};
  bias[1].bias = 0.5f;
  EXPECT_EQ(runs(bias), (Runs{{1, kPage}, {1, kPage}}));
}

TEST(EntryRun, PerKeyTermsStayOnTheirOwn) {
  std::vector<BlockEntry> meta{page(0, 0), page(1, 64), page(2, 128)};
  meta[1].key_meta = 0;
  EXPECT_EQ(runs(meta), (Runs{{1, kPage}, {1, kPage}, {1, kPage}}));
  std::vector<BlockEntry> mask{page(0, 0), page(1, 64)};
  mask[0].key_mask = 0xffff;
  EXPECT_EQ(runs(mask), (Runs{{1, kPage}, {1, kPage}}));
  std::vector<BlockEntry> bias{page(0, 0, kEntryKeyBias), page(1, 64, kEntryKeyBias)};  // the pool's biases
  EXPECT_EQ(runs(bias), (Runs{{2, 2 * kPage}}));                                         // are contiguous
}

// Where the causal mask applies, the keys' positions must continue too (a zigzag shard's two chunks
// sit in consecutive pages but far apart in the sequence); without it positions do not matter.
TEST(EntryRun, CausalEntriesNeedContiguousPositions) {
  std::vector<BlockEntry> jump{page(0, 0, kEntryCausal), page(1, 4096, kEntryCausal)};
  EXPECT_EQ(runs(jump), (Runs{{1, kPage}, {1, kPage}}));
  std::vector<BlockEntry> along{page(0, 0, kEntryCausal), page(1, 64, kEntryCausal)};
  EXPECT_EQ(runs(along), (Runs{{2, 2 * kPage}}));
  std::vector<BlockEntry> whole{page(0, 0), page(1, 4096)};
  EXPECT_EQ(runs(whole), (Runs{{2, 2 * kPage}}));
}

}  // namespace
}  // namespace ringcast::kernels::cpu
