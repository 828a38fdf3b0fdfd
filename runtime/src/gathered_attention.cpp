// GatheredAttention (gathered_attention.hpp), one code path for both backends. Forward: one
// all-gather with per-rank counts of packed fp32 key rows [k | v | bias] (each rank's sequences in
// order), unpacked into page pools of the kernel's storage dtype (f32 CPU, bf16 CUDA)
// [h_kv, pages, 64, f] in which every sequence's keys start a page and follow rank order; then one
// kernel call over all the rank's queries, whose table gives the rows of sequence s in each query
// tile the pages of s. Backward: the kernel's fp32 dK/dV pools packed the same way and sent back to
// their owners by one all-to-all with per-rank counts; each owner sums the P blocks in rank order, so
// results do not depend on timing.
// The key bias rides as one more head-dim feature: q' = [q, 1/scale, 0..], k' = [k, bias, 0..],
// v' = [v, 0..], so scale q'.k' = scale q.k + bias and the kernel's dK of that feature is d_bias
// (summed over the KV heads, which share the bias). The feature width f is d + 1 on the CPU and the
// next head dim the CUDA kernels take (64 or 128) there. Without a bias f = d and the kernel writes
// the caller's o and d_q in place (fp32 outputs); q and d_o are read in place on the CPU and
// converted to bf16 on CUDA.
// Host work is metadata only: the counts agreed across ranks, the kept header (uploaded by the
// forward, downloaded by the backward) and the block tables, built on the host and uploaded in one
// copy per pass into the workspace. A pass waits for its stream once -- in the agreement (forward) or
// the header download (backward) -- and makes its uploads right after, while the stream is idle; the
// _v collectives agree their counts on the communicator's metadata path.
#include "gathered_attention.hpp"

#include "agreement.hpp"

#include <ringcast/error.hpp>
#include <ringcast/kernels/attention.hpp>
#include <ringcast/kernels/block_table.hpp>
#include <ringcast/kernels/layout.hpp>
#include <ringcast/memory.hpp>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstddef>
#include <cstring>
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
    return static_cast<T*>(take_bytes(static_cast<std::size_t>(count) * sizeof(T)));
  }
  void* take_bytes(std::size_t bytes) {
    void* p = base_ ? base_ + used_ : nullptr;
    used_ += round_up(bytes);
    return p;
  }
  std::size_t used() const { return used_; }

 private:
  std::byte* base_;
  std::size_t used_ = 0;
};

// Host arrays laid end to end (64-byte aligned) and uploaded to a device region with one copy; at()
// then points into the device copy.
class Staging {
 public:
  template <typename T>
  std::size_t add(std::span<const T> x) {
    const std::size_t at = round_up(bytes_.size());
    bytes_.resize(at + x.size_bytes());
    if (!x.empty()) std::memcpy(bytes_.data() + at, x.data(), x.size_bytes());
    return at;
  }
  // Capacity is the region's size; a table past it means the workspace bound is wrong.
  void upload(void* region, std::size_t capacity, const kernels::ExecContext& ctx) {
    RINGCAST_CHECK(bytes_.size() <= capacity, "GatheredAttention: {} bytes of tables exceed the {} reserved",
                   bytes_.size(), capacity);
    region_ = static_cast<std::byte*>(region);
    copy_from_host(region_, bytes_.data(), bytes_.size(), ctx.device, ctx.stream);
  }
  template <typename T>
  const T* at(std::size_t offset) const {
    return reinterpret_cast<const T*>(region_ + offset);
  }

 private:
  std::vector<std::byte> bytes_;
  std::byte* region_ = nullptr;
};

// Element `offset` of an array of dtype at base.
void* element(void* base, DType dtype, std::int64_t offset) {
  return static_cast<std::byte*>(base) + offset * static_cast<std::int64_t>(dtype_size(dtype));
}

// dst[a, i, c] (+)= src[a, i, c] over shape {a, i, c}, converted between the dtypes; strides in
// elements, c contiguous on both sides. A source stride of 0 broadcasts.
using Dims = std::array<std::int64_t, 2>;  // strides of the two outer dimensions
void copy(const void* src, DType src_dtype, Dims src_strides, void* dst, DType dst_dtype, Dims dst_strides,
          std::int64_t outer, std::int64_t rows, std::int64_t cols, bool accumulate, const kernels::ExecContext& ctx) {
  if (outer == 0 || rows == 0 || cols == 0) return;
  kernels::StridedCopy c;
  c.ndim = 3;
  c.shape = {outer, rows, cols};
  c.src_strides = {src_strides[0], src_strides[1], 1};
  c.dst_strides = {dst_strides[0], dst_strides[1], 1};
  c.src = src;
  c.src_dtype = src_dtype;
  c.dst = dst;
  c.dst_dtype = dst_dtype;
  c.accumulate = accumulate;
  kernels::copy_strided(c, ctx);
}

// The fp32 case of copy().
void copy(const float* src, Dims src_strides, float* dst, Dims dst_strides, std::int64_t outer, std::int64_t rows,
          std::int64_t cols, bool accumulate, const kernels::ExecContext& ctx) {
  copy(src, DType::kF32, src_strides, dst, DType::kF32, dst_strides, outer, rows, cols, accumulate, ctx);
}

void zero(void* x, std::int64_t count, DType dtype, const kernels::ExecContext& ctx) {
  kernels::fill_zero(x, static_cast<std::size_t>(count) * dtype_size(dtype), ctx);
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
  const bool cpu;
  const DType storage;            // the kernel's q, k, v, d_o: f32 on the CPU, bf16 on CUDA
  const std::int64_t max_pages;   // pool pages of the largest call: its keys plus a partial page per sequence
  const float scale;              // softmax scale 1/sqrt(d)
  std::size_t kernel_bytes = 0;   // the attention kernel's workspace for the largest call

  // The kept region: the forward's [bias, n_q[S], n_k[P][S]], then its K and V pools (storage dtype).
  struct Kept {
    std::int64_t* header;
    void* k_pool;
    void* v_pool;
  };
  // One call's temporaries.
  struct Work {
    void* q_pad;                // [max_queries, h, f], storage dtype
    float* o_pad;               // [max_queries, h, f]
    void* d_o_pad;              // [max_queries, h, f], storage dtype
    float* d_q_pad;             // [max_queries, h, f]
    float* send;                // packed key rows: own (forward), gradients of all (backward)
    float* recv;                // packed key rows: all (forward), P blocks of own (backward)
    float *d_k_pool, *d_v_pool;
    std::int32_t* q_pos;        // zeros: bidirectional entries never read query positions
    void* tables;               // the pass's constants and block tables (Staging)
    void* kernel;
  };

  State(const Session& s, const GatheredAttentionShape& sh)
      : session(s), shape(sh), ctx{s.device(), s.stream()}, ranks(s.size()), cpu(s.device().kind == DeviceKind::kCpu),
        storage(cpu ? DType::kF32 : DType::kBF16),
        max_pages((sh.max_total_keys + kPageSize - 1) / kPageSize + sh.sequences),
        scale(static_cast<float>(1.0 / std::sqrt(static_cast<double>(std::max(sh.head_dim, 1))))) {}

  // The kernel's head dim f for a call with or without a bias. Called after the ranks agreed on the
  // bias, so every rank throws alike.
  int features(bool bias) const {
    const int d = shape.head_dim;
    if (!bias) return d;
    RINGCAST_CHECK(shape.key_bias, "GatheredAttention: a call passes a key bias, but the shape has key_bias = false");
    if (cpu) return d + 1;
    RINGCAST_CHECK(d + 1 <= 128, "GatheredAttention: a key bias needs head_dim <= 127 on CUDA (head_dim is {})", d);
    return d + 1 <= 64 ? 64 : 128;
  }
  // The widest f of any call.
  int max_features() const {
    const int d = shape.head_dim;
    if (!shape.key_bias) return d;
    return cpu ? d + 1 : d + 1 <= 128 ? features(true) : d;
  }
  std::int64_t pool_elements() const { return std::int64_t{shape.kv_heads} * max_pages * kPageSize * max_features(); }
  std::int64_t header_size() const { return 1 + shape.sequences + std::int64_t{ranks} * shape.sequences; }
  // Floats of one packed key row.
  std::int64_t row_width(bool bias) const { return 2 * std::int64_t{shape.kv_heads} * shape.head_dim + (bias ? 1 : 0); }
  // Bytes of the tables region: the constants, the forward table and its transpose of the largest call
  // (each tile sees at most every page, in every KV head), with the alignment of five arrays.
  std::size_t table_bytes() const {
    const std::int64_t tiles = (shape.max_queries + kernels::kQueryTile - 1) / kernels::kQueryTile;
    const std::int64_t units = tiles * shape.kv_heads, entries = units * max_pages;
    const std::int64_t page_slots = std::int64_t{shape.kv_heads} * max_pages;
    return round_up(2 * sizeof(float)) + round_up(static_cast<std::size_t>(units + 1) * sizeof(std::int64_t)) +
           round_up(static_cast<std::size_t>(entries) * sizeof(kernels::BlockEntry)) +
           round_up(static_cast<std::size_t>(page_slots + 1) * sizeof(std::int64_t)) +
           round_up(static_cast<std::size_t>(entries) * sizeof(kernels::PageRef));
  }

  Kept kept(void* base, std::size_t* bytes = nullptr) const {
    Carver c(base);
    Kept k;
    k.header = c.take<std::int64_t>(header_size());
    k.k_pool = c.take_bytes(static_cast<std::size_t>(pool_elements()) * dtype_size(storage));
    k.v_pool = c.take_bytes(static_cast<std::size_t>(pool_elements()) * dtype_size(storage));
    if (bytes) *bytes = c.used();
    return k;
  }

  Work work(void* base, std::size_t* bytes = nullptr) const {
    Carver c(base);
    const std::int64_t w = row_width(true), qp = shape.max_queries * shape.heads * max_features();
    Work wk;
    wk.q_pad = c.take_bytes(static_cast<std::size_t>(qp) * dtype_size(storage));
    wk.o_pad = c.take<float>(qp);
    wk.d_o_pad = c.take_bytes(static_cast<std::size_t>(qp) * dtype_size(storage));
    wk.d_q_pad = c.take<float>(qp);
    wk.send = c.take<float>(std::max(shape.max_keys, shape.max_total_keys) * w);
    wk.recv = c.take<float>(std::max(shape.max_total_keys, ranks * shape.max_keys) * w);
    wk.d_k_pool = c.take<float>(pool_elements());
    wk.d_v_pool = c.take<float>(pool_elements());
    wk.q_pos = c.take<std::int32_t>(std::max<std::int64_t>(shape.max_queries, 1));
    wk.tables = c.take_bytes(table_bytes());
    wk.kernel = c.take<std::byte>(static_cast<std::int64_t>(kernel_bytes));
    if (bytes) *bytes = c.used();
    return wk;
  }

  kernels::AttentionShape kernel_shape(std::int64_t queries, std::int64_t pages, int features) const {
    kernels::AttentionShape s;
    s.batch = 1;
    s.seq_q = queries;
    s.heads = shape.heads;
    s.kv_heads = shape.kv_heads;
    s.head_dim = features;
    s.page_size = kPageSize;
    s.num_pages = pages;
    return s;
  }

  // The kernel's q: the caller's when f = d in the storage dtype; otherwise q' = [q, 1/scale, 0..]
  // (the constant only with a bias) in the storage dtype. `one` is 1/scale in device memory.
  const void* kernel_q(const Work& wk, const float* q, std::int64_t queries, int f, bool bias, const float* one) const {
    const int d = shape.head_dim;
    const std::int64_t rows = queries * shape.heads;
    if (f == d && storage == DType::kF32) return q;
    if (f != d) zero(wk.q_pad, rows * f, storage, ctx);
    copy(q, DType::kF32, {0, d}, wk.q_pad, storage, {0, f}, 1, rows, d, false, ctx);
    if (bias) copy(one, DType::kF32, {0, 0}, element(wk.q_pad, storage, d), storage, {0, f}, 1, rows, 1, false, ctx);
    return wk.q_pad;
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
  const bool cpu = state_->cpu;
  const std::array<std::int64_t, 9> mine{s.heads,          s.kv_heads, s.head_dim,    s.sequences, s.max_total_keys,
                                         s.key_bias,       cpu,        s.max_queries, s.max_keys};
  const auto all = gather_from_all_ranks(session, mine);
  for (int r = 0; r < session.size(); ++r) {
    const std::int64_t* x = &all[r * mine.size()];
    RINGCAST_CHECK(std::equal(x, x + 7, all.begin()),
                   "GatheredAttention: ranks disagree on the shape or backend: rank 0 has heads {}, kv_heads {}, "
                   "head_dim {}, sequences {}, max_total_keys {}, key_bias {}, cpu {}; rank {} has {}, {}, {}, {}, {}, "
                   "{}, {}",
                   all[0], all[1], all[2], all[3], all[4], all[5], all[6], r, x[0], x[1], x[2], x[3], x[4], x[5], x[6]);
    RINGCAST_CHECK(x[7] >= 0 && x[8] >= 0 && x[8] <= x[4],
                   "GatheredAttention: rank {} has max_queries {}, max_keys {} (need >= 0 and max_keys <= "
                   "max_total_keys {})",
                   r, x[7], x[8], x[4]);
  }
  RINGCAST_CHECK(s.heads >= 1 && s.kv_heads >= 1 && s.heads % s.kv_heads == 0,
                 "GatheredAttention: heads ({}) must be a positive multiple of kv_heads ({})", s.heads, s.kv_heads);
  // The bias feature makes the kernel's head dim d + 1, which the CPU kernel takes up to 256; the
  // CUDA kernels take 64 and 128.
  if (cpu)
    RINGCAST_CHECK(s.head_dim >= 1 && s.head_dim < 256, "GatheredAttention: head_dim {} is outside [1, 255]",
                   s.head_dim);
  else
    RINGCAST_CHECK(s.head_dim == 64 || s.head_dim == 128, "GatheredAttention: head_dim {} on CUDA (64 or 128)",
                   s.head_dim);
  RINGCAST_CHECK(s.sequences >= 1 && s.max_total_keys >= 0,
                 "GatheredAttention: sequences ({}) must be >= 1 and "
                 "max_total_keys ({}) >= 0",
                 s.sequences, s.max_total_keys);
  const std::int64_t queries = std::max<std::int64_t>(s.max_queries, 1),
                     pages = std::max<std::int64_t>(state_->max_pages, 1);
  for (const int f : {s.head_dim, state_->max_features()}) {  // the widths a call may use
    const kernels::AttentionShape largest = state_->kernel_shape(queries, pages, f);
    state_->kernel_bytes =
        std::max({state_->kernel_bytes, kernels::attention_forward_workspace_bytes(largest, state_->ctx),
                  kernels::attention_backward_workspace_bytes(largest, state_->ctx)});
  }
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

  const int d = sh.head_dim, hkv = sh.kv_heads, f = st.features(bias);
  const std::int64_t kvd = std::int64_t{hkv} * d, w = st.row_width(bias);
  const State::Kept kept = st.kept(a.kept);
  const State::Work wk = st.work(a.workspace);
  std::vector<std::int64_t> header{bias ? 1 : 0};
  header.insert(header.end(), q_counts.begin(), q_counts.end());
  header.insert(header.end(), keys.counts.begin(), keys.counts.end());
  copy_from_host(kept.header, header.data(), header.size() * sizeof(std::int64_t), st.ctx.device, st.ctx.stream);
  // The tables go up first, while the stream is idle after the agreement.
  const kernels::AttentionShape ks = st.kernel_shape(queries, keys.pages(), f);
  const kernels::HostBlockTable host_table =
      keys.total > 0 && queries > 0 ? st.table(ks, q_counts, keys) : kernels::HostBlockTable{};
  Staging tables;
  const std::array<float, 2> constants{1.0f / st.scale, kernels::kNegInf};
  const std::size_t constants_at = tables.add(std::span<const float>(constants));
  const std::size_t offsets_at = tables.add(std::span<const std::int64_t>(host_table.offsets));
  const std::size_t entries_at = tables.add(std::span<const kernels::BlockEntry>(host_table.entries));
  tables.upload(wk.tables, st.table_bytes(), st.ctx);
  if (keys.total == 0) {  // no key anywhere: every query sees nothing
    zero(a.o, queries * sh.heads * d, DType::kF32, st.ctx);
    copy(tables.at<float>(constants_at) + 1, {0, 0}, a.lse, {0, 1}, 1, queries * sh.heads, 1, false, st.ctx);
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

  const std::int64_t head_stride = ks.num_pages * kPageSize * f;  // one KV head of a pool
  if (f != d) {  // the features past d: the bias column of k', zeros elsewhere
    zero(kept.k_pool, hkv * head_stride, st.storage, st.ctx);
    zero(kept.v_pool, hkv * head_stride, st.storage, st.ctx);
  }
  for (int r = 0; r < st.ranks; ++r)
    for (int s = 0; s < sh.sequences; ++s) {
      const std::size_t i = keys.at(r, s);
      const float* rows = wk.recv + keys.row[i] * w;
      const std::int64_t slot = keys.slot[i] * f;
      copy(rows, DType::kF32, {d, w}, element(kept.k_pool, st.storage, slot), st.storage, {head_stride, f}, hkv,
           keys.counts[i], d, false, st.ctx);
      copy(rows + kvd, DType::kF32, {d, w}, element(kept.v_pool, st.storage, slot), st.storage, {head_stride, f}, hkv,
           keys.counts[i], d, false, st.ctx);
      if (bias)
        copy(rows + 2 * kvd, DType::kF32, {0, w}, element(kept.k_pool, st.storage, slot + d), st.storage,
             {head_stride, f}, hkv, keys.counts[i], 1, false, st.ctx);
    }
  if (queries == 0) return;

  zero(wk.q_pos, queries, DType::kI32, st.ctx);
  float* o = f == d ? a.o : wk.o_pad;
  kernels::AttentionForwardParams p;
  p.shape = ks;
  p.dtype = st.storage;
  p.o_dtype = DType::kF32;
  p.softmax_scale = st.scale;
  p.q = st.kernel_q(wk, a.q, queries, f, bias, tables.at<float>(constants_at));
  p.k_pages = kept.k_pool;
  p.v_pages = kept.v_pool;
  p.q_pos = wk.q_pos;
  p.table = {tables.at<std::int64_t>(offsets_at), tables.at<kernels::BlockEntry>(entries_at), nullptr,
             static_cast<std::int64_t>(host_table.entries.size())};
  p.o = o;
  p.lse = a.lse;
  p.workspace = wk.kernel;
  p.workspace_bytes = st.kernel_bytes;
  kernels::attention_forward(p, st.ctx);
  if (f != d) copy(wk.o_pad, {0, f}, a.o, {0, d}, 1, queries * sh.heads, d, false, st.ctx);
}

void GatheredAttention::backward(const GatheredBackwardArgs& a) {
  const GatheredForwardArgs& fw = a.fwd;
  State& st = *state_;
  const GatheredAttentionShape& sh = st.shape;
  const auto S = static_cast<std::size_t>(sh.sequences);
  const State::Kept kept = st.kept(fw.kept);  // read only: the forward's header and pools
  std::vector<std::int64_t> header(static_cast<std::size_t>(st.header_size()), 0);
  if (fw.kept)
    copy_to_host(header.data(), kept.header, header.size() * sizeof(std::int64_t), st.ctx.device, st.ctx.stream);
  const std::vector<std::int64_t> q_counts = st.split(fw.n_q, fw.q_counts), k_counts = st.split(fw.n_k, fw.k_counts);
  const std::int64_t queries = fw.n_q, own_keys = fw.n_k;
  const bool bias = fw.kept && header[0] != 0;  // the forward's call had one
  const Problem problem = [&] {
    if (const Problem p = st.check_counts(fw.n_q, q_counts, fw.n_k, k_counts); p != kFine) return p;
    if (!fw.kept || !fw.workspace) return kNullMemory;
    const std::int64_t* kept_n_k = header.data() + 1 + S + st.session.rank() * S;
    if (!std::equal(q_counts.begin(), q_counts.end(), header.data() + 1) ||
        !std::equal(k_counts.begin(), k_counts.end(), kept_n_k) || (own_keys > 0 && (fw.key_bias != nullptr) != bias))
      return kNotTheForward;
    if (a.d_key_bias && !bias) return kBiasGradient;
    if ((queries > 0 && (!fw.q || !fw.o || !fw.lse || !a.d_o)) || (own_keys > 0 && (!fw.k || !fw.v))) return kNullInput;
    if ((queries > 0 && !a.d_q) || (own_keys > 0 && (!a.d_k || !a.d_v))) return kNullOutput;
    return kFine;
  }();
  st.agree("backward", problem, q_counts, k_counts, fw.key_bias != nullptr);

  const KeyLayout keys(std::vector<std::int64_t>(header.begin() + 1 + static_cast<std::ptrdiff_t>(S), header.end()),
                       st.ranks, sh.sequences);
  if (keys.total == 0) return;  // nothing was attended: no gradient anywhere
  const int d = sh.head_dim, hkv = sh.kv_heads, f = st.features(bias);
  const std::int64_t kvd = std::int64_t{hkv} * d, w = st.row_width(bias);
  const State::Work wk = st.work(fw.workspace);
  const kernels::AttentionShape ks = st.kernel_shape(queries, keys.pages(), f);
  const std::int64_t head_stride = ks.num_pages * kPageSize * f;
  if (queries == 0) {
    zero(wk.send, keys.total * w, DType::kF32, st.ctx);  // this rank's queries add nothing to anyone's keys
  } else {
    const kernels::HostBlockTable host_table = st.table(ks, q_counts, keys);
    const kernels::HostTransposedTable host_transposed = kernels::transpose(host_table, ks);
    Staging tables;
    const std::array<float, 2> constants{1.0f / st.scale, kernels::kNegInf};
    const std::size_t constants_at = tables.add(std::span<const float>(constants));
    const std::size_t offsets_at = tables.add(std::span<const std::int64_t>(host_table.offsets));
    const std::size_t entries_at = tables.add(std::span<const kernels::BlockEntry>(host_table.entries));
    const std::size_t t_offsets_at = tables.add(std::span<const std::int64_t>(host_transposed.offsets));
    const std::size_t refs_at = tables.add(std::span<const kernels::PageRef>(host_transposed.refs));
    tables.upload(wk.tables, st.table_bytes(), st.ctx);
    zero(wk.q_pos, queries, DType::kI32, st.ctx);

    // Padded features: o' = [o, 0..] (P v' is 0 past d), dO' = [dO, 0..], dQ' into a zeroed pad.
    const std::int64_t rows = queries * sh.heads;
    float* o = fw.o;  // only read (p.fwd.o): the forward's O or its padded copy
    const void* d_o = a.d_o;
    float* d_q = a.d_q;
    if (f != d) {
      zero(wk.o_pad, rows * f, DType::kF32, st.ctx);
      copy(fw.o, {0, d}, wk.o_pad, {0, f}, 1, rows, d, false, st.ctx);
      zero(wk.d_q_pad, rows * f, DType::kF32, st.ctx);
      o = wk.o_pad;
      d_q = wk.d_q_pad;
    }
    if (f != d || st.storage != DType::kF32) {
      if (f != d) zero(wk.d_o_pad, rows * f, st.storage, st.ctx);
      copy(a.d_o, DType::kF32, {0, d}, wk.d_o_pad, st.storage, {0, f}, 1, rows, d, false, st.ctx);
      d_o = wk.d_o_pad;
    }
    kernels::AttentionBackwardParams p;
    p.fwd.shape = ks;
    p.fwd.dtype = st.storage;
    p.fwd.o_dtype = DType::kF32;
    p.fwd.softmax_scale = st.scale;
    p.fwd.q = st.kernel_q(wk, fw.q, queries, f, bias, tables.at<float>(constants_at));
    p.fwd.k_pages = kept.k_pool;
    p.fwd.v_pages = kept.v_pool;
    p.fwd.q_pos = wk.q_pos;
    p.fwd.table = {tables.at<std::int64_t>(offsets_at), tables.at<kernels::BlockEntry>(entries_at), nullptr,
                   static_cast<std::int64_t>(host_table.entries.size())};
    p.fwd.o = o;
    p.fwd.lse = fw.lse;
    p.d_o = d_o;
    p.transposed = {tables.at<std::int64_t>(t_offsets_at), tables.at<kernels::PageRef>(refs_at),
                    static_cast<std::int64_t>(host_transposed.refs.size())};
    p.d_q = d_q;
    p.d_k_pages = wk.d_k_pool;
    p.d_v_pages = wk.d_v_pool;
    p.accumulate = true;  // into the caller's d_q; the pools start from zero
    p.workspace = wk.kernel;
    p.workspace_bytes = st.kernel_bytes;
    zero(wk.d_k_pool, hkv * head_stride, DType::kF32, st.ctx);
    zero(wk.d_v_pool, hkv * head_stride, DType::kF32, st.ctx);
    kernels::attention_backward(p, st.ctx);
    if (f != d) copy(wk.d_q_pad, {0, f}, a.d_q, {0, d}, 1, rows, d, true, st.ctx);

    // Gradients of every gathered key, packed like the forward's rows (rank-major: owner blocks).
    for (int r = 0; r < st.ranks; ++r)
      for (int s = 0; s < sh.sequences; ++s) {
        const std::size_t i = keys.at(r, s);
        float* packed = wk.send + keys.row[i] * w;
        const std::int64_t slot = keys.slot[i] * f;
        copy(wk.d_k_pool + slot, {head_stride, f}, packed, {d, w}, hkv, keys.counts[i], d, false, st.ctx);
        copy(wk.d_v_pool + slot, {head_stride, f}, packed + kvd, {d, w}, hkv, keys.counts[i], d, false, st.ctx);
        for (int g = 0; bias && g < hkv; ++g)  // one KV head at a time: they sum into one column
          copy(wk.d_k_pool + g * head_stride + slot + d, {0, f}, packed + 2 * kvd, {0, w}, 1, keys.counts[i], 1, g > 0,
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
