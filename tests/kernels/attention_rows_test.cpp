// The CPU attention kernel on per-row selection tables: entries whose row masks hold a few scattered
// rows of the tile (the union of the rows' own page choices, as `selection = row` builds it), which
// the kernels gather into compact blocks. Sparse and denser masks, GQA 1 and 8, head dims 40 / 64 /
// 128, a partial last tile, and KeyMeta / key masks / key biases on gathered rows. Forward (O, LSE)
// and backward (dQ, dK, dV) against the float64 oracle at the tolerance of attention_cpu_test.cpp
// (1e-5, derived there).
#include "cpu_attention_harness.hpp"

#include <gtest/gtest.h>

#include <string>
#include <utility>
#include <vector>

namespace ringcast::test {
namespace {

using kernels::AttentionShape;

// A random table whose entries keep each row with probability `row_keep`: about row_keep * 128 rows
// per entry, scattered, so every full tile takes the gathered path.
void expect_sparse_rows_match(const AttentionShape& s, double row_keep, RandomTableOptions opt, std::uint64_t seed,
                              const std::string& what) {
  const auto q_pos = iota_positions(s.seq_q, 64);
  opt.min_entries = 1;
  opt.max_entries = 6;
  opt.row_mask_keep = row_keep;
  expect_matches_reference(CpuAttention(s, random_block_table(s, q_pos, opt, seed), q_pos, seed + 1), what);
}

// A table of per-row choices (rows_vary) cuts even whole-tile rows into gathered blocks of kRowBlock.
TEST(AttentionRows, RowsVaryGathersWholeTiles) {
  // GQA 8, d 128, pages of 32, causal; a partial last tile.
  const AttentionShape s{1, 300, 8, 1, 128, 32, 10};
  const std::vector<kernels::KeyRange> keys{{0, 300, 0}};
  const auto q_pos = iota_positions(s.seq_q);
  kernels::HostBlockTable t = kernels::dense_table(s, keys, q_pos, true);
  t.rows_vary = true;
  expect_matches_reference(CpuAttention(s, std::move(t), q_pos, 204), "dense causal, rows vary");
}

TEST(AttentionRows, FewRowsPerEntry) {
  // ~13 rows per entry, GQA 8.
  RandomTableOptions opt;
  opt.causal_fraction = 0.3;
  opt.partial_fraction = 0.3;
  opt.bias_stddev = 1.0;
  expect_sparse_rows_match(AttentionShape{1, 300, 8, 1, 64, 64, 7}, 0.1, opt, 201, "GQA 8, 10% rows");
}

TEST(AttentionRows, DenserRowsHeadDim128) {
  // ~45 rows per entry, pages of 128; the last tile has 4 rows.
  RandomTableOptions opt;
  opt.causal_fraction = 0.3;
  opt.partial_fraction = 0.3;
  opt.bias_stddev = 0.5;
  expect_sparse_rows_match(AttentionShape{2, 260, 16, 2, 128, 128, 5}, 0.35, opt, 202, "GQA 8, 35% rows, d 128");
}

TEST(AttentionRows, NoGqaOddHeadDim) {
  RandomTableOptions opt;
  opt.causal_fraction = 0.5;
  opt.partial_fraction = 0.3;
  expect_sparse_rows_match(AttentionShape{1, 333, 3, 3, 40, 32, 12}, 0.2, opt, 203, "GQA 1, 20% rows, d 40");
}

TEST(AttentionRows, SummaryKeysOnGatheredRows) {
  // Per-key row masks and biases, key subsets and the pool's per-key biases, read for gathered rows.
  RandomTableOptions opt;
  opt.causal_fraction = 0.2;
  opt.partial_fraction = 0.3;
  opt.bias_stddev = 0.5;
  opt.key_meta_fraction = 0.4;
  opt.key_mask_fraction = 0.5;
  opt.key_bias_fraction = 0.5;
  expect_sparse_rows_match(AttentionShape{1, 290, 4, 2, 64, 64, 6}, 0.15, opt, 204, "GQA 2, 15% rows, key meta");
}

}  // namespace
}  // namespace ringcast::test
