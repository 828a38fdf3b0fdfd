// CUDA selection of the clustered mode (select_remote_blocks, select_pages) against the CPU backend
// on the same inputs, one rank of P simulated as in tests/selection/clustered_pipeline.hpp; the block
// tables built from both; and the device-resident path (selection_device.hpp: slots, the table built
// on the device and its transpose) against the host functions. Two kinds of inputs:
//  - exact: small integers (per-page bases plus noise, planted duplicate pages and blocks), so that
//    every summary, selection query and score is exactly representable in fp32 whatever the order of
//    summation (each configuration's bit budget is asserted): CPU and GPU must agree exactly, ties
//    included (ties go to the lower global index);
//  - generic: normal draws rounded to bf16, where the backends sum a score in different orders: a
//    unit may differ only by swapping candidates whose float64 scores tie within fp32 rounding.
// Failures print the unit, both choices and the float64 scores of the candidates they disagree on.
#include <ringcast/error.hpp>
#include <ringcast/kernels/cast.hpp>
#include <ringcast/kernels/block_table.hpp>
#include <ringcast/kernels/selection.hpp>
#include <ringcast/kernels/selection_device.hpp>

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <random>
#include <sstream>
#include <string>
#include <type_traits>
#include <vector>

#include "attention_reference.hpp"
#include "clustered_pipeline.hpp"
#include "device_array.hpp"

namespace ringcast::test {
namespace {

using namespace kernels;

constexpr int kPageSize = 64;  // unless a configuration says otherwise

struct Config {
  std::string label;
  std::int64_t n;
  int heads, kv_heads, head_dim, coarse_pages;
  int ranks, rank;
  SelectionOptions opt;
  int amp = 0;  // exact inputs: integers in [-amp, amp]; 0: generic (bf16 normals)
  bool identical_keys = false;
  int page_size = kPageSize;
};

SelectionOptions options(bool causal, SelectUnit unit, SelectScore score, int top_k, int coarse_k, int window,
                         int remote_blocks, int remote_cap) {
  SelectionOptions o;
  o.causal = causal;
  o.unit = unit;
  o.score = score;
  o.top_k = top_k;
  o.coarse_k = coarse_k;
  o.window = window;
  o.remote_blocks = remote_blocks;
  o.remote_cap = remote_cap;
  return o;
}

// Bits that every partial sum of a score needs to be exact: |partial| <= d * (amp * G) * amp on the
// grid of the query (1 for a row; 1/128 for a tile's mean of 128 rows) times that of the summaries
// (1 for minima and maxima of integers; 1/(page_size * coarse_pages), a power of two, for means).
int exact_bits(const Config& c) {
  const double group = double(c.heads) / c.kv_heads;
  const double max_sum = double(c.head_dim) * c.amp * group * c.amp;
  const double grid_q = c.opt.unit == SelectUnit::kRow ? 1.0 : 1.0 / kQueryTile;
  const double grid_s = c.opt.score == SelectScore::kBound ? 1.0 : 1.0 / (double(c.page_size) * c.coarse_pages);
  return static_cast<int>(std::ceil(std::log2(max_sum / (grid_q * grid_s))));
}

ClusteredProblem make_problem(const Config& c, std::uint64_t seed) {
  ClusteredProblem pr;
  pr.n = c.n;
  pr.heads = c.heads;
  pr.kv_heads = c.kv_heads;
  pr.head_dim = c.head_dim;
  pr.page_size = c.page_size;
  pr.coarse_pages = c.coarse_pages;
  const auto nq = static_cast<std::size_t>(c.n * c.heads * c.head_dim);
  const auto row = static_cast<std::size_t>(c.kv_heads * c.head_dim);  // one position of K or V
  const std::size_t nk = static_cast<std::size_t>(c.n) * row;
  if (c.amp == 0) {
    pr.q = bf16_values(random_normal(nq, seed));
    pr.k = bf16_values(random_normal(nk, seed + 1));
    pr.v = bf16_values(random_normal(nk, seed + 2));
  } else {
    std::mt19937_64 rng(seed);
    std::uniform_int_distribution<int> value(-c.amp, c.amp), base(-(c.amp - 1), c.amp - 1), noise(-1, 1);
    pr.q.resize(nq);
    for (float& x : pr.q) x = float(value(rng));
    pr.v.resize(nk);
    for (float& x : pr.v) x = float(value(rng));
    // Keys vary around a per-page base, so pages and blocks have distinct bounds and means.
    pr.k.resize(nk);
    std::vector<int> page_base(row);
    for (std::int64_t pos = 0; pos < c.n; ++pos) {
      if (pos % c.page_size == 0) {
        for (int& b : page_base) b = base(rng);
      }
      for (std::size_t x = 0; x < row; ++x) {
        pr.k[pos * row + x] = float(std::clamp(page_base[x] + noise(rng), -c.amp, c.amp));
      }
    }
    // Planted ties: page 9 repeats page 5, block 2 repeats block 0 (identical summaries).
    const auto copy_keys = [&](std::int64_t from, std::int64_t to, std::int64_t count) {
      if (to + count <= c.n) std::copy_n(pr.k.begin() + from * row, count * row, pr.k.begin() + to * row);
    };
    copy_keys(5 * c.page_size, 9 * c.page_size, c.page_size);
    const std::int64_t block_keys = std::int64_t{c.page_size} * c.coarse_pages;
    copy_keys(0, 2 * block_keys, block_keys);
  }
  if (c.identical_keys) {  // every score ties: the lower index wins everywhere
    for (std::size_t x = 0; x < nk; ++x) pr.k[x] = pr.k[x % row];
  }
  return pr;
}

// One KV head's summary rows on the device: coarse [num_blocks, d], pages [resident_pages, d].
struct DeviceRows {
  DeviceArray<float> mean, min, max;
  DeviceRows(const std::vector<float>& mean_rows, const std::vector<float>& min_rows,
             const std::vector<float>& max_rows)
      : mean(mean_rows), min(min_rows), max(max_rows) {}
  SummaryRows view() const { return {mean.get(), min.get(), max.get()}; }
};

struct HostRows {
  std::vector<float> mean, min, max;
  SummaryRows view() const { return {mean.data(), min.data(), max.data()}; }
};

// The coarse rows of KV head g (the whole sequence), from the [kv_heads, rows, d] pools.
HostRows coarse_rows(const GlobalSummaries& gs, int g) {
  const auto rows = [&](const std::vector<float>& pool) {
    const float* first = gs.block_row(pool, g, 0);
    return std::vector<float>(first, first + gs.shape.num_blocks() * gs.shape.head_dim);
  };
  return {rows(gs.block_mean_k), rows(gs.block_min), rows(gs.block_max)};
}

// The page rows of KV head g in pool order; padding slots of the fetched region hold NaN (never read).
HostRows page_rows(const GlobalSummaries& gs, const ClusteredLayout& L, int g) {
  const int d = gs.shape.head_dim;
  HostRows r;
  for (std::vector<float>* v : {&r.mean, &r.min, &r.max}) {
    v->assign(static_cast<std::size_t>(L.resident_pages() * d), std::numeric_limits<float>::quiet_NaN());
  }
  for (std::int64_t pp = 0; pp < L.resident_pages(); ++pp) {
    const std::int64_t gp = L.pool_page_global(pp);
    if (gp < 0) continue;
    std::copy_n(gs.page_row(gs.page_mean_k, g, gp), d, r.mean.begin() + pp * d);
    std::copy_n(gs.page_row(gs.page_min, g, gp), d, r.min.begin() + pp * d);
    std::copy_n(gs.page_row(gs.page_max, g, gp), d, r.max.begin() + pp * d);
  }
  return r;
}

// float64 selection query of unit u (selection.hpp), and a score with the size of its terms.
std::vector<double> unit_query(const Config& c, const std::vector<float>& q_loc, std::int64_t n_loc, std::int64_t u,
                               int g) {
  const bool rows = c.opt.unit == SelectUnit::kRow;
  const std::int64_t r0 = rows ? u : u * kQueryTile;
  const std::int64_t lo = rows ? u : c.opt.causal ? std::max<std::int64_t>(0, r0 - (kQueryTile - 1)) : r0;
  const std::int64_t hi = rows || c.opt.causal ? r0 : std::min(r0 + kQueryTile, n_loc) - 1;
  const int d = c.head_dim, group = c.heads / c.kv_heads;
  std::vector<double> q(static_cast<std::size_t>(d), 0.0);
  for (std::int64_t r = lo; r <= hi; ++r)
    for (int h = g * group; h < (g + 1) * group; ++h)
      for (int ch = 0; ch < d; ++ch) q[ch] += q_loc[static_cast<std::size_t>((r * c.heads + h) * d + ch)];
  for (double& x : q) x /= double(hi - lo + 1);
  return q;
}

struct Score {
  double value, magnitude;  // the score, and the sum of its terms' absolute values
};
Score score64(const std::vector<double>& q, const HostRows& rows, std::int64_t row, bool bound) {
  Score s{0.0, 0.0};
  const std::size_t at = static_cast<std::size_t>(row) * q.size();
  for (std::size_t ch = 0; ch < q.size(); ++ch) {
    const double t = bound ? std::max(q[ch] * rows.max[at + ch], q[ch] * rows.min[at + ch]) : q[ch] * rows.mean[at + ch];
    s.value += t;
    s.magnitude += std::abs(t);
  }
  return s;
}

template <typename T>
std::string list(const std::vector<T>& v) {
  std::ostringstream os;
  os << '{';
  for (std::size_t i = 0; i < v.size(); ++i) os << (i ? " " : "") << v[i];
  os << '}';
  return os.str();
}

template <typename T>
std::vector<T> minus(const std::vector<T>& a, const std::vector<T>& b) {
  std::vector<T> out;
  for (const T& x : a) {
    if (std::find(b.begin(), b.end(), x) == b.end()) out.push_back(x);
  }
  return out;
}

// Compares the selections of KV head g unit by unit. Exact inputs: any difference fails. Generic
// inputs: the candidates one backend kept and the other did not must all score within fp32 rounding
// of each other in float64 (pages are compared only where the coarse blocks agree). Returns the
// number of units that differ by such near-ties.
int compare_selections(const Config& c, const std::vector<float>& q_loc, const ClusteredLayout& L, int g,
                       const HostRows& coarse, const HostRows& pages, const ClusteredSelection& cpu,
                       const ClusteredSelection& gpu) {
  const std::int64_t units = c.opt.unit == SelectUnit::kRow ? L.n_loc : L.num_tiles();
  EXPECT_EQ(gpu.unit, cpu.unit) << c.label;
  if (gpu.page_offsets.size() != std::size_t(units) + 1 || gpu.block_offsets.size() != std::size_t(units) + 1) {
    ADD_FAILURE() << c.label << ": KV head " << g << ": the CUDA selection has " << gpu.page_offsets.size() - 1
                  << " page units and " << gpu.block_offsets.size() - 1 << " block units, expected " << units;
    return 0;
  }
  const bool bound = c.opt.score == SelectScore::kBound;
  int failures = 0, near_ties = 0;
  for (std::int64_t u = 0; u < units; ++u) {
    const auto slice = [u](const auto& offsets, const auto& values) {
      using T = typename std::decay_t<decltype(values)>::value_type;
      return std::vector<T>(values.begin() + offsets[u], values.begin() + offsets[u + 1]);
    };
    const std::vector<std::int32_t> cpu_pages = slice(cpu.page_offsets, cpu.pages);
    const std::vector<std::int32_t> gpu_pages = slice(gpu.page_offsets, gpu.pages);
    const std::vector<std::int64_t> cpu_blocks = slice(cpu.block_offsets, cpu.blocks);
    const std::vector<std::int64_t> gpu_blocks = slice(gpu.block_offsets, gpu.blocks);
    if (cpu_pages == gpu_pages && cpu_blocks == gpu_blocks) continue;

    const std::vector<double> q = unit_query(c, q_loc, L.n_loc, u, g);
    std::ostringstream why;
    why << c.label << ": KV head " << g << " unit " << u << ": CPU pool pages " << list(cpu_pages) << " blocks "
        << list(cpu_blocks) << ", CUDA pool pages " << list(gpu_pages) << " blocks " << list(gpu_blocks)
        << "; float64 scores of the disputed candidates:";
    double lo = INFINITY, hi = -INFINITY, magnitude = 0.0;
    const auto dispute = [&](const char* kind, std::int64_t id, const HostRows& rows, std::int64_t row) {
      const Score s = score64(q, rows, row, bound);
      lo = std::min(lo, s.value);
      hi = std::max(hi, s.value);
      magnitude = std::max(magnitude, s.magnitude);
      why << ' ' << kind << id << '=' << s.value;
    };
    if (cpu_blocks != gpu_blocks) {
      for (const std::int64_t b : minus(cpu_blocks, gpu_blocks)) dispute("block ", b, coarse, b);
      for (const std::int64_t b : minus(gpu_blocks, cpu_blocks)) dispute("block ", b, coarse, b);
    } else {
      for (const std::int32_t p : minus(cpu_pages, gpu_pages)) dispute("pool page ", p, pages, p);
      for (const std::int32_t p : minus(gpu_pages, cpu_pages)) dispute("pool page ", p, pages, p);
    }
    // fp32 sums of d terms err by at most ~d * 2^-24 of the terms' absolute sum; 1e-5 covers d <= 167.
    const bool near_tie = c.amp == 0 && hi - lo <= 1e-5 * magnitude;
    if (near_tie) {
      ++near_ties;
    } else if (failures++ < 4) {
      ADD_FAILURE() << why.str() << (c.amp == 0 ? " (not a tie within rounding)" : " (exact inputs: no difference allowed)");
    }
  }
  EXPECT_EQ(failures, 0) << c.label << ": KV head " << g << ": " << failures << " of " << units << " units differ";
  return near_ties;
}

void expect_same_tables(const std::string& what, const HostBlockTable& a, const HostBlockTable& b) {
  EXPECT_EQ(a.offsets, b.offsets) << what << ": table offsets";
  ASSERT_EQ(a.entries.size(), b.entries.size()) << what << ": table entries";
  ASSERT_EQ(a.key_meta.size(), b.key_meta.size()) << what << ": KeyMeta records";
  for (std::size_t i = 0; i < a.entries.size(); ++i) {
    if (std::memcmp(&a.entries[i], &b.entries[i], sizeof(BlockEntry)) != 0) {
      ADD_FAILURE() << what << ": table entry " << i << " differs (page " << a.entries[i].page << " vs "
                    << b.entries[i].page << ")";
      return;
    }
  }
  EXPECT_EQ(std::memcmp(a.key_meta.data(), b.key_meta.data(), a.key_meta.size() * sizeof(KeyMeta)), 0)
      << what << ": KeyMeta records differ";
}

// select_pages_to_slots output of one KV head, poisoned first.
struct DeviceSlots {
  std::int64_t units;
  DeviceArray<std::int32_t> pages;
  DeviceArray<std::int64_t> blocks;
  DeviceArray<std::int32_t> counts;
  DeviceSlots(const SelectionParams& sp, const SelectionOptions& o)
      : units(o.unit == SelectUnit::kRow ? sp.layout->n_loc : sp.layout->num_tiles()),
        pages(static_cast<std::size_t>(units * o.top_k)),
        blocks(static_cast<std::size_t>(units * o.coarse_k)),
        counts(static_cast<std::size_t>(2 * units)) {}
  SelectionSlots view() const { return {pages.get(), blocks.get(), counts.get()}; }
};

// The slots compacted in unit order must be the host-returning CUDA selection.
void expect_slots_hold(const std::string& what, const DeviceSlots& slots, const ClusteredSelection& sel,
                       const SelectionOptions& o) {
  const std::vector<std::int32_t> pages = slots.pages.download(), counts = slots.counts.download();
  const std::vector<std::int64_t> blocks = slots.blocks.download();
  ClusteredSelection got;
  for (std::int64_t u = 0; u < slots.units; ++u) {
    got.pages.insert(got.pages.end(), pages.begin() + u * o.top_k, pages.begin() + u * o.top_k + counts[2 * u]);
    got.blocks.insert(got.blocks.end(), blocks.begin() + u * o.coarse_k,
                      blocks.begin() + u * o.coarse_k + counts[2 * u + 1]);
    got.page_offsets.push_back(std::int64_t(got.pages.size()));
    got.block_offsets.push_back(std::int64_t(got.blocks.size()));
  }
  EXPECT_EQ(got.page_offsets, sel.page_offsets) << what << ": slot page counts";
  EXPECT_EQ(got.pages, sel.pages) << what << ": slot pages";
  EXPECT_EQ(got.block_offsets, sel.block_offsets) << what << ": slot block counts";
  EXPECT_EQ(got.blocks, sel.blocks) << what << ": slot blocks";
}

// build_clustered_table_on_device from the slots must be `expected` (the host build from the same
// selections): sizes first (no room), then the entries; and its transpose that of transpose().
void expect_device_tables(const std::string& what, const std::vector<ClusteredLayout>& layouts,
                          const SelectionOptions& o, const std::vector<SelectionSlots>& slots,
                          const HostBlockTable& expected, const AttentionShape& shape) {
  DeviceArray<std::int64_t> offsets(expected.offsets.size());
  const TableSize size = build_clustered_table_on_device(layouts, o, slots, {offsets.get()}, cuda_context());
  ASSERT_EQ(size.entries, std::int64_t(expected.entries.size())) << what << ": device table entries";
  ASSERT_EQ(size.key_meta, std::int64_t(expected.key_meta.size())) << what << ": device table KeyMeta records";
  EXPECT_EQ(offsets.download(), expected.offsets) << what << ": device table offsets (sizing call)";
  DeviceArray<BlockEntry> entries(expected.entries.size());
  DeviceArray<KeyMeta> key_meta(expected.key_meta.size());
  const TableSize again = build_clustered_table_on_device(
      layouts, o, slots, {offsets.get(), entries.get(), size.entries, key_meta.get(), size.key_meta}, cuda_context());
  EXPECT_EQ(again.entries, size.entries) << what;
  HostBlockTable got;
  got.offsets = offsets.download();
  got.entries = entries.download();
  got.key_meta = key_meta.download();
  expect_same_tables(what + " (device table)", expected, got);

  const HostTransposedTable t = transpose(expected, shape);
  DeviceArray<std::int64_t> t_offsets(t.offsets.size());
  DeviceArray<PageRef> refs(t.refs.size());
  const BlockTable view{offsets.get(), entries.get(), size.key_meta > 0 ? key_meta.get() : nullptr, size.entries};
  transpose_on_device(view, shape, t_offsets.get(), refs.get(), cuda_context());
  EXPECT_EQ(t_offsets.download(), t.offsets) << what << ": device transpose offsets";
  const std::vector<PageRef> got_refs = refs.download();
  EXPECT_EQ(std::memcmp(got_refs.data(), t.refs.data(), t.refs.size() * sizeof(PageRef)), 0)
      << what << ": device transpose refs";
}

// One configuration: top-R (compared on exact inputs), then selection and tables over the CPU's
// top-R, so both backends select over the same pools.
void run_config(const Config& c, std::uint64_t seed) {
  SCOPED_TRACE(c.label);
  const bool exact = c.amp > 0;
  if (exact) {
    ASSERT_TRUE(c.opt.score == SelectScore::kBound || (c.coarse_pages & (c.coarse_pages - 1)) == 0)
        << "coarse means of a block whose page count is not a power of two are not exact";
    ASSERT_LE(exact_bits(c), 24) << "the inputs of an exact configuration must keep every score exact in fp32";
  }
  const ClusteredProblem pr = make_problem(c, seed);
  const GlobalSummaries gs(pr);
  const std::int64_t n_loc = c.n / c.ranks;
  const std::vector<float> q_loc = local_queries(pr, c.rank * n_loc, n_loc);
  const DeviceArray<float> q_dev(q_loc);

  ClusteredLayout base;
  base.page_size = c.page_size;
  base.coarse_pages = c.coarse_pages;
  base.n = c.n;
  base.first_pos = c.rank * n_loc;
  base.n_loc = n_loc;
  base.halo_before = c.rank > 0 ? base.first_block() - 1 : -1;
  base.halo_after = !c.opt.causal && c.rank + 1 < c.ranks ? base.first_block() + base.local_blocks() : -1;

  std::vector<RemoteSelection> remote;
  std::int64_t capacity = 0;
  for (int g = 0; g < c.kv_heads; ++g) {
    const HostRows coarse = coarse_rows(gs, g);
    const DeviceRows coarse_dev(coarse.mean, coarse.min, coarse.max);
    const SelectionQueries hq{q_loc.data(), c.heads, c.kv_heads, c.head_dim, g};
    const SelectionQueries dq{q_dev.get(), c.heads, c.kv_heads, c.head_dim, g};
    remote.push_back(select_remote_blocks({&base, c.opt, hq, coarse.view()}, {}));
    capacity = std::max<std::int64_t>(capacity, std::int64_t(remote.back().fetch.size()));
    const RemoteSelection gpu = select_remote_blocks({&base, c.opt, dq, coarse_dev.view()}, cuda_context());
    if (!exact) continue;
    const RemoteSelection& cpu = remote.back();
    EXPECT_EQ(gpu.fetch, cpu.fetch) << c.label << ": fetch list of KV head " << g;
    EXPECT_EQ(gpu.usable_offsets, cpu.usable_offsets) << c.label << ": usable offsets of KV head " << g;
    EXPECT_EQ(gpu.usable, cpu.usable) << c.label << ": usable blocks of KV head " << g;
  }

  std::vector<ClusteredLayout> layouts;
  std::vector<ClusteredSelection> cpu_sel, gpu_sel;
  std::vector<std::unique_ptr<DeviceSlots>> slots;
  int near_ties = 0;
  for (int g = 0; g < c.kv_heads; ++g) {
    ClusteredLayout L = base;
    L.fetched = remote[g].fetch;
    L.fetch_capacity = capacity;
    layouts.push_back(L);
  }
  for (int g = 0; g < c.kv_heads; ++g) {
    const ClusteredLayout& L = layouts[g];
    const HostRows coarse = coarse_rows(gs, g);
    const HostRows pages = page_rows(gs, L, g);
    const DeviceRows coarse_dev(coarse.mean, coarse.min, coarse.max), pages_dev(pages.mean, pages.min, pages.max);
    SelectionParams sp;
    sp.layout = &L;
    sp.options = c.opt;
    sp.queries = {q_loc.data(), c.heads, c.kv_heads, c.head_dim, g};
    sp.coarse = coarse.view();
    sp.pages = pages.view();
    sp.usable_offsets = remote[g].usable_offsets;
    sp.usable = remote[g].usable;
    cpu_sel.push_back(select_pages(sp, {}));
    sp.queries.q = q_dev.get();
    sp.coarse = coarse_dev.view();
    sp.pages = pages_dev.view();
    gpu_sel.push_back(select_pages(sp, cuda_context()));
    near_ties += compare_selections(c, q_loc, L, g, coarse, pages, cpu_sel.back(), gpu_sel.back());
    slots.push_back(std::make_unique<DeviceSlots>(sp, c.opt));
    select_pages_to_slots(sp, slots.back()->view(), cuda_context());
    expect_slots_hold(c.label + ": KV head " + std::to_string(g), *slots.back(), gpu_sel.back(), c.opt);
  }
  if (!exact) std::printf("    %-52s %d unit(s) differ by float64 near-ties\n", c.label.c_str(), near_ties);
  const HostBlockTable gpu_table = build_clustered_table(layouts, c.opt, gpu_sel);
  if (near_ties == 0) expect_same_tables(c.label, build_clustered_table(layouts, c.opt, cpu_sel), gpu_table);
  std::vector<SelectionSlots> views;
  for (const auto& s : slots) views.push_back(s->view());
  AttentionShape shape;
  shape.seq_q = n_loc;
  shape.heads = c.heads;
  shape.kv_heads = c.kv_heads;
  shape.head_dim = c.head_dim;
  shape.page_size = c.page_size;
  shape.num_pages = layouts.front().num_pages();
  expect_device_tables(c.label, layouts, c.opt, views, gpu_table, shape);
  // The grouped row order of GQA with per-row selection (SelectionOptions::rows_per_token): the same
  // selections, each token's G heads as consecutive rows of 128 / G-token tiles.
  const int group = c.heads / c.kv_heads;
  if (c.opt.unit == SelectUnit::kRow && group > 1 && (group & (group - 1)) == 0) {
    SelectionOptions grouped = c.opt;
    grouped.rows_per_token = group;
    shape.seq_q = n_loc * group;
    shape.heads = c.kv_heads;
    expect_device_tables(c.label + " grouped rows", layouts, grouped, views,
                         build_clustered_table(layouts, grouped, gpu_sel), shape);
  }
}

constexpr SelectUnit kRow = SelectUnit::kRow;
constexpr SelectUnit kTile = SelectUnit::kTile;
constexpr SelectScore kBound = SelectScore::kBound;
constexpr SelectScore kMean = SelectScore::kMean;

TEST(SelectionGpu, ExactInputsMatchCpuIncludingTies) {
  RINGCAST_SKIP_WITHOUT_CUDA();
  const Config configs[] = {
      {"causal row bound P4 r3 d128 G4", 4096, 8, 2, 128, 4, 4, 3, options(true, kRow, kBound, 5, 2, 256, 2, 3), 4},
      {"causal tile bound P4 r3 d128 G4", 4096, 8, 2, 128, 4, 4, 3, options(true, kTile, kBound, 5, 2, 256, 2, 3), 4},
      {"bidir row bound P4 r1 (two halos)", 4096, 8, 2, 128, 4, 4, 1, options(false, kRow, kBound, 5, 2, 256, 2, 3),
       4},
      {"bidir tile bound P4 r1 (two halos)", 4096, 8, 2, 128, 4, 4, 1,
       options(false, kTile, kBound, 5, 2, 256, 2, 3), 4},
      {"causal row mean P4 r2", 4096, 8, 2, 128, 4, 4, 2, options(true, kRow, kMean, 5, 2, 128, 2, 3), 4},
      {"bidir tile mean P3 r1 d40 G3", 3072, 6, 2, 40, 4, 3, 1, options(false, kTile, kMean, 7, 2, 200, 2, 3), 2},
      {"bidir row bound top_k 40 coarse_k 3 d200 G3", 3072, 6, 2, 200, 4, 3, 2,
       options(false, kRow, kBound, 40, 3, 256, 3, 3), 4},
      {"causal tile bound top_k 100 coarse_k 32 d64", 4096, 2, 2, 64, 4, 1, 0,
       options(true, kTile, kBound, 100, 32, 256, 0, 0), 4},
      {"causal row bound empty selection", 2048, 4, 2, 64, 4, 2, 1, options(true, kRow, kBound, 0, 0, 256, 0, 0), 4},
      {"causal row bound one block", 256, 4, 1, 32, 4, 1, 0, options(true, kRow, kBound, 3, 1, 64, 2, 2), 4},
      {"causal tile bound window 0", 2048, 4, 2, 64, 4, 2, 1, options(true, kTile, kBound, 6, 2, 0, 2, 2), 4},
      {"causal row bound all keys identical", 2048, 4, 1, 64, 4, 2, 1, options(true, kRow, kBound, 6, 2, 256, 2, 2),
       4, true},
      {"causal row bound 64 x 16 blocks P4 r2", 16384, 8, 2, 128, 16, 4, 2,
       options(true, kRow, kBound, 16, 4, 256, 4, 8), 4},
      {"causal tile bound 64 x 16 blocks P4 r3", 16384, 8, 2, 128, 16, 4, 3,
       options(true, kTile, kBound, 16, 4, 512, 4, 8), 4},
      // Pages of 16 in blocks of 2: shards that end in a partial tile of 96 or 32 rows (row masks with
      // and without a high word). Tile units only where causal: a partial tile's own mean is not exact.
      {"causal row bound pages of 16, last tile 96 rows", 448, 4, 2, 64, 2, 2, 1,
       options(true, kRow, kBound, 6, 2, 32, 2, 3), 4, false, 16},
      {"causal tile bound pages of 16, last tile 96 rows", 448, 4, 2, 64, 2, 2, 1,
       options(true, kTile, kBound, 6, 2, 32, 2, 3), 4, false, 16},
      {"bidir row mean pages of 16, last tile 32 rows P3 r1", 480, 6, 2, 40, 2, 3, 1,
       options(false, kRow, kMean, 5, 2, 32, 2, 3), 4, false, 16},
  };
  std::uint64_t seed = 1000;
  for (const Config& c : configs) run_config(c, seed++);
}

TEST(SelectionGpu, GenericInputsDifferOnlyByNearTies) {
  RINGCAST_SKIP_WITHOUT_CUDA();
  const Config configs[] = {
      {"generic causal row bound P2 r1 d128", 8192, 8, 2, 128, 16, 2, 1, options(true, kRow, kBound, 16, 4, 256, 2, 4)},
      {"generic bidir tile mean P4 r1 d128", 8192, 8, 2, 128, 16, 4, 1, options(false, kTile, kMean, 16, 4, 512, 2, 4)},
      {"generic causal row mean P1 d64 G1", 4096, 3, 3, 64, 4, 1, 0, options(true, kRow, kMean, 8, 3, 256, 0, 0)},
  };
  std::uint64_t seed = 2000;
  for (const Config& c : configs) run_config(c, seed++);
}

TEST(SelectionGpu, RepeatedCallsAgreeBitwise) {
  RINGCAST_SKIP_WITHOUT_CUDA();
  Config c{"repeat", 4096, 8, 2, 128, 4, 2, 1, options(true, kRow, kBound, 16, 4, 256, 2, 4)};
  const ClusteredProblem pr = make_problem(c, 3000);  // generic inputs: scores are not exact
  const GlobalSummaries gs(pr);
  ClusteredLayout L;
  L.coarse_pages = c.coarse_pages;
  L.n = c.n;
  L.n_loc = c.n;
  const HostRows coarse = coarse_rows(gs, 1);
  const HostRows pages = page_rows(gs, L, 1);
  const DeviceRows coarse_dev(coarse.mean, coarse.min, coarse.max), pages_dev(pages.mean, pages.min, pages.max);
  const DeviceArray<float> q_dev(pr.q);
  SelectionParams sp;
  sp.layout = &L;
  sp.options = c.opt;
  sp.queries = {q_dev.get(), c.heads, c.kv_heads, c.head_dim, 1};
  sp.coarse = coarse_dev.view();
  sp.pages = pages_dev.view();
  const ClusteredSelection first = select_pages(sp, cuda_context());
  for (int i = 0; i < 3; ++i) {
    const ClusteredSelection again = select_pages(sp, cuda_context());
    EXPECT_EQ(again.pages, first.pages);
    EXPECT_EQ(again.page_offsets, first.page_offsets);
    EXPECT_EQ(again.blocks, first.blocks);
  }
}

TEST(SelectionGpu, RejectsWhatTheCudaBackendDoesNotHold) {
  RINGCAST_SKIP_WITHOUT_CUDA();
  ClusteredLayout L;
  L.coarse_pages = 4;
  L.n = L.n_loc = 1024;
  const DeviceArray<float> buf(std::size_t{1} << 16);
  SelectionParams sp;
  sp.layout = &L;
  sp.queries = {buf.get(), 2, 1, 64, 0};
  sp.coarse = sp.pages = {buf.get(), buf.get(), buf.get()};
  const auto expect_error = [](const auto& call, const std::string& needle) {
    try {
      call();
      ADD_FAILURE() << "no error; expected \"" << needle << "\"";
    } catch (const Error& e) {
      EXPECT_NE(e.message().find(needle), std::string::npos) << e.message();
    }
  };
  SelectionParams p = sp;
  p.options.top_k = 129;
  expect_error([&] { select_pages(p, cuda_context()); }, "top_k 129 (at most 128)");
  p = sp;
  p.options.coarse_k = 33;
  expect_error([&] { select_pages(p, cuda_context()); }, "is not supported");
  p = sp;
  p.queries.head_dim = 257;
  expect_error([&] { select_pages(p, cuda_context()); }, "head_dim 257 (at most 256)");
  RemoteSelectionParams rp{&L, sp.options, sp.queries, sp.coarse};
  rp.options.remote_blocks = 33;
  expect_error([&] { select_remote_blocks(rp, cuda_context()); }, "remote_blocks 33 (at most 32)");
  // The device-resident calls have no CPU backend.
  const DeviceArray<std::int32_t> page_slots(8 * 16), counts(2 * 8);
  const DeviceArray<std::int64_t> block_slots(8 * 4);
  expect_error([&] { select_pages_to_slots(sp, {page_slots.get(), block_slots.get(), counts.get()}, {}); },
               "not supported on the CPU backend (use select_pages)");
}

}  // namespace
}  // namespace ringcast::test
