// Page selection and rank-level top-R of the clustered mode (selection.hpp) against a naive float64
// restatement of DESIGN.md §4.1 steps 4-5 (every score computed, sorted by score then index): row and
// tile units, causal and bidirectional, GQA 4, P = 1 and 4, ties (identical keys: the lower index
// wins), thread-count determinism, the layout's page maps and key biases, and validation errors.
#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <ringcast/error.hpp>
#include <string>

#include "attention_reference.hpp"
#include "clustered_pipeline.hpp"

namespace ringcast::test {
namespace {

using namespace kernels;

ClusteredProblem make_problem(std::int64_t n, int heads, int kv_heads, bool identical_keys, std::uint64_t seed) {
  ClusteredProblem pr;
  pr.n = n;
  pr.heads = heads;
  pr.kv_heads = kv_heads;
  pr.head_dim = 16;
  pr.q = random_normal(std::size_t(n * heads * pr.head_dim), seed);
  pr.k = random_normal(std::size_t(n * kv_heads * pr.head_dim), seed + 1);
  pr.v = random_normal(std::size_t(n * kv_heads * pr.head_dim), seed + 2);
  if (identical_keys) {  // every position holds the same key: every score ties
    for (std::size_t x = 0; x < pr.k.size(); ++x) pr.k[x] = pr.k[x % std::size_t(kv_heads * pr.head_dim)];
  }
  return pr;
}

// q̂ in float64: mean over local rows [r0, r1] of the sum over the group's heads.
std::vector<double> naive_query(const ClusteredProblem& pr, std::int64_t first, std::int64_t r0, std::int64_t r1,
                                int g) {
  const int d = pr.head_dim, group = pr.heads / pr.kv_heads;
  std::vector<double> q(std::size_t(d), 0.0);
  for (std::int64_t r = r0; r <= r1; ++r) {
    for (int h = g * group; h < (g + 1) * group; ++h) {
      for (int c = 0; c < d; ++c) q[std::size_t(c)] += pr.q[std::size_t(((first + r) * pr.heads + h) * d + c)];
    }
  }
  for (double& x : q) x /= double(r1 - r0 + 1);
  return q;
}

double naive_score(const std::vector<double>& q, const float* mean, const float* mn, const float* mx, bool bound) {
  double s = 0.0;
  for (std::size_t c = 0; c < q.size(); ++c) s += bound ? std::max(q[c] * mx[c], q[c] * mn[c]) : q[c] * mean[c];
  return s;
}

// The best k of (score, index), sorted by index.
std::vector<std::int64_t> best(std::vector<std::pair<double, std::int64_t>> c, int k) {
  std::sort(c.begin(), c.end(),
            [](auto& a, auto& b) { return a.first > b.first || (a.first == b.first && a.second < b.second); });
  std::vector<std::int64_t> out;
  for (std::size_t i = 0; i < c.size() && int(i) < k; ++i) out.push_back(c[i].second);
  std::sort(out.begin(), out.end());
  return out;
}

// Step 5 restated per unit: usable blocks, eligibility from positions, coarse then fine top-k.
void expect_naive_selection(const ClusteredProblem& pr, const GlobalSummaries& gs, const RankRun& run,
                            const std::string& what) {
  const SelectionOptions& o = run.options;
  const bool bound = o.score == SelectScore::kBound;
  const int ps = pr.page_size, cp = pr.coarse_pages;
  const std::int64_t bk = std::int64_t(ps) * cp;
  int mismatches = 0;
  for (int g = 0; g < pr.kv_heads; ++g) {
    const ClusteredLayout& L = run.layouts[std::size_t(g)];
    const ClusteredSelection& sel = run.selections[std::size_t(g)];
    const RemoteSelection& rem = run.remote[std::size_t(g)];
    const std::int64_t units = o.unit == SelectUnit::kRow ? L.n_loc : L.num_tiles();
    for (std::int64_t u = 0; u < units; ++u) {
      const std::int64_t tile = o.unit == SelectUnit::kRow ? u / kQueryTile : u;
      const std::int64_t t0 = L.first_pos + tile * kQueryTile, t1 = std::min(t0 + kQueryTile, L.first_pos + L.n_loc);
      const std::int64_t lo = o.causal ? t0 - o.window : t0 - o.window / 2, hi = o.causal ? t1 : t1 + o.window / 2;
      const auto eligible = [&](std::int64_t p0, std::int64_t p1) {
        return o.causal ? p1 <= lo : p1 <= lo || p0 >= hi;
      };
      const std::int64_t r0 = tile * kQueryTile;
      const std::vector<double> q = o.unit == SelectUnit::kRow ? naive_query(pr, L.first_pos, u, u, g)
                                    : o.causal
                                        ? naive_query(pr, L.first_pos, std::max<std::int64_t>(0, r0 - 127), r0, g)
                                        : naive_query(pr, L.first_pos, r0, t1 - L.first_pos - 1, g);
      std::vector<std::pair<double, std::int64_t>> blocks, pages;
      for (std::int64_t b = 0; b < L.num_blocks(); ++b) {
        const bool usable =
            L.is_local_block(b) || b == L.halo_before || b == L.halo_after ||
            std::find(rem.usable.begin() + rem.usable_offsets[tile], rem.usable.begin() + rem.usable_offsets[tile + 1],
                      b) != rem.usable.begin() + rem.usable_offsets[tile + 1];
        if (!usable) continue;
        if (eligible(b * bk, (b + 1) * bk)) {
          blocks.emplace_back(naive_score(q, gs.block_row(gs.block_mean_k, g, b), gs.block_row(gs.block_min, g, b),
                                          gs.block_row(gs.block_max, g, b), bound),
                              b);
          continue;
        }
        for (std::int64_t p = b * cp; p < (b + 1) * cp; ++p) {
          if (eligible(p * ps, (p + 1) * ps)) pages.emplace_back(0.0, p);
        }
      }
      const std::vector<std::int64_t> chosen = best(blocks, o.coarse_k);
      for (const std::int64_t b : chosen) {
        for (std::int64_t p = b * cp; p < (b + 1) * cp; ++p) pages.emplace_back(0.0, p);
      }
      for (auto& [score, p] : pages) {
        score = naive_score(q, gs.page_row(gs.page_mean_k, g, p), gs.page_row(gs.page_min, g, p),
                            gs.page_row(gs.page_max, g, p), bound);
      }
      std::vector<std::int64_t> got_pages;
      for (std::int64_t i = sel.page_offsets[u]; i < sel.page_offsets[u + 1]; ++i)
        got_pages.push_back(L.pool_page_global(sel.pages[i]));
      const std::vector<std::int64_t> got_blocks(sel.blocks.begin() + sel.block_offsets[u],
                                                 sel.blocks.begin() + sel.block_offsets[u + 1]);
      if ((got_pages != best(pages, o.top_k) || got_blocks != chosen) && mismatches++ < 3) {
        ADD_FAILURE() << what << ": KV head " << g << " unit " << u << " differs from the naive selection";
      }
    }
  }
  EXPECT_EQ(mismatches, 0) << what;
}

// Step 4 restated: causal running max and admission in tile order; bidirectional max over tiles.
void expect_naive_remote(const ClusteredProblem& pr, const GlobalSummaries& gs, const RankRun& run,
                         const std::string& what) {
  const SelectionOptions& o = run.options;
  const std::int64_t bk = std::int64_t(pr.page_size) * pr.coarse_pages;
  for (int g = 0; g < pr.kv_heads; ++g) {
    const ClusteredLayout& L = run.layouts[std::size_t(g)];
    const RemoteSelection& rem = run.remote[std::size_t(g)];
    std::vector<double> running(std::size_t(L.num_blocks()), -1e300);
    std::vector<std::int64_t> fetch, usable, offsets{0};
    for (std::int64_t tile = 0; tile < L.num_tiles(); ++tile) {
      const std::int64_t r0 = tile * kQueryTile;
      const std::vector<double> q = o.causal ? naive_query(pr, L.first_pos, std::max<std::int64_t>(0, r0 - 127), r0, g)
                                             : naive_query(pr, L.first_pos, r0, r0 + kQueryTile - 1, g);
      std::vector<std::pair<double, std::int64_t>> c;
      for (std::int64_t b = 0; b < L.num_blocks(); ++b) {
        if (L.is_local_block(b) || b == L.halo_before || b == L.halo_after) continue;
        running[std::size_t(b)] =
            std::max(running[std::size_t(b)],
                     naive_score(q, gs.block_row(gs.block_mean_k, g, b), gs.block_row(gs.block_min, g, b),
                                 gs.block_row(gs.block_max, g, b), true));
        if (!o.causal || (b + 1) * bk <= L.first_pos + r0 - o.window) c.emplace_back(running[std::size_t(b)], b);
      }
      if (!o.causal) continue;
      std::sort(c.begin(), c.end(),
                [](auto& a, auto& b) { return a.first > b.first || (a.first == b.first && a.second < b.second); });
      const std::size_t begin = usable.size();
      for (std::size_t i = 0; i < c.size() && int(i) < o.remote_blocks; ++i) {
        bool in = std::find(fetch.begin(), fetch.end(), c[i].second) != fetch.end();
        if (!in && int(fetch.size()) < o.remote_cap) fetch.push_back(c[i].second), in = true;
        if (in) usable.push_back(c[i].second);
      }
      std::sort(usable.begin() + std::ptrdiff_t(begin), usable.end());
      offsets.push_back(std::int64_t(usable.size()));
    }
    if (!o.causal) {
      std::vector<std::pair<double, std::int64_t>> c;
      for (std::int64_t b = 0; b < L.num_blocks(); ++b) {
        if (!(L.is_local_block(b) || b == L.halo_before || b == L.halo_after))
          c.emplace_back(running[std::size_t(b)], b);
      }
      std::vector<std::int64_t> top = best(c, o.remote_blocks);
      std::vector<std::int64_t> got = rem.fetch;
      std::sort(got.begin(), got.end());
      EXPECT_EQ(got, top) << what << ": fetch list";
      continue;
    }
    EXPECT_EQ(rem.fetch, fetch) << what << ": fetch list of KV head " << g;
    EXPECT_EQ(rem.usable, usable) << what << ": usable blocks";
    EXPECT_EQ(rem.usable_offsets, offsets) << what << ": usable offsets";
    EXPECT_LE(int(rem.fetch.size()), o.remote_cap) << what;
  }
}

TEST(SelectionCpu, MatchesNaiveSelectionRowAndTileGqa4) {
  for (const bool ties : {false, true}) {
    const ClusteredProblem pr = make_problem(2048, 8, 2, ties, ties ? 61 : 51);
    const GlobalSummaries gs(pr);
    for (const bool causal : {true, false}) {
      for (const SelectUnit unit : {SelectUnit::kRow, SelectUnit::kTile}) {
        for (const SelectScore score : {SelectScore::kBound, SelectScore::kMean}) {
          SelectionOptions o;
          o.causal = causal;
          o.unit = unit;
          o.score = score;
          o.top_k = 5;
          o.coarse_k = 2;
          o.remote_blocks = 2;
          o.remote_cap = 3;
          for (const int ranks : {1, 4}) {
            const RankRun run = run_rank(pr, gs, ranks, ranks - 1, o, /*attention=*/false);
            const std::string what = std::string(ties ? "ties " : "") + (causal ? "causal" : "bidirectional") +
                                     (unit == SelectUnit::kRow ? " row" : " tile") +
                                     (score == SelectScore::kBound ? " bound" : " mean") +
                                     " P=" + std::to_string(ranks);
            expect_naive_selection(pr, gs, run, what);
            if (score == SelectScore::kBound) expect_naive_remote(pr, gs, run, what);
          }
        }
      }
    }
  }
}

TEST(SelectionCpu, IdenticalForAnyThreadCount) {
  const ClusteredProblem pr = make_problem(2048, 4, 1, false, 71);
  const GlobalSummaries gs(pr);
  SelectionOptions o;
  o.top_k = 4;
  o.coarse_k = 2;
  const int saved = omp_get_max_threads();
  omp_set_num_threads(1);
  const RankRun one = run_rank(pr, gs, 2, 1, o, false);
  omp_set_num_threads(3);
  const RankRun three = run_rank(pr, gs, 2, 1, o, false);
  omp_set_num_threads(saved);
  EXPECT_EQ(one.selections[0].pages, three.selections[0].pages);
  EXPECT_EQ(one.selections[0].page_offsets, three.selections[0].page_offsets);
  EXPECT_EQ(one.selections[0].blocks, three.selections[0].blocks);
  EXPECT_EQ(one.table.entries.size(), three.table.entries.size());
}

TEST(SelectionCpu, LayoutMapsPagesAndFillsKeyBias) {
  ClusteredLayout L;
  L.page_size = 32;
  L.coarse_pages = 4;
  L.n = 128 * 8;
  L.first_pos = 128 * 4;
  L.n_loc = 128 * 2;
  L.halo_before = 3;
  L.halo_after = 6;
  L.fetched = {1};
  L.fetch_capacity = 2;
  L.validate();
  EXPECT_EQ(L.resident_pages(), 8 + 8 + 8);
  EXPECT_EQ(L.page_summary_first_page(), 24);
  EXPECT_EQ(L.coarse_summary_first_page(), 25);
  EXPECT_EQ(L.num_pages(), 26);
  for (std::int64_t pp = 0; pp < L.resident_pages(); ++pp) {
    const std::int64_t gp = L.pool_page_global(pp);
    EXPECT_EQ(gp < 0, pp >= 20) << "pool page " << pp;  // the second fetched slot is padding
    if (gp >= 0) {
      EXPECT_EQ(L.page_pool_page(gp), pp);
    }
  }
  EXPECT_EQ(L.block_pool_page(0), -1);
  std::vector<std::int32_t> page_counts(24, 32), block_counts(8, 128);
  std::fill(page_counts.begin() + 20, page_counts.end(), 0);
  std::vector<float> bias(std::size_t(L.num_pages() * 32), -1.f);
  fill_summary_key_bias(L, page_counts, block_counts, bias);
  EXPECT_FLOAT_EQ(bias[24 * 32 + 3], std::log(32.f));
  EXPECT_EQ(bias[24 * 32 + 21], 0.f);
  EXPECT_FLOAT_EQ(bias[25 * 32 + 7], std::log(128.f));
  EXPECT_EQ(bias[5], 0.f);

  ClusteredLayout bad = L;
  bad.halo_before = 2;
  EXPECT_THROW(bad.validate(), Error);
  bad = L;
  bad.fetched = {4};
  EXPECT_THROW(bad.validate(), Error);
  bad = L;
  bad.fetch_capacity = 0;
  EXPECT_THROW(bad.validate(), Error);
}

TEST(SelectionCpu, RejectsBadParameters) {
  const ClusteredProblem pr = make_problem(1024, 2, 1, false, 81);
  const GlobalSummaries gs(pr);
  ClusteredLayout L;
  L.coarse_pages = 4;
  L.n = L.n_loc = 1024;
  SelectionParams sp;
  sp.layout = &L;
  sp.queries = {pr.q.data(), 2, 1, 16, 0};
  sp.coarse = {gs.block_mean_k.data(), gs.block_min.data(), gs.block_max.data()};
  sp.pages = {gs.page_mean_k.data(), gs.page_min.data(), gs.page_max.data()};
  EXPECT_NO_THROW(select_pages(sp, ExecContext{}));
  const auto expect_error = [&](const SelectionParams& p, const ExecContext& ctx, const std::string& needle) {
    try {
      select_pages(p, ctx);
      ADD_FAILURE() << "no error; expected \"" << needle << "\"";
    } catch (const Error& e) {
      EXPECT_NE(e.message().find(needle), std::string::npos) << e.message();
    }
  };
#if !RINGCAST_WITH_CUDA  // with the CUDA backend this is a launch (tests/gpu/test_selection_gpu.cpp)
  ExecContext cuda;
  cuda.device.kind = DeviceKind::kCuda;
  expect_error(sp, cuda, "no CUDA backend");
#endif
  SelectionParams p = sp;
  p.options.window = 512;
  expect_error(p, {}, "window 512 must lie in [0, 256]");
  p = sp;
  p.pages.max = nullptr;
  expect_error(p, {}, "page summaries lack the minima and maxima");
  p = sp;
  const std::vector<std::int64_t> offsets(9, 0), usable{2};
  std::vector<std::int64_t> off = offsets;
  off.back() = 1;
  p.usable_offsets = off;
  p.usable = usable;
  expect_error(p, {}, "which the layout did not fetch");
}

}  // namespace
}  // namespace ringcast::test
