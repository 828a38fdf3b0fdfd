// `ringcast bench kernels --pattern selection-tile|selection-row` (bench_kernels.hpp), CUDA builds only.
// One rank holding the whole causal sequence (no remote blocks), on the device-resident path of
// selection_device.hpp: page and coarse summaries of K/V, select_pages_to_slots per KV head (scoring
// fused with the top-k), the forward table built on the device from the slots, then the attention
// over that table. K, V and the selection queries are fp32 (the summaries' and selection's
// interface); the attention reads bf16 / f16 pools. The table build synchronizes to learn its size, so
// it is timed by wall clock; the rest with CUDA events.
#include "bench_device.hpp"

#include <ringcast/error.hpp>
#include <ringcast/kernels/block_table.hpp>
#include <ringcast/kernels/grouped_rows.hpp>
#include <ringcast/kernels/selection.hpp>
#include <ringcast/kernels/selection_device.hpp>
#include <ringcast/kernels/summaries.hpp>

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <optional>
#include <random>
#include <string>
#include <vector>

namespace ringcast::launch::bench {
namespace {

using kernels::AttentionShape;
using kernels::BlockEntry;
using kernels::HostBlockTable;

constexpr int kCoarsePages = 16;  // 1024-key coarse blocks (DESIGN.md §4.1)
constexpr int kCoarseK = 4;
constexpr int kWindow = 256;

kernels::SelectionOptions selection_options(const BenchKernelsOptions& opt) {
  kernels::SelectionOptions o;
  o.causal = true;
  o.unit = opt.pattern == "selection-row" ? kernels::SelectUnit::kRow : kernels::SelectUnit::kTile;
  // The clustered mode's row order: per-row selection runs the GQA group's heads as a tile's rows.
  if (o.unit == kernels::SelectUnit::kRow) o.rows_per_token = kernels::grouped_rows_per_token(opt.heads, opt.kv_heads);
  o.score = kernels::SelectScore::kBound;
  o.top_k = opt.k;
  o.coarse_k = kCoarseK;
  o.window = kWindow;
  return o;
}

kernels::ClusteredLayout single_rank_layout(std::int64_t n) {
  kernels::ClusteredLayout L;
  L.page_size = kPageSize;
  L.coarse_pages = kCoarsePages;
  L.n = L.n_loc = n;
  L.validate();
  return L;
}

// Page and coarse summaries of K, V [1, n, kv_heads, d] in one buffer per level: the fields mean K,
// mean V, min, max, each a [kv_heads, rows, d] pool, one after the other; counts beside.
struct SummaryBuffers {
  kernels::SummaryShape shape;
  std::size_t page_field, block_field;  // elements of one field
  float* pages;
  float* blocks;
  std::int32_t* page_counts;
  std::int32_t* block_counts;

  kernels::SummaryPools page_pools() const {
    return {pages, pages + page_field, pages + 2 * page_field, pages + 3 * page_field, page_counts};
  }
  kernels::SummaryPools block_pools() const {
    return {blocks, blocks + block_field, blocks + 2 * block_field, blocks + 3 * block_field, block_counts};
  }
  void compute(const float* k, const float* v, const kernels::ExecContext& ctx) const {
    const kernels::SummaryPools p = page_pools();
    kernels::page_summaries({shape, k, v, p}, ctx);
    kernels::coarse_summaries({shape, p.key_mean, p.value_mean, p.key_min, p.key_max, p.count, block_pools()}, ctx);
  }
  // KV head g's rows of a level, as select_pages reads them.
  kernels::SummaryRows rows(bool coarse, int g) const {
    const kernels::SummaryPools p = coarse ? block_pools() : page_pools();
    const std::int64_t at = g * (coarse ? shape.block_rows() : shape.page_rows()) * shape.head_dim;
    return {p.key_mean + at, p.key_min + at, p.key_max + at};
  }
};

kernels::SummaryShape summary_shape(std::int64_t n, int kv_heads, int head_dim) {
  return {1, n, kv_heads, head_dim, kPageSize, kCoarsePages};
}
std::size_t field_elems(const kernels::SummaryShape& s, std::int64_t rows) {
  return static_cast<std::size_t>(s.kv_heads * rows * s.head_dim);
}

// The summaries on the device.
struct DeviceSummaries {
  kernels::SummaryShape shape;
  DeviceArray pages, blocks, page_counts, block_counts;
  DeviceSummaries(std::int64_t n, int kv_heads, int head_dim)
      : shape(summary_shape(n, kv_heads, head_dim)),
        pages(4 * field_elems(shape, shape.page_rows()) * sizeof(float)),
        blocks(4 * field_elems(shape, shape.block_rows()) * sizeof(float)),
        page_counts(shape.num_pages() * sizeof(std::int32_t)),
        block_counts(shape.num_blocks() * sizeof(std::int32_t)) {}
  SummaryBuffers buffers() const {
    return {shape, field_elems(shape, shape.page_rows()), field_elems(shape, shape.block_rows()), pages.as<float>(),
            blocks.as<float>(), page_counts.as<std::int32_t>(), block_counts.as<std::int32_t>()};
  }
};

kernels::SelectionParams selection_params(const kernels::ClusteredLayout& L, const kernels::SelectionOptions& o,
                                          const float* q, int heads, int kv_heads, int head_dim,
                                          const SummaryBuffers& s, int g) {
  kernels::SelectionParams sp;
  sp.layout = &L;
  sp.options = o;
  sp.queries = {q, heads, kv_heads, head_dim, g};
  sp.coarse = s.rows(true, g);
  sp.pages = s.rows(false, g);
  return sp;
}

// Every KV head's selection slots on the device.
struct DeviceSelection {
  std::vector<kernels::SelectionParams> params;
  std::vector<DeviceArray> buffers;  // pages, blocks, counts per KV head
  std::vector<kernels::SelectionSlots> slots;

  DeviceSelection(const kernels::ClusteredLayout& L, const kernels::SelectionOptions& o, const float* q, int heads,
                  int kv_heads, int head_dim, const SummaryBuffers& s) {
    const std::int64_t units = o.unit == kernels::SelectUnit::kRow ? L.n_loc : L.num_tiles();
    for (int g = 0; g < kv_heads; ++g) {
      params.push_back(selection_params(L, o, q, heads, kv_heads, head_dim, s, g));
      buffers.emplace_back(units * o.top_k * sizeof(std::int32_t));
      buffers.emplace_back(units * o.coarse_k * sizeof(std::int64_t));
      buffers.emplace_back(2 * units * sizeof(std::int32_t));
    }
    for (int g = 0; g < kv_heads; ++g) {
      slots.push_back({buffers[3 * g].as<std::int32_t>(), buffers[3 * g + 1].as<std::int64_t>(),
                       buffers[3 * g + 2].as<std::int32_t>()});
    }
  }
  void run(const kernels::ExecContext& ctx) const {
    for (std::size_t g = 0; g < params.size(); ++g) kernels::select_pages_to_slots(params[g], slots[g], ctx);
  }
  // The selection of KV head g on the host (slots compacted in unit order).
  kernels::ClusteredSelection download(int g, const kernels::SelectionOptions& o) const {
    const std::vector<std::int32_t> pages = buffers[3 * g].download<std::int32_t>();
    const std::vector<std::int64_t> blocks = buffers[3 * g + 1].download<std::int64_t>();
    const std::vector<std::int32_t> counts = buffers[3 * g + 2].download<std::int32_t>();
    kernels::ClusteredSelection sel;
    sel.unit = o.unit;
    for (std::size_t u = 0; 2 * u < counts.size(); ++u) {
      sel.pages.insert(sel.pages.end(), pages.begin() + u * o.top_k, pages.begin() + u * o.top_k + counts[2 * u]);
      sel.blocks.insert(sel.blocks.end(), blocks.begin() + u * o.coarse_k,
                        blocks.begin() + u * o.coarse_k + counts[2 * u + 1]);
      sel.page_offsets.push_back(static_cast<std::int64_t>(sel.pages.size()));
      sel.block_offsets.push_back(static_cast<std::int64_t>(sel.blocks.size()));
    }
    return sel;
  }
};

// A forward table built on the device, its buffers sized by a first call.
struct DeviceTable {
  std::vector<kernels::ClusteredLayout> layouts;
  kernels::SelectionOptions options;
  DeviceArray offsets;
  std::optional<DeviceArray> entries, key_meta;
  kernels::TableSize size;

  DeviceTable(const kernels::ClusteredLayout& L, int kv_heads, const kernels::SelectionOptions& o)
      : layouts(static_cast<std::size_t>(kv_heads), L), options(o),
        offsets((kernels::attention_tiles(L, o) * kv_heads + 1) * sizeof(std::int64_t)) {}
  void build(const DeviceSelection& sel, const kernels::ExecContext& ctx) {
    kernels::DeviceTableStorage out{offsets.as<std::int64_t>()};
    if (entries) out = {offsets.as<std::int64_t>(), entries->as<BlockEntry>(), size.entries,
                        key_meta->as<kernels::KeyMeta>(), size.key_meta};
    const kernels::TableSize need = kernels::build_clustered_table_on_device(layouts, options, sel.slots, out, ctx);
    if (entries && need.entries <= size.entries && need.key_meta <= size.key_meta) return;
    size = need;
    entries.emplace(size.entries * sizeof(BlockEntry));
    key_meta.emplace(size.key_meta * sizeof(kernels::KeyMeta));
    build(sel, ctx);
  }
  kernels::BlockTable view() const {
    return {offsets.as<std::int64_t>(), entries->as<BlockEntry>(),
            size.key_meta > 0 ? key_meta->as<kernels::KeyMeta>() : nullptr, size.entries};
  }
  HostBlockTable download() const {
    HostBlockTable t;
    t.offsets = offsets.download<std::int64_t>();
    t.entries = entries->download<BlockEntry>();
    t.key_meta = key_meta->download<kernels::KeyMeta>();
    t.entries.resize(static_cast<std::size_t>(size.entries));
    t.key_meta.resize(static_cast<std::size_t>(size.key_meta));
    return t;
  }
};

bool same_tables(const HostBlockTable& a, const HostBlockTable& b) {
  return a.offsets == b.offsets && a.entries.size() == b.entries.size() && a.key_meta.size() == b.key_meta.size() &&
         std::memcmp(a.entries.data(), b.entries.data(), a.entries.size() * sizeof(BlockEntry)) == 0 &&
         std::memcmp(a.key_meta.data(), b.key_meta.data(), a.key_meta.size() * sizeof(kernels::KeyMeta)) == 0;
}

// The check, on a shape of at most 8192 tokens and 2 KV heads: integer inputs in [-4, 4] keep every
// summary and score exact in fp32 whatever the order of summation (d 128 and a group of up to 32
// heads stay below 2^24 on the score's grid), so the CUDA summaries, selections and table must equal
// the CPU backend's. Returns the units whose selection differs, plus one if the summaries or the
// table differ.
std::int64_t check_selection(const BenchKernelsOptions& opt) {
  const int group = opt.heads / opt.kv_heads;
  const int kv_heads = std::min(opt.kv_heads, 2);
  const int heads = kv_heads * group;
  const std::int64_t n = std::min<std::int64_t>(opt.seq, 8192);
  const int d = opt.head_dim;
  std::mt19937_64 rng(opt.seed + 23);
  std::uniform_int_distribution<int> value(-4, 4);
  const auto draw = [&](std::size_t count) {
    std::vector<float> x(count);
    for (float& e : x) e = static_cast<float>(value(rng));
    return x;
  };
  const std::vector<float> k = draw(static_cast<std::size_t>(n * kv_heads * d));
  const std::vector<float> v = draw(k.size());
  const std::vector<float> q = draw(static_cast<std::size_t>(n * heads * d));
  const kernels::ClusteredLayout L = single_rank_layout(n);
  const kernels::SelectionOptions o = selection_options(opt);

  const kernels::SummaryShape shape = summary_shape(n, kv_heads, d);
  std::vector<float> pages(4 * field_elems(shape, shape.page_rows())), blocks(4 * field_elems(shape, shape.block_rows()));
  std::vector<std::int32_t> page_counts(shape.num_pages()), block_counts(shape.num_blocks());
  const SummaryBuffers cpu_sums{shape,         field_elems(shape, shape.page_rows()),
                                field_elems(shape, shape.block_rows()), pages.data(), blocks.data(),
                                page_counts.data(), block_counts.data()};
  const kernels::ExecContext cpu{};
  cpu_sums.compute(k.data(), v.data(), cpu);
  std::vector<kernels::ClusteredSelection> cpu_sel;
  for (int g = 0; g < kv_heads; ++g)
    cpu_sel.push_back(kernels::select_pages(selection_params(L, o, q.data(), heads, kv_heads, d, cpu_sums, g), cpu));
  const std::vector<kernels::ClusteredLayout> layouts(static_cast<std::size_t>(kv_heads), L);
  const HostBlockTable cpu_table = kernels::build_clustered_table(layouts, o, cpu_sel);

  const kernels::ExecContext gpu = cuda_context();
  const DeviceArray k_dev = DeviceArray::from(k), v_dev = DeviceArray::from(v), q_dev = DeviceArray::from(q);
  const DeviceSummaries sums(n, kv_heads, d);
  sums.buffers().compute(k_dev.as<float>(), v_dev.as<float>(), gpu);
  const DeviceSelection sel(L, o, q_dev.as<float>(), heads, kv_heads, d, sums.buffers());
  sel.run(gpu);
  DeviceTable table(L, kv_heads, o);
  table.build(sel, gpu);
  std::int64_t wrong = sums.pages.download<float>() != pages || sums.blocks.download<float>() != blocks ||
                       !same_tables(table.download(), cpu_table);
  for (int g = 0; g < kv_heads; ++g) {
    const kernels::ClusteredSelection got = sel.download(g, o);
    const kernels::ClusteredSelection& ref = cpu_sel[g];
    for (std::size_t u = 0; u + 1 < ref.page_offsets.size(); ++u) {
      const bool same =
          std::equal(ref.pages.begin() + ref.page_offsets[u], ref.pages.begin() + ref.page_offsets[u + 1],
                     got.pages.begin() + got.page_offsets[u], got.pages.begin() + got.page_offsets[u + 1]) &&
          std::equal(ref.blocks.begin() + ref.block_offsets[u], ref.blocks.begin() + ref.block_offsets[u + 1],
                     got.blocks.begin() + got.block_offsets[u], got.blocks.begin() + got.block_offsets[u + 1]);
      wrong += !same;
    }
  }
  return wrong;
}

}  // namespace

int bench_selection(const BenchKernelsOptions& opt, DType dtype, const cudaDeviceProp& prop) {
  RINGCAST_CHECK(opt.batch == 1, "bench kernels --pattern {}: batch must be 1 (one rank's sequence)", opt.pattern);
  RINGCAST_CHECK(opt.seq % (kPageSize * kCoarsePages) == 0,
                 "bench kernels --pattern {}: seq must be a multiple of the {}-key coarse block", opt.pattern,
                 kPageSize * kCoarsePages);
  const std::int64_t wrong = check_selection(opt);
  const bool ok = wrong == 0;

  const std::int64_t n = opt.seq;
  const int d = opt.head_dim, heads = opt.heads, kv_heads = opt.kv_heads;
  const kernels::ClusteredLayout L = single_rank_layout(n);
  const kernels::SelectionOptions o = selection_options(opt);
  const DeviceArray k32(n * kv_heads * d * sizeof(float)), v32(k32.bytes()), q32(n * heads * d * sizeof(float));
  fill_repeating_f32(k32, opt.seed + 1);
  fill_repeating_f32(v32, opt.seed + 2);
  fill_repeating_f32(q32, opt.seed + 3);
  const DeviceSummaries sums(n, kv_heads, d);
  const DeviceSelection sel(L, o, q32.as<float>(), heads, kv_heads, d, sums.buffers());
  DeviceTable table(L, kv_heads, o);

  cudaStream_t stream;
  RINGCAST_CUDA_CHECK(cudaStreamCreate(&stream));
  const kernels::ExecContext ctx = cuda_context(stream);
  const double summaries_ms = median_ms(opt.warmup, opt.repeats, stream, [&] {
    sums.buffers().compute(k32.as<float>(), v32.as<float>(), ctx);
  });
  const double select_ms = median_ms(opt.warmup, opt.repeats, stream, [&] { sel.run(ctx); });
  table.build(sel, ctx);  // sizes the buffers
  const double table_ms = median_wall_ms(opt.warmup, opt.repeats, [&] { table.build(sel, ctx); });

  // The attention over that table: storage-dtype pools of L.num_pages() pages per KV head; with
  // grouped rows (o.rows_per_token = G) n * G rows of kv_heads heads, each at its token's position.
  const int group = o.rows_per_token;
  AttentionShape s = make_shape(1, n * group, heads / group, kv_heads, d);
  s.num_pages = L.num_pages();
  const std::size_t pool_elems = static_cast<std::size_t>(kv_heads * s.num_pages * kPageSize * d);
  const DeviceArray q16(n * heads * d * 2), k16(pool_elems * 2), v16(pool_elems * 2), o16(n * heads * d * 2),
      lse(n * heads * sizeof(float));
  fill_repeating(q16, dtype, opt.seed + 4);
  fill_repeating(k16, dtype, opt.seed + 5);
  fill_repeating(v16, dtype, opt.seed + 6);
  std::vector<float> bias(static_cast<std::size_t>(kv_heads * s.num_pages * kPageSize));
  const std::vector<std::int32_t> page_counts(static_cast<std::size_t>(L.resident_pages()), kPageSize);
  const std::vector<std::int32_t> block_counts(static_cast<std::size_t>(L.num_blocks()), kPageSize * kCoarsePages);
  const std::size_t per_head = static_cast<std::size_t>(s.num_pages * kPageSize);
  for (int g = 0; g < kv_heads; ++g)
    kernels::fill_summary_key_bias(L, page_counts, block_counts, {bias.data() + g * per_head, per_head});
  const DeviceArray key_bias = DeviceArray::from(bias);
  const std::vector<std::int32_t> pos = kernels::GroupedRows(n, heads, kv_heads, d, group).row_positions(positions(n));
  const DeviceArray q_pos = DeviceArray::from(pos);
  kernels::AttentionForwardParams fwd;
  fwd.shape = s;
  fwd.dtype = fwd.o_dtype = dtype;
  fwd.softmax_scale = 1.f / std::sqrt(static_cast<float>(d));
  fwd.q = q16.as<void>();
  fwd.k_pages = k16.as<void>();
  fwd.v_pages = v16.as<void>();
  fwd.q_pos = q_pos.as<std::int32_t>();
  fwd.key_bias = key_bias.as<float>();
  fwd.table = table.view();
  fwd.o = o16.as<void>();
  fwd.lse = lse.as<float>();
  const double attention_ms =
      median_ms(opt.warmup, opt.repeats, stream, [&] { kernels::attention_forward(fwd, ctx); });
  RINGCAST_CUDA_CHECK(cudaStreamDestroy(stream));

  const double selection_ms = summaries_ms + select_ms + table_ms;
  const double entries_per_unit = static_cast<double>(table.size.entries) / static_cast<double>(s.num_units());
  const std::string shape = fmt::format("B1 n{} h{}/{} d{}", n, heads, kv_heads, d);
  const std::string unit = o.unit == kernels::SelectUnit::kRow ? "row" : "tile";
  fmt::print("# ringcast bench kernels --pattern {} on {} ({} SMs), {}: causal, bound score, top_k {} per {}, "
             "coarse_k {}, window {}, {} row(s) per token in a kernel tile; selection = summaries + select + table "
             "(device path)\n",
             opt.pattern, prop.name, prop.multiProcessorCount, opt.dtype, o.top_k, unit, o.coarse_k, o.window, group);
  fmt::print("{:<28} {:>4} {:>9} {:>13} {:>10} {:>9} {:>13} {:>13} {:>9} {:>7} {}\n", "shape", "k", "entries",
             "summaries_ms", "select_ms", "table_ms", "selection_ms", "attention_ms", "sel/attn", "#wrong", "check");
  fmt::print("{:<28} {:>4} {:>9.1f} {:>13.3f} {:>10.3f} {:>9.3f} {:>13.3f} {:>13.3f} {:>8.1f}% {:>7} {}\n", shape,
             o.top_k, entries_per_unit, summaries_ms, select_ms, table_ms, selection_ms, attention_ms,
             100.0 * selection_ms / attention_ms, wrong, ok ? "OK" : "WRONG");
  fmt::print("csv,ringcast-selection,{},{},{},{},{},{},{},{:.6g},{:.6g},{:.6g},{:.6g},{:.6g},{:.6g},{:.4g},{},{}\n",
             unit, n, heads, kv_heads, d, o.top_k, opt.dtype, entries_per_unit, summaries_ms, select_ms, table_ms,
             selection_ms, attention_ms, selection_ms / attention_ms, wrong, ok ? "OK" : "WRONG");
  return ok ? 0 : 1;
}

}  // namespace ringcast::launch::bench
