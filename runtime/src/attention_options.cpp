// Names, parsing and cross-checks of the attention options. validate() runs on every rank before any
// communication, so every rank fails the same way with the same message.
#include <ringcast/attention_options.hpp>
#include <ringcast/error.hpp>

#include <algorithm>
#include <array>
#include <utility>

namespace ringcast {
namespace {

template <typename E, std::size_t N>
E parse_enum(std::string_view what, std::string_view s, const std::array<std::pair<std::string_view, E>, N>& table) {
  std::string choices;
  for (const auto& [n, e] : table) {
    if (n == s) return e;
    if (!choices.empty()) choices += '|';
    choices += n;
  }
  RINGCAST_THROW("unknown {} '{}' ({})", what, s, choices);
}

constexpr std::array<std::pair<std::string_view, AttentionMode>, 4> kModes{
    {{"ring", AttentionMode::kRing}, {"ulysses", AttentionMode::kUlysses},
     {"allgather", AttentionMode::kAllGather}, {"clustered", AttentionMode::kClustered}}};
constexpr std::array<std::pair<std::string_view, Placement>, 3> kPlacements{
    {{"auto", Placement::kAuto}, {"contiguous", Placement::kContiguous}, {"zigzag", Placement::kZigzag}}};
constexpr std::array<std::pair<std::string_view, ClusterKind>, 2> kClusters{
    {{"blocks", ClusterKind::kBlocks}, {"surrogate", ClusterKind::kSurrogate}}};
constexpr std::array<std::pair<std::string_view, SelectionUnit>, 3> kUnits{
    {{"auto", SelectionUnit::kAuto}, {"tile", SelectionUnit::kTile}, {"row", SelectionUnit::kRow}}};
constexpr std::array<std::pair<std::string_view, ScoreKind>, 2> kScores{
    {{"bound", ScoreKind::kBound}, {"mean", ScoreKind::kMean}}};
constexpr std::array<std::pair<std::string_view, SurrogateAssignment>, 2> kAssignments{
    {{"single", SurrogateAssignment::kSingle}, {"topk", SurrogateAssignment::kTopK}}};
constexpr std::array<std::pair<std::string_view, ClusterCombine>, 2> kCombines{
    {{"joint", ClusterCombine::kJoint}, {"cast", ClusterCombine::kCast}}};
constexpr std::array<std::pair<std::string_view, DType>, 3> kDtypes{
    {{"bf16", DType::kBF16}, {"f16", DType::kF16}, {"f32", DType::kF32}}};

template <typename E, std::size_t N>
std::string_view name_of(E e, const std::array<std::pair<std::string_view, E>, N>& table) {
  for (const auto& [n, v] : table)
    if (v == e) return n;
  return "?";
}

}  // namespace

std::string_view name(AttentionMode m) { return name_of(m, kModes); }
std::string_view name(Placement p) { return name_of(p, kPlacements); }
std::string_view name(ClusterKind c) { return name_of(c, kClusters); }
std::string_view name(SelectionUnit u) { return name_of(u, kUnits); }
std::string_view name(ScoreKind s) { return name_of(s, kScores); }
std::string_view name(SurrogateAssignment a) { return name_of(a, kAssignments); }
std::string_view name(ClusterCombine c) { return name_of(c, kCombines); }
AttentionMode parse_mode(std::string_view s) { return parse_enum("attention mode", s, kModes); }
Placement parse_placement(std::string_view s) { return parse_enum("placement", s, kPlacements); }
ClusterKind parse_clusters(std::string_view s) { return parse_enum("cluster kind", s, kClusters); }
SelectionUnit parse_selection(std::string_view s) { return parse_enum("selection unit", s, kUnits); }
ScoreKind parse_score(std::string_view s) { return parse_enum("score", s, kScores); }
SurrogateAssignment parse_assignment(std::string_view s) { return parse_enum("surrogate assignment", s, kAssignments); }
ClusterCombine parse_combine(std::string_view s) { return parse_enum("cluster combine", s, kCombines); }
DType parse_dtype(std::string_view s) { return parse_enum("dtype", s, kDtypes); }

Placement AttentionOptions::resolved_placement(const LayerShape& s) const {
  if (placement != Placement::kAuto) return placement;
  return mode == AttentionMode::kRing && s.causal ? Placement::kZigzag : Placement::kContiguous;
}

SelectionUnit AttentionOptions::resolved_selection(const LayerShape& s) const {
  if (selection != SelectionUnit::kAuto) return selection;
  return s.causal ? SelectionUnit::kRow : SelectionUnit::kTile;
}

int AttentionOptions::resolved_pipeline_groups(const LayerShape& s) const {
  if (pipeline_groups > 0) return pipeline_groups;
  const int per_rank = s.kv_heads / s.ranks;
  int g = std::clamp(per_rank, 1, kMaxPipelineGroups);
  while (per_rank % g != 0) --g;
  return g;
}

void validate(const LayerShape& s, const AttentionOptions& o) {
  RINGCAST_CHECK(s.ranks >= 1 && s.batch >= 1 && s.heads >= 1 && s.kv_heads >= 1,
                 "ranks, batch, heads and kv-heads must be positive");
  RINGCAST_CHECK(s.seq_len > 0, "the sequence length must be positive, got {}", s.seq_len);
  RINGCAST_CHECK(s.seq_len % s.ranks == 0,
                 "sequence length {} does not divide evenly over {} ranks (n % P = {}): pad or trim the sequence",
                 s.seq_len, s.ranks, s.seq_len % s.ranks);
  RINGCAST_CHECK(s.heads % s.kv_heads == 0, "{} query heads cannot share {} KV heads evenly (GQA needs h % h_kv == 0)",
                 s.heads, s.kv_heads);
  RINGCAST_CHECK(s.head_dim == 64 || s.head_dim == 128, "head dim {} is not supported (64 or 128)", s.head_dim);
  if (o.resolved_placement(s) == Placement::kZigzag) {
    RINGCAST_CHECK(s.seq_len % (2 * s.ranks) == 0,
                   "zigzag placement needs the sequence length ({}) to divide by 2P = {}", s.seq_len, 2 * s.ranks);
  }
  if (o.mode == AttentionMode::kUlysses) {
    RINGCAST_CHECK(s.heads % s.ranks == 0 && s.kv_heads % s.ranks == 0,
                   "ulysses mode shards heads over ranks: heads ({}) and kv-heads ({}) must divide by {} ranks",
                   s.heads, s.kv_heads, s.ranks);
    RINGCAST_CHECK(o.pipeline_groups >= 0 && (s.kv_heads / s.ranks) % std::max(o.pipeline_groups, 1) == 0,
                   "ulysses pipeline groups ({}) must divide the {} KV heads of each rank (0 = auto)",
                   o.pipeline_groups, s.kv_heads / s.ranks);
  }
  if (o.mode == AttentionMode::kClustered) {
    RINGCAST_CHECK(o.page_size == 32 || o.page_size == 64 || o.page_size == 128, "page size {} (32, 64 or 128)",
                   o.page_size);
    RINGCAST_CHECK(o.coarse_pages >= 1 && o.top_k >= 1 && o.coarse_k >= 1 && o.remote_blocks >= 0 && o.remote_cap >= 0,
                   "clustered budgets must be positive (coarse-pages, top-k, coarse-k; remote-blocks >= 0)");
    RINGCAST_CHECK(s.local_len() % o.coarse_block() == 0,
                   "clustered mode needs each rank's {} tokens to be whole coarse blocks of {} keys", s.local_len(),
                   o.coarse_block());
    RINGCAST_CHECK(!(o.clusters == ClusterKind::kSurrogate && s.causal),
                   "surrogate (CAST) clusters are bidirectional only, as in the CAST paper");
  }
  if (o.uses_surrogates()) {
    RINGCAST_CHECK(o.surrogate_clusters >= 0, "surrogate clusters per rank must be >= 0 (0: n_loc / page size), got {}",
                   o.surrogate_clusters);
    const int c = o.resolved_surrogate_clusters(s);  // >= coarse_pages by default: n_loc is whole coarse blocks
    RINGCAST_CHECK(o.combine == ClusterCombine::kCast || c % o.coarse_pages == 0,
                   "surrogate clusters with the joint combine: {} clusters per rank must be whole coarse blocks of {} "
                   "clusters (coarse-pages)",
                   c, o.coarse_pages);
  }
}

std::array<std::int64_t, 3> surrogate_shape(const LayerShape& shape, const AttentionOptions& options) {
  RINGCAST_CHECK(options.uses_surrogates(), "surrogate_shape: mode {} with clusters = {} takes no surrogate tokens",
                 name(options.mode), name(options.clusters));
  return {shape.kv_heads, options.resolved_surrogate_clusters(shape), shape.head_dim};
}

}  // namespace ringcast
