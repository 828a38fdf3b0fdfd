// `ringcast bench kernels` (bench_kernels.hpp). Tables are built on the host, uploaded once, and the
// kernels are timed through the public attention API with CUDA events (warm-up, then the median of
// `repeats`). Effective TFLOP/s count 4 * d * (query-key pairs the table and masks let through, x
// query heads) per forward, 3.5x that for forward + backward (PERFORMANCE.md). Large inputs are
// filled by repeating one random chunk: timing does not depend on the values; the correctness check
// runs on a small shape with fully random inputs against the CPU backend (fp32, same rounded inputs).
// The selection patterns time the table build, which synchronizes to learn its size, by wall clock.
#include "bench_kernels.hpp"
#include "npy.hpp"

#include <ringcast/error.hpp>
#include <ringcast/kernels/attention.hpp>
#include <ringcast/kernels/block_table.hpp>
#include <ringcast/kernels/selection.hpp>
#include <ringcast/kernels/selection_device.hpp>
#include <ringcast/kernels/summaries.hpp>

#include <fmt/format.h>
#include <fmt/ranges.h>

#if RINGCAST_WITH_CUDA
#include <ringcast/cuda_check.hpp>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>
#endif

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <optional>
#include <random>
#include <string>
#include <vector>

namespace ringcast::launch {

#if !RINGCAST_WITH_CUDA

int bench_kernels(const BenchKernelsOptions&) {
  RINGCAST_THROW("ringcast bench kernels: this build has no CUDA backend (configure with -DRINGCAST_CUDA=ON)");
}

#else

namespace {

using kernels::AttentionShape;
using kernels::BlockEntry;
using kernels::HostBlockTable;
using kernels::kQueryTile;

constexpr int kPageSize = 64;

// ---- tables ----------------------------------------------------------------------------------------

struct Tables {
  HostBlockTable table;
  std::vector<std::int32_t> row_pages;  // per-row: [kv_heads, seq, k] chosen pages, -1 padded
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

// The tile's own pages (the causal diagonal): every existing row, causal position mask.
void add_diagonal(HostBlockTable& t, const AttentionShape& s, std::int64_t tile) {
  const int rows = kernels::tile_rows(s, tile);
  const std::int64_t first = tile * kQueryTile / kPageSize;
  const std::int64_t last = (tile * kQueryTile + rows - 1) / kPageSize;
  for (std::int64_t page = first; page <= last; ++page) {
    BlockEntry e{};
    const auto mask = kernels::full_row_mask(rows);
    e.row_mask[0] = mask[0];
    e.row_mask[1] = mask[1];
    e.page = static_cast<std::int32_t>(page);
    e.key_pos0 = static_cast<std::int32_t>(page * kPageSize);
    e.key_count = static_cast<std::int32_t>(std::min<std::int64_t>(kPageSize, s.seq_q - page * kPageSize));
    e.key_meta = -1;
    e.flags = kernels::kEntryCausal;
    t.entries.push_back(e);
  }
}

Tables build_tables(const AttentionShape& s, const std::string& pattern, int k, std::uint64_t seed,
                    const std::vector<std::int32_t>& q_pos) {
  Tables out;
  if (pattern == "dense" || pattern == "dense-causal") {
    const kernels::KeyRange keys{0, s.seq_q, 0};
    out.table = kernels::dense_table(s, {&keys, 1}, q_pos, pattern == "dense-causal");
    return out;
  }
  std::mt19937_64 rng(seed);
  HostBlockTable& t = out.table;
  const bool per_row = pattern == "per-row";
  if (per_row) out.row_pages.assign(static_cast<std::size_t>(s.kv_heads * s.seq_q * k), -1);
  for (std::int64_t u = 0; u < s.num_units(); ++u) {
    const int kvh = static_cast<int>(u % s.kv_heads);
    const std::int64_t tile = (u / s.kv_heads) % s.num_tiles();
    const std::int64_t before = tile * kQueryTile / kPageSize;  // pages entirely before the tile
    if (!per_row) {
      for (const std::int32_t page : choose(rng, before, k)) {
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
    } else {
      // Each row picks its own k pages; the tile's entries are their union, each with the rows that chose it.
      std::vector<std::array<std::uint64_t, 2>> masks(static_cast<std::size_t>(before), {0, 0});
      const bool record = u < s.kv_heads * s.num_tiles();  // batch element 0 (all share the dump layout)
      for (int r = 0; r < kernels::tile_rows(s, tile); ++r) {
        const std::vector<std::int32_t> pages = choose(rng, before, k);
        for (std::size_t i = 0; i < pages.size(); ++i) {
          masks[pages[i]][r / 64] |= std::uint64_t{1} << (r % 64);
          if (record) out.row_pages[(kvh * s.seq_q + tile * kQueryTile + r) * k + i] = pages[i];
        }
      }
      for (std::int64_t page = 0; page < before; ++page) {
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
    }
    add_diagonal(t, s, tile);
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

void dump_tables(const std::string& dir, const Tables& t, const AttentionShape& s, int k) {
  const HostBlockTable& table = t.table;
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

// ---- device side -----------------------------------------------------------------------------------

std::uint16_t to_storage(float x, DType t) {  // round to nearest even
  std::uint16_t bits;
  if (t == DType::kBF16) {
    const __nv_bfloat16 h = __float2bfloat16_rn(x);
    std::memcpy(static_cast<void*>(&bits), &h, 2);
  } else {
    const __half h = __float2half_rn(x);
    std::memcpy(static_cast<void*>(&bits), &h, 2);
  }
  return bits;
}

float from_storage(std::uint16_t bits, DType t) {
  if (t == DType::kBF16) {
    __nv_bfloat16 h;
    std::memcpy(static_cast<void*>(&h), &bits, 2);
    return __bfloat162float(h);
  }
  __half h;
  std::memcpy(static_cast<void*>(&h), &bits, 2);
  return __half2float(h);
}

class Device {
 public:
  explicit Device(std::size_t bytes) : bytes_(bytes) { RINGCAST_CUDA_CHECK(cudaMalloc(&ptr_, std::max<std::size_t>(bytes, 16))); }
  Device(const Device&) = delete;
  Device& operator=(const Device&) = delete;
  ~Device() { cudaFree(ptr_); }
  template <typename T>
  static Device from(const std::vector<T>& host) {
    Device d(host.size() * sizeof(T));
    if (!host.empty()) RINGCAST_CUDA_CHECK(cudaMemcpy(d.ptr_, host.data(), d.bytes_, cudaMemcpyHostToDevice));
    return d;
  }
  Device(Device&& o) noexcept : ptr_(o.ptr_), bytes_(o.bytes_) { o.ptr_ = nullptr; }
  template <typename T>
  T* as() const { return static_cast<T*>(ptr_); }
  template <typename T>
  std::vector<T> download() const {
    std::vector<T> h(bytes_ / sizeof(T));
    RINGCAST_CUDA_CHECK(cudaMemcpy(h.data(), ptr_, bytes_, cudaMemcpyDeviceToHost));
    return h;
  }
  std::size_t bytes() const { return bytes_; }

 private:
  void* ptr_ = nullptr;
  std::size_t bytes_ = 0;
};

// Fills a device buffer of 16-bit values by repeating one chunk of N(0, 1) draws.
void fill_repeating(const Device& d, DType t, std::uint64_t seed) {
  const std::size_t n = d.bytes() / 2;
  const std::size_t chunk = std::min<std::size_t>(n, std::size_t{1} << 22);
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal;
  std::vector<std::uint16_t> h(chunk);
  for (auto& x : h) x = to_storage(normal(rng), t);
  for (std::size_t off = 0; off < n; off += chunk) {
    RINGCAST_CUDA_CHECK(cudaMemcpy(d.as<std::uint16_t>() + off, h.data(), std::min(chunk, n - off) * 2,
                                   cudaMemcpyHostToDevice));
  }
}

// One problem on the device: inputs, outputs, tables, and the parameter blocks that point at them.
struct Problem {
  AttentionShape shape;
  DType dtype;
  Tables tables;
  std::vector<std::int32_t> q_pos;
  kernels::HostTransposedTable transposed;
  Device q, k, v, d_o, o, lse, d_q, d_k, d_v, workspace, pos, offsets, entries, t_offsets, refs;
  kernels::AttentionForwardParams fwd;
  kernels::AttentionBackwardParams bwd;

  Problem(const AttentionShape& s, DType t, Tables tb, std::vector<std::int32_t> positions, bool backward)
      : shape(s), dtype(t), tables(std::move(tb)), q_pos(std::move(positions)),
        transposed(backward ? kernels::transpose(tables.table, s) : kernels::HostTransposedTable{}),
        q(elems_q() * 2), k(elems_kv() * 2), v(elems_kv() * 2), d_o(backward ? elems_q() * 2 : 0),
        o(elems_q() * 2), lse(rows() * 4), d_q(backward ? elems_q() * 4 : 0), d_k(backward ? elems_kv() * 4 : 0),
        d_v(backward ? elems_kv() * 4 : 0),
        workspace(backward ? kernels::attention_backward_workspace_bytes(s, ctx()) : 0), pos(Device::from(q_pos)),
        offsets(Device::from(tables.table.offsets)), entries(Device::from(tables.table.entries)),
        t_offsets(Device::from(transposed.offsets)), refs(Device::from(transposed.refs)) {
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
  static kernels::ExecContext ctx(void* stream = nullptr) { return {{DeviceKind::kCuda, 0}, stream}; }
};

AttentionShape make_shape(int batch, std::int64_t seq, int heads, int kv_heads, int head_dim) {
  AttentionShape s;
  s.batch = batch;
  s.seq_q = seq;
  s.heads = heads;
  s.kv_heads = kv_heads;
  s.head_dim = head_dim;
  s.page_size = kPageSize;
  s.num_pages = (seq + kPageSize - 1) / kPageSize;
  return s;
}

std::vector<std::int32_t> positions(std::int64_t seq) {
  std::vector<std::int32_t> p(static_cast<std::size_t>(seq));
  for (std::int64_t i = 0; i < seq; ++i) p[i] = static_cast<std::int32_t>(i);
  return p;
}

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
  const AttentionShape s = make_shape(1, std::min<std::int64_t>(opt.seq, 1000), kv_heads * group, kv_heads,
                                      opt.head_dim);
  std::vector<std::int32_t> pos = positions(s.seq_q);
  Problem p(s, dtype, build_tables(s, opt.pattern, opt.k, opt.seed, pos), pos, opt.backward);

  std::mt19937_64 rng(opt.seed + 17);
  std::normal_distribution<float> normal;
  auto random_input = [&](const Device& d, std::size_t n) {
    std::vector<std::uint16_t> h(n);
    std::vector<float> f(n);
    for (std::size_t i = 0; i < n; ++i) {
      h[i] = to_storage(normal(rng), dtype);
      f[i] = from_storage(h[i], dtype);
    }
    RINGCAST_CUDA_CHECK(cudaMemcpy(d.as<void>(), h.data(), n * 2, cudaMemcpyHostToDevice));
    return f;
  };
  const std::vector<float> q = random_input(p.q, p.elems_q());
  const std::vector<float> k = random_input(p.k, p.elems_kv());
  const std::vector<float> v = random_input(p.v, p.elems_kv());
  const std::vector<float> d_o = opt.backward ? random_input(p.d_o, p.elems_q()) : std::vector<float>{};

  kernels::attention_forward(p.fwd, Problem::ctx());
  if (opt.backward) kernels::attention_backward(p.bwd, Problem::ctx());
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
  for (const std::uint16_t h : p.o.download<std::uint16_t>()) o_gpu.push_back(from_storage(h, dtype));
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

template <typename F>
double median_ms(int warmup, int repeats, cudaStream_t stream, F&& run) {
  for (int i = 0; i < warmup; ++i) run();
  cudaEvent_t start, stop;
  RINGCAST_CUDA_CHECK(cudaEventCreate(&start));
  RINGCAST_CUDA_CHECK(cudaEventCreate(&stop));
  std::vector<double> times;
  for (int i = 0; i < repeats; ++i) {
    RINGCAST_CUDA_CHECK(cudaEventRecord(start, stream));
    run();
    RINGCAST_CUDA_CHECK(cudaEventRecord(stop, stream));
    RINGCAST_CUDA_CHECK(cudaEventSynchronize(stop));
    float ms = 0;
    RINGCAST_CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
    times.push_back(ms);
  }
  RINGCAST_CUDA_CHECK(cudaEventDestroy(start));
  RINGCAST_CUDA_CHECK(cudaEventDestroy(stop));
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

// ---- selection (patterns selection-tile, selection-row) -------------------------------------------
//
// One rank holding the whole causal sequence (no remote blocks), on the device-resident path of
// selection_device.hpp: page and coarse summaries of K/V, select_pages_to_slots per KV head (scoring
// fused with the top-k), the forward table built on the device from the slots, then the attention
// over that table. K, V and the selection queries are fp32 (the summaries' and selection's
// interface); the attention reads bf16 / f16 pools.

constexpr int kCoarsePages = 16;  // 1024-key coarse blocks (DESIGN.md §4.1)
constexpr int kCoarseK = 4;
constexpr int kWindow = 256;

kernels::SelectionOptions selection_options(const BenchKernelsOptions& opt) {
  kernels::SelectionOptions o;
  o.causal = true;
  o.unit = opt.pattern == "selection-row" ? kernels::SelectUnit::kRow : kernels::SelectUnit::kTile;
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
  Device pages, blocks, page_counts, block_counts;
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
  std::vector<Device> buffers;  // pages, blocks, counts per KV head
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
  Device offsets;
  std::optional<Device> entries, key_meta;
  kernels::TableSize size;

  DeviceTable(const kernels::ClusteredLayout& L, int kv_heads, const kernels::SelectionOptions& o)
      : layouts(static_cast<std::size_t>(kv_heads), L), options(o),
        offsets((L.num_tiles() * kv_heads + 1) * sizeof(std::int64_t)) {}
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

  const kernels::ExecContext gpu = Problem::ctx();
  const Device k_dev = Device::from(k), v_dev = Device::from(v), q_dev = Device::from(q);
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

void fill_repeating_f32(const Device& d, std::uint64_t seed) {
  const std::size_t n = d.bytes() / sizeof(float);
  const std::size_t chunk = std::min<std::size_t>(n, (std::size_t{1} << 22) + 7);  // odd period: pages differ
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal;
  std::vector<float> h(chunk);
  for (float& x : h) x = normal(rng);
  for (std::size_t off = 0; off < n; off += chunk) {
    RINGCAST_CUDA_CHECK(
        cudaMemcpy(d.as<float>() + off, h.data(), std::min(chunk, n - off) * sizeof(float), cudaMemcpyHostToDevice));
  }
}

// Median wall time of fn (which synchronizes what it times); two runs once one takes over a second.
template <typename F>
double median_wall_ms(int warmup, int repeats, F&& fn) {
  for (int i = 0; i < warmup; ++i) fn();
  std::vector<double> times;
  for (int i = 0; i < repeats; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    fn();
    times.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
    if (times.front() > 1000.0 && times.size() >= 2) break;
  }
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

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
  const Device k32(n * kv_heads * d * sizeof(float)), v32(k32.bytes()), q32(n * heads * d * sizeof(float));
  fill_repeating_f32(k32, opt.seed + 1);
  fill_repeating_f32(v32, opt.seed + 2);
  fill_repeating_f32(q32, opt.seed + 3);
  const DeviceSummaries sums(n, kv_heads, d);
  const DeviceSelection sel(L, o, q32.as<float>(), heads, kv_heads, d, sums.buffers());
  DeviceTable table(L, kv_heads, o);

  cudaStream_t stream;
  RINGCAST_CUDA_CHECK(cudaStreamCreate(&stream));
  const kernels::ExecContext ctx = Problem::ctx(stream);
  const double summaries_ms = median_ms(opt.warmup, opt.repeats, stream, [&] {
    sums.buffers().compute(k32.as<float>(), v32.as<float>(), ctx);
  });
  const double select_ms = median_ms(opt.warmup, opt.repeats, stream, [&] { sel.run(ctx); });
  table.build(sel, ctx);  // sizes the buffers
  const double table_ms = median_wall_ms(opt.warmup, opt.repeats, [&] { table.build(sel, ctx); });

  // The attention over that table: storage-dtype pools of L.num_pages() pages per KV head.
  AttentionShape s = make_shape(1, n, heads, kv_heads, d);
  s.num_pages = L.num_pages();
  const std::size_t pool_elems = static_cast<std::size_t>(kv_heads * s.num_pages * kPageSize * d);
  const Device q16(n * heads * d * 2), k16(pool_elems * 2), v16(pool_elems * 2), o16(n * heads * d * 2),
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
  const Device key_bias = Device::from(bias);
  const std::vector<std::int32_t> pos = positions(n);
  const Device q_pos = Device::from(pos);
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
             "coarse_k {}, window {}; selection = summaries + select + table (device path)\n",
             opt.pattern, prop.name, prop.multiProcessorCount, opt.dtype, o.top_k, unit, o.coarse_k, o.window);
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

}  // namespace

int bench_kernels(const BenchKernelsOptions& opt) {
  const bool selection = opt.pattern == "selection-tile" || opt.pattern == "selection-row";
  RINGCAST_CHECK(opt.pattern == "dense" || opt.pattern == "dense-causal" || opt.pattern == "random-pages" ||
                     opt.pattern == "per-row" || selection,
                 "bench kernels: unknown pattern '{}' (dense | dense-causal | random-pages | per-row | "
                 "selection-tile | selection-row)",
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

  const AttentionShape s = make_shape(opt.batch, opt.seq, opt.heads, opt.kv_heads, opt.head_dim);
  std::vector<std::int32_t> pos = positions(s.seq_q);
  Tables tables = build_tables(s, opt.pattern, opt.k, opt.seed, pos);
  if (!opt.dump_dir.empty()) dump_tables(opt.dump_dir, tables, s, opt.k);
  const double pairs = attended_pairs(tables.table, s, pos);
  const double avg_entries = static_cast<double>(tables.table.entries.size()) / static_cast<double>(s.num_units());
  Problem p(s, dtype, std::move(tables), pos, opt.backward);
  fill_repeating(p.q, dtype, opt.seed + 1);
  fill_repeating(p.k, dtype, opt.seed + 2);
  fill_repeating(p.v, dtype, opt.seed + 3);
  if (opt.backward) fill_repeating(p.d_o, dtype, opt.seed + 4);

  cudaStream_t stream;
  RINGCAST_CUDA_CHECK(cudaStreamCreate(&stream));
  const kernels::ExecContext ctx = Problem::ctx(stream);
  const double fwd_flops = 4.0 * s.head_dim * pairs;
  const double fwd_ms = median_ms(opt.warmup, opt.repeats, stream, [&] { kernels::attention_forward(p.fwd, ctx); });
  double fb_ms = NAN;
  if (opt.backward) {
    fb_ms = median_ms(opt.warmup, opt.repeats, stream, [&] {
      kernels::attention_forward(p.fwd, ctx);
      kernels::attention_backward(p.bwd, ctx);
    });
  }
  RINGCAST_CUDA_CHECK(cudaStreamDestroy(stream));

  const double fwd_tflops = fwd_flops / (fwd_ms * 1e-3) / 1e12;
  const double fb_tflops = 3.5 * fwd_flops / (fb_ms * 1e-3) / 1e12;
  const std::string shape = fmt::format("B{} n{} h{}/{} d{}", s.batch, s.seq_q, s.heads, s.kv_heads, s.head_dim);
  fmt::print("# ringcast bench kernels on {} ({} SMs), {}\n", prop.name, prop.multiProcessorCount, opt.dtype);
  fmt::print("{:<28} {:<13} {:>4} {:>9} {:>10} {:>9} {:>12} {:>9} {:>9} {}\n", "shape", "pattern", "k", "entries",
             "fwd_ms", "fwd_TF/s", "fwd+bwd_ms", "f+b_TF/s", "error", "check");
  fmt::print("{:<28} {:<13} {:>4} {:>9.1f} {:>10.3f} {:>9.1f} {:>12.3f} {:>9.1f} {:>9.2e} {}\n", shape, opt.pattern,
             opt.k, avg_entries, fwd_ms, fwd_tflops, fb_ms, fb_tflops, err, ok ? "OK" : "WRONG");
  fmt::print("csv,ringcast,{},{},{},{},{},{},{},{},{:.6g},{:.6g},{:.6g},{:.6g},{:.6g},{:.6g},{:.3e},{}\n", opt.pattern,
             s.batch, s.seq_q, s.heads, s.kv_heads, s.head_dim, opt.k, opt.dtype, avg_entries, pairs, fwd_ms,
             fwd_tflops, fb_ms, fb_tflops, err, ok ? "OK" : "WRONG");
  return ok ? 0 : 1;
}

#endif  // RINGCAST_WITH_CUDA

}  // namespace ringcast::launch
