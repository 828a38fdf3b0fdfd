// `ringcast bench kernels` (bench_kernels.hpp). Tables are built on the host, uploaded once, and the
// kernels are timed through the public attention API with CUDA events (warm-up, then the median of
// `repeats`). Effective TFLOP/s count 4 * d * (query-key pairs the table and masks let through, x
// query heads) per forward, 3.5x that for forward + backward (PERFORMANCE.md). Large inputs are
// filled by repeating one random chunk: timing does not depend on the values; the correctness check
// runs on a small shape with fully random inputs against the CPU backend (fp32, same rounded inputs).
// The selection patterns live in bench_selection.cpp.
#include "bench_kernels.hpp"

#include <ringcast/error.hpp>

#if RINGCAST_WITH_CUDA
#include "bench_device.hpp"
#include "npy.hpp"

#include <ringcast/kernels/attention.hpp>
#include <ringcast/kernels/block_table.hpp>
#include <ringcast/kernels/grouped_rows.hpp>
#include <ringcast/kernels/selection.hpp>
#include <ringcast/storage_bits.hpp>

#include <cuda_runtime_api.h>
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>
#endif

namespace ringcast::launch {

#if !RINGCAST_WITH_CUDA

int bench_kernels(const BenchKernelsOptions&) {
  RINGCAST_THROW("ringcast bench kernels: this build has no CUDA backend (configure with -DRINGCAST_CUDA=ON)");
}

#else

using namespace bench;

namespace {

using kernels::AttentionShape;
using kernels::BlockEntry;
using kernels::HostBlockTable;
using kernels::kQueryTile;

// ---- tables ----------------------------------------------------------------------------------------

// The problem a pattern runs: per-row-grouped puts each token's G = heads / kv_heads query heads as
// consecutive rows of their KV head (the clustered mode's order under GQA with per-row selection,
// kernels/grouped_rows.hpp), so the kernel sees seq * G rows of kv_heads heads, each row at its
// token's position, and a tile's list is the union of 128 / G tokens' choices.
struct Layout {
  AttentionShape tokens;  // the problem: seq tokens of `heads` query heads
  AttentionShape kernel;  // what the kernel runs
  int group = 1;          // kernel rows per token
  std::vector<std::int32_t> q_pos;  // [kernel.seq_q]
};

Layout make_layout(int batch, std::int64_t seq, int heads, int kv_heads, int head_dim, const std::string& pattern) {
  Layout l;
  l.tokens = make_shape(batch, seq, heads, kv_heads, head_dim);
  l.group = pattern == "per-row-grouped" ? kernels::grouped_rows_per_token(heads, kv_heads) : 1;
  RINGCAST_CHECK(l.group == (pattern == "per-row-grouped" ? heads / kv_heads : 1),
                 "bench kernels: per-row-grouped needs heads / kv_heads a power of two <= {}, got {}", kQueryTile,
                 heads / kv_heads);
  l.kernel = make_shape(batch, seq * l.group, heads / l.group, kv_heads, head_dim);
  l.kernel.num_pages = l.tokens.num_pages;  // the keys are the tokens'
  l.q_pos = kernels::GroupedRows(seq, heads, kv_heads, head_dim, l.group).row_positions(positions(seq));
  return l;
}

struct Tables {
  HostBlockTable table;        // the kernel's
  HostBlockTable token_table;  // per-row-grouped: the same choices over 128-token tiles (what the dumps describe)
  std::vector<std::int32_t> row_pages;  // per-row: [kv_heads, seq, k] chosen pages of batch element 0, -1 padded
};

// Distinct random draws from [0, n): all of them when n <= k.
std::vector<std::int32_t> choose(std::mt19937_64& rng, std::int64_t n, int k) {
  std::vector<std::int32_t> out;
  if (n <= k) {
    for (std::int64_t i = 0; i < n; ++i) out.push_back(static_cast<std::int32_t>(i));
    return out;
  }
  std::uniform_int_distribution<std::int64_t> pick(0, n - 1);
  while (static_cast<int>(out.size()) < k) {
    const auto p = static_cast<std::int32_t>(pick(rng));
    if (std::find(out.begin(), out.end(), p) == out.end()) out.push_back(p);
  }
  std::sort(out.begin(), out.end());
  return out;
}

// The causal diagonal of attention tile `tile` (tokens [t0, t0 + count) of `group` rows each): the
// pages from its 128-token tile's first token to its own last one, every row, causal position mask.
void add_diagonal(HostBlockTable& t, std::int64_t seq, std::int64_t tile, int group) {
  const std::int64_t t0 = tile * (kQueryTile / group);
  const std::int64_t count = std::min<std::int64_t>(kQueryTile / group, seq - t0);
  const auto mask = kernels::full_row_mask(static_cast<int>(count * group));
  for (std::int64_t page = t0 / kQueryTile * kQueryTile / kPageSize; page <= (t0 + count - 1) / kPageSize; ++page) {
    BlockEntry e{};
    e.row_mask[0] = mask[0];
    e.row_mask[1] = mask[1];
    e.page = static_cast<std::int32_t>(page);
    e.key_pos0 = static_cast<std::int32_t>(page * kPageSize);
    e.key_count = static_cast<std::int32_t>(std::min<std::int64_t>(kPageSize, seq - page * kPageSize));
    e.key_meta = -1;
    e.flags = kernels::kEntryCausal;
    t.entries.push_back(e);
  }
}

// Per-row choices: for every (batch element, KV head, token) k distinct pages among those entirely
// before the token's 128-token tile (fewer where there are fewer), -1 padded: [B, kv_heads, seq, k].
std::vector<std::int32_t> draw_row_choices(const AttentionShape& s, int k, std::mt19937_64& rng) {
  std::vector<std::int32_t> out(static_cast<std::size_t>(s.batch * s.kv_heads * s.seq_q * k), -1);
  for (std::int64_t row = 0; row < s.batch * s.kv_heads * s.seq_q; ++row) {
    const std::int64_t token = row % s.seq_q;
    const std::vector<std::int32_t> pages = choose(rng, token / kQueryTile * kQueryTile / kPageSize, k);
    std::copy(pages.begin(), pages.end(), out.begin() + row * k);
  }
  return out;
}

// The table of per-row choices with `group` rows per token: each chosen page once per attention
// tile, with the rows of the tokens that chose it, then the diagonal.
HostBlockTable per_row_table(const AttentionShape& s, const std::vector<std::int32_t>& choices, int k, int group) {
  HostBlockTable t;
  const std::int64_t per_tile = kQueryTile / group, tiles = (s.seq_q + per_tile - 1) / per_tile;
  for (int b = 0; b < s.batch; ++b)
    for (std::int64_t tile = 0; tile < tiles; ++tile)
      for (int kvh = 0; kvh < s.kv_heads; ++kvh) {
        const std::int64_t t0 = tile * per_tile, count = std::min(per_tile, s.seq_q - t0);
        std::vector<std::array<std::uint64_t, 2>> masks(static_cast<std::size_t>(t0 / kPageSize), {0, 0});
        for (std::int64_t i = 0; i < count; ++i) {
          const std::int32_t* chosen = choices.data() + ((std::int64_t{b} * s.kv_heads + kvh) * s.seq_q + t0 + i) * k;
          for (int j = 0; j < k && chosen[j] >= 0; ++j)
            for (std::int64_t r = i * group; r < (i + 1) * group; ++r)
              masks[chosen[j]][r / 64] |= std::uint64_t{1} << (r % 64);
        }
        for (std::size_t page = 0; page < masks.size(); ++page) {
          if (!(masks[page][0] | masks[page][1])) continue;
          BlockEntry e{};
          e.row_mask[0] = masks[page][0];
          e.row_mask[1] = masks[page][1];
          e.page = static_cast<std::int32_t>(page);
          e.key_pos0 = static_cast<std::int32_t>(page * kPageSize);
          e.key_count = kPageSize;
          e.key_meta = -1;
          t.entries.push_back(e);
        }
        add_diagonal(t, s.seq_q, tile, group);
        t.offsets.push_back(static_cast<std::int64_t>(t.entries.size()));
      }
  return t;
}

Tables build_tables(const Layout& l, const std::string& pattern, int k, std::uint64_t seed) {
  Tables out;
  const AttentionShape& s = l.kernel;
  if (pattern == "dense" || pattern == "dense-causal") {
    const kernels::KeyRange keys{0, s.seq_q, 0};
    out.table = kernels::dense_table(s, {&keys, 1}, l.q_pos, pattern == "dense-causal");
    return out;
  }
  std::mt19937_64 rng(seed);
  if (pattern == "per-row" || pattern == "per-row-grouped") {
    const std::vector<std::int32_t> choices = draw_row_choices(l.tokens, k, rng);
    out.row_pages.assign(choices.begin(), choices.begin() + l.tokens.kv_heads * l.tokens.seq_q * k);
    out.table = per_row_table(l.tokens, choices, k, l.group);
    if (l.group > 1) out.token_table = per_row_table(l.tokens, choices, k, 1);
    return out;
  }
  HostBlockTable& t = out.table;  // random pages: k per tile, every row
  for (std::int64_t u = 0; u < s.num_units(); ++u) {
    const std::int64_t tile = (u / s.kv_heads) % s.num_tiles();
    for (const std::int32_t page : choose(rng, tile * kQueryTile / kPageSize, k)) {
      BlockEntry e{};
      const auto mask = kernels::full_row_mask(kernels::tile_rows(s, tile));
      e.row_mask[0] = mask[0];
      e.row_mask[1] = mask[1];
      e.page = page;
      e.key_pos0 = page * kPageSize;
      e.key_count = kPageSize;
      e.key_meta = -1;
      t.entries.push_back(e);
    }
    add_diagonal(t, s.seq_q, tile, 1);
    t.offsets.push_back(static_cast<std::int64_t>(t.entries.size()));
  }
  return out;
}

// Query-key pairs the kernel computes for real (row masks, key_count, causal), summed over query heads.
double attended_pairs(const HostBlockTable& t, const AttentionShape& s, const std::vector<std::int32_t>& q_pos) {
  double pairs = 0;
  for (std::int64_t u = 0; u < s.num_units(); ++u) {
    const std::int64_t tile = (u / s.kv_heads) % s.num_tiles();
    const int rows = kernels::tile_rows(s, tile);
    for (std::int64_t i = t.offsets[u]; i < t.offsets[u + 1]; ++i) {
      const BlockEntry& e = t.entries[i];
      for (int r = 0; r < rows; ++r) {
        if (!((e.row_mask[r / 64] >> (r % 64)) & 1u)) continue;
        std::int64_t n = e.key_count;
        if (e.flags & kernels::kEntryCausal) {
          n = std::clamp<std::int64_t>(std::int64_t{q_pos[tile * kQueryTile + r]} - e.key_pos0 + 1, 0, n);
        }
        pairs += static_cast<double>(n);
      }
    }
  }
  return pairs * (s.heads / s.kv_heads);
}

// ---- .npy dumps ----------------------------------------------------------------------------------

// pages.npy: each (batch element, 128-token tile, KV head)'s pages; rows.npy: the per-row choices.
void dump_tables(const std::string& dir, const Tables& t, const Layout& l, int k) {
  const HostBlockTable& table = l.group > 1 ? t.token_table : t.table;
  const AttentionShape& s = l.tokens;
  std::int64_t width = 0;
  for (std::int64_t u = 0; u < s.num_units(); ++u) width = std::max(width, table.offsets[u + 1] - table.offsets[u]);
  std::vector<std::int32_t> pages(static_cast<std::size_t>(s.num_units() * width), -1);
  for (std::int64_t u = 0; u < s.num_units(); ++u) {
    for (std::int64_t i = table.offsets[u]; i < table.offsets[u + 1]; ++i)
      pages[u * width + (i - table.offsets[u])] = table.entries[i].page;
  }
  write_npy(dir + "/pages.npy", pages, {s.num_units(), width});
  if (!t.row_pages.empty()) write_npy(dir + "/rows.npy", t.row_pages, {s.kv_heads, s.seq_q, k});
}

// One problem on the device: inputs, outputs, tables, and the parameter blocks that point at them.
struct Problem {
  AttentionShape shape;
  DType dtype;
  Tables tables;
  std::vector<std::int32_t> q_pos;
  kernels::HostTransposedTable transposed;
  DeviceArray q, k, v, d_o, o, lse, d_q, d_k, d_v, workspace, pos, offsets, entries, t_offsets, refs;
  kernels::AttentionForwardParams fwd;
  kernels::AttentionBackwardParams bwd;

  Problem(const AttentionShape& s, DType t, Tables tb, std::vector<std::int32_t> positions, bool backward)
      : shape(s), dtype(t), tables(std::move(tb)), q_pos(std::move(positions)),
        transposed(backward ? kernels::transpose(tables.table, s) : kernels::HostTransposedTable{}),
        q(elems_q() * 2), k(elems_kv() * 2), v(elems_kv() * 2), d_o(backward ? elems_q() * 2 : 0),
        o(elems_q() * 2), lse(rows() * 4), d_q(backward ? elems_q() * 4 : 0), d_k(backward ? elems_kv() * 4 : 0),
        d_v(backward ? elems_kv() * 4 : 0),
        workspace(backward ? kernels::attention_backward_workspace_bytes(s, cuda_context()) : 0), pos(DeviceArray::from(q_pos)),
        offsets(DeviceArray::from(tables.table.offsets)), entries(DeviceArray::from(tables.table.entries)),
        t_offsets(DeviceArray::from(transposed.offsets)), refs(DeviceArray::from(transposed.refs)) {
    fwd.shape = s;
    fwd.dtype = t;
    fwd.o_dtype = t;
    fwd.softmax_scale = 1.f / std::sqrt(static_cast<float>(s.head_dim));
    fwd.q = q.as<void>();
    fwd.k_pages = k.as<void>();
    fwd.v_pages = v.as<void>();
    fwd.q_pos = pos.as<std::int32_t>();
    fwd.table = {offsets.as<std::int64_t>(), entries.as<BlockEntry>(), nullptr,
                 static_cast<std::int64_t>(tables.table.entries.size())};
    fwd.o = o.as<void>();
    fwd.lse = lse.as<float>();
    bwd.fwd = fwd;
    bwd.d_o = d_o.as<void>();
    bwd.transposed = {t_offsets.as<std::int64_t>(), refs.as<kernels::PageRef>(),
                      static_cast<std::int64_t>(transposed.refs.size())};
    bwd.d_q = d_q.as<float>();
    bwd.d_k_pages = d_k.as<float>();
    bwd.d_v_pages = d_v.as<float>();
    bwd.workspace = workspace.as<void>();
    bwd.workspace_bytes = workspace.bytes();
  }
  std::size_t elems_q() const { return static_cast<std::size_t>(shape.batch * shape.seq_q * shape.heads * shape.head_dim); }
  std::size_t elems_kv() const {
    return static_cast<std::size_t>(shape.kv_heads * shape.num_pages * kPageSize * shape.head_dim);
  }
  std::size_t rows() const { return static_cast<std::size_t>(shape.batch * shape.heads * shape.seq_q); }
};

double rel_error(const std::vector<float>& x, const std::vector<float>& ref) {
  double num = 0, den = 0;
  for (std::size_t i = 0; i < x.size(); ++i) {
    const double d = static_cast<double>(x[i]) - ref[i];
    num += d * d;
    den += static_cast<double>(ref[i]) * ref[i];
  }
  return std::isfinite(num) ? std::sqrt(num / std::max(den, 1e-300)) : INFINITY;
}

// The small-shape check: the same pattern on the GPU and on the CPU backend (fp32) with identical
// (storage-rounded) inputs; the largest relative error over O and, with backward, dQ, dK, dV.
double check_small(const BenchKernelsOptions& opt, DType dtype) {
  const int group = opt.heads / opt.kv_heads;
  const int kv_heads = std::min(opt.kv_heads, 2);
  const Layout l =
      make_layout(1, std::min<std::int64_t>(opt.seq, 1000), kv_heads * group, kv_heads, opt.head_dim, opt.pattern);
  const AttentionShape& s = l.kernel;
  const std::vector<std::int32_t>& pos = l.q_pos;
  Problem p(s, dtype, build_tables(l, opt.pattern, opt.k, opt.seed), pos, opt.backward);

  std::mt19937_64 rng(opt.seed + 17);
  std::normal_distribution<float> normal;
  auto random_input = [&](const DeviceArray& d, std::size_t n) {
    std::vector<std::uint16_t> h(n);
    std::vector<float> f(n);
    for (std::size_t i = 0; i < n; ++i) {
      h[i] = storage_bits(normal(rng), dtype);
      f[i] = storage_value(h[i], dtype);
    }
    RINGCAST_CUDA_CHECK(cudaMemcpy(d.as<void>(), h.data(), n * 2, cudaMemcpyHostToDevice));
    return f;
  };
  const std::vector<float> q = random_input(p.q, p.elems_q());
  const std::vector<float> k = random_input(p.k, p.elems_kv());
  const std::vector<float> v = random_input(p.v, p.elems_kv());
  const std::vector<float> d_o = opt.backward ? random_input(p.d_o, p.elems_q()) : std::vector<float>{};

  kernels::attention_forward(p.fwd, cuda_context());
  if (opt.backward) kernels::attention_backward(p.bwd, cuda_context());
  RINGCAST_CUDA_CHECK(cudaDeviceSynchronize());

  std::vector<float> o_cpu(p.elems_q()), lse_cpu(p.rows());
  kernels::AttentionForwardParams f;
  f.shape = s;
  f.dtype = f.o_dtype = DType::kF32;
  f.softmax_scale = p.fwd.softmax_scale;
  f.q = q.data();
  f.k_pages = k.data();
  f.v_pages = v.data();
  f.q_pos = pos.data();
  f.table = p.tables.table.view();
  f.o = o_cpu.data();
  f.lse = lse_cpu.data();
  const kernels::ExecContext cpu{};
  std::vector<std::uint8_t> ws_f(kernels::attention_forward_workspace_bytes(s, cpu));
  f.workspace = ws_f.data();
  f.workspace_bytes = ws_f.size();
  kernels::attention_forward(f, cpu);

  std::vector<float> o_gpu;
  for (const std::uint16_t h : p.o.download<std::uint16_t>()) o_gpu.push_back(storage_value(h, dtype));
  double err = rel_error(o_gpu, o_cpu);
  if (opt.backward) {
    std::vector<float> dq(p.elems_q()), dk(p.elems_kv()), dv(p.elems_kv());
    kernels::AttentionBackwardParams b;
    b.fwd = f;
    b.d_o = d_o.data();
    b.transposed = p.transposed.view();
    b.d_q = dq.data();
    b.d_k_pages = dk.data();
    b.d_v_pages = dv.data();
    std::vector<std::uint8_t> ws_b(kernels::attention_backward_workspace_bytes(s, cpu));
    b.workspace = ws_b.data();
    b.workspace_bytes = ws_b.size();
    kernels::attention_backward(b, cpu);
    err = std::max({err, rel_error(p.d_q.download<float>(), dq), rel_error(p.d_k.download<float>(), dk),
                    rel_error(p.d_v.download<float>(), dv)});
  }
  return err;
}

}  // namespace

int bench_kernels(const BenchKernelsOptions& opt) {
  const bool selection = opt.pattern == "selection-tile" || opt.pattern == "selection-row";
  RINGCAST_CHECK(opt.pattern == "dense" || opt.pattern == "dense-causal" || opt.pattern == "random-pages" ||
                     opt.pattern == "per-row" || opt.pattern == "per-row-grouped" || selection,
                 "bench kernels: unknown pattern '{}' (dense | dense-causal | random-pages | per-row | "
                 "per-row-grouped | selection-tile | selection-row)",
                 opt.pattern);
  RINGCAST_CHECK(opt.dtype == "bf16" || opt.dtype == "f16", "bench kernels: dtype must be bf16 or f16");
  RINGCAST_CHECK(opt.repeats >= 1 && opt.warmup >= 0 && opt.k >= 1, "bench kernels: bad repeats/warmup/k");
  RINGCAST_CHECK(opt.kv_heads >= 1 && opt.heads % opt.kv_heads == 0, "bench kernels: heads % kv_heads != 0");
  const DType dtype = opt.dtype == "bf16" ? DType::kBF16 : DType::kF16;

  cudaDeviceProp prop{};
  int device = 0;
  RINGCAST_CUDA_CHECK(cudaGetDevice(&device));
  RINGCAST_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
  if (selection) return bench_selection(opt, dtype, prop);

  const double err = check_small(opt, dtype);
  const bool ok = err <= 2e-2;

  const Layout l = make_layout(opt.batch, opt.seq, opt.heads, opt.kv_heads, opt.head_dim, opt.pattern);
  const AttentionShape& s = l.kernel;
  const std::vector<std::int32_t>& pos = l.q_pos;
  Tables tables = build_tables(l, opt.pattern, opt.k, opt.seed);
  if (!opt.dump_dir.empty()) dump_tables(opt.dump_dir, tables, l, opt.k);
  const double pairs = attended_pairs(tables.table, s, pos);
  const double avg_entries = static_cast<double>(tables.table.entries.size()) / static_cast<double>(s.num_units());
  Problem p(s, dtype, std::move(tables), pos, opt.backward);
  fill_repeating(p.q, dtype, opt.seed + 1);
  fill_repeating(p.k, dtype, opt.seed + 2);
  fill_repeating(p.v, dtype, opt.seed + 3);
  if (opt.backward) fill_repeating(p.d_o, dtype, opt.seed + 4);

  cudaStream_t stream;
  RINGCAST_CUDA_CHECK(cudaStreamCreate(&stream));
  const kernels::ExecContext ctx = cuda_context(stream);
  const double fwd_flops = 4.0 * s.head_dim * pairs;
  const double fwd_ms = median_ms(opt.warmup, opt.repeats, stream, [&] { kernels::attention_forward(p.fwd, ctx); });
  double fb_ms = NAN;
  if (opt.backward) {
    fb_ms = median_ms(opt.warmup, opt.repeats, stream, [&] {
      kernels::attention_forward(p.fwd, ctx);
      kernels::attention_backward(p.bwd, ctx);
    });
  }
  // per-row-grouped: what the clustered mode adds around the forward, timed alone -- Q from token order
  // to grouped order, O and LSE back (kernels/grouped_rows.hpp), every batch element.
  double perm_ms = NAN;
  if (l.group > 1) {
    const AttentionShape& t = l.tokens;
    const kernels::GroupedRows rows(t.seq_q, t.heads, t.kv_heads, t.head_dim, l.group);
    const DeviceArray q_tokens(p.elems_q() * 2), o_tokens(p.elems_q() * 2), lse_tokens(p.rows() * 4);
    const std::int64_t elems = t.seq_q * t.heads * t.head_dim, stats = t.seq_q * t.heads;
    perm_ms = median_ms(opt.warmup, opt.repeats, stream, [&] {
      for (int b = 0; b < t.batch; ++b) {
        if (rows.moves_rows()) {  // with one KV head the rows are in place, as in the mode
          rows.to_grouped(q_tokens.as<std::uint16_t>() + b * elems, dtype, p.q.as<std::uint16_t>() + b * elems,
                          dtype, ctx);
          rows.to_tokens(p.o.as<std::uint16_t>() + b * elems, dtype, o_tokens.as<std::uint16_t>() + b * elems, dtype,
                         ctx);
        }
        rows.lse_to_tokens(p.lse.as<float>() + b * stats, lse_tokens.as<float>() + b * stats, ctx);
      }
    });
  }
  RINGCAST_CUDA_CHECK(cudaStreamDestroy(stream));

  const double fwd_tflops = fwd_flops / (fwd_ms * 1e-3) / 1e12;
  const double fb_tflops = 3.5 * fwd_flops / (fb_ms * 1e-3) / 1e12;
  // The problem's shape (tokens, query heads), whatever row order the kernel ran; entries per kernel tile.
  const AttentionShape& t = l.tokens;
  const std::string shape = fmt::format("B{} n{} h{}/{} d{}", t.batch, t.seq_q, t.heads, t.kv_heads, t.head_dim);
  fmt::print("# ringcast bench kernels on {} ({} SMs), {}\n", prop.name, prop.multiProcessorCount, opt.dtype);
  fmt::print("{:<28} {:<16} {:>4} {:>9} {:>10} {:>9} {:>12} {:>9} {:>9} {:>5} {:>8}\n", "shape", "pattern", "k",
             "entries", "fwd_ms", "fwd_TF/s", "fwd+bwd_ms", "f+b_TF/s", "error", "check", "perm_ms");
  fmt::print("{:<28} {:<16} {:>4} {:>9.1f} {:>10.3f} {:>9.1f} {:>12.3f} {:>9.1f} {:>9.2e} {:>5} {:>8.3f}\n", shape,
             opt.pattern, opt.k, avg_entries, fwd_ms, fwd_tflops, fb_ms, fb_tflops, err, ok ? "OK" : "WRONG", perm_ms);
  fmt::print("csv,ringcast,{},{},{},{},{},{},{},{},{:.6g},{:.6g},{:.6g},{:.6g},{:.6g},{:.6g},{:.3e},{},{:.6g}\n",
             opt.pattern, t.batch, t.seq_q, t.heads, t.kv_heads, t.head_dim, opt.k, opt.dtype, avg_entries, pairs,
             fwd_ms, fwd_tflops, fb_ms, fb_tflops, err, ok ? "OK" : "WRONG", perm_ms);
  return ok ? 0 : 1;
}

#endif  // RINGCAST_WITH_CUDA

}  // namespace ringcast::launch
