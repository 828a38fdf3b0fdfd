// The distributed attention operator: one attention layer over a sequence sharded across the
// Session's ranks, forward and backward, in any mode of AttentionOptions (ring, ulysses, allgather;
// clustered as it lands). Usable without the model stack.
//
// Per rank, token layout: q [B, n_loc, h, d]; k, v [B, n_loc, h_kv, d]; o like q; lse [B, h, n_loc]
// f32. The storage dtype is f32 on the CPU backend and bf16 / f16 on CUDA (shape.dtype); gradients
// come back in the storage dtype. The rank holds the rows at positions() of the whole sequence
// (contiguous: [r n_loc, (r+1) n_loc); zigzag: chunks r and 2P-1-r of 2P). Work is enqueued on the
// session's stream; the operator owns its scratch (allocated once, reported by workspace_bytes()).
// backward() uses the inputs and outputs of the latest forward() (pass the same views again).
// attended_entries() lists, in global terms, what the latest forward() attended (clustered mode).
// Clustered mode with clusters = surrogate (CAST): the surrogate tokens are parameters of the layer,
// owned by the caller (surrogate_shape() in attention_options.hpp) and identical on every rank; the
// backward adds this rank's part of their gradient into d_surrogates, so the caller all-reduces it
// (sums over ranks) with its other parameters' gradients.
#pragma once

#include <ringcast/attention_options.hpp>
#include <ringcast/session.hpp>
#include <ringcast/tensor.hpp>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>
#include <vector>

namespace ringcast {

// Global positions of rank `rank`'s rows, in the order the rank stores them.
std::vector<std::int32_t> shard_positions(const LayerShape& shape, const AttentionOptions& options, int rank);

// surrogates [h_kv, c, d] in the storage dtype: given exactly when options.uses_surrogates(), else
// left empty (data == nullptr). With the `cast` combine, lse holds the log-sum-exp of the token's
// intra-cluster attention in its first cluster (-inf for a token in no cluster); O is CAST's mix.
struct AttentionForwardArgs {
  TensorView q, k, v;  // inputs
  TensorView o, lse;   // outputs
  TensorView surrogates = {};
};

// d_surrogates [h_kv, c, d] f32: this rank's part of dLoss/dS is added into it (zero it before the
// first layer call of a step; the caller all-reduces it). Given exactly when surrogates are.
// In place: d_q, d_k, d_v may be q, k, v themselves (the same memory; every mode reads its inputs
// before it writes a gradient), so a caller needs no second Q|K|V buffer. Any other overlap of an
// output with an input or with another output is refused.
struct AttentionBackwardArgs {
  TensorView q, k, v, o, lse, d_o;  // the forward's inputs and outputs, and the output gradient
  TensorView d_q, d_k, d_v;         // outputs
  TensorView surrogates = {}, d_surrogates = {};
};

// The resolution at which a tile's rows see keys (DESIGN.md §4.1 "Visibility rules"): exact window
// or selected pages, or one summary key standing for a page or a coarse block. The values are the
// kind codes of `ringcast check --dump`.
enum class AttendedKind : std::int32_t { kWindow = 0, kSelected = 1, kPageSummary = 2, kCoarseSummary = 3 };

// One thing a (batch element, tile, KV head) attended: a whole global page (window, selected), or one
// summary key, named by the global page or block it stands for. Bit r of row_mask[r / 64]: tile row r
// (position first_row_pos + r) sees it; causal: row t sees only the page's keys at positions <= t.
// clusters = surrogate: pages are clusters, global_id = rank * c + cluster (a block: that id divided
// by coarse_pages), their keys the members cluster_members() lists; kWindow is a row's own cluster
// (CAST intra-cluster attention). Tiles are still 128 consecutive local rows. (Under GQA with per-row
// selection the kernel's tiles hold 128 / G tokens, each with its G query heads; their entries are
// reported here in their 128-row tile's terms, so such a tile lists a page once per kernel tile.)
struct AttendedEntry {
  int batch = 0;
  std::int64_t tile = 0;           // rank-local tile of kQueryTile (128) rows
  std::int64_t first_row_pos = 0;  // global position of the tile's first row
  int kv_head = 0;
  AttendedKind kind = AttendedKind::kWindow;
  std::int64_t global_id = 0;  // global page (window, selected, page summary) or global block (coarse)
  std::uint64_t row_mask[2] = {0, 0};
  bool causal = false;
};

// The size of the latest forward()'s block table over this rank's (batch element, query tile, KV head)
// units: a unit's entries are the pages and summary pages its tile attends. With per-row selection a
// tile's list is the union of its rows' choices, so the figures show how far a tile's rows agree.
// Under GQA (G = heads / kv_heads > 1, a power of two) a per-row selection tile is 128 / G tokens,
// each token's G query heads its rows (NSA's layout), so the union is over 128 / G tokens.
struct TableEntries {
  std::int64_t units = 0;
  std::int64_t total = 0;  // entries over all units
  std::int64_t max = 0;    // the longest list of one unit
  double mean() const { return units > 0 ? static_cast<double>(total) / static_cast<double>(units) : 0.0; }
  // Adds a table given by its offsets (units + 1 of them, the first 0).
  void add(std::span<const std::int64_t> offsets);
};

class DistributedAttention {
 public:
  // Collective: every rank constructs it with the same shape and options (validated first, the
  // same way on every rank, so a bad configuration fails everywhere before any communication).
  DistributedAttention(const Session& session, const LayerShape& shape, const AttentionOptions& options);
  ~DistributedAttention();
  DistributedAttention(const DistributedAttention&) = delete;
  DistributedAttention& operator=(const DistributedAttention&) = delete;

  const LayerShape& shape() const;
  const AttentionOptions& options() const;
  std::span<const std::int32_t> positions() const;
  std::size_t workspace_bytes() const;

  void forward(const AttentionForwardArgs& args);
  void backward(const AttentionBackwardArgs& args);

  // What the latest forward() attended, in (batch, tile, KV head) order, per unit in table order.
  // Clustered mode only (the exact modes attend every visible key, page for page): throws Error for
  // the others, and before the first forward().
  std::vector<AttendedEntry> attended_entries() const;
  // The size of the latest forward()'s table; clustered mode only, like attended_entries().
  TableEntries table_entries() const;
  // clusters = surrogate only: the clusters of the latest forward(), [B, h_kv, c, page_size] global
  // positions of their members (this rank's tokens, ascending), -1 in padding slots.
  std::vector<std::int32_t> cluster_members() const;

  class Mode;  // one implementation per AttentionMode (runtime/src/attention_*.cpp)

 private:
  std::unique_ptr<Mode> mode_;
};

}  // namespace ringcast
