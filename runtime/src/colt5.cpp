// CoLT5 mixers (colt5.hpp), one code path for both backends. Activations are [rows, ·] fp32 matrices
// in the session device's memory, rows = batch * n_loc in position order; every operation on them is
// a kernels:: call enqueued on the session's stream (routed rows move by gather_rows, scaled by
// s̃, and dL/ds̃ comes from rowwise_dot on the routed rows). Light attention: the rank's window keys
// (its own rows plus halos of up to window_radius positions from the ranks around it, one grouped
// exchange of fp32 rows) in page pools of the storage dtype, and one kernel call over all heads whose
// table gives the light KV heads the exact band |i - j| <= r (KeyMeta row masks on the pages that
// straddle its edges) and the heavy KV heads nothing; the heavy heads' slots of O are then filled from
// one GatheredAttention call for the whole batch. Gradients of halo keys go back to their owners by
// the reverse exchange; every sum runs in a fixed order.
// The host sees only routing metadata (select_hard): each router downloads its scores, all-gathers
// its candidates through device buffers and downloads them, then uploads its routed rows. That waits
// for the stream twice per router and forward (the scores, the all-gather); the other copies find it
// idle. GatheredAttention adds about one wait per pass (gathered_attention.cpp). So a forward waits
// twice (FFN) or about five times (attention), a backward never (FFN) or about once (attention), and
// the host never touches an activation.
#include "colt5.hpp"

#include <ringcast/error.hpp>
#include <ringcast/kernels/block_table.hpp>
#include <ringcast/kernels/layers.hpp>
#include <ringcast/kernels/layout.hpp>
#include <ringcast/kernels/routing.hpp>
#include <ringcast/kernels/row_gather.hpp>
#include <ringcast/memory.hpp>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdlib>
#include <numeric>
#include <utility>

namespace ringcast::model {
namespace {

constexpr int kWindowPageSize = 64;

void zero(float* x, std::int64_t count, const RunContext& rc) {
  kernels::fill_zero(x, static_cast<std::size_t>(count) * sizeof(float), rc.exec);
}

std::int64_t floats_for(std::size_t bytes) {
  return static_cast<std::int64_t>((bytes + sizeof(float) - 1) / sizeof(float));
}

// The scratch floats that n elements of dtype fill.
std::int64_t floats_for(std::int64_t n, DType dtype) {
  return floats_for(static_cast<std::size_t>(n) * dtype_size(dtype));
}

// Element `offset` of an array of dtype at base.
void* element(void* base, DType dtype, std::int64_t offset) {
  return static_cast<char*>(base) + offset * static_cast<std::int64_t>(dtype_size(dtype));
}

// The soft top-k's cross-rank reduction: user is the Session whose ranks hold the slices.
void all_reduce_slices(float* values, int count, kernels::ReduceOp op, void* user) {
  const Session& session = *static_cast<const Session*>(user);
  const comm::Buffer buf{values, static_cast<std::size_t>(count), DType::kF32};
  session.comm().all_reduce(buf, buf, op == kernels::ReduceOp::kSum ? comm::ReduceOp::kSum : comm::ReduceOp::kMax,
                            session.stream());
}

// Element (h, b, t, c) of a block of rows sits at base + h·head + b·batch + t·row + c.
struct Strides {
  std::int64_t head, batch, row;
};

// dst (+)= src over heads x batch x rows x d elements; src is fp32, dst fp32 or (when not
// accumulating) the storage dtype of a page pool.
void copy_block(const float* src, Strides s, void* dst, DType dst_dtype, Strides t, int heads, int batch,
                std::int64_t rows, int d, bool accumulate, const RunContext& rc) {
  if (heads == 0 || rows == 0) return;
  kernels::StridedCopy c;
  c.ndim = 4;
  c.shape = {heads, batch, rows, d};
  c.src_strides = {s.head, s.batch, s.row, 1};
  c.dst_strides = {t.head, t.batch, t.row, 1};
  c.src = src;
  c.dst = dst;
  c.dst_dtype = dst_dtype;
  c.accumulate = accumulate;
  kernels::copy_strided(c, rc.exec);
}

// Rows [first, first + count) of a block.
struct HaloRows {
  std::int64_t first, count;
};

// One message per neighbour, fp32 [K | V] x [batch, rows, heads, d]: rows out(peer) of (src_k, src_v)
// go to the peer, and what arrives from it lands in rows in(peer) of (dst_k, dst_v), of dst_dtype --
// added with `accumulate`, in peer order so sums repeat exactly. The light attention's halo (token
// rows into window slots) and its transpose (slot gradients back into token rows) are this one exchange.
template <typename Peers, typename Out, typename In>
void exchange_halo(const RunContext& rc, const Peers& peers, int heads, int batch, int d, const float* src_k,
                   const float* src_v, Strides src, Out out, void* dst_k, void* dst_v, DType dst_dtype, Strides dst,
                   In in, bool accumulate) {
  float *send = rc.scratch.get("colt5.attn.halo_send"), *recv = rc.scratch.get("colt5.attn.halo_recv");
  const auto halo = [&](std::int64_t rows) { return Strides{d, rows * heads * d, std::int64_t{heads} * d}; };
  std::vector<comm::SendOp> sends;
  std::vector<comm::RecvOp> recvs;
  std::int64_t sent = 0, received = 0;
  for (const auto& p : peers) {
    const HaloRows o = out(p);
    const std::int64_t part = std::int64_t{batch} * o.count * heads * d;
    float* msg = send + sent;
    copy_block(src_k + o.first * src.row, src, msg, DType::kF32, halo(o.count), heads, batch, o.count, d, false, rc);
    copy_block(src_v + o.first * src.row, src, msg + part, DType::kF32, halo(o.count), heads, batch, o.count, d, false,
               rc);
    sends.push_back({p.rank, {msg, static_cast<std::size_t>(2 * part), DType::kF32}});
    sent += 2 * part;
    const std::int64_t arriving = 2 * std::int64_t{batch} * in(p).count * heads * d;
    recvs.push_back({p.rank, {recv + received, static_cast<std::size_t>(arriving), DType::kF32}});
    received += arriving;
  }
  rc.session.comm().exchange(sends, recvs, rc.session.stream());
  received = 0;
  for (const auto& p : peers) {
    const HaloRows i = in(p);
    const std::int64_t part = std::int64_t{batch} * i.count * heads * d;
    copy_block(recv + received, halo(i.count), element(dst_k, dst_dtype, i.first * dst.row), dst_dtype, dst, heads,
               batch, i.count, d, accumulate, rc);
    copy_block(recv + received + part, halo(i.count), element(dst_v, dst_dtype, i.first * dst.row), dst_dtype, dst,
               heads, batch, i.count, d, accumulate, rc);
    received += 2 * part;
  }
}

// Routed rows move between a full matrix (rows of full_stride floats) and a packed one (rows of
// `width` floats), `width` columns at a time, optionally weighted per routed row ([count()]).
// packed[t] = w_t · full[rows[t]]
void gather_routed(const RunContext& rc, const Router& router, int width, const float* full, std::int64_t full_stride,
                   float* packed, const float* weights = nullptr) {
  kernels::gather_rows({.rows = router.count(),
                        .width = width,
                        .index = router.device_rows(rc),
                        .weights = weights,
                        .src = full,
                        .src_row_stride = full_stride,
                        .dst = packed},
                       rc.exec);
}
// full[rows[t]] (+)= w_t · packed[t]; the other rows keep their values.
void scatter_routed(const RunContext& rc, const Router& router, int width, const float* packed, float* full,
                    std::int64_t full_stride, const float* weights, bool accumulate) {
  kernels::gather_rows({.rows = router.count(),
                        .width = width,
                        .dst_rows = router.device_rows(rc),
                        .weights = weights,
                        .accumulate = accumulate,
                        .src = packed,
                        .dst = full,
                        .dst_row_stride = full_stride},
                       rc.exec);
}

// Routed rows per sequence from a router's offsets.
std::vector<std::int64_t> per_sequence(std::span<const std::int64_t> offsets) {
  std::vector<std::int64_t> counts(offsets.size() - 1);
  for (std::size_t b = 0; b < counts.size(); ++b) counts[b] = offsets[b + 1] - offsets[b];
  return counts;
}

std::int64_t routed_tokens(const char* field, double fraction, std::int64_t n) {
  RINGCAST_CHECK(fraction > 0.0 && fraction <= 1.0, "colt5.{} = {} must lie in (0, 1]", field, fraction);
  const auto k = static_cast<std::int64_t>(std::llround(fraction * static_cast<double>(n)));
  RINGCAST_CHECK(k >= 1, "colt5.{} = {} routes no token of a sequence of {} (need at least 1)", field, fraction, n);
  return k;
}

}  // namespace

Colt5Plan plan_colt5(const ModelConfig& c, const Geometry& g, int ranks, int rank) {
  const Colt5Config& o = c.colt5;
  RINGCAST_CHECK(!g.causal, "CoLT5 runs in bidirectional (encoder) stacks; this stack is causal");
  RINGCAST_CHECK(c.heads >= 1 && c.kv_heads >= 1 && c.heads % c.kv_heads == 0,
                 "CoLT5: heads ({}) must be a positive multiple of kv_heads ({})", c.heads, c.kv_heads);
  Colt5Plan p;
  p.light_heads = o.light_heads == 0 ? c.heads / 4 : o.light_heads;
  RINGCAST_CHECK(p.light_heads >= 1 && p.light_heads < c.heads,
                 "colt5.light_heads resolves to {}, outside [1, heads = {}) (0 means heads / 4)", p.light_heads,
                 c.heads);
  const int group = c.heads / c.kv_heads;
  RINGCAST_CHECK(p.light_heads % group == 0,
                 "colt5.light_heads = {} must be a multiple of heads / kv_heads = {}, so that light and heavy heads "
                 "use separate KV heads",
                 p.light_heads, group);
  p.ffn_tokens = routed_tokens("ffn_fraction", o.ffn_fraction, g.seq_len);
  p.query_tokens = routed_tokens("query_fraction", o.query_fraction, g.seq_len);
  p.kv_tokens = routed_tokens("kv_fraction", o.kv_fraction, g.seq_len);
  RINGCAST_CHECK(o.window_radius >= 0, "colt5.window_radius = {} must be >= 0", o.window_radius);
  RINGCAST_CHECK(std::isfinite(o.epsilon) && o.epsilon > 0.0f && o.iterations >= 1,
                 "colt5: epsilon ({}) must be > 0 and iterations ({}) >= 1", o.epsilon, o.iterations);
  p.light_ffn_hidden = o.light_ffn_hidden == 0 ? c.ffn_hidden / 2 : o.light_ffn_hidden;
  p.heavy_ffn_hidden = o.heavy_ffn_hidden == 0 ? c.ffn_hidden * 4 : o.heavy_ffn_hidden;
  RINGCAST_CHECK(p.light_ffn_hidden >= 1 && p.heavy_ffn_hidden >= 1,
                 "colt5: light_ffn_hidden ({}) and heavy_ffn_hidden ({}) must resolve to >= 1", p.light_ffn_hidden,
                 p.heavy_ffn_hidden);
  bool contiguous =
      g.seq_len == std::int64_t{ranks} * g.local_len && static_cast<std::int64_t>(g.positions.size()) == g.local_len;
  for (std::int64_t i = 0; contiguous && i < g.local_len; ++i)
    contiguous = g.positions[static_cast<std::size_t>(i)] == rank * g.local_len + i;
  RINGCAST_CHECK(contiguous,
                 "CoLT5 needs the contiguous placement (rank r holds positions [r n_loc, (r + 1) n_loc)); use "
                 "attention.placement = contiguous");
  return p;
}

// --- Router ---

Router::Router(const Session& session, ParameterTable& table, Scratch& scratch, const std::string& name,
               const std::string& scratch_key, const ModelConfig& c, const Geometry& g, std::int64_t k)
    : session_(session), geom_(g), dim_(c.dim), k_(k), epsilon_(c.colt5.epsilon), iterations_(c.colt5.iterations),
      key_(scratch_key) {
  RINGCAST_CHECK(k >= 1 && k <= g.seq_len, "Router '{}': routes {} of {} tokens", name, k, g.seq_len);
  u_ = table.add(name, 1, c.dim, false, Init::kFanIn);
  for (const char* part : {".s", ".weights", ".d_weights", ".d_s"}) scratch.reserve(key_ + part, g.rows());
  scratch.reserve(key_ + ".a", std::int64_t{g.batch} * iterations_);
  const std::int64_t candidates = 2 * std::int64_t{g.batch} * max_local();  // (score bits, position) pairs
  scratch.reserve(key_ + ".mine", floats_for(static_cast<std::size_t>(candidates) * sizeof(std::int32_t)));
  scratch.reserve(key_ + ".all",
                  floats_for(static_cast<std::size_t>(candidates * session.size()) * sizeof(std::int32_t)));
  scratch.reserve(key_ + ".rows", floats_for(static_cast<std::size_t>(g.batch * max_local()) * sizeof(std::int64_t)));
  scratch.reserve(key_ + ".routed_weights", g.batch * max_local());
}

std::int64_t Router::max_local() const { return std::min(k_, geom_.local_len); }

const std::int64_t* Router::device_rows(const RunContext& rc) const {
  return reinterpret_cast<const std::int64_t*>(rc.scratch.get(key_ + ".rows"));
}

const float* Router::routed_weights(const RunContext& rc) const { return rc.scratch.get(key_ + ".routed_weights"); }

// Each rank holds a slice of every sequence: the soft top-k sums its slices across ranks.
template <class Params>
Params Router::soft_topk_settings() const {
  Params p;
  p.batch = geom_.batch;
  p.seq = geom_.local_len;
  p.k = static_cast<int>(k_);
  p.epsilon = epsilon_;
  p.iterations = iterations_;
  p.reduce = {all_reduce_slices, const_cast<void*>(static_cast<const void*>(&session_))};
  return p;
}

void Router::forward(const RunContext& rc, const float* x) {
  const Scratch& sc = rc.scratch;
  float *s = sc.get(key_ + ".s"), *weights = sc.get(key_ + ".weights"), *a = sc.get(key_ + ".a");
  kernels::router_scores({geom_.batch, geom_.local_len, dim_, x, rc.p(u_), s}, rc.exec);
  auto p = soft_topk_settings<kernels::SoftTopkParams>();
  p.s = s;
  p.s_tilde = weights;
  p.a_history = a;
  kernels::soft_topk(p, rc.exec);
  select_hard(rc, s);
  gather_routed(rc, *this, 1, weights, 1, sc.get(key_ + ".routed_weights"));
}

// The global top-k of each sequence by (score desc, position asc). A token of the global top-k is in
// its rank's local top-min(k, n_loc) under the same order, so gathering those candidates as
// (score bits, position) pairs suffices, and every rank then picks the same set. On the host: the
// scores come down, the candidates go through the communicator's memory, the routed rows go back up.
void Router::select_hard(const RunContext& rc, const float* s_dev) {
  const Device& device = rc.exec.device;
  const Stream stream = rc.exec.stream;
  std::vector<float> scores(static_cast<std::size_t>(geom_.rows()));
  copy_to_host(scores.data(), s_dev, scores.size() * sizeof(float), device, stream);
  const float* s = scores.data();
  const int ranks = session_.size(), batch = geom_.batch;
  const std::int64_t n_loc = geom_.local_len, first = std::int64_t{session_.rank()} * n_loc, c = max_local();
  const std::size_t pair = 2;
  auto before = [](float sa, std::int32_t pa, float sb, std::int32_t pb) { return sa > sb || (sa == sb && pa < pb); };

  std::vector<std::int32_t> mine(static_cast<std::size_t>(batch * c) * pair);
  std::vector<std::int32_t> local(static_cast<std::size_t>(n_loc));
  for (int b = 0; b < batch; ++b) {
    const float* sb = s + b * n_loc;
    std::iota(local.begin(), local.end(), 0);
    std::partial_sort(local.begin(), local.begin() + c, local.end(),
                      [&](std::int32_t i, std::int32_t j) { return before(sb[i], i, sb[j], j); });
    for (std::int64_t t = 0; t < c; ++t) {
      const std::size_t at = static_cast<std::size_t>(b * c + t) * pair;
      mine[at] = std::bit_cast<std::int32_t>(sb[local[static_cast<std::size_t>(t)]]);
      mine[at + 1] = static_cast<std::int32_t>(first + local[static_cast<std::size_t>(t)]);
    }
  }
  std::vector<std::int32_t> all(mine.size() * static_cast<std::size_t>(ranks));
  auto* mine_dev = reinterpret_cast<std::int32_t*>(rc.scratch.get(key_ + ".mine"));
  auto* all_dev = reinterpret_cast<std::int32_t*>(rc.scratch.get(key_ + ".all"));
  copy_from_host(mine_dev, mine.data(), mine.size() * sizeof(std::int32_t), device, stream);
  session_.comm().all_gather({mine_dev, mine.size(), DType::kI32}, {all_dev, all.size(), DType::kI32}, stream);
  session_.comm().synchronize(stream);
  copy_to_host(all.data(), all_dev, all.size() * sizeof(std::int32_t), device, stream);

  struct Candidate {
    float score;
    std::int32_t pos;
  };
  std::vector<Candidate> cands(static_cast<std::size_t>(ranks * c));
  rows_.clear();
  offsets_.assign(1, 0);
  for (int b = 0; b < batch; ++b) {
    for (int r = 0; r < ranks; ++r)
      for (std::int64_t t = 0; t < c; ++t) {
        const std::size_t at = (static_cast<std::size_t>(r * batch + b) * c + t) * pair;
        cands[static_cast<std::size_t>(r * c + t)] = {std::bit_cast<float>(all[at]), all[at + 1]};
      }
    std::partial_sort(cands.begin(), cands.begin() + k_, cands.end(),
                      [&](const Candidate& x, const Candidate& y) { return before(x.score, x.pos, y.score, y.pos); });
    const std::size_t begin = rows_.size();
    for (std::int64_t t = 0; t < k_; ++t) {
      const std::int64_t pos = cands[static_cast<std::size_t>(t)].pos;
      if (pos >= first && pos < first + n_loc) rows_.push_back(b * n_loc + pos - first);
    }
    std::sort(rows_.begin() + static_cast<std::ptrdiff_t>(begin), rows_.end());
    offsets_.push_back(static_cast<std::int64_t>(rows_.size()));
  }
  copy_from_host(rc.scratch.get(key_ + ".rows"), rows_.data(), rows_.size() * sizeof(std::int64_t), device, stream);
}

void Router::backward(const RunContext& rc, const float* x, const float* d_routed, float* dx) {
  const Scratch& sc = rc.scratch;
  float *s = sc.get(key_ + ".s"), *a = sc.get(key_ + ".a"), *d_s = sc.get(key_ + ".d_s");
  float* d_weights = sc.get(key_ + ".d_weights");
  zero(d_weights, geom_.rows(), rc);
  scatter_routed(rc, *this, 1, d_routed, d_weights, 1, nullptr, false);
  zero(d_s, geom_.rows(), rc);
  auto p = soft_topk_settings<kernels::SoftTopkBackwardParams>();
  p.s = s;
  p.a_history = a;
  p.d_s_tilde = d_weights;
  p.d_s = d_s;
  kernels::soft_topk_backward(p, rc.exec);
  kernels::router_scores_backward({geom_.batch, geom_.local_len, dim_, x, rc.p(u_), d_s, dx, rc.g(u_)}, rc.exec);
}

// --- Colt5Ffn ---

Colt5Ffn::Colt5Ffn(const Session& session, ParameterTable& table, Scratch& scratch, const std::string& prefix,
                   const ModelConfig& c, const Geometry& g)
    : geom_(g), plan_(plan_colt5(c, g, session.size(), session.rank())), dim_(c.dim),
      router_(session, table, scratch, prefix + "router_ffn", "colt5.ffn.router", c, g, plan_.ffn_tokens),
      light_(table, scratch, prefix + "ffn_light.", "colt5.ffn_light", c.dim, plan_.light_ffn_hidden, g.rows(),
             c.row_chunk),
      heavy_(table, scratch, prefix + "ffn_heavy.", "colt5.ffn_heavy", c.dim, plan_.heavy_ffn_hidden,
             g.batch * router_.max_local(), c.row_chunk) {
  const std::int64_t routed = g.batch * router_.max_local() * c.dim;
  for (const char* key : {"colt5.ffn.x", "colt5.ffn.h", "colt5.ffn.d_h", "colt5.ffn.d_x"}) scratch.reserve(key, routed);
  scratch.reserve("colt5.ffn.d_weight", g.batch * router_.max_local());
}

void Colt5Ffn::forward(const RunContext& rc, const float* x, float* y) {
  const Scratch& sc = rc.scratch;
  router_.forward(rc, x);
  const std::int64_t nr = router_.count();
  float *xr = sc.get("colt5.ffn.x"), *hr = sc.get("colt5.ffn.h");
  gather_routed(rc, router_, dim_, x, dim_, xr);
  if (nr > 0) {
    zero(hr, nr * dim_, rc);
    heavy_.forward_rows(rc, nr, xr, hr);
  }
  scatter_routed(rc, router_, dim_, hr, y, dim_, router_.routed_weights(rc), true);  // y += s̃ FFN_heavy
  light_.forward(rc, x, y);
}

void Colt5Ffn::backward(const RunContext& rc, const float* x, const float* dy, float* dx) {
  const Scratch& sc = rc.scratch;
  const std::int64_t nr = router_.count();
  float *xr = sc.get("colt5.ffn.x"), *hr = sc.get("colt5.ffn.h"), *d_h = sc.get("colt5.ffn.d_h");
  float *d_xr = sc.get("colt5.ffn.d_x"), *d_weight = sc.get("colt5.ffn.d_weight");
  float* dy_r = d_xr;  // the routed rows of dy, until the heavy backward needs d_xr
  gather_routed(rc, router_, dim_, dy, dim_, dy_r);
  kernels::rowwise_dot({nr, dim_, dy_r, hr, d_weight}, rc.exec);  // dL/ds̃ = dy · FFN_heavy
  kernels::gather_rows({.rows = nr, .width = dim_, .weights = router_.routed_weights(rc), .src = dy_r, .dst = d_h},
                       rc.exec);  // s̃ dy
  if (nr > 0) {
    zero(d_xr, nr * dim_, rc);
    heavy_.backward_rows(rc, nr, xr, d_h, d_xr);
    scatter_routed(rc, router_, dim_, d_xr, dx, dim_, nullptr, true);
  }
  light_.backward(rc, x, dy, dx);
  router_.backward(rc, x, d_weight, dx);
}

// --- Colt5Attention ---

Colt5Attention::Colt5Attention(const Session& session, ParameterTable& table, Scratch& scratch,
                               const std::string& prefix, const ModelConfig& c, const Geometry& g)
    : session_(session), geom_(g), plan_(plan_colt5(c, g, session.size(), session.rank())),
      storage_(attention_dtype(session.device())), proj_(table, prefix, c), light_heads_(plan_.light_heads),
      light_kv_heads_(plan_.light_heads / (c.heads / c.kv_heads)), radius_(c.colt5.window_radius),
      router_q_(session, table, scratch, prefix + "router_q", "colt5.attn.router_q", c, g, plan_.query_tokens),
      router_kv_(session, table, scratch, prefix + "router_kv", "colt5.attn.router_kv", c, g, plan_.kv_tokens),
      gathered_(session, GatheredAttentionShape{c.heads - light_heads_, c.kv_heads - light_kv_heads_, c.head_dim,
                                                g.batch, g.batch * router_q_.max_local(),
                                                g.batch * router_kv_.max_local(), g.batch * plan_.kv_tokens, false}) {
  build_window(session.size(), session.rank());
  const std::int64_t rows = g.rows(), qw = proj_.q_width(), kw = proj_.kv_width(), d = c.head_dim;
  for (const char* key : {"colt5.attn.q", "colt5.attn.o", "colt5.attn.d_q", "colt5.attn.d_o"})
    scratch.reserve(key, rows * qw);
  for (const char* key : {"colt5.attn.k", "colt5.attn.v", "colt5.attn.d_k", "colt5.attn.d_v"})
    scratch.reserve(key, rows * kw);
  scratch.reserve("colt5.attn.lse", rows * c.heads);
  if (storage_ != DType::kF32)
    for (const char* key : {"colt5.attn.q_s", "colt5.attn.d_o_s"})
      scratch.reserve(key, floats_for(rows * qw, storage_));
  const std::int64_t pool = std::int64_t{c.kv_heads} * g.batch * window_pages_ * kWindowPageSize * d;
  for (const char* key : {"colt5.attn.pool_k", "colt5.attn.pool_v"}) scratch.reserve(key, floats_for(pool, storage_));
  for (const char* key : {"colt5.attn.d_pool_k", "colt5.attn.d_pool_v"}) scratch.reserve(key, pool);
  std::int64_t halo_send = 0, halo_recv = 0;
  for (const HaloPeer& p : peers_) {
    halo_send += p.send_count;
    halo_recv += p.recv_count;
  }
  const std::int64_t halo_row = 2 * std::int64_t{g.batch} * light_kv_heads_ * d;  // K and V of one position
  scratch.reserve("colt5.attn.halo_send", std::max(halo_send, halo_recv) * halo_row);
  scratch.reserve("colt5.attn.halo_recv", std::max(halo_send, halo_recv) * halo_row);
  const kernels::ExecContext exec{session.device(), session.stream()};
  scratch.reserve("colt5.attn.kernel",
                  floats_for(std::max(kernels::attention_forward_workspace_bytes(light_shape_, exec),
                                      kernels::attention_backward_workspace_bytes(light_shape_, exec))));
  const int heavy = c.heads - light_heads_, heavy_kv = c.kv_heads - light_kv_heads_;
  const std::int64_t mq = g.batch * router_q_.max_local(), mkv = g.batch * router_kv_.max_local();
  for (const char* key : {"colt5.attn.qh", "colt5.attn.oh", "colt5.attn.d_oh", "colt5.attn.d_qh"})
    scratch.reserve(key, mq * heavy * d);
  scratch.reserve("colt5.attn.lse_h", mq * heavy);
  for (const char* key : {"colt5.attn.kh", "colt5.attn.vh", "colt5.attn.d_kh", "colt5.attn.d_vh"})
    scratch.reserve(key, mkv * heavy_kv * d);
  scratch.reserve("colt5.attn.d_weight_q", mq);
  scratch.reserve("colt5.attn.d_weight_kv", mkv);
  scratch.reserve("colt5.attn.vr", mkv * heavy_kv * d);
  scratch.reserve("colt5.attn.kept", floats_for(gathered_.kept_bytes()));
  scratch.reserve("colt5.attn.gathered", floats_for(gathered_.workspace_bytes()));
}

// The window of positions this rank's queries see, the halo plan, and the light table (the same for
// every batch element: the entries of batch element b name pages b * window_pages + p).
void Colt5Attention::build_window(int ranks, int rank) {
  const Geometry& g = geom_;
  const std::int64_t n = g.seq_len, n_loc = g.local_len, start = rank * n_loc, r = radius_;
  const auto window = [&](std::int64_t first) {
    return std::pair{std::max<std::int64_t>(0, first - r), std::min(n, first + n_loc + r)};
  };
  const auto [w0, w1] = window(start);
  window_first_ = w0;
  window_pages_ = (w1 - w0 + kWindowPageSize - 1) / kWindowPageSize;
  for (int p = 0; p < ranks; ++p) {
    if (p == rank) continue;
    const std::int64_t p0 = p * n_loc;
    const auto [pw0, pw1] = window(p0);
    HaloPeer peer;
    peer.rank = p;
    peer.send_first = std::max(start, pw0) - start;
    peer.send_count = std::max<std::int64_t>(0, std::min(start + n_loc, pw1) - std::max(start, pw0));
    peer.recv_slot = std::max(p0, w0) - w0;
    peer.recv_count = std::max<std::int64_t>(0, std::min(p0 + n_loc, w1) - std::max(p0, w0));
    if (peer.send_count > 0 || peer.recv_count > 0) peers_.push_back(peer);
  }

  light_shape_.batch = g.batch;
  light_shape_.seq_q = n_loc;
  light_shape_.heads = proj_.heads;
  light_shape_.kv_heads = proj_.kv_heads;
  light_shape_.head_dim = proj_.head_dim;
  light_shape_.page_size = kWindowPageSize;
  light_shape_.num_pages = g.batch * window_pages_;

  kernels::HostBlockTable light_table;
  std::vector<std::vector<kernels::BlockEntry>> tiles(static_cast<std::size_t>(light_shape_.num_tiles()));
  for (std::int64_t tile = 0; tile < light_shape_.num_tiles(); ++tile) {
    const int rows = kernels::tile_rows(light_shape_, tile);
    const std::int32_t* pos = g.positions.data() + tile * kernels::kQueryTile;
    const std::int64_t t0 = pos[0], t1 = pos[rows - 1];  // contiguous placement: increasing
    for (std::int64_t page = 0; page < window_pages_; ++page) {
      const std::int64_t k0 = w0 + page * kWindowPageSize;
      const int count = static_cast<int>(std::min<std::int64_t>(kWindowPageSize, w1 - k0));
      const std::int64_t k1 = k0 + count - 1;
      if (k1 < t0 - r || k0 > t1 + r) continue;
      kernels::BlockEntry e{};
      e.page = static_cast<std::int32_t>(page);
      e.key_pos0 = static_cast<std::int32_t>(k0);
      e.key_count = count;
      e.key_meta = -1;
      if (t1 - k0 <= r && k1 - t0 <= r) {  // every row sees every key of the page
        const auto full = kernels::full_row_mask(rows);
        e.row_mask[0] = full[0];
        e.row_mask[1] = full[1];
      } else {  // the page straddles an edge of the band: one row mask per key
        e.key_meta = static_cast<std::int32_t>(light_table.key_meta.size());
        for (int j = 0; j < kWindowPageSize; ++j) {  // a page's worth of records; slots past count stay empty
          kernels::KeyMeta m{};
          for (int row = 0; row < rows && j < count; ++row)
            if (std::abs(pos[row] - (k0 + j)) <= r) m.row_mask[row / 64] |= std::uint64_t{1} << (row % 64);
          e.row_mask[0] |= m.row_mask[0];
          e.row_mask[1] |= m.row_mask[1];
          light_table.key_meta.push_back(m);
        }
      }
      tiles[static_cast<std::size_t>(tile)].push_back(e);
    }
  }
  for (int b = 0; b < g.batch; ++b)
    for (const auto& entries : tiles)
      for (int kvh = 0; kvh < light_shape_.kv_heads; ++kvh) {
        if (kvh < light_kv_heads_) {
          for (kernels::BlockEntry e : entries) {
            e.page += static_cast<std::int32_t>(b * window_pages_);
            light_table.entries.push_back(e);
          }
        }
        light_table.offsets.push_back(static_cast<std::int64_t>(light_table.entries.size()));
      }
  light_tables_ = std::make_unique<DeviceTables>(light_table, light_shape_, session_.device(), session_.stream());
}

void* Colt5Attention::storage_twin(const RunContext& rc, const char* fp32_key, const char* twin_key) const {
  return storage_ == DType::kF32 ? static_cast<void*>(rc.scratch.get(fp32_key)) : rc.scratch.get(twin_key);
}

void Colt5Attention::forward(const RunContext& rc, const float* x, float* y) {
  const Scratch& sc = rc.scratch;
  proj_.project(rc, geom_, x, sc.get("colt5.attn.q"), sc.get("colt5.attn.k"), sc.get("colt5.attn.v"));
  router_q_.forward(rc, x);
  router_kv_.forward(rc, x);
  light_forward(rc);
  heavy_forward(rc);
  kernels::linear_forward({geom_.rows(), static_cast<int>(proj_.q_width()), proj_.dim, sc.get("colt5.attn.o"),
                           rc.p(proj_.wo), y, true, rc.compute},
                          rc.exec);
}

void Colt5Attention::backward(const RunContext& rc, const float* x, const float* dy, float* dx) {
  const Scratch& sc = rc.scratch;
  float *d_q = sc.get("colt5.attn.d_q"), *d_k = sc.get("colt5.attn.d_k"), *d_v = sc.get("colt5.attn.d_v");
  float* d_o = sc.get("colt5.attn.d_o");
  zero(d_o, geom_.rows() * proj_.q_width(), rc);
  kernels::linear_backward({geom_.rows(), static_cast<int>(proj_.q_width()), proj_.dim, sc.get("colt5.attn.o"),
                            rc.p(proj_.wo), dy, d_o, rc.g(proj_.wo), rc.compute},
                           rc.exec);
  light_backward(rc);  // writes d_q (every head), d_k and d_v
  heavy_backward(rc);  // adds the heavy heads' share, and dL/ds̃ of both routers
  router_q_.backward(rc, x, sc.get("colt5.attn.d_weight_q"), dx);
  router_kv_.backward(rc, x, sc.get("colt5.attn.d_weight_kv"), dx);
  proj_.project_backward(rc, geom_, x, d_q, d_k, d_v, dx);
}

// The light kernel reads q, the pools and d_o in the storage dtype and writes O (fp32: o_dtype), LSE,
// dQ and the pool gradients in fp32, so only q, the pools and d_o are converted.
void Colt5Attention::light_forward(const RunContext& rc) {
  const Scratch& sc = rc.scratch;
  const int batch = geom_.batch, lkv = light_kv_heads_, d = proj_.head_dim;
  const std::int64_t n_loc = geom_.local_len, kw = proj_.kv_width(), slots = window_pages_ * kWindowPageSize;
  const float *q = sc.get("colt5.attn.q"), *k = sc.get("colt5.attn.k"), *v = sc.get("colt5.attn.v");
  void *pool_k = sc.get("colt5.attn.pool_k"), *pool_v = sc.get("colt5.attn.pool_v");
  const Strides tokens{d, n_loc * kw, kw};
  const Strides pool{batch * slots * d, slots * d, d};
  const std::int64_t own_slot = geom_.positions[0] - window_first_;
  copy_block(k, tokens, element(pool_k, storage_, own_slot * d), storage_, pool, lkv, batch, n_loc, d, false, rc);
  copy_block(v, tokens, element(pool_v, storage_, own_slot * d), storage_, pool, lkv, batch, n_loc, d, false, rc);

  // Halos: the neighbours' edge rows into their window slots.
  exchange_halo(rc, peers_, lkv, batch, d, k, v, tokens,
                [](const auto& p) { return HaloRows{p.send_first, p.send_count}; }, pool_k, pool_v, storage_, pool,
                [](const auto& p) { return HaloRows{p.recv_slot, p.recv_count}; }, false);

  void* q_s = storage_twin(rc, "colt5.attn.q", "colt5.attn.q_s");
  if (q_s != q)
    kernels::copy_strided(kernels::StridedCopy::flat(q, DType::kF32, q_s, storage_, geom_.rows() * proj_.q_width()),
                          rc.exec);
  float* ws = sc.get("colt5.attn.kernel");
  kernels::AttentionForwardParams p;
  p.shape = light_shape_;
  p.dtype = storage_;
  p.o_dtype = DType::kF32;
  p.softmax_scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(d)));
  p.q = q_s;
  p.k_pages = pool_k;
  p.v_pages = pool_v;
  p.q_pos = geom_.kernel_positions(rc.exec.device);
  p.table = light_tables_->table();
  p.o = sc.get("colt5.attn.o");
  p.lse = sc.get("colt5.attn.lse");
  p.workspace = ws;
  p.workspace_bytes = static_cast<std::size_t>(sc.floats("colt5.attn.kernel")) * sizeof(float);
  kernels::attention_forward(p, rc.exec);
}

void Colt5Attention::light_backward(const RunContext& rc) {
  const Scratch& sc = rc.scratch;
  const int batch = geom_.batch, lkv = light_kv_heads_, d = proj_.head_dim;
  const std::int64_t n_loc = geom_.local_len, kw = proj_.kv_width(), slots = window_pages_ * kWindowPageSize;
  float *d_k = sc.get("colt5.attn.d_k"), *d_v = sc.get("colt5.attn.d_v");
  float *d_pool_k = sc.get("colt5.attn.d_pool_k"), *d_pool_v = sc.get("colt5.attn.d_pool_v");

  const float* d_o = sc.get("colt5.attn.d_o");
  void* d_o_s = storage_twin(rc, "colt5.attn.d_o", "colt5.attn.d_o_s");
  if (d_o_s != d_o)
    kernels::copy_strided(
        kernels::StridedCopy::flat(d_o, DType::kF32, d_o_s, storage_, geom_.rows() * proj_.q_width()), rc.exec);
  float* ws = sc.get("colt5.attn.kernel");
  kernels::AttentionBackwardParams p;
  p.fwd.shape = light_shape_;
  p.fwd.dtype = storage_;
  p.fwd.o_dtype = DType::kF32;
  p.fwd.softmax_scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(d)));
  p.fwd.q = storage_twin(rc, "colt5.attn.q", "colt5.attn.q_s");  // converted by the forward
  p.fwd.k_pages = sc.get("colt5.attn.pool_k");
  p.fwd.v_pages = sc.get("colt5.attn.pool_v");
  p.fwd.q_pos = geom_.kernel_positions(rc.exec.device);
  p.fwd.table = light_tables_->table();
  p.fwd.o = sc.get("colt5.attn.o");
  p.fwd.lse = sc.get("colt5.attn.lse");
  p.d_o = d_o_s;
  p.transposed = light_tables_->transposed();
  p.d_q = sc.get("colt5.attn.d_q");
  p.d_k_pages = d_pool_k;
  p.d_v_pages = d_pool_v;
  p.accumulate = false;  // every head's d_q and every page slot are written
  p.workspace = ws;
  p.workspace_bytes = static_cast<std::size_t>(sc.floats("colt5.attn.kernel")) * sizeof(float);
  kernels::attention_backward(p, rc.exec);

  zero(d_k, geom_.rows() * kw, rc);
  zero(d_v, geom_.rows() * kw, rc);
  const Strides tokens{d, n_loc * kw, kw};
  const Strides pool{batch * slots * d, slots * d, d};
  const std::int64_t own_slot = geom_.positions[0] - window_first_;
  copy_block(d_pool_k + own_slot * d, pool, d_k, DType::kF32, tokens, lkv, batch, n_loc, d, true, rc);
  copy_block(d_pool_v + own_slot * d, pool, d_v, DType::kF32, tokens, lkv, batch, n_loc, d, true, rc);

  // The transpose: halo slots' gradients go back to their owners and add into their rows.
  exchange_halo(rc, peers_, lkv, batch, d, d_pool_k, d_pool_v, pool,
                [](const auto& p) { return HaloRows{p.recv_slot, p.recv_count}; }, d_k, d_v, DType::kF32, tokens,
                [](const auto& p) { return HaloRows{p.send_first, p.send_count}; }, true);
}

GatheredForwardArgs Colt5Attention::heavy_args(const RunContext& rc, std::span<const std::int64_t> q_counts,
                                               std::span<const std::int64_t> k_counts) const {
  const Scratch& sc = rc.scratch;
  GatheredForwardArgs a;
  a.n_q = router_q_.count();
  a.n_k = router_kv_.count();
  a.q_counts = q_counts;
  a.k_counts = k_counts;
  a.q = sc.get("colt5.attn.qh");
  a.k = sc.get("colt5.attn.kh");
  a.v = sc.get("colt5.attn.vh");
  a.o = sc.get("colt5.attn.oh");
  a.lse = sc.get("colt5.attn.lse_h");
  a.kept = sc.get("colt5.attn.kept");
  a.workspace = sc.get("colt5.attn.gathered");
  return a;
}

void Colt5Attention::heavy_forward(const RunContext& rc) {
  const Scratch& sc = rc.scratch;
  const int d = proj_.head_dim;
  const std::int64_t qw = proj_.q_width(), kw = proj_.kv_width();
  const int hq = (proj_.heads - light_heads_) * d, hk = (proj_.kv_heads - light_kv_heads_) * d;
  const std::int64_t lq = std::int64_t{light_heads_} * d, lk = std::int64_t{light_kv_heads_} * d;
  const float *q = sc.get("colt5.attn.q"), *k = sc.get("colt5.attn.k"), *v = sc.get("colt5.attn.v");
  float *qh = sc.get("colt5.attn.qh"), *kh = sc.get("colt5.attn.kh"), *vh = sc.get("colt5.attn.vh");
  float *oh = sc.get("colt5.attn.oh"), *o = sc.get("colt5.attn.o");
  gather_routed(rc, router_q_, hq, q + lq, qw, qh);
  gather_routed(rc, router_kv_, hk, k + lk, kw, kh);
  gather_routed(rc, router_kv_, hk, v + lk, kw, vh, router_kv_.routed_weights(rc));  // V scaled by s̃^kv
  const std::vector<std::int64_t> n_q = per_sequence(router_q_.offsets()), n_k = per_sequence(router_kv_.offsets());
  gathered_.forward(heavy_args(rc, n_q, n_k));
  // The light kernel left the heavy heads' slots of O at 0: unrouted queries keep that.
  scatter_routed(rc, router_q_, hq, oh, o + lq, qw, router_q_.routed_weights(rc), false);
}

void Colt5Attention::heavy_backward(const RunContext& rc) {
  const Scratch& sc = rc.scratch;
  const int d = proj_.head_dim;
  const std::int64_t qw = proj_.q_width(), kw = proj_.kv_width();
  const int hq = (proj_.heads - light_heads_) * d, hk = (proj_.kv_heads - light_kv_heads_) * d;
  const std::int64_t lq = std::int64_t{light_heads_} * d, lk = std::int64_t{light_kv_heads_} * d;
  const float* v = sc.get("colt5.attn.v");
  const float *d_o = sc.get("colt5.attn.d_o"), *oh = sc.get("colt5.attn.oh");
  float *d_q = sc.get("colt5.attn.d_q"), *d_k = sc.get("colt5.attn.d_k"), *d_v = sc.get("colt5.attn.d_v");
  float *d_oh = sc.get("colt5.attn.d_oh"), *d_qh = sc.get("colt5.attn.d_qh");
  float *d_kh = sc.get("colt5.attn.d_kh"), *d_vh = sc.get("colt5.attn.d_vh"), *vr = sc.get("colt5.attn.vr");
  float *d_wq = sc.get("colt5.attn.d_weight_q"), *d_wkv = sc.get("colt5.attn.d_weight_kv");
  const std::int64_t nq = router_q_.count(), nkv = router_kv_.count();

  float* d_o_r = d_qh;  // the routed rows of dO's heavy heads, until the gathered backward needs d_qh
  gather_routed(rc, router_q_, hq, d_o + lq, qw, d_o_r);
  kernels::rowwise_dot({nq, hq, d_o_r, oh, d_wq}, rc.exec);  // dL/ds̃^q = dO · A_heavy
  kernels::gather_rows({.rows = nq, .width = hq, .weights = router_q_.routed_weights(rc), .src = d_o_r, .dst = d_oh},
                       rc.exec);  // s̃^q dO
  zero(d_qh, nq * hq, rc);
  zero(d_kh, nkv * hk, rc);
  zero(d_vh, nkv * hk, rc);
  const std::vector<std::int64_t> n_q = per_sequence(router_q_.offsets()), n_k = per_sequence(router_kv_.offsets());
  gathered_.backward({.fwd = heavy_args(rc, n_q, n_k), .d_o = d_oh, .d_q = d_qh, .d_k = d_kh, .d_v = d_vh});
  scatter_routed(rc, router_q_, hq, d_qh, d_q + lq, qw, nullptr, true);
  scatter_routed(rc, router_kv_, hk, d_kh, d_k + lk, kw, nullptr, true);
  scatter_routed(rc, router_kv_, hk, d_vh, d_v + lk, kw, router_kv_.routed_weights(rc), true);
  gather_routed(rc, router_kv_, hk, v + lk, kw, vr);
  kernels::rowwise_dot({nkv, hk, d_vh, vr, d_wkv}, rc.exec);  // dL/ds̃^kv = dV_heavy · V
}

}  // namespace ringcast::model
