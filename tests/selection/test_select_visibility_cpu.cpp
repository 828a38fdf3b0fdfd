// The visibility rules of the clustered mode (DESIGN.md §4.1), end to end on one simulated rank of
// P = 1, 2, 4: exactness (budgets that cover every page give exact attention, against float64 naive
// attention over the whole sequence), coverage (every key a row may see is counted exactly once, and
// with zero queries the kernel's softmax weights per resolution add up to the keys they stand for)
// and the causal leak check (nothing after position t changes choices or outputs up to t).
#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <functional>
#include <string>
#include <tuple>
#include <vector>

#include "attention_reference.hpp"
#include "clustered_pipeline.hpp"
#include "naive_attention.hpp"

namespace ringcast::test {
namespace {

using kernels::ClusteredLayout;
using kernels::SelectionOptions;
using kernels::SelectUnit;

ClusteredProblem make_problem(std::int64_t n, int heads, int kv_heads, int page_size, int coarse_pages,
                              std::uint64_t seed) {
  ClusteredProblem pr;
  pr.n = n;
  pr.heads = heads;
  pr.kv_heads = kv_heads;
  pr.head_dim = 16;
  pr.page_size = page_size;
  pr.coarse_pages = coarse_pages;
  pr.q = random_normal(std::size_t(n * heads * pr.head_dim), seed);
  pr.k = random_normal(std::size_t(n * kv_heads * pr.head_dim), seed + 1);
  pr.v = random_normal(std::size_t(n * kv_heads * pr.head_dim), seed + 2);
  return pr;
}

SelectionOptions options(bool causal, SelectUnit unit) {
  SelectionOptions o;
  o.causal = causal;
  o.unit = unit;
  o.top_k = 3;
  o.coarse_k = 2;
  o.remote_blocks = 1;
  o.remote_cap = 2;
  return o;
}

std::string describe(const SelectionOptions& o, int ranks, int r) {
  return std::string(o.causal ? "causal" : "bidirectional") + (o.unit == SelectUnit::kRow ? " row" : " tile") +
         " P=" + std::to_string(ranks) + " r=" + std::to_string(r);
}

TEST(SelectVisibility, FullBudgetsGiveExactAttention) {
  struct Case {
    std::int64_t n;
    int heads, kv_heads, page_size, coarse_pages;
  };
  // GQA 2 and 4; pages of 64 and 32; the last case has one coarse block per rank at P = 4.
  for (const Case c : {Case{2048, 4, 2, 64, 4}, Case{1536, 4, 1, 32, 8}, Case{1024, 2, 1, 64, 4}}) {
    const ClusteredProblem pr = make_problem(c.n, c.heads, c.kv_heads, c.page_size, c.coarse_pages, 7);
    const GlobalSummaries gs(pr);
    for (const bool causal : {true, false}) {
      const NaiveResult ref = naive_attention({1, pr.n, pr.heads, pr.kv_heads, pr.head_dim, causal}, to_f64(pr.q),
                                              to_f64(pr.k), to_f64(pr.v));
      for (const SelectUnit unit : {SelectUnit::kRow, SelectUnit::kTile}) {
        SelectionOptions o = options(causal, unit);
        const std::int64_t blocks = pr.n / (std::int64_t(pr.page_size) * pr.coarse_pages);
        o.top_k = static_cast<int>(pr.n / pr.page_size);
        o.coarse_k = o.remote_blocks = o.remote_cap = static_cast<int>(blocks);
        for (const int ranks : {1, 2, 4}) {
          if (pr.n / ranks % (std::int64_t(pr.page_size) * pr.coarse_pages) != 0) continue;
          for (int r = 0; r < ranks; ++r) {
            const RankRun run = run_rank(pr, gs, ranks, r, o);
            const std::vector<std::int32_t> pos = run.q_pos;
            const std::vector<double> o_ref = take_rows(ref.o, 1, pr.n, pr.heads * pr.head_dim, pos);
            const std::vector<double> lse_ref = take_lse(ref.lse, 1, pr.heads, pr.n, pos);
            const double e_o = relative_error(run.o, o_ref), e_lse = relative_error(run.lse, lse_ref);
            const std::string what = describe(o, ranks, r) + " n=" + std::to_string(pr.n);
            if (e_o > 1e-5 || e_lse > 1e-5)
              std::printf("[ %s ] relative error O %.1e LSE %.1e\n", what.c_str(), e_o, e_lse);
            EXPECT_LE(e_o, 1e-5) << what;
            EXPECT_LE(e_lse, 1e-5) << what;
          }
        }
      }
    }
  }
}

enum class Resolution { kWindow, kSelected, kPageSummary, kCoarseSummary };

Resolution classify(const kernels::BlockEntry& e, const ClusteredLayout& L, const kernels::TileGeometry& g) {
  if (e.page >= L.coarse_summary_first_page()) return Resolution::kCoarseSummary;
  if (e.page >= L.page_summary_first_page()) return Resolution::kPageSummary;
  const std::int64_t pos0 = L.pool_page_global(e.page) * L.page_size;
  return pos0 + L.page_size > g.window_lo && pos0 < g.window_hi ? Resolution::kWindow : Resolution::kSelected;
}

// Calls f(position range [p0, p1), resolution) for every key row `row` (tile row r) sees through the
// entries of unit u, as the kernel reads them (row masks, key masks, KeyMeta, causal positions).
void visible_ranges(const RankRun& run, std::int64_t u, int g, std::int64_t tile, int r,
                    const std::function<void(std::int64_t, std::int64_t, Resolution)>& f) {
  const ClusteredLayout& L = run.layouts[std::size_t(g)];
  const kernels::TileGeometry geo = kernels::tile_geometry(L, run.options, tile);
  const std::int64_t t = L.first_pos + tile * kernels::kQueryTile + r;
  const auto bit = [](const std::uint64_t(&m)[2], int i) { return (m[i / 64] >> (i % 64)) & 1u; };
  for (std::int64_t i = run.table.offsets[u]; i < run.table.offsets[u + 1]; ++i) {
    const kernels::BlockEntry& e = run.table.entries[i];
    if (!bit(e.row_mask, r)) continue;
    const Resolution res = classify(e, L, geo);
    for (int j = 0; j < e.key_count; ++j) {
      if (!((e.key_mask >> j) & 1u)) continue;
      if (e.key_meta >= 0 && !bit(run.table.key_meta[std::size_t(e.key_meta + j)].row_mask, r)) continue;
      if ((e.flags & kernels::kEntryCausal) && e.key_pos0 + j > t) continue;
      const std::int64_t slot = std::int64_t(e.page - L.page_summary_first_page()) * L.page_size + j;
      if (res == Resolution::kCoarseSummary) {
        const std::int64_t block = std::int64_t(e.page - L.coarse_summary_first_page()) * L.page_size + j;
        f(block * L.block_keys(), (block + 1) * L.block_keys(), res);
      } else if (res == Resolution::kPageSummary) {
        const std::int64_t page = L.pool_page_global(slot);
        f(page * L.page_size, (page + 1) * L.page_size, res);
      } else {
        const std::int64_t pos = L.pool_page_global(e.page) * L.page_size + j;
        f(pos, pos + 1, res);
      }
    }
  }
}

// The table restricted to the entries of one resolution.
kernels::HostBlockTable only(const RankRun& run, Resolution res, int kv_heads) {
  kernels::HostBlockTable t;
  t.key_meta = run.table.key_meta;
  for (std::size_t u = 0; u + 1 < run.table.offsets.size(); ++u) {
    const std::int64_t tile = std::int64_t(u) / kv_heads;
    const ClusteredLayout& L = run.layouts[u % std::size_t(kv_heads)];
    const kernels::TileGeometry g = kernels::tile_geometry(L, run.options, tile);
    for (std::int64_t i = run.table.offsets[u]; i < run.table.offsets[u + 1]; ++i) {
      if (classify(run.table.entries[i], L, g) == res) t.entries.push_back(run.table.entries[i]);
    }
    t.offsets.push_back(std::int64_t(t.entries.size()));
  }
  return t;
}

TEST(SelectVisibility, EveryVisibleKeyCountsOnceAndWeightsAddUp) {
  const ClusteredProblem pr = make_problem(2048, 4, 2, 64, 4, 21);
  const GlobalSummaries gs(pr);
  struct Case {
    int ranks, r;
  };
  for (const bool causal : {true, false}) {
    for (const SelectUnit unit : {SelectUnit::kRow, SelectUnit::kTile}) {
      for (const Case c : {Case{1, 0}, Case{2, 1}, Case{4, 2}, Case{4, 0}}) {
        SelectionOptions o = options(causal, unit);
        if (c.r == 2) o.remote_blocks = 0;  // no remote block fetched: coarse summaries stand for them
        RankRun run = run_rank(pr, gs, c.ranks, c.r, o, /*attention=*/false);
        const std::string what = describe(o, c.ranks, c.r);
        const std::int64_t n_loc = run.shape.seq_q;
        // Counts per (row, KV head), from the table.
        std::vector<double> counts[4];
        for (auto& v : counts) v.assign(std::size_t(n_loc * pr.heads), 0.0);
        int failures = 0;
        std::vector<int> cover(std::size_t(pr.n));
        for (std::int64_t i = 0; i < n_loc; ++i) {
          const std::int64_t t = run.q_pos[std::size_t(i)];
          for (int g = 0; g < pr.kv_heads; ++g) {
            std::fill(cover.begin(), cover.end(), 0);
            std::int64_t c4[4] = {0, 0, 0, 0};
            const std::int64_t tile = i / kernels::kQueryTile;
            visible_ranges(run, tile * pr.kv_heads + g, g, tile, int(i % kernels::kQueryTile),
                           [&](std::int64_t p0, std::int64_t p1, Resolution res) {
                             for (std::int64_t p = p0; p < p1; ++p) ++cover[std::size_t(p)];
                             c4[int(res)] += p1 - p0;
                           });
            for (std::int64_t p = 0; p < pr.n; ++p) {
              const int want = !causal || p <= t ? 1 : 0;
              if (cover[std::size_t(p)] != want && failures++ < 5) {
                ADD_FAILURE() << what << ": row " << t << " KV head " << g << " counts key " << p << " "
                              << cover[std::size_t(p)] << " times, expected " << want;
              }
            }
            for (int h = g * (pr.heads / pr.kv_heads); h < (g + 1) * (pr.heads / pr.kv_heads); ++h) {
              for (int k = 0; k < 4; ++k) counts[k][std::size_t(h * n_loc + i)] = double(c4[k]);
            }
          }
        }
        // With zero queries every logit is its bias: exp(LSE) of a resolution's entries is the number of
        // keys they stand for (exact keys weigh 1, summaries their count), and in total what the row sees.
        const std::vector<float> zero_q(std::size_t(n_loc * pr.heads * pr.head_dim), 0.f);
        std::vector<double> total(counts[0].size(), 0.0);
        const char* names[4] = {"window", "selected", "page summaries", "coarse summaries"};
        for (int k = 0; k < 4; ++k) {
          attend(run, zero_q, only(run, Resolution(k), pr.kv_heads));
          std::vector<double> weight(run.lse.size());
          for (std::size_t x = 0; x < weight.size(); ++x) weight[x] = std::exp(double(run.lse[x]));
          const double e = relative_error(weight, counts[k]);
          std::printf("[ %-26s ] %-16s weights vs key counts: relative error %.1e\n", what.c_str(), names[k], e);
          EXPECT_LE(e, 1e-5) << what << ": " << names[k];
          for (std::size_t x = 0; x < total.size(); ++x) total[x] += counts[k][x];
        }
        attend(run, zero_q, run.table);
        std::vector<double> weight(run.lse.size()), expected(run.lse.size());
        for (std::size_t x = 0; x < weight.size(); ++x) {
          weight[x] = std::exp(double(run.lse[x]));
          expected[x] = causal ? double(run.q_pos[x % std::size_t(n_loc)] + 1) : double(pr.n);
        }
        EXPECT_EQ(total, expected) << what;
        EXPECT_LE(relative_error(weight, expected), 1e-5) << what << ": all resolutions";
      }
    }
  }
}

// Global page ids of a unit's selection.
// What one tile row reads through the entries of unit u of `table`: per key (pool page, key) the bias
// the kernel adds (entry bias, KeyMeta bias, whether the pool's key bias applies), as the kernel reads
// them (row masks, key masks, KeyMeta, causal positions against the row's position), in table order.
using ReadKey = std::tuple<std::int32_t, int, float, float, bool>;
std::vector<ReadKey> keys_read(const kernels::HostBlockTable& table, std::int64_t u, int row, std::int64_t pos) {
  const auto bit = [](const std::uint64_t(&m)[2], int i) { return (m[i / 64] >> (i % 64)) & 1u; };
  std::vector<ReadKey> out;
  for (std::int64_t i = table.offsets[u]; i < table.offsets[u + 1]; ++i) {
    const kernels::BlockEntry& e = table.entries[i];
    if (!bit(e.row_mask, row)) continue;
    for (int j = 0; j < e.key_count; ++j) {
      if (!((e.key_mask >> j) & 1u) || ((e.flags & kernels::kEntryCausal) && e.key_pos0 + j > pos)) continue;
      const kernels::KeyMeta* meta = e.key_meta >= 0 ? &table.key_meta[std::size_t(e.key_meta + j)] : nullptr;
      if (meta && !bit(meta->row_mask, row)) continue;
      out.emplace_back(e.page, j, e.bias, meta ? meta->bias : 0.f, (e.flags & kernels::kEntryKeyBias) != 0);
    }
  }
  return out;
}

// SelectionOptions::rows_per_token = G (the clustered mode under GQA with per-row selection): each of
// token t's G rows of its 128 / G-token tile reads exactly the keys, biases and order that row t of
// the 128-token tile reads with one row per token, for every G up to 128, causal and bidirectional,
// at ranks with a halo, fetched blocks and a partial last tile.
TEST(SelectVisibility, GroupedRowsReadWhatTheirTokenReads) {
  // 576 tokens per rank at P = 4 (4.5 tiles) in 64-key blocks of two 32-key pages.
  const ClusteredProblem pr = make_problem(2304, 4, 2, 32, 2, 33);
  const GlobalSummaries gs(pr);
  for (const bool causal : {true, false}) {
    SelectionOptions opt = options(causal, SelectUnit::kRow);
    opt.window = 64;
    for (int r : {0, 2}) {
      const RankRun run = run_rank(pr, gs, 4, r, opt, false);
      const ClusteredLayout& L = run.layouts.front();
      for (const int group : {2, 8, 64, 128}) {
        SCOPED_TRACE(describe(opt, 4, r) + " G=" + std::to_string(group));
        SelectionOptions grouped = opt;
        grouped.rows_per_token = group;
        const kernels::HostBlockTable table = kernels::build_clustered_table(run.layouts, grouped, run.selections);
        const std::int64_t tiles = kernels::attention_tiles(L, grouped);
        ASSERT_EQ(table.offsets.size(), std::size_t(tiles * pr.kv_heads + 1));
        for (std::int64_t tile = 0; tile < tiles; ++tile)
          for (int g = 0; g < pr.kv_heads; ++g)
            for (int row = 0; row < kernels::kQueryTile; ++row) {
              const std::int64_t t = tile * (kernels::kQueryTile / group) + row / group;  // rank-local token
              const std::int64_t pos = L.first_pos + t;
              const std::vector<ReadKey> got = keys_read(table, tile * pr.kv_heads + g, row, pos);
              if (t >= L.n_loc) {
                ASSERT_TRUE(got.empty()) << "row " << row << " of tile " << tile << " has no token";
                continue;
              }
              const std::int64_t u = t / kernels::kQueryTile * pr.kv_heads + g;
              ASSERT_EQ(got, keys_read(run.table, u, int(t % kernels::kQueryTile), pos))
                  << "token " << t << ", head " << row % group << " of its group, KV head " << g;
            }
      }
    }
  }
}

std::vector<std::int64_t> global_pages(const RankRun& run, int g, std::int64_t u) {
  const kernels::ClusteredSelection& s = run.selections[std::size_t(g)];
  std::vector<std::int64_t> pages;
  for (std::int64_t i = s.page_offsets[u]; i < s.page_offsets[u + 1]; ++i) {
    pages.push_back(run.layouts[std::size_t(g)].pool_page_global(s.pages[i]));
  }
  return pages;
}

TEST(SelectVisibility, CausalNothingAfterPositionTLeaks) {
  const ClusteredProblem pr = make_problem(2048, 4, 2, 64, 4, 31);
  const GlobalSummaries gs(pr);
  struct Case {
    int ranks, r;
    std::int64_t t;
  };
  for (const SelectUnit unit : {SelectUnit::kRow, SelectUnit::kTile}) {
    for (const Case c : {Case{1, 0, 1300}, Case{2, 1, 1724}, Case{4, 3, 1600}}) {
      SelectionOptions o = options(true, unit);
      const std::string what = describe(o, c.ranks, c.r);
      const RankRun a = run_rank(pr, gs, c.ranks, c.r, o);
      // Static check: outside its window a tile references no key at or after t0 - window.
      for (std::size_t u = 0; u + 1 < a.table.offsets.size(); ++u) {
        const int g = int(u % std::size_t(pr.kv_heads));
        const std::int64_t tile = std::int64_t(u) / pr.kv_heads;
        const kernels::TileGeometry geo = kernels::tile_geometry(a.layouts[std::size_t(g)], o, tile);
        for (int r = 0; r < kernels::kQueryTile; ++r) {
          visible_ranges(a, std::int64_t(u), g, tile, r, [&](std::int64_t, std::int64_t p1, Resolution res) {
            if (res != Resolution::kWindow) {
              ASSERT_LE(p1, geo.t0 - o.window) << what << " tile " << tile;
            }
          });
        }
      }
      // Dynamic check: new queries, keys and values after t.
      ClusteredProblem changed = pr;
      const std::size_t q_row = std::size_t(pr.heads * pr.head_dim), kv_row = std::size_t(pr.kv_heads * pr.head_dim);
      const std::vector<float> noise = random_normal(std::size_t(pr.n) * q_row, 99, 3.0);
      for (std::size_t x = std::size_t(c.t + 1) * q_row; x < changed.q.size(); ++x) changed.q[x] = noise[x];
      for (std::size_t x = std::size_t(c.t + 1) * kv_row; x < changed.k.size(); ++x) {
        changed.k[x] = noise[x];
        changed.v[x] = -noise[x + 1];
      }
      const RankRun b = run_rank(changed, GlobalSummaries(changed), c.ranks, c.r, o);
      const std::int64_t first = a.layouts[0].first_pos;
      const std::int64_t rows = c.t - first + 1;
      const std::int64_t units = unit == SelectUnit::kRow ? rows : (rows - 1) / kernels::kQueryTile + 1;
      for (int g = 0; g < pr.kv_heads; ++g) {
        for (std::int64_t u = 0; u < units; ++u) {
          ASSERT_EQ(global_pages(a, g, u), global_pages(b, g, u)) << what << ": unit " << u << " KV head " << g;
        }
      }
      double max_diff = 0.0;
      for (std::size_t x = 0; x < std::size_t(rows) * q_row; ++x)
        max_diff = std::max(max_diff, double(std::abs(a.o[x] - b.o[x])));
      std::printf("[ %-26s ] t = %lld: outputs of rows <= t differ by at most %.1e\n", what.c_str(),
                  static_cast<long long>(c.t), max_diff);
      EXPECT_LE(max_diff, 1e-6) << what;
    }
  }
}

}  // namespace
}  // namespace ringcast::test
