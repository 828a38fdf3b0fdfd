// Block-sparse paged attention: the one attention kernel of ringcast (DESIGN.md §2, §4).
//
// Queries come in tiles of kQueryTile = 128 rows. Keys and values live in pages of page_size keys
// (64 by default) in one pool per KV head: K and V pools are [kv_heads, num_pages, page_size, head_dim],
// row-major, so one page of one head is a contiguous page_size x head_dim block. For every
// (batch, query tile, KV head) a block table lists entries; each entry names a page and says which of
// the tile's 128 rows see it (row_mask), whether the causal position mask applies (key position <=
// query position, positions from q_pos and entry.key_pos0), an additive logit bias, and how many of
// the page's keys are valid (a valid prefix) and which of those take part (key_mask, all by default).
// Pages of summary keys are shared by many tiles: an entry may take a subset of their keys (key_mask),
// add the pool's per-key bias (kEntryKeyBias: key_bias[kv_head][page][j], e.g. log(count) of the keys a
// summary stands for), and, where rows of one tile see different keys of the page, point at page_size
// KeyMeta records (key_meta >= 0): each key then has its own row mask and bias on top of the entry's. Query heads h share KV head h / (heads / kv_heads) (GQA); the table is per KV head.
//
// Forward: O [B, n_q, heads, head_dim] in o_dtype (storage dtype or fp32), LSE [B, heads, n_q] fp32 (natural log of
// the softmax denominator of scale * q.k + bias). A row that sees no key gets O = 0, LSE = -inf.
// Backward (given dO, O, LSE): dQ [B, n_q, heads, head_dim] and dK, dV page pools, all fp32 and
// accumulated into (added to, or overwritten when accumulate = false). dK/dV of a page sum over
// every entry that references it; the transposed table (page -> entries) lets each page be owned by
// one worker, so there are no atomics. Pointers are host memory on the CPU backend and device memory
// on the CUDA backend; the CUDA backend enqueues on `stream` and never allocates: scratch comes from
// the workspace, sized by the *_workspace_bytes queries.
#pragma once

#include <ringcast/dtype.hpp>
#include <ringcast/tensor.hpp>

#include <cstddef>
#include <cstdint>
#include <limits>

namespace ringcast::kernels {

inline constexpr int kQueryTile = 128;

enum EntryFlags : std::uint32_t {
  kEntryCausal = 1u << 0,   // apply the per-row position mask: key_pos0 + j <= q_pos[row]
  kEntryKeyBias = 1u << 1,  // add key_bias[kv_head][page][j] to key j's logit
};

struct BlockEntry {
  std::uint64_t row_mask[2];  // bit r of row_mask[r / 64]: tile row r sees this entry
  std::int32_t page;          // page id in the KV head's pool
  std::int32_t key_pos0;      // global position of the page's key 0 (used when kEntryCausal)
  float bias;                 // additive logit bias for every key of the entry (e.g. log(count))
  std::int32_t key_meta;      // index of the first of page_size KeyMeta records, or -1
  std::int32_t key_count;     // keys [0, key_count) of the page are valid, 1 <= key_count <= page_size
  std::uint32_t flags;        // EntryFlags
  std::uint64_t key_mask = ~std::uint64_t{0};  // bit j: key j takes part; 64 keys: all ones when page_size > 64
};

// Per-key visibility and bias for pages of gathered summary keys.
struct KeyMeta {
  std::uint64_t row_mask[2];
  float bias;
  std::int32_t reserved;
};

// Forward table: CSR over units u = (b * num_tiles + tile) * kv_heads + kv_head, entries of unit u in
// entries[offsets[u], offsets[u + 1]). num_tiles = ceil(n_q / kQueryTile).
struct BlockTable {
  const std::int64_t* offsets = nullptr;  // [B * num_tiles * kv_heads + 1]
  const BlockEntry* entries = nullptr;
  const KeyMeta* key_meta = nullptr;      // may be null when no entry uses it
  std::int64_t num_entries = 0;
  // Row masks follow per-row choices (selection = row): the CPU kernel then cuts every entry's rows
  // into fixed blocks, so that a row's results never depend on the rows after it (tile_math.hpp).
  bool rows_vary = false;
};

// Transposed table: for each (kv_head, page) the forward entries that reference it, as indices into
// BlockTable::entries together with the unit they belong to. CSR over kv_head * num_pages + page.
struct PageRef {
  std::int64_t unit;   // forward unit index (b * num_tiles + tile) * kv_heads + kv_head
  std::int64_t entry;  // index into BlockTable::entries
};
struct TransposedTable {
  const std::int64_t* offsets = nullptr;  // [kv_heads * num_pages + 1]
  const PageRef* refs = nullptr;
  std::int64_t num_refs = 0;
};

struct AttentionShape {
  int batch = 1;
  std::int64_t seq_q = 0;    // n_q, query rows per batch element (need not divide by kQueryTile)
  int heads = 1;
  int kv_heads = 1;
  int head_dim = 64;         // 64 or 128 (CUDA); any on the CPU backend
  int page_size = 64;
  std::int64_t num_pages = 0;  // pages per KV head in the pools
  std::int64_t num_tiles() const { return (seq_q + kQueryTile - 1) / kQueryTile; }
  std::int64_t num_units() const { return batch * num_tiles() * kv_heads; }
};

struct AttentionForwardParams {
  AttentionShape shape;
  DType dtype = DType::kF32;    // storage dtype of q, k, v, d_o: kF32 on CPU, kBF16 / kF16 on CUDA
  DType o_dtype = DType::kF32;  // dtype of o: the storage dtype, or kF32 for partials that merge
  float softmax_scale = 0.f;
  const void* q = nullptr;         // [B, n_q, heads, head_dim]
  const void* k_pages = nullptr;   // [kv_heads, num_pages, page_size, head_dim]
  const void* v_pages = nullptr;
  const std::int32_t* q_pos = nullptr;  // [n_q] global positions of the query rows (causal entries)
  const float* key_bias = nullptr;      // [kv_heads, num_pages, page_size]; read by kEntryKeyBias entries
  BlockTable table;
  void* o = nullptr;     // [B, n_q, heads, head_dim]
  float* lse = nullptr;  // [B, heads, n_q]
  void* workspace = nullptr;
  std::size_t workspace_bytes = 0;
};

struct AttentionBackwardParams {
  AttentionForwardParams fwd;  // the forward's inputs, its O and LSE (o, lse are read)
  const void* d_o = nullptr;   // [B, n_q, heads, head_dim], storage dtype
  TransposedTable transposed;
  float* d_q = nullptr;        // [B, n_q, heads, head_dim]
  float* d_k_pages = nullptr;  // [kv_heads, num_pages, page_size, head_dim]
  float* d_v_pages = nullptr;
  bool accumulate = false;     // add into d_q / d_k / d_v instead of overwriting
  void* workspace = nullptr;
  std::size_t workspace_bytes = 0;
};

struct ExecContext {
  Device device{};
  Stream stream = nullptr;
};

// Validates shapes and options (head dims, dtypes, GQA ratio, null pointers) and throws Error.
void validate(const AttentionForwardParams& p, DeviceKind device);

std::size_t attention_forward_workspace_bytes(const AttentionShape& shape, const ExecContext& ctx);
std::size_t attention_backward_workspace_bytes(const AttentionShape& shape, const ExecContext& ctx);

void attention_forward(const AttentionForwardParams& p, const ExecContext& ctx);
void attention_backward(const AttentionBackwardParams& p, const ExecContext& ctx);

// Merges a partial result into an accumulator by log-sum-exp, in fp32, overflow-safe:
//   lse = m + log(exp(lse_acc - m) + exp(lse_part - m)), m = max(lse_acc, lse_part)
//   o_acc = exp(lse_acc - lse) o_acc + exp(lse_part - lse) o_part
// A side with lse = -inf contributes nothing; both -inf leaves O = 0, LSE = -inf.
// O layouts [B, n, heads, head_dim] fp32, LSE [B, heads, n].
struct MergeParams {
  int batch = 1;
  std::int64_t seq = 0;
  int heads = 1;
  int head_dim = 64;
  float* o_acc = nullptr;
  float* lse_acc = nullptr;
  const float* o_part = nullptr;
  const float* lse_part = nullptr;
};
void merge_by_lse(const MergeParams& p, const ExecContext& ctx);

inline constexpr float kNegInf = -std::numeric_limits<float>::infinity();

}  // namespace ringcast::kernels
