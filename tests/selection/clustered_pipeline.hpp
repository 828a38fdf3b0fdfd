// One rank of the clustered mode, simulated from a whole sequence held in one process: summaries of
// the whole sequence, the rank's top-R, its pool (local, halo and fetched pages copied from the global
// K/V, page and coarse summaries, key_bias), the selection of every KV head, the block table and the
// CPU attention over the pool. Tests of selection.hpp run this for P = 1, 2, 4 and compare with
// naive attention over the whole sequence. Batch 1; q [n, heads, d], k and v [n, kv_heads, d].
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <ringcast/kernels/attention.hpp>
#include <ringcast/kernels/selection.hpp>
#include <ringcast/kernels/summaries.hpp>
#include <span>
#include <vector>

namespace ringcast::test {

struct ClusteredProblem {
  std::int64_t n = 0;
  int heads = 1;
  int kv_heads = 1;
  int head_dim = 16;
  int page_size = 64;
  int coarse_pages = 4;
  std::vector<float> q, k, v;
};

// Page and coarse summaries of the whole sequence ([kv_heads, rows, d] pools of summaries.hpp).
struct GlobalSummaries {
  kernels::SummaryShape shape;
  std::vector<float> page_mean_k, page_mean_v, page_min, page_max;
  std::vector<std::int32_t> page_count;
  std::vector<float> block_mean_k, block_mean_v, block_min, block_max;
  std::vector<std::int32_t> block_count;

  explicit GlobalSummaries(const ClusteredProblem& pr) {
    shape.seq = pr.n;
    shape.kv_heads = pr.kv_heads;
    shape.head_dim = pr.head_dim;
    shape.page_size = pr.page_size;
    shape.coarse_pages = pr.coarse_pages;
    const auto pool = [&](std::int64_t rows) {
      return std::vector<float>(std::size_t(pr.kv_heads * rows * pr.head_dim));
    };
    page_mean_k = page_mean_v = page_min = page_max = pool(shape.page_rows());
    block_mean_k = block_mean_v = block_min = block_max = pool(shape.block_rows());
    page_count.resize(std::size_t(shape.num_pages()));
    block_count.resize(std::size_t(shape.num_blocks()));
    const kernels::ExecContext ctx{};
    kernels::PageSummaryParams ps{
        shape,
        pr.k.data(),
        pr.v.data(),
        {page_mean_k.data(), page_mean_v.data(), page_min.data(), page_max.data(), page_count.data()}};
    kernels::page_summaries(ps, ctx);
    kernels::CoarseSummaryParams cs{
        shape,
        page_mean_k.data(),
        page_mean_v.data(),
        page_min.data(),
        page_max.data(),
        page_count.data(),
        {block_mean_k.data(), block_mean_v.data(), block_min.data(), block_max.data(), block_count.data()}};
    kernels::coarse_summaries(cs, ctx);
  }
  // Row `unit` of KV head g of a [kv_heads, rows, d] pool.
  const float* page_row(const std::vector<float>& pool, int g, std::int64_t page) const {
    return pool.data() + (g * shape.page_rows() + page) * shape.head_dim;
  }
  const float* block_row(const std::vector<float>& pool, int g, std::int64_t block) const {
    return pool.data() + (g * shape.block_rows() + block) * shape.head_dim;
  }
};

struct RankRun {
  kernels::SelectionOptions options;
  std::vector<kernels::ClusteredLayout> layouts;  // per KV head
  std::vector<kernels::RemoteSelection> remote;
  std::vector<kernels::ClusteredSelection> selections;
  kernels::HostBlockTable table;
  kernels::AttentionShape shape;
  std::vector<float> k_pool, v_pool, key_bias;
  std::vector<std::int32_t> q_pos;
  std::vector<float> o, lse;  // [n_loc, heads, d], [heads, n_loc]
};

// Attention of `run`'s queries q_loc [n_loc, heads, d] over its pool and `table`.
inline void attend(RankRun& run, const std::vector<float>& q_loc, const kernels::HostBlockTable& table) {
  const kernels::AttentionShape& s = run.shape;
  run.o.assign(q_loc.size(), 0.f);
  run.lse.assign(std::size_t(s.heads * s.seq_q), 0.f);
  kernels::AttentionForwardParams p;
  p.shape = s;
  p.softmax_scale = 1.f / std::sqrt(static_cast<float>(s.head_dim));
  p.q = q_loc.data();
  p.k_pages = run.k_pool.data();
  p.v_pages = run.v_pool.data();
  p.q_pos = run.q_pos.data();
  p.key_bias = run.key_bias.data();
  p.table = table.view();
  p.o = run.o.data();
  p.lse = run.lse.data();
  const kernels::ExecContext ctx{};
  std::vector<std::byte> ws(kernels::attention_forward_workspace_bytes(s, ctx));
  p.workspace = ws.data();
  p.workspace_bytes = ws.size();
  kernels::attention_forward(p, ctx);
}

inline std::vector<float> local_queries(const ClusteredProblem& pr, std::int64_t first, std::int64_t n_loc) {
  const std::size_t row = std::size_t(pr.heads * pr.head_dim);
  return {pr.q.begin() + first * std::int64_t(row), pr.q.begin() + (first + n_loc) * std::int64_t(row)};
}

// Rank r of P: top-R, pool, selection, table and (when `attention`) the attention output.
inline RankRun run_rank(const ClusteredProblem& pr, const GlobalSummaries& gs, int ranks, int r,
                        const kernels::SelectionOptions& opt, bool attention = true) {
  using namespace kernels;
  const std::int64_t n_loc = pr.n / ranks;
  const int d = pr.head_dim;
  const int ps = pr.page_size;
  const ExecContext ctx{};
  const std::vector<float> q_loc = local_queries(pr, r * n_loc, n_loc);
  RankRun run;
  run.options = opt;
  ClusteredLayout base;
  base.page_size = ps;
  base.coarse_pages = pr.coarse_pages;
  base.n = pr.n;
  base.first_pos = r * n_loc;
  base.n_loc = n_loc;
  base.halo_before = r > 0 ? base.first_block() - 1 : -1;
  base.halo_after = !opt.causal && r + 1 < ranks ? base.first_block() + base.local_blocks() : -1;
  std::int64_t capacity = 0;
  for (int g = 0; g < pr.kv_heads; ++g) {
    const SummaryRows coarse{gs.block_row(gs.block_mean_k, g, 0), gs.block_row(gs.block_min, g, 0),
                             gs.block_row(gs.block_max, g, 0)};
    run.remote.push_back(select_remote_blocks({&base, opt, {q_loc.data(), pr.heads, pr.kv_heads, d, g}, coarse}, ctx));
    capacity = std::max<std::int64_t>(capacity, std::int64_t(run.remote.back().fetch.size()));
  }
  for (int g = 0; g < pr.kv_heads; ++g) {
    ClusteredLayout L = base;
    L.fetched = run.remote[std::size_t(g)].fetch;
    L.fetch_capacity = capacity;
    run.layouts.push_back(L);
  }
  const ClusteredLayout& L0 = run.layouts[0];
  const std::int64_t pages = L0.num_pages();
  const std::size_t page_elems = std::size_t(ps * d);
  run.k_pool.assign(std::size_t(pr.kv_heads * pages) * page_elems, 0.f);
  run.v_pool = run.k_pool;
  run.key_bias.assign(std::size_t(pr.kv_heads * pages * ps), 0.f);
  for (int g = 0; g < pr.kv_heads; ++g) {
    const ClusteredLayout& L = run.layouts[std::size_t(g)];
    float* kp = run.k_pool.data() + g * pages * std::int64_t(page_elems);
    float* vp = run.v_pool.data() + g * pages * std::int64_t(page_elems);
    std::vector<float> page_min(std::size_t(L.resident_pages() * d)), page_max(page_min.size());
    std::vector<std::int32_t> page_counts(std::size_t(L.resident_pages()), 0);
    for (std::int64_t pp = 0; pp < L.resident_pages(); ++pp) {
      const std::int64_t gp = L.pool_page_global(pp);
      if (gp < 0) continue;
      for (int j = 0; j < ps; ++j) {
        const std::int64_t src = ((gp * ps + j) * pr.kv_heads + g) * d;
        std::copy_n(pr.k.begin() + src, d, kp + (pp * ps + j) * d);
        std::copy_n(pr.v.begin() + src, d, vp + (pp * ps + j) * d);
      }
      const std::int64_t summary = (L.page_summary_first_page() * ps + pp) * d;
      std::copy_n(gs.page_row(gs.page_mean_k, g, gp), d, kp + summary);
      std::copy_n(gs.page_row(gs.page_mean_v, g, gp), d, vp + summary);
      std::copy_n(gs.page_row(gs.page_min, g, gp), d, page_min.begin() + pp * d);
      std::copy_n(gs.page_row(gs.page_max, g, gp), d, page_max.begin() + pp * d);
      page_counts[std::size_t(pp)] = gs.page_count[std::size_t(gp)];
    }
    for (std::int64_t b = 0; b < L.num_blocks(); ++b) {
      const std::int64_t summary = (L.coarse_summary_first_page() * ps + b) * d;
      std::copy_n(gs.block_row(gs.block_mean_k, g, b), d, kp + summary);
      std::copy_n(gs.block_row(gs.block_mean_v, g, b), d, vp + summary);
    }
    fill_summary_key_bias(L, page_counts, gs.block_count,
                          std::span<float>(run.key_bias).subspan(std::size_t(g * pages * ps), std::size_t(pages * ps)));
    SelectionParams sp;
    sp.layout = &L;
    sp.options = opt;
    sp.queries = {q_loc.data(), pr.heads, pr.kv_heads, d, g};
    sp.coarse = {gs.block_row(gs.block_mean_k, g, 0), gs.block_row(gs.block_min, g, 0),
                 gs.block_row(gs.block_max, g, 0)};
    sp.pages = {kp + L.page_summary_first_page() * std::int64_t(page_elems), page_min.data(), page_max.data()};
    sp.usable_offsets = run.remote[std::size_t(g)].usable_offsets;
    sp.usable = run.remote[std::size_t(g)].usable;
    run.selections.push_back(select_pages(sp, ctx));
  }
  run.table = build_clustered_table(run.layouts, opt, run.selections);
  run.shape.seq_q = n_loc;
  run.shape.heads = pr.heads;
  run.shape.kv_heads = pr.kv_heads;
  run.shape.head_dim = d;
  run.shape.page_size = ps;
  run.shape.num_pages = pages;
  for (std::int64_t i = 0; i < n_loc; ++i) run.q_pos.push_back(static_cast<std::int32_t>(r * n_loc + i));
  if (attention) attend(run, q_loc, run.table);
  return run;
}

}  // namespace ringcast::test
