// The distributed attention operator's common parts: shard positions and segments, page-pool
// packing, device block tables, argument checks, and the choice of mode.
#include "agreement.hpp"
#include "attention_internal.hpp"

#include <ringcast/error.hpp>
#include <ringcast/kernels/layout.hpp>

#include <cstdint>
#include <iterator>

namespace ringcast {

Segments shard_segments(const LayerShape& shape, const AttentionOptions& options, int rank, int page_size) {
  Segments s;
  const std::int64_t n_loc = shape.local_len();
  if (options.resolved_placement(shape) == Placement::kZigzag) {
    const std::int64_t chunk = shape.seq_len / (2 * shape.ranks);
    s.count = 2;
    s.len = chunk;
    s.pos0 = {static_cast<std::int32_t>(rank * chunk), static_cast<std::int32_t>((2 * shape.ranks - 1 - rank) * chunk)};
  } else {
    s.count = 1;
    s.len = n_loc;
    s.pos0 = {static_cast<std::int32_t>(rank * n_loc)};
  }
  s.pages_per_segment = (s.len + page_size - 1) / page_size;
  return s;
}

std::vector<kernels::KeyRange> Segments::ranges(std::int64_t first_page) const {
  std::vector<kernels::KeyRange> r;
  for (int i = 0; i < count; ++i) r.push_back({first_page + i * pages_per_segment, len, pos0[i]});
  return r;
}

std::vector<std::int32_t> shard_positions(const LayerShape& shape, const AttentionOptions& options, int rank) {
  validate(shape, options);
  const Segments seg = shard_segments(shape, options, rank, kExactPageSize);
  std::vector<std::int32_t> pos;
  pos.reserve(static_cast<std::size_t>(seg.count * seg.len));
  for (int i = 0; i < seg.count; ++i)
    for (std::int64_t j = 0; j < seg.len; ++j) pos.push_back(static_cast<std::int32_t>(seg.pos0[i] + j));
  return pos;
}

namespace {

// The strided copy between tokens [B, S, L, H, d] and pool [B][H][S*pps][ps][d]; within a head, token
// (s, j) sits at slot s * pps * ps + j of the pool, so the pool side is a plain strided view.
kernels::StridedCopy pool_copy(int batch, int heads, int d, const Segments& seg, int page_size, bool to_pool,
                               PoolSpan span) {
  const std::int64_t slots = (span.pool_pages < 0 ? seg.pages() : span.pool_pages) * page_size;
  kernels::StridedCopy c;
  c.ndim = 5;
  c.shape = {batch, seg.count, seg.len, heads, d, 1};
  const std::array<std::int64_t, 6> tok{seg.count * seg.len * heads * d, seg.len * heads * d, std::int64_t{heads} * d, d, 1, 1};
  const std::array<std::int64_t, 6> pool{heads * slots * d, seg.pages_per_segment * page_size * d, d, slots * d, 1, 1};
  c.src_strides = to_pool ? tok : pool;
  c.dst_strides = to_pool ? pool : tok;
  return c;
}

}  // namespace

void pack_to_pool(const void* tokens, DType dtype, void* pool, int batch, int heads, int head_dim, const Segments& seg,
                  int page_size, const kernels::ExecContext& ctx, PoolSpan span) {
  kernels::StridedCopy c = pool_copy(batch, heads, head_dim, seg, page_size, true, span);
  c.src = tokens;
  c.dst = static_cast<char*>(pool) + span.first_page * page_size * head_dim * dtype_size(dtype);
  c.src_dtype = c.dst_dtype = dtype;
  kernels::copy_strided(c, ctx);
}

void unpack_from_pool(const float* pool, void* tokens, DType dst_dtype, int batch, int heads, int head_dim,
                      const Segments& seg, int page_size, const kernels::ExecContext& ctx, PoolSpan span) {
  kernels::StridedCopy c = pool_copy(batch, heads, head_dim, seg, page_size, false, span);
  c.src = pool + span.first_page * page_size * head_dim;
  c.src_dtype = DType::kF32;
  c.dst = tokens;
  c.dst_dtype = dst_dtype;
  kernels::copy_strided(c, ctx);
}

DeviceTables::DeviceTables(const kernels::HostBlockTable& table, const kernels::AttentionShape& shape,
                           const Device& device, Stream stream) {
  const kernels::HostTransposedTable t = kernels::transpose(table, shape);
  auto put = [&](DeviceBuffer& buf, const auto& vec) {
    using T = typename std::decay_t<decltype(vec)>::value_type;
    buf = DeviceBuffer(vec.size() * sizeof(T), device);
    buf.copy_from_host(vec.data(), vec.size() * sizeof(T), 0, stream);
  };
  put(offsets_, table.offsets);
  put(entries_, table.entries);
  put(key_meta_, table.key_meta);
  put(t_offsets_, t.offsets);
  put(t_refs_, t.refs);
  num_entries_ = static_cast<std::int64_t>(table.entries.size());
  num_refs_ = static_cast<std::int64_t>(t.refs.size());
  rows_vary_ = table.rows_vary;
}

kernels::BlockTable DeviceTables::table() const {
  return {offsets_.as<const std::int64_t>(), entries_.as<const kernels::BlockEntry>(),
          key_meta_.bytes() ? key_meta_.as<const kernels::KeyMeta>() : nullptr, num_entries_, rows_vary_};
}

kernels::TransposedTable DeviceTables::transposed() const {
  return {t_offsets_.as<const std::int64_t>(), t_refs_.as<const kernels::PageRef>(), num_refs_};
}

std::size_t DeviceTables::bytes() const {
  return offsets_.bytes() + entries_.bytes() + key_meta_.bytes() + t_offsets_.bytes() + t_refs_.bytes();
}

DistributedAttention::Mode::Mode(const Session& s, const LayerShape& sh, const AttentionOptions& o)
    : session(s),
      shape(sh),
      options(o),
      positions(shard_positions(sh, o, s.rank())),
      ctx{s.device(), s.stream()} {
  RINGCAST_CHECK(sh.ranks == s.size(), "the layer shape names {} ranks but the session has {}", sh.ranks, s.size());
  const bool cpu = s.device().kind == DeviceKind::kCpu;
  RINGCAST_CHECK(cpu ? sh.dtype == DType::kF32 : (sh.dtype == DType::kBF16 || sh.dtype == DType::kF16),
                 "dtype {} on the {} backend (CPU: f32; CUDA: bf16 or f16)", dtype_name(sh.dtype), cpu ? "CPU" : "CUDA");
}

std::vector<AttendedEntry> DistributedAttention::Mode::attended_entries() const {
  RINGCAST_THROW("attended_entries() is not available for mode {} (clustered mode only: the exact modes attend "
                 "every key a row may see)",
                 name(options.mode));
}

TableEntries DistributedAttention::Mode::table_entries() const {
  RINGCAST_THROW("table_entries() is not available for mode {} (clustered mode only: the exact modes attend "
                 "every key a row may see)",
                 name(options.mode));
}

void TableEntries::add(std::span<const std::int64_t> offsets) {
  RINGCAST_CHECK(!offsets.empty() && offsets.front() == 0, "TableEntries::add: offsets must start at 0");
  for (std::size_t u = 1; u < offsets.size(); ++u) max = std::max(max, offsets[u] - offsets[u - 1]);
  units += static_cast<std::int64_t>(offsets.size()) - 1;
  total += offsets.back();
}

std::vector<std::int32_t> DistributedAttention::Mode::cluster_members() const {
  RINGCAST_THROW("cluster_members() is available with clusters = surrogate only (mode {}, clusters = {})",
                 name(options.mode), name(options.clusters));
}

DeviceBuffer DistributedAttention::Mode::allocate(std::size_t bytes) {
  workspace_bytes += bytes;
  return DeviceBuffer(bytes, session.device());
}

namespace {

// Whether two views share memory (an empty view shares none).
bool overlaps(const TensorView& a, const TensorView& b) {
  if (a.data == nullptr || b.data == nullptr) return false;
  const auto a0 = reinterpret_cast<std::uintptr_t>(a.data), b0 = reinterpret_cast<std::uintptr_t>(b.data);
  return a0 < b0 + b.bytes() && b0 < a0 + a.bytes();
}

void check_view(const TensorView& t, const char* name, DType dtype, std::initializer_list<std::int64_t> dims,
                const Device& device) {
  RINGCAST_CHECK(t.data != nullptr, "attention: {} is null", name);
  RINGCAST_CHECK(t.dtype == dtype, "attention: {} is {}, expected {}", name, dtype_name(t.dtype), dtype_name(dtype));
  RINGCAST_CHECK(t.device.kind == device.kind, "attention: {} lives on the wrong device", name);
  RINGCAST_CHECK(t.is_contiguous(), "attention: {} must be contiguous", name);
  RINGCAST_CHECK(t.ndim == static_cast<int>(dims.size()), "attention: {} has {} dimensions, expected {}", name, t.ndim,
                 dims.size());
  int i = 0;
  for (auto d : dims) {
    RINGCAST_CHECK(t.shape[i] == d, "attention: {} dimension {} is {}, expected {}", name, i, t.shape[i], d);
    ++i;
  }
}

}  // namespace

void DistributedAttention::Mode::check_args(const AttentionForwardArgs& a) const {
  const auto& s = shape;
  const std::int64_t n = s.local_len();
  const Device& dev = session.device();
  check_view(a.q, "q", s.dtype, {s.batch, n, s.heads, s.head_dim}, dev);
  check_view(a.k, "k", s.dtype, {s.batch, n, s.kv_heads, s.head_dim}, dev);
  check_view(a.v, "v", s.dtype, {s.batch, n, s.kv_heads, s.head_dim}, dev);
  check_view(a.o, "o", s.dtype, {s.batch, n, s.heads, s.head_dim}, dev);
  check_view(a.lse, "lse", DType::kF32, {s.batch, s.heads, n}, dev);
  check_surrogates(a.surrogates, "surrogates", s.dtype);
}

void DistributedAttention::Mode::check_surrogates(const TensorView& t, const char* what, DType dtype) const {
  if (!options.uses_surrogates()) {
    RINGCAST_CHECK(t.data == nullptr, "attention: {} given, but mode {} with clusters = {} takes none", what,
                   name(options.mode), name(options.clusters));
    return;
  }
  RINGCAST_CHECK(t.data != nullptr, "attention: clusters = surrogate needs {} [h_kv, c, d] (surrogate_shape())", what);
  const auto [h_kv, c, d] = surrogate_shape(shape, options);
  check_view(t, what, dtype, {h_kv, c, d}, session.device());
}

void DistributedAttention::Mode::check_args(const AttentionBackwardArgs& a) const {
  check_args(AttentionForwardArgs{a.q, a.k, a.v, a.o, a.lse, a.surrogates});
  const auto& s = shape;
  const std::int64_t n = s.local_len();
  const Device& dev = session.device();
  check_view(a.d_o, "d_o", s.dtype, {s.batch, n, s.heads, s.head_dim}, dev);
  check_view(a.d_q, "d_q", s.dtype, {s.batch, n, s.heads, s.head_dim}, dev);
  check_view(a.d_k, "d_k", s.dtype, {s.batch, n, s.kv_heads, s.head_dim}, dev);
  check_view(a.d_v, "d_v", s.dtype, {s.batch, n, s.kv_heads, s.head_dim}, dev);
  check_surrogates(a.d_surrogates, "d_surrogates", DType::kF32);
  // Outputs overlap no input and no other output, but for a gradient that is its own input.
  const std::pair<const char*, const TensorView*> inputs[] = {{"q", &a.q},     {"k", &a.k},   {"v", &a.v},
                                                              {"o", &a.o},     {"lse", &a.lse}, {"d_o", &a.d_o},
                                                              {"surrogates", &a.surrogates}};
  const std::pair<const char*, const TensorView*> outputs[] = {
      {"d_q", &a.d_q}, {"d_k", &a.d_k}, {"d_v", &a.d_v}, {"d_surrogates", &a.d_surrogates}};
  for (std::size_t i = 0; i < std::size(outputs); ++i) {
    const auto& [out_name, out] = outputs[i];
    for (std::size_t j = 0; j < std::size(inputs); ++j) {
      const auto& [in_name, in] = inputs[j];
      if (!overlaps(*out, *in)) continue;
      const bool own_input = i < 3 && j == i && out->data == in->data && out->bytes() == in->bytes();
      RINGCAST_CHECK(own_input, "attention backward: {} overlaps {}", out_name, in_name);
    }
    for (std::size_t j = 0; j < i; ++j)
      RINGCAST_CHECK(!overlaps(*out, *outputs[j].second), "attention backward: {} overlaps {}", out_name,
                     outputs[j].first);
  }
}

DistributedAttention::DistributedAttention(const Session& session, const LayerShape& shape,
                                           const AttentionOptions& options) {
  require_same_layer_on_all_ranks(session, shape, options);  // before validate(): a disagreement fails everywhere
  validate(shape, options);
  switch (options.mode) {
    case AttentionMode::kRing:
    case AttentionMode::kAllGather: mode_ = make_ring_mode(session, shape, options); break;
    case AttentionMode::kUlysses: mode_ = make_ulysses_mode(session, shape, options); break;
    case AttentionMode::kClustered: mode_ = make_clustered_mode(session, shape, options); break;
  }
}

DistributedAttention::~DistributedAttention() = default;
const LayerShape& DistributedAttention::shape() const { return mode_->shape; }
const AttentionOptions& DistributedAttention::options() const { return mode_->options; }
std::span<const std::int32_t> DistributedAttention::positions() const { return mode_->positions; }
std::size_t DistributedAttention::workspace_bytes() const { return mode_->workspace_bytes; }
std::vector<AttendedEntry> DistributedAttention::attended_entries() const { return mode_->attended_entries(); }
TableEntries DistributedAttention::table_entries() const { return mode_->table_entries(); }
std::vector<std::int32_t> DistributedAttention::cluster_members() const { return mode_->cluster_members(); }

void DistributedAttention::forward(const AttentionForwardArgs& args) {
  mode_->check_args(args);
  if (mode_->options.check_inputs) {
    const std::pair<std::string_view, TensorView> inputs[] = {{"q", args.q}, {"k", args.k}, {"v", args.v}};
    require_finite_on_all_ranks(mode_->session, inputs);
  }
  mode_->forward(args);
}

void DistributedAttention::backward(const AttentionBackwardArgs& args) {
  mode_->check_args(args);
  if (mode_->options.check_inputs) {
    const std::pair<std::string_view, TensorView> inputs[] = {{"d_o", args.d_o}};
    require_finite_on_all_ranks(mode_->session, inputs);
  }
  mode_->backward(args);
}

}  // namespace ringcast
