// What a distributed attention layer is asked to do: its shape (global sequence, ranks, heads) and its
// options (mode, placement, the clustered mode's budgets). Shared by the operator, `plan`, `check`
// and `run`; names parse from and print to the strings the CLI and config files use.
#pragma once

#include <ringcast/dtype.hpp>

#include <array>
#include <cstdint>
#include <string>
#include <string_view>

namespace ringcast {

enum class AttentionMode { kRing, kUlysses, kAllGather, kClustered };
enum class Placement { kAuto, kContiguous, kZigzag };  // auto: zigzag for causal ring, else contiguous
enum class ClusterKind { kBlocks, kSurrogate };
enum class SelectionUnit { kAuto, kTile, kRow };       // auto: row when causal, tile when bidirectional
enum class ScoreKind { kBound, kMean };
// clusters = surrogate (CAST, docs/clustered-design.md): how tokens join the surrogates' clusters, and
// how a query combines its own cluster with the others.
enum class SurrogateAssignment { kSingle, kTopK };  // single-assignment Top-K with capacity page_size, or Top-K
enum class ClusterCombine { kJoint, kCast };  // one softmax over clusters and summaries (DESIGN.md §4.1), or CAST's mix

struct LayerShape {
  std::int64_t seq_len = 0;  // n, the whole sequence
  int ranks = 1;             // P
  int batch = 1;
  int heads = 16;
  int kv_heads = 16;
  int head_dim = 128;
  DType dtype = DType::kBF16;
  bool causal = true;
  std::int64_t local_len() const { return seq_len / ranks; }
};

struct AttentionOptions {
  AttentionMode mode = AttentionMode::kRing;
  Placement placement = Placement::kAuto;
  ClusterKind clusters = ClusterKind::kBlocks;
  SelectionUnit selection = SelectionUnit::kAuto;
  ScoreKind score = ScoreKind::kBound;
  int page_size = 64;       // keys per page
  int coarse_pages = 16;    // pages per coarse block
  int top_k = 16;           // pages each selection unit keeps
  int coarse_k = 4;         // coarse blocks each unit keeps before choosing pages
  int remote_blocks = 8;    // R: remote coarse blocks a rank fetches (bidirectional) / per tile (causal)
  int remote_cap = 0;       // most remote blocks fetched per rank and KV head when causal; 0 = 2R
  int window_before = 256;  // causal window: keys in [t0 - window_before, t1); bidirectional uses 128
  int window_bidir = 128;   // bidirectional window: [t0 - window_bidir, t1 + window_bidir)
  int surrogate_clusters = 0;  // surrogate: clusters c per rank and KV head; 0 = n_loc / page_size
  SurrogateAssignment assignment = SurrogateAssignment::kSingle;
  ClusterCombine combine = ClusterCombine::kJoint;
  bool check_inputs = true;  // refuse NaN/Inf inputs on every rank (one pass + a small all-gather per call)
  // ulysses: head groups G (dividing h_kv / P) whose all-to-alls overlap the attention of the group
  // before; 0 = auto, the largest divisor of h_kv / P up to kMaxPipelineGroups. Results do not depend on G.
  int pipeline_groups = 0;
  static constexpr int kMaxPipelineGroups = 4;

  Placement resolved_placement(const LayerShape& s) const;
  SelectionUnit resolved_selection(const LayerShape& s) const;
  int resolved_remote_cap() const { return remote_cap > 0 ? remote_cap : 2 * remote_blocks; }
  int resolved_pipeline_groups(const LayerShape& s) const;
  std::int64_t coarse_block() const { return std::int64_t{page_size} * coarse_pages; }
  // Whether the layer takes surrogate tokens (AttentionForwardArgs::surrogates).
  bool uses_surrogates() const { return mode == AttentionMode::kClustered && clusters == ClusterKind::kSurrogate; }
  int resolved_surrogate_clusters(const LayerShape& s) const {
    return surrogate_clusters > 0 ? surrogate_clusters : static_cast<int>(s.local_len() / page_size);
  }
};

// The shape [h_kv, c, d] of the surrogate tokens a layer with these options takes (the caller owns
// them as parameters, identical on every rank); throws Error when the options take none.
std::array<std::int64_t, 3> surrogate_shape(const LayerShape& shape, const AttentionOptions& options);

// Throws Error (the same message on every rank) when shape and options do not fit together:
// n % P, n % 2P for zigzag, h % h_kv, h % P, h_kv % P and (h_kv / P) % pipeline groups for Ulysses,
// head dims, budgets, and for surrogate clusters: bidirectional only and (joint combine) whole coarse
// blocks of clusters per rank.
void validate(const LayerShape& shape, const AttentionOptions& options);

std::string_view name(AttentionMode m);
std::string_view name(Placement p);
std::string_view name(ClusterKind c);
std::string_view name(SelectionUnit u);
std::string_view name(ScoreKind s);
std::string_view name(SurrogateAssignment a);
std::string_view name(ClusterCombine c);
// Parse the CLI spelling; throw Error listing the choices on anything else.
AttentionMode parse_mode(std::string_view s);
Placement parse_placement(std::string_view s);
ClusterKind parse_clusters(std::string_view s);
SelectionUnit parse_selection(std::string_view s);
ScoreKind parse_score(std::string_view s);
SurrogateAssignment parse_assignment(std::string_view s);
ClusterCombine parse_combine(std::string_view s);
DType parse_dtype(std::string_view s);

}  // namespace ringcast
