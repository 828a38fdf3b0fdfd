// Needle retrieval of the page selection (DESIGN.md §4.1 step 5): a 64K-token single rank of random
// normal keys, d = 128, with needles planted far before their query rows, each a scaled copy of its
// row's query direction. With score = bound the needle's page must be among the row's 16 selected
// pages for >= 80% of the rows (DESIGN.md reports 85-100%); score = mean is printed for comparison.
// Summaries and selection only: no attention.
#include "attention_reference.hpp"
#include "clustered_pipeline.hpp"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>

namespace ringcast::test {
namespace {

using namespace kernels;

TEST(SelectNeedle, BoundFindsThePlantedKey) {
  constexpr std::int64_t kN = 65536;
  constexpr int kDim = 128;
  // 40 needle rows in one sequence (each row's needle competes with the 39 others too); needle key =
  // kScale * sqrt(d) * q / |q|, so its logit q.k / sqrt(d) is kScale |q|, about 2 sqrt(d) = 23.
  constexpr int kTrials = 40;
  constexpr double kScale = 2.0;
  ClusteredProblem pr;
  pr.n = kN;
  pr.head_dim = kDim;
  pr.coarse_pages = 16;
  pr.q = random_normal(std::size_t(kN * kDim), 41);
  pr.k = random_normal(std::size_t(kN * kDim), 42);
  pr.v = random_normal(std::size_t(kN * kDim), 43);
  std::mt19937_64 rng(44);
  std::vector<std::int64_t> rows, needles;
  for (int trial = 0; trial < kTrials; ++trial) {
    // Rows spread over the second half; each needle at least 4096 positions before its row, one per page.
    const std::int64_t row = kN / 2 + trial * (kN / 2 / kTrials) + std::int64_t(rng() % 512);
    std::int64_t pos = 0;
    do {
      pos = std::int64_t(rng() % std::uint64_t(row - 4096));
    } while (std::any_of(needles.begin(), needles.end(), [&](std::int64_t p) { return p / 64 == pos / 64; }));
    const float* q = pr.q.data() + row * kDim;
    double norm = 0.0;
    for (int c = 0; c < kDim; ++c) norm += double(q[c]) * q[c];
    const double scale = kScale * std::sqrt(double(kDim) / norm);
    for (int c = 0; c < kDim; ++c) pr.k[std::size_t(pos * kDim + c)] = float(scale * q[c]);
    rows.push_back(row);
    needles.push_back(pos);
  }
  const GlobalSummaries gs(pr);
  ClusteredLayout L;
  L.n = L.n_loc = kN;
  L.coarse_pages = pr.coarse_pages;
  double rate[2] = {0.0, 0.0};
  for (const SelectScore score : {SelectScore::kBound, SelectScore::kMean}) {
    SelectionParams sp;
    sp.layout = &L;
    sp.options.score = score;  // defaults otherwise: causal, row units, top_k 16, coarse_k 4
    sp.queries = {pr.q.data(), 1, 1, kDim, 0};
    sp.coarse = {gs.block_mean_k.data(), gs.block_min.data(), gs.block_max.data()};
    sp.pages = {gs.page_mean_k.data(), gs.page_min.data(), gs.page_max.data()};
    const ClusteredSelection sel = select_pages(sp, ExecContext{});
    int found = 0;
    for (int trial = 0; trial < kTrials; ++trial) {
      const auto first = sel.pages.begin() + sel.page_offsets[rows[std::size_t(trial)]];
      const auto last = sel.pages.begin() + sel.page_offsets[rows[std::size_t(trial)] + 1];
      found += std::find(first, last, std::int32_t(needles[std::size_t(trial)] / 64)) != last;
    }
    rate[score == SelectScore::kMean] = double(found) / kTrials;
  }
  std::printf("[ needle, n = 64K, d = 128 ] needle page among the 16 selected: bound %.0f%%, mean %.0f%% of %d rows\n",
              100 * rate[0], 100 * rate[1], kTrials);
  EXPECT_GE(rate[0], 0.8);
}

}  // namespace
}  // namespace ringcast::test
