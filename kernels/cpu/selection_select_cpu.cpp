// CPU selection of the clustered mode (selection.hpp): rank-level top-R of remote blocks (DESIGN.md
// §4.1 step 4) and coarse-to-fine page selection per unit (step 5). Scoring is fused with the top-k:
// a unit scores its candidates one by one into a k-slot sorted buffer, so no score matrix is stored.
// OpenMP threads take whole tiles; each unit writes fixed slots of the output, compacted in unit
// order afterwards, so results do not depend on the thread count. Parameters arrive validated.
#include <omp.h>

#include <algorithm>
#include <limits>
#include <span>
#include <vector>

#include "cpu/selection_cpu.hpp"

namespace ringcast::kernels::cpu {
namespace {

struct Scored {
  float score;
  std::int64_t index;
};
// Higher score first; ties toward the lower global index (deterministic, DESIGN.md §4.1 step 5).
bool better(const Scored& a, const Scored& b) { return a.score > b.score || (a.score == b.score && a.index < b.index); }

// The best k of the candidates pushed so far, best first.
class TopK {
 public:
  explicit TopK(int k) : k_(static_cast<std::size_t>(std::max(k, 0))) { items_.reserve(k_); }
  void clear() { items_.clear(); }
  void push(float score, std::int64_t index) {
    const Scored s{score, index};
    if (k_ == 0 || (items_.size() == k_ && !better(s, items_.back()))) return;
    if (items_.size() == k_) items_.pop_back();
    items_.insert(std::upper_bound(items_.begin(), items_.end(), s, better), s);
  }
  const std::vector<Scored>& items() const { return items_; }

 private:
  std::size_t k_;
  std::vector<Scored> items_;
};

// Score of summary row i for the selection query q (Quest bound or mean key).
float summary_score(SelectScore kind, const float* q, const SummaryRows& rows, std::int64_t i, int d) {
  float s = 0.f;
  if (kind == SelectScore::kMean) {
    const float* m = rows.mean + i * d;
#pragma omp simd reduction(+ : s)
    for (int c = 0; c < d; ++c) s += q[c] * m[c];
  } else {  // q+ . k_max + q- . k_min = sum_c max(q_c k_max_c, q_c k_min_c), since k_min <= k_max
    const float* mx = rows.max + i * d;
    const float* mn = rows.min + i * d;
#pragma omp simd reduction(+ : s)
    for (int c = 0; c < d; ++c) s += std::max(q[c] * mx[c], q[c] * mn[c]);
  }
  return s;
}

// out = the mean over the rank's local rows [r0, r1] of the query summed over the group's heads.
void selection_query(const SelectionQueries& sq, std::int64_t r0, std::int64_t r1, float* out) {
  const int d = sq.head_dim;
  const int group = sq.heads / sq.kv_heads;
  std::fill(out, out + d, 0.f);
  for (std::int64_t r = r0; r <= r1; ++r) {
    for (int h = sq.kv_head * group; h < (sq.kv_head + 1) * group; ++h) {
      const float* q = sq.q + (r * sq.heads + h) * d;
#pragma omp simd
      for (int c = 0; c < d; ++c) out[c] += q[c];
    }
  }
  const float inv = 1.f / static_cast<float>(r1 - r0 + 1);
  for (int c = 0; c < d; ++c) out[c] *= inv;
}

// A tile's query for shared choices (step 4, and step 5 in tile mode): causal, the lagged mean over
// positions [t0 - 127, t0] held by the rank; bidirectional, the tile's mean.
void tile_query(const ClusteredLayout& layout, const SelectionOptions& opt, const SelectionQueries& sq,
                std::int64_t tile, float* out) {
  const std::int64_t r0 = tile * kQueryTile;
  if (opt.causal) {
    selection_query(sq, std::max<std::int64_t>(0, r0 - (kQueryTile - 1)), r0, out);
  } else {
    selection_query(sq, r0, std::min(r0 + kQueryTile, layout.n_loc) - 1, out);
  }
}

// Remote blocks: neither local nor halo, ascending.
std::vector<std::int64_t> remote_blocks(const ClusteredLayout& layout) {
  std::vector<std::int64_t> blocks;
  for (std::int64_t b = 0; b < layout.num_blocks(); ++b) {
    if (!layout.is_local_block(b) && b != layout.halo_before && b != layout.halo_after) blocks.push_back(b);
  }
  return blocks;
}

// Candidates of one tile, shared by its units: coarse blocks (eligible, usable) and pages of usable
// blocks that hold window pages (eligible pages only), both ascending.
struct TileCandidates {
  std::vector<std::int64_t> blocks;
  std::vector<std::int64_t> pages;  // global page ids
};

TileCandidates tile_candidates(const SelectionParams& p, std::int64_t tile) {
  const ClusteredLayout& L = *p.layout;
  const TileGeometry g = tile_geometry(L, p.options, tile);
  std::vector<std::int64_t> usable;
  for (std::int64_t b = L.first_block(); b < L.first_block() + L.local_blocks(); ++b) usable.push_back(b);
  for (const std::int64_t halo : {L.halo_before, L.halo_after}) {
    if (halo >= 0) usable.push_back(halo);
  }
  if (!p.usable_offsets.empty()) {
    usable.insert(usable.end(), p.usable.begin() + p.usable_offsets[tile],
                  p.usable.begin() + p.usable_offsets[tile + 1]);
  }
  std::sort(usable.begin(), usable.end());
  TileCandidates c;
  for (const std::int64_t b : usable) {
    if (g.block_eligible(b, L.block_keys())) {
      c.blocks.push_back(b);
      continue;
    }
    for (std::int64_t page = b * L.coarse_pages; page < (b + 1) * L.coarse_pages; ++page) {
      if (g.page_eligible(page, L.page_size)) c.pages.push_back(page);
    }
  }
  return c;
}

}  // namespace

RemoteSelection select_remote_blocks(const RemoteSelectionParams& p) {
  const ClusteredLayout& L = *p.layout;
  const SelectionOptions& opt = p.options;
  const int d = p.queries.head_dim;
  const std::int64_t tiles = L.num_tiles();
  const std::vector<std::int64_t> remote = remote_blocks(L);
  std::vector<float> q(static_cast<std::size_t>(d));
  RemoteSelection out;
  TopK best(opt.remote_blocks);
  if (!opt.causal) {
    std::vector<float> score(remote.size(), -std::numeric_limits<float>::infinity());
    for (std::int64_t t = 0; t < tiles; ++t) {
      tile_query(L, opt, p.queries, t, q.data());
      for (std::size_t i = 0; i < remote.size(); ++i) {
        score[i] = std::max(score[i], summary_score(opt.score, q.data(), p.coarse, remote[i], d));
      }
    }
    for (std::size_t i = 0; i < remote.size(); ++i) best.push(score[i], remote[i]);
    for (const Scored& s : best.items()) out.fetch.push_back(s.index);
    std::vector<std::int64_t> sorted = out.fetch;
    std::sort(sorted.begin(), sorted.end());
    for (std::int64_t t = 0; t < tiles; ++t) {
      out.usable.insert(out.usable.end(), sorted.begin(), sorted.end());
      out.usable_offsets.push_back(static_cast<std::int64_t>(out.usable.size()));
    }
    return out;
  }
  // Causal: the running max over tiles 0..T decides T's top-R, so nothing after t0 does.
  std::vector<float> running(remote.size(), -std::numeric_limits<float>::infinity());
  for (std::int64_t t = 0; t < tiles; ++t) {
    const TileGeometry g = tile_geometry(L, opt, t);
    tile_query(L, opt, p.queries, t, q.data());
    best.clear();
    for (std::size_t i = 0; i < remote.size(); ++i) {
      running[i] = std::max(running[i], summary_score(opt.score, q.data(), p.coarse, remote[i], d));
      if (g.block_eligible(remote[i], L.block_keys())) best.push(running[i], remote[i]);
    }
    const std::size_t tile_begin = out.usable.size();
    for (const Scored& s : best.items()) {
      bool fetched = std::find(out.fetch.begin(), out.fetch.end(), s.index) != out.fetch.end();
      if (!fetched && static_cast<int>(out.fetch.size()) < opt.remote_cap) {
        out.fetch.push_back(s.index);
        fetched = true;
      }
      if (fetched) out.usable.push_back(s.index);
    }
    std::sort(out.usable.begin() + static_cast<std::ptrdiff_t>(tile_begin), out.usable.end());
    out.usable_offsets.push_back(static_cast<std::int64_t>(out.usable.size()));
  }
  return out;
}

ClusteredSelection select_pages(const SelectionParams& p) {
  const ClusteredLayout& L = *p.layout;
  const SelectionOptions& opt = p.options;
  const int d = p.queries.head_dim;
  const bool rows = opt.unit == SelectUnit::kRow;
  const std::int64_t tiles = L.num_tiles();
  const std::int64_t units = rows ? L.n_loc : tiles;
  const std::size_t k = static_cast<std::size_t>(opt.top_k);
  const std::size_t ck = static_cast<std::size_t>(opt.coarse_k);
  // Fixed slots per unit, compacted below.
  std::vector<std::int32_t> page_slots(static_cast<std::size_t>(units) * k);
  std::vector<std::int64_t> block_slots(static_cast<std::size_t>(units) * ck);
  std::vector<std::int32_t> page_counts(static_cast<std::size_t>(units));
  std::vector<std::int32_t> block_counts(static_cast<std::size_t>(units));

#pragma omp parallel
  {
    std::vector<float> q(static_cast<std::size_t>(d));
    TopK coarse(opt.coarse_k);
    TopK fine(opt.top_k);
    std::vector<std::int64_t> chosen;
    std::vector<std::pair<std::int64_t, std::int32_t>> picked;  // (global page, pool page)
#pragma omp for schedule(dynamic)
    for (std::int64_t tile = 0; tile < tiles; ++tile) {
      const TileCandidates cand = tile_candidates(p, tile);
      const std::int64_t u0 = rows ? tile * kQueryTile : tile;
      const std::int64_t u1 = rows ? std::min((tile + 1) * kQueryTile, L.n_loc) : tile + 1;
      for (std::int64_t u = u0; u < u1; ++u) {
        if (rows) {
          selection_query(p.queries, u, u, q.data());
        } else {
          tile_query(L, opt, p.queries, tile, q.data());
        }
        coarse.clear();
        for (const std::int64_t b : cand.blocks) coarse.push(summary_score(opt.score, q.data(), p.coarse, b, d), b);
        chosen.clear();
        for (const Scored& s : coarse.items()) chosen.push_back(s.index);
        std::sort(chosen.begin(), chosen.end());
        fine.clear();
        for (const std::int64_t b : chosen) {
          for (std::int64_t page = b * L.coarse_pages; page < (b + 1) * L.coarse_pages; ++page) {
            fine.push(summary_score(opt.score, q.data(), p.pages, L.page_pool_page(page), d), page);
          }
        }
        for (const std::int64_t page : cand.pages) {
          fine.push(summary_score(opt.score, q.data(), p.pages, L.page_pool_page(page), d), page);
        }
        picked.clear();
        for (const Scored& s : fine.items()) {
          picked.emplace_back(s.index, static_cast<std::int32_t>(L.page_pool_page(s.index)));
        }
        std::sort(picked.begin(), picked.end());
        const std::size_t su = static_cast<std::size_t>(u);
        for (std::size_t i = 0; i < picked.size(); ++i) page_slots[su * k + i] = picked[i].second;
        std::copy(chosen.begin(), chosen.end(), block_slots.begin() + static_cast<std::ptrdiff_t>(su * ck));
        page_counts[su] = static_cast<std::int32_t>(picked.size());
        block_counts[su] = static_cast<std::int32_t>(chosen.size());
      }
    }
  }

  ClusteredSelection out;
  out.unit = opt.unit;
  for (std::size_t u = 0; u < static_cast<std::size_t>(units); ++u) {
    out.pages.insert(out.pages.end(), page_slots.begin() + static_cast<std::ptrdiff_t>(u * k),
                     page_slots.begin() + static_cast<std::ptrdiff_t>(u * k + page_counts[u]));
    out.blocks.insert(out.blocks.end(), block_slots.begin() + static_cast<std::ptrdiff_t>(u * ck),
                      block_slots.begin() + static_cast<std::ptrdiff_t>(u * ck + block_counts[u]));
    out.page_offsets.push_back(static_cast<std::int64_t>(out.pages.size()));
    out.block_offsets.push_back(static_cast<std::int64_t>(out.blocks.size()));
  }
  return out;
}

}  // namespace ringcast::kernels::cpu
