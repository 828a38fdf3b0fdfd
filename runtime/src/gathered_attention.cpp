// GatheredAttention on the CPU backend (gathered_attention.hpp). Forward: one all-gather with per-rank
// counts of packed key rows [k | v | bias] (each rank's sequences in order), unpacked into page pools
// [h_kv, pages, 64, f] in which every sequence's keys start a page and follow rank order; then one
// kernel call over all the rank's queries, whose table gives the rows of sequence s in each query
// tile the pages of s. Backward: the kernel's dK/dV pools packed the same way and sent back to their
// owners by one all-to-all with per-rank counts; each owner sums the P blocks in rank order, so
// results do not depend on timing.
// The key bias rides as one more head-dim feature, f = d + 1: q' = [q, 1/scale], k' = [k, bias],
// v' = [v, 0], so scale q'.k' = scale q.k + bias and the kernel's dK of that feature is d_bias
// (summed over the KV heads, which share the bias). Without a bias f = d and the kernel reads and
// writes the caller's q, o, d_o and d_q in place.
#include "gathered_attention.hpp"

#include "agreement.hpp"

#include <ringcast/error.hpp>
#include <ringcast/kernels/attention.hpp>
#include <ringcast/kernels/block_table.hpp>
#include <ringcast/kernels/layout.hpp>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <numeric>
#include <utility>
#include <vector>

namespace ringcast::model {
namespace {

constexpr int kPageSize = 64;
constexpr std::size_t kAlign = 64;

std::size_t round_up(std::size_t bytes) { return (bytes + kAlign - 1) / kAlign * kAlign; }

// Hands out 64-byte aligned regions of a caller's block in a fixed order; with a null base it only
// measures, so the size queries and the passes share one layout.
class Carver {
 public:
  explicit Carver(void* base) : base_(static_cast<std::byte*>(base)) {}
  template <typename T>
  T* take(std::int64_t count) {
    T* p = base_ ? reinterpret_cast<T*>(base_ + used_) : nullptr;
    used_ += round_up(static_cast<std::size_t>(count) * sizeof(T));
    return p;
  }
  std::size_t used() const { return used_; }

 private:
  std::byte* base_;
  std::size_t used_ = 0;
};

// dst[a, i, c] (+)= src[a, i, c] over shape {a, i, c}; strides in elements, c contiguous on both
// sides. A source stride of 0 broadcasts.
using Dims = std::array<std::int64_t, 2>;  // strides of the two outer dimensions
void copy(const float* src, Dims src_strides, float* dst, Dims dst_strides, std::int64_t outer, std::int64_t rows,
          std::int64_t cols, bool accumulate, const kernels::ExecContext& ctx) {
  if (outer == 0 || rows == 0 || cols == 0) return;
  kernels::StridedCopy c;
  c.ndim = 3;
  c.shape = {outer, rows, cols};
  c.src_strides = {src_strides[0], src_strides[1], 1};
  c.dst_strides = {dst_strides[0], dst_strides[1], 1};
  c.src = src;
  c.dst = dst;
  c.accumulate = accumulate;
  kernels::copy_strided(c, ctx);
}

void zero(float* x, std::int64_t count, const kernels::ExecContext& ctx) {
  kernels::fill_zero(x, static_cast<std::size_t>(count) * sizeof(float), ctx);
}

std::int64_t sum(std::span<const std::int64_t> x) { return std::accumulate(x.begin(), x.end(), std::int64_t{0}); }

// What one rank found wrong with its arguments, in a form every rank can word alike.
enum Problem : std::int64_t {
  kFine,
  kSequences,
  kQueryCount,
  kKeyCount,
  kNullInput,
  kNullOutput,
  kNullMemory,
  kNotTheForward,
  kBiasGradient
};

// Where the keys of a call sit, from the counts n_k[r][s] of every rank r and sequence s. The
// gathered rows are rank-major (each rank's block holds its sequences in order); in the pools every
// sequence starts a page and holds its keys in rank order.
struct KeyLayout {
  int ranks = 0, sequences = 0;
  std::vector<std::int64_t> counts;     // [r][s]
  std::vector<std::int64_t> row;        // [r][s]: first gathered row of (r, s)
  std::vector<std::int64_t> slot;       // [r][s]: first pool slot of (r, s)
  std::vector<std::int64_t> seq_keys;   // [s]: keys of sequence s over all ranks
  std::vector<std::int64_t> seq_page;   // [s + 1]: first page of sequence s
  std::vector<std::int64_t> rank_keys;  // [r]: keys rank r holds
  std::int64_t total = 0;

  KeyLayout(std::vector<std::int64_t> n_k, int num_ranks, int num_sequences)
      : ranks(num_ranks), sequences(num_sequences), counts(std::move(n_k)), row(counts.size()), slot(counts.size()),
        seq_keys(static_cast<std::size_t>(sequences), 0), seq_page(static_cast<std::size_t>(sequences) + 1, 0),
        rank_keys(static_cast<std::size_t>(ranks), 0) {
    for (int r = 0; r < ranks; ++r)
      for (int s = 0; s < sequences; ++s) {
        row[at(r, s)] = total;
        total += counts[at(r, s)];
        rank_keys[static_cast<std::size_t>(r)] += counts[at(r, s)];
      }
    for (int s = 0; s < sequences; ++s) {
      const auto si = static_cast<std::size_t>(s);
      for (int r = 0; r < ranks; ++r) {
        slot[at(r, s)] = seq_page[si] * kPageSize + seq_keys[si];
        seq_keys[si] += counts[at(r, s)];
      }
      seq_page[si + 1] = seq_page[si] + (seq_keys[si] + kPageSize - 1) / kPageSize;
    }
  }
  std::size_t at(int r, int s) const { return static_cast<std::size_t>(r * sequences + s); }
  std::int64_t pages() const { return seq_page.back(); }
};

}  // namespace

struct GatheredAttention::State {
  const Session& session;
  const GatheredAttentionShape shape;
  const kernels::ExecContext ctx;
  const int ranks;
  const std::int64_t max_pages;     // pool pages of the largest call: its keys plus a partial page per sequence
  const float scale;                // softmax scale 1/sqrt(d)
  std::size_t kernel_bytes = 0;     // the attention kernel's workspace for the largest call
  std::vector<std::int32_t> q_pos;  // zeros: bidirectional entries never read query positions

  // The kept region: the forward's [bias, n_q[S], n_k[P][S]], then its K and V pools.
  struct Kept {
    std::int64_t* header;
    float* k_pool;
    float* v_pool;
  };
  // One call's temporaries.
  struct Work {
    float *q_pad, *o_pad, *d_o_pad, *d_q_pad;  // [max_queries, h, d + 1] (calls with a bias)
    float* send;                               // packed key rows: own (forward), gradients of all (backward)
    float* recv;                               // packed key rows: all (forward), P blocks of own (backward)
    float *d_k_pool, *d_v_pool;
    float* one;  // the constant feature of q'
    void* kernel;
  };

  State(const Session& s, const GatheredAttentionShape& sh)
      : session(s), shape(sh), ctx{s.device(), s.stream()}, ranks(s.size()),
        max_pages((sh.max_total_keys + kPageSize - 1) / kPageSize + sh.sequences),
        scale(static_cast<float>(1.0 / std::sqrt(static_cast<double>(std::max(sh.head_dim, 1))))),
        q_pos(static_cast<std::size_t>(std::max<std::int64_t>(sh.max_queries, 0)), 0) {}

  int padded_dim() const { return shape.head_dim + 1; }
  std::int64_t pool_floats() const { return std::int64_t{shape.kv_heads} * max_pages * kPageSize * padded_dim(); }
  std::int64_t header_size() const { return 1 + shape.sequences + std::int64_t{ranks} * shape.sequences; }
  // Floats of one packed key row.
  std::int64_t row_width(bool bias) const { return 2 * std::int64_t{shape.kv_heads} * shape.head_dim + (bias ? 1 : 0); }

  Kept kept(void* base, std::size_t* bytes = nullptr) const {
    Carver c(base);
    Kept k;
    k.header = c.take<std::int64_t>(header_size());
    k.k_pool = c.take<float>(pool_floats());
    k.v_pool = c.take<float>(pool_floats());
    if (bytes) *bytes = c.used();
    return k;
  }

  Work work(void* base, std::size_t* bytes = nullptr) const {
    Carver c(base);
    const std::int64_t w = row_width(true), qp = shape.max_queries * shape.heads * padded_dim();
    Work wk;
    wk.q_pad = c.take<float>(qp);
    wk.o_pad = c.take<float>(qp);
    wk.d_o_pad = c.take<float>(qp);
    wk.d_q_pad = c.take<float>(qp);
    wk.send = c.take<float>(std::max(shape.max_keys, shape.max_total_keys) * w);
    wk.recv = c.take<float>(std::max(shape.max_total_keys, ranks * shape.max_keys) * w);
    wk.d_k_pool = c.take<float>(pool_floats());
    wk.d_v_pool = c.take<float>(pool_floats());
    wk.one = c.take<float>(1);
    wk.kernel = c.take<std::byte>(static_cast<std::int64_t>(kernel_bytes));
    if (bytes) *bytes = c.used();
    return wk;
  }

  kernels::AttentionShape kernel_shape(std::int64_t queries, std::int64_t pages, bool bias) const {
    kernels::AttentionShape s;
    s.batch = 1;
    s.seq_q = queries;
    s.heads = shape.heads;
    s.kv_heads = shape.kv_heads;
    s.head_dim = shape.head_dim + (bias ? 1 : 0);
    s.page_size = kPageSize;
    s.num_pages = pages;
    return s;
  }

  // Each query tile's rows of sequence s see every page of s (all sequences' queries are one run of
  // rows, sequence after sequence); the same entries for every KV head.
  kernels::HostBlockTable table(const kernels::AttentionShape& ks, std::span<const std::int64_t> n_q,
                                const KeyLayout& keys) const {
    kernels::HostBlockTable t;
    for (std::int64_t tile = 0; tile < ks.num_tiles(); ++tile) {
      const std::int64_t t0 = tile * kernels::kQueryTile, t1 = t0 + kernels::tile_rows(ks, tile);
      std::vector<kernels::BlockEntry> entries;
      std::int64_t q0 = 0;
      for (int s = 0; s < shape.sequences; ++s) {
        const std::int64_t lo = std::max(q0, t0), hi = std::min(q0 + n_q[static_cast<std::size_t>(s)], t1);
        q0 += n_q[static_cast<std::size_t>(s)];
        const std::int64_t count = keys.seq_keys[static_cast<std::size_t>(s)];
        if (lo >= hi || count == 0) continue;
        const auto upto = kernels::full_row_mask(static_cast<int>(hi - t0));
        const auto before = kernels::full_row_mask(static_cast<int>(lo - t0));
        kernels::BlockEntry e{};
        e.row_mask[0] = upto[0] & ~before[0];
        e.row_mask[1] = upto[1] & ~before[1];
        e.key_meta = -1;
        for (std::int64_t first = 0; first < count; first += kPageSize) {
          e.page = static_cast<std::int32_t>(keys.seq_page[static_cast<std::size_t>(s)] + first / kPageSize);
          e.key_count = static_cast<std::int32_t>(std::min<std::int64_t>(kPageSize, count - first));
          entries.push_back(e);
        }
      }
      for (int g = 0; g < ks.kv_heads; ++g) {
        t.entries.insert(t.entries.end(), entries.begin(), entries.end());
        t.offsets.push_back(static_cast<std::int64_t>(t.entries.size()));
      }
    }
    return t;
  }

  // Gathers every rank's record [problem, passes_bias, max_queries, max_keys, n_q[S], n_k[S]] and
  // throws the same Error on every rank when any rank's arguments are wrong, or when a rank holding
  // keys passes no bias in a call that has one. Returns n_k[r][s] and whether the call has a bias.
  std::pair<std::vector<std::int64_t>, bool> agree(const char* pass, Problem mine, std::span<const std::int64_t> n_q,
                                                   std::span<const std::int64_t> n_k, bool passes_bias) const {
    const auto S = static_cast<std::size_t>(shape.sequences);
    const std::size_t width = 4 + 2 * S;
    std::vector<std::int64_t> record(width, 0);
    record[0] = mine;
    record[1] = passes_bias ? 1 : 0;
    record[2] = shape.max_queries;
    record[3] = shape.max_keys;
    if (mine != kSequences) {
      std::copy(n_q.begin(), n_q.end(), record.begin() + 4);
      std::copy(n_k.begin(), n_k.end(), record.begin() + 4 + static_cast<std::ptrdiff_t>(S));
    }
    const auto all = gather_from_all_ranks(session, record);
    std::vector<std::int64_t> counts;
    bool bias = false;
    for (int r = 0; r < ranks; ++r) {
      const std::int64_t* x = &all[r * width];
      const std::span<const std::int64_t> q(x + 4, S), k(x + 4 + S, S);
      switch (static_cast<Problem>(x[0])) {
        case kFine:
          break;
        case kSequences:
          RINGCAST_THROW(
              "GatheredAttention {}: rank {} passes q_counts or k_counts that are not {} counts summing to "
              "n_q and n_k",
              pass, r, S);
        case kQueryCount:
          RINGCAST_THROW(
              "GatheredAttention {}: rank {} passes n_q = [{}], negative or more than max_queries = {} in all", pass, r,
              fmt::join(q, ", "), x[2]);
        case kKeyCount:
          RINGCAST_THROW("GatheredAttention {}: rank {} passes n_k = [{}], negative or more than max_keys = {} in all",
                         pass, r, fmt::join(k, ", "), x[3]);
        case kNullInput:
          RINGCAST_THROW("GatheredAttention {}: rank {} passes a null input", pass, r);
        case kNullOutput:
          RINGCAST_THROW("GatheredAttention {}: rank {} passes a null output", pass, r);
        case kNullMemory:
          RINGCAST_THROW("GatheredAttention {}: rank {} passes no kept region or workspace", pass, r);
        case kNotTheForward:
          RINGCAST_THROW(
              "GatheredAttention {}: rank {} passes n_q = [{}], n_k = [{}] or a key bias unlike the forward "
              "that wrote its kept region",
              pass, r, fmt::join(q, ", "), fmt::join(k, ", "));
        case kBiasGradient:
          RINGCAST_THROW("GatheredAttention {}: rank {} asks for d_key_bias without a key bias", pass, r);
        default:
          RINGCAST_THROW("GatheredAttention {}: rank {} reports unknown problem {}", pass, r, x[0]);
      }
      counts.insert(counts.end(), k.begin(), k.end());
      bias = bias || x[1] != 0;
    }
    for (int r = 0; r < ranks; ++r) {
      const std::int64_t* x = &all[r * width];
      const std::int64_t keys = sum({x + 4 + S, S});
      RINGCAST_CHECK(!bias || keys == 0 || x[1] != 0,
                     "GatheredAttention {}: some ranks pass a key bias, but rank {} passes none for its {} keys", pass,
                     r, keys);
    }
    return {counts, bias};
  }

  // The per-sequence counts of a call: the split as given, or the total when one sequence takes all.
  std::vector<std::int64_t> split(std::int64_t total, std::span<const std::int64_t> counts) const {
    if (counts.empty() && shape.sequences == 1) return {total};
    return {counts.begin(), counts.end()};
  }

  // The local checks every pass shares, on the totals and their splits.
  Problem check_counts(std::int64_t n_q, const std::vector<std::int64_t>& q, std::int64_t n_k,
                       const std::vector<std::int64_t>& k) const {
    const auto S = static_cast<std::size_t>(shape.sequences);
    if (q.size() != S || k.size() != S || sum(q) != n_q || sum(k) != n_k) return kSequences;
    if (std::any_of(q.begin(), q.end(), [](std::int64_t x) { return x < 0; }) || n_q > shape.max_queries)
      return kQueryCount;
    if (std::any_of(k.begin(), k.end(), [](std::int64_t x) { return x < 0; }) || n_k > shape.max_keys) return kKeyCount;
    return kFine;
  }
};

GatheredAttention::GatheredAttention(const Session& session, const GatheredAttentionShape& shape)
    : state_(std::make_unique<State>(session, shape)) {
  const GatheredAttentionShape& s = shape;
  const std::array<std::int64_t, 8> mine{
      s.heads,          s.kv_heads,    s.head_dim, s.sequences,
      s.max_total_keys, s.max_queries, s.max_keys, session.device().kind == DeviceKind::kCpu};
  const auto all = gather_from_all_ranks(session, mine);
  for (int r = 0; r < session.size(); ++r) {
    const std::int64_t* x = &all[r * mine.size()];
    RINGCAST_CHECK(std::equal(x, x + 5, all.begin()),
                   "GatheredAttention: ranks disagree on the shape: rank 0 has heads {}, kv_heads {}, head_dim {}, "
                   "sequences {}, max_total_keys {}; rank {} has {}, {}, {}, {}, {}",
                   all[0], all[1], all[2], all[3], all[4], r, x[0], x[1], x[2], x[3], x[4]);
    RINGCAST_CHECK(x[7] == 1, "GatheredAttention: runs on the CPU backend only (rank {} is on a GPU)", r);
    RINGCAST_CHECK(x[5] >= 0 && x[6] >= 0 && x[6] <= x[4],
                   "GatheredAttention: rank {} has max_queries {}, max_keys {} (need >= 0 and max_keys <= "
                   "max_total_keys {})",
                   r, x[5], x[6], x[4]);
  }
  RINGCAST_CHECK(s.heads >= 1 && s.kv_heads >= 1 && s.heads % s.kv_heads == 0,
                 "GatheredAttention: heads ({}) must be a positive multiple of kv_heads ({})", s.heads, s.kv_heads);
  // The bias feature makes the kernel's head dim d + 1, which the CPU kernel takes up to 256.
  RINGCAST_CHECK(s.head_dim >= 1 && s.head_dim < 256, "GatheredAttention: head_dim {} is outside [1, 255]", s.head_dim);
  RINGCAST_CHECK(s.sequences >= 1 && s.max_total_keys >= 0,
                 "GatheredAttention: sequences ({}) must be >= 1 and "
                 "max_total_keys ({}) >= 0",
                 s.sequences, s.max_total_keys);
  const kernels::AttentionShape largest = state_->kernel_shape(std::max<std::int64_t>(s.max_queries, 1),
                                                               std::max<std::int64_t>(state_->max_pages, 1), true);
  state_->kernel_bytes = std::max(kernels::attention_forward_workspace_bytes(largest, state_->ctx),
                                  kernels::attention_backward_workspace_bytes(largest, state_->ctx));
}

GatheredAttention::~GatheredAttention() = default;

std::size_t GatheredAttention::kept_bytes() const {
  std::size_t bytes = 0;
  state_->kept(nullptr, &bytes);
  return bytes;
}

std::size_t GatheredAttention::workspace_bytes() const {
  std::size_t bytes = 0;
  state_->work(nullptr, &bytes);
  return bytes;
}

void GatheredAttention::forward(const GatheredForwardArgs& a) {
  State& st = *state_;
  const GatheredAttentionShape& sh = st.shape;
  const std::vector<std::int64_t> q_counts = st.split(a.n_q, a.q_counts), k_counts = st.split(a.n_k, a.k_counts);
  const std::int64_t queries = a.n_q, own_keys = a.n_k;
  const Problem problem = [&] {
    if (const Problem p = st.check_counts(a.n_q, q_counts, a.n_k, k_counts); p != kFine) return p;
    if ((queries > 0 && !a.q) || (own_keys > 0 && (!a.k || !a.v))) return kNullInput;
    if (queries > 0 && (!a.o || !a.lse)) return kNullOutput;
    if (!a.kept || !a.workspace) return kNullMemory;
    return kFine;
  }();
  auto [counts, bias] = st.agree("forward", problem, q_counts, k_counts, a.key_bias != nullptr);
  const KeyLayout keys(std::move(counts), st.ranks, sh.sequences);
  RINGCAST_CHECK(keys.total <= sh.max_total_keys,
                 "GatheredAttention forward: {} keys over all ranks, max_total_keys is {}", keys.total,
                 sh.max_total_keys);

  const int d = sh.head_dim, hkv = sh.kv_heads;
  const std::int64_t kvd = std::int64_t{hkv} * d, w = st.row_width(bias), f = d + (bias ? 1 : 0);
  const State::Kept kept = st.kept(a.kept);
  const State::Work wk = st.work(a.workspace);
  kept.header[0] = bias ? 1 : 0;
  std::copy(q_counts.begin(), q_counts.end(), kept.header + 1);
  std::copy(keys.counts.begin(), keys.counts.end(), kept.header + 1 + sh.sequences);
  if (keys.total == 0) {  // no key anywhere: every query sees nothing
    zero(a.o, queries * sh.heads * d, st.ctx);
    std::fill_n(a.lse, queries * sh.heads, kernels::kNegInf);
    return;
  }

  copy(a.k, {0, kvd}, wk.send, {0, w}, 1, own_keys, kvd, false, st.ctx);
  copy(a.v, {0, kvd}, wk.send + kvd, {0, w}, 1, own_keys, kvd, false, st.ctx);
  if (bias) copy(a.key_bias, {0, 1}, wk.send + 2 * kvd, {0, w}, 1, own_keys, 1, false, st.ctx);
  std::vector<std::size_t> recv_counts(static_cast<std::size_t>(st.ranks));
  for (int r = 0; r < st.ranks; ++r)
    recv_counts[static_cast<std::size_t>(r)] =
        static_cast<std::size_t>(keys.rank_keys[static_cast<std::size_t>(r)] * w);
  st.session.comm().all_gather_v({wk.send, static_cast<std::size_t>(own_keys * w), DType::kF32},
                                 {wk.recv, static_cast<std::size_t>(keys.total * w), DType::kF32}, recv_counts,
                                 st.session.stream());

  const kernels::AttentionShape ks = st.kernel_shape(queries, keys.pages(), bias);
  const std::int64_t head_stride = ks.num_pages * kPageSize * f;  // one KV head of a pool
  if (bias) zero(kept.v_pool, hkv * head_stride, st.ctx);         // v' = [v, 0]
  for (int r = 0; r < st.ranks; ++r)
    for (int s = 0; s < sh.sequences; ++s) {
      const std::size_t i = keys.at(r, s);
      const float* rows = wk.recv + keys.row[i] * w;
      const std::int64_t slot = keys.slot[i] * f;
      copy(rows, {d, w}, kept.k_pool + slot, {head_stride, f}, hkv, keys.counts[i], d, false, st.ctx);
      copy(rows + kvd, {d, w}, kept.v_pool + slot, {head_stride, f}, hkv, keys.counts[i], d, false, st.ctx);
      if (bias)
        copy(rows + 2 * kvd, {0, w}, kept.k_pool + slot + d, {head_stride, f}, hkv, keys.counts[i], 1, false, st.ctx);
    }
  if (queries == 0) return;

  const float* q = a.q;
  float* o = a.o;
  if (bias) {
    *wk.one = 1.0f / st.scale;
    copy(a.q, {0, d}, wk.q_pad, {0, f}, 1, queries * sh.heads, d, false, st.ctx);
    copy(wk.one, {0, 0}, wk.q_pad + d, {0, f}, 1, queries * sh.heads, 1, false, st.ctx);
    q = wk.q_pad;
    o = wk.o_pad;
  }
  const kernels::HostBlockTable table = st.table(ks, q_counts, keys);
  kernels::AttentionForwardParams p;
  p.shape = ks;
  p.softmax_scale = st.scale;
  p.q = q;
  p.k_pages = kept.k_pool;
  p.v_pages = kept.v_pool;
  p.q_pos = st.q_pos.data();
  p.table = table.view();
  p.o = o;
  p.lse = a.lse;
  p.workspace = wk.kernel;
  p.workspace_bytes = st.kernel_bytes;
  kernels::attention_forward(p, st.ctx);
  if (bias) copy(wk.o_pad, {0, f}, a.o, {0, d}, 1, queries * sh.heads, d, false, st.ctx);
}

void GatheredAttention::backward(const GatheredBackwardArgs& a) {
  State& st = *state_;
  const GatheredAttentionShape& sh = st.shape;
  const auto S = static_cast<std::size_t>(sh.sequences);
  // The backward only reads the kept region; the layout helper hands out mutable pointers.
  const State::Kept kept = st.kept(const_cast<void*>(a.kept));
  const std::vector<std::int64_t> q_counts = st.split(a.n_q, a.q_counts), k_counts = st.split(a.n_k, a.k_counts);
  const std::int64_t queries = a.n_q, own_keys = a.n_k;
  const bool bias = a.kept && kept.header[0] != 0;  // the forward's call had one
  const Problem problem = [&] {
    if (const Problem p = st.check_counts(a.n_q, q_counts, a.n_k, k_counts); p != kFine) return p;
    if (!a.kept || !a.workspace) return kNullMemory;
    const std::int64_t* kept_n_k = kept.header + 1 + S + st.session.rank() * S;
    if (!std::equal(q_counts.begin(), q_counts.end(), kept.header + 1) ||
        !std::equal(k_counts.begin(), k_counts.end(), kept_n_k) || (own_keys > 0 && (a.key_bias != nullptr) != bias))
      return kNotTheForward;
    if (a.d_key_bias && !bias) return kBiasGradient;
    if ((queries > 0 && (!a.q || !a.o || !a.lse || !a.d_o)) || (own_keys > 0 && (!a.k || !a.v))) return kNullInput;
    if ((queries > 0 && !a.d_q) || (own_keys > 0 && (!a.d_k || !a.d_v))) return kNullOutput;
    return kFine;
  }();
  st.agree("backward", problem, q_counts, k_counts, a.key_bias != nullptr);

  const KeyLayout keys(std::vector<std::int64_t>(kept.header + 1 + S, kept.header + 1 + S + st.ranks * S), st.ranks,
                       sh.sequences);
  if (keys.total == 0) return;  // nothing was attended: no gradient anywhere
  const int d = sh.head_dim, hkv = sh.kv_heads;
  const std::int64_t kvd = std::int64_t{hkv} * d, w = st.row_width(bias), f = d + (bias ? 1 : 0);
  const State::Work wk = st.work(a.workspace);
  const kernels::AttentionShape ks = st.kernel_shape(queries, keys.pages(), bias);
  const std::int64_t head_stride = ks.num_pages * kPageSize * f;
  if (queries == 0) {
    zero(wk.send, keys.total * w, st.ctx);  // this rank's queries add nothing to anyone's keys
  } else {
    const float *q = a.q, *o = a.o, *d_o = a.d_o;
    float* d_q = a.d_q;
    if (bias) {
      const std::int64_t rows = queries * sh.heads;
      *wk.one = 1.0f / st.scale;
      copy(a.q, {0, d}, wk.q_pad, {0, f}, 1, rows, d, false, st.ctx);
      copy(wk.one, {0, 0}, wk.q_pad + d, {0, f}, 1, rows, 1, false, st.ctx);
      zero(wk.o_pad, rows * f, st.ctx);  // o' = [o, 0]: its last feature is P v'[d] = 0
      copy(a.o, {0, d}, wk.o_pad, {0, f}, 1, rows, d, false, st.ctx);
      zero(wk.d_o_pad, rows * f, st.ctx);
      copy(a.d_o, {0, d}, wk.d_o_pad, {0, f}, 1, rows, d, false, st.ctx);
      zero(wk.d_q_pad, rows * f, st.ctx);
      q = wk.q_pad;
      o = wk.o_pad;
      d_o = wk.d_o_pad;
      d_q = wk.d_q_pad;
    }
    const kernels::HostBlockTable table = st.table(ks, q_counts, keys);
    const kernels::HostTransposedTable transposed = kernels::transpose(table, ks);
    kernels::AttentionBackwardParams p;
    p.fwd.shape = ks;
    p.fwd.softmax_scale = st.scale;
    p.fwd.q = q;
    p.fwd.k_pages = kept.k_pool;
    p.fwd.v_pages = kept.v_pool;
    p.fwd.q_pos = st.q_pos.data();
    p.fwd.table = table.view();
    p.fwd.o = const_cast<float*>(o);  // the backward only reads the forward's outputs
    p.fwd.lse = const_cast<float*>(a.lse);
    p.d_o = d_o;
    p.transposed = transposed.view();
    p.d_q = d_q;
    p.d_k_pages = wk.d_k_pool;
    p.d_v_pages = wk.d_v_pool;
    p.accumulate = true;  // into the caller's d_q; the pools start from zero
    p.workspace = wk.kernel;
    p.workspace_bytes = st.kernel_bytes;
    zero(wk.d_k_pool, hkv * head_stride, st.ctx);
    zero(wk.d_v_pool, hkv * head_stride, st.ctx);
    kernels::attention_backward(p, st.ctx);
    if (bias) copy(wk.d_q_pad, {0, f}, a.d_q, {0, d}, 1, queries * sh.heads, d, true, st.ctx);

    // Gradients of every gathered key, packed like the forward's rows (rank-major: owner blocks).
    for (int r = 0; r < st.ranks; ++r)
      for (int s = 0; s < sh.sequences; ++s) {
        const std::size_t i = keys.at(r, s);
        float* rows = wk.send + keys.row[i] * w;
        const std::int64_t slot = keys.slot[i] * f;
        copy(wk.d_k_pool + slot, {head_stride, f}, rows, {d, w}, hkv, keys.counts[i], d, false, st.ctx);
        copy(wk.d_v_pool + slot, {head_stride, f}, rows + kvd, {d, w}, hkv, keys.counts[i], d, false, st.ctx);
        for (int g = 0; bias && g < hkv; ++g)  // one KV head at a time: they sum into one column
          copy(wk.d_k_pool + g * head_stride + slot + d, {0, f}, rows + 2 * kvd, {0, w}, 1, keys.counts[i], 1, g > 0,
               st.ctx);
      }
  }

  std::vector<std::size_t> send_counts(static_cast<std::size_t>(st.ranks)),
      recv_counts(static_cast<std::size_t>(st.ranks), static_cast<std::size_t>(own_keys * w));
  for (int r = 0; r < st.ranks; ++r)
    send_counts[static_cast<std::size_t>(r)] =
        static_cast<std::size_t>(keys.rank_keys[static_cast<std::size_t>(r)] * w);
  st.session.comm().all_to_all_v({wk.send, static_cast<std::size_t>(keys.total * w), DType::kF32}, send_counts,
                                 {wk.recv, static_cast<std::size_t>(st.ranks * own_keys * w), DType::kF32}, recv_counts,
                                 st.session.stream());
  for (int r = 0; r < st.ranks; ++r) {
    const float* block = wk.recv + r * own_keys * w;
    copy(block, {0, w}, a.d_k, {0, kvd}, 1, own_keys, kvd, true, st.ctx);
    copy(block + kvd, {0, w}, a.d_v, {0, kvd}, 1, own_keys, kvd, true, st.ctx);
    if (a.d_key_bias) copy(block + 2 * kvd, {0, w}, a.d_key_bias, {0, 1}, 1, own_keys, 1, true, st.ctx);
  }
}

}  // namespace ringcast::model
