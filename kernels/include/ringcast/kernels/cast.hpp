// CAST building blocks (ALGORITHMS.md §5, DESIGN.md §4.1 `clusters = surrogate`): surrogate
// affinities, cluster assignment, gathering members into pages, softmax(A_k)-weighted cluster
// summaries and the output mixing. Intra-cluster attention between the gathered pages is the
// attention kernel's job; these kernels take its result as an input.
//
// Layouts (fp32): Q [B, n, heads, d]; K, V [B, n, kv_heads, d]; surrogates S [kv_heads, c, d];
// A_q [B, heads, n, c]; A_k [B, kv_heads, n, c]. Clusters belong to a KV head; cluster `cl` of batch
// b has page id b * c + cl and owns rows [cl * page_size, (cl + 1) * page_size) of the gathered
// queries [B, c * page_size, heads, d]. members [B, kv_heads, c, page_size] lists token indices in
// increasing order, slots [counts, page_size) are padding (-1). Per-cluster summaries use the summary
// pool layout of summaries.hpp: [kv_heads, rows, d], slot b * c + cl, rows rounded up to whole pages.
//
// GQA: every query head scores with the surrogates of its KV head (A_q per query head); clusters and
// their summaries are per KV head, so the assignment affinity averages the group's query softmaxes.
// Assignment is hard (no gradient through the choice); gradients reach S, Q, K and V through the
// affinities used as weights in the summaries and the mixing. Backward passes add into their outputs.
#pragma once

#include <ringcast/kernels/attention.hpp>

#include <cstdint>

namespace ringcast::kernels {

struct CastShape {
  int batch = 1;
  std::int64_t seq = 0;  // n tokens per batch element
  int heads = 1;
  int kv_heads = 1;
  int head_dim = 64;
  int clusters = 1;      // c surrogate tokens per KV head
  int page_size = 64;    // cluster capacity

  int group() const { return heads / kv_heads; }
  std::int64_t member_rows() const { return std::int64_t{clusters} * page_size; }
  std::int64_t summary_rows() const {
    return (std::int64_t{batch} * clusters + page_size - 1) / page_size * page_size;
  }
};

// A_q = Q Sᵀ, A_k = K Sᵀ (no scale: the surrogates carry it).
struct CastAffinityParams {
  CastShape shape;
  const float* q = nullptr;
  const float* k = nullptr;
  const float* surrogates = nullptr;
  float* a_q = nullptr;
  float* a_k = nullptr;
};

struct CastAffinityBackwardParams {
  CastShape shape;
  const float* q = nullptr;
  const float* k = nullptr;
  const float* surrogates = nullptr;
  const float* d_a_q = nullptr;
  const float* d_a_k = nullptr;
  float* d_q = nullptr;  // added into
  float* d_k = nullptr;
  float* d_surrogates = nullptr;
};

// Both rules rank tokens by A_g[j, cl] = mean over the group's query heads of softmax_c(A_q[j, :])[cl]
// + softmax_c(A_k[j, :])[cl] (our reading of the paper's f(A_q) + f(A_k)); ties go to the lower
// token index, then the lower cluster index.
enum class CastAssignment {
  kTopK,        // each cluster takes its min(page_size, n) best tokens; a token may join several or none
  kSingleTopK,  // tokens in order of their best affinity join their best cluster with room; at most one
};

struct CastAssignParams {
  CastShape shape;
  CastAssignment rule = CastAssignment::kTopK;
  const float* a_q = nullptr;
  const float* a_k = nullptr;
  std::int32_t* members = nullptr;  // [B, kv_heads, c, page_size]
  std::int32_t* counts = nullptr;   // [B, kv_heads, c]
};

// Gathers members: queries into [B, c * page_size, heads, d] (query head h uses the clusters of KV
// head h / group), keys and values into page pools [kv_heads, B * c, page_size, d]. Padding is zero.
struct CastGatherParams {
  CastShape shape;
  const std::int32_t* members = nullptr;
  const std::int32_t* counts = nullptr;
  const float* q = nullptr;
  const float* k = nullptr;
  const float* v = nullptr;
  float* q_gathered = nullptr;
  float* k_pages = nullptr;
  float* v_pages = nullptr;
};

// The adjoint of the gather: a scatter-add in which a token sums over its memberships.
struct CastGatherBackwardParams {
  CastShape shape;
  const std::int32_t* members = nullptr;
  const std::int32_t* counts = nullptr;
  const float* d_q_gathered = nullptr;
  const float* d_k_pages = nullptr;
  const float* d_v_pages = nullptr;
  float* d_q = nullptr;  // added into
  float* d_k = nullptr;
  float* d_v = nullptr;
};

// R_inter[cl] = Σ_{j∈I_cl} π_j V_j and the matching key Σ π_j K_j, π = softmax over the members j of
// A_k[j, cl]. An empty cluster has zero summaries.
struct CastSummaryParams {
  CastShape shape;
  const std::int32_t* members = nullptr;
  const std::int32_t* counts = nullptr;
  const float* a_k = nullptr;
  const float* k = nullptr;
  const float* v = nullptr;
  float* key_summary = nullptr;    // [kv_heads, summary_rows, d]
  float* value_summary = nullptr;
};

struct CastSummaryBackwardParams {
  CastShape shape;
  const std::int32_t* members = nullptr;
  const std::int32_t* counts = nullptr;
  const float* a_k = nullptr;
  const float* k = nullptr;
  const float* v = nullptr;
  const float* d_key_summary = nullptr;
  const float* d_value_summary = nullptr;
  float* d_a_k = nullptr;  // added into
  float* d_k = nullptr;
  float* d_v = nullptr;
};

// O_i = Σ_cl w_{i,cl} X_{i,cl}, w_i = softmax_c(A_q[i, :]) of i's query head, X_{i,cl} = i's row of
// `intra` (the intra-cluster attention output over the gathered queries) when i is a member of cl,
// else R_inter[cl] of the head's KV head.
struct CastMixParams {
  CastShape shape;
  const std::int32_t* members = nullptr;
  const std::int32_t* counts = nullptr;
  const float* a_q = nullptr;
  const float* intra = nullptr;          // [B, c * page_size, heads, d]
  const float* value_summary = nullptr;  // [kv_heads, summary_rows, d]
  float* o = nullptr;                    // [B, n, heads, d]
};

struct CastMixBackwardParams {
  CastShape shape;
  const std::int32_t* members = nullptr;
  const std::int32_t* counts = nullptr;
  const float* a_q = nullptr;
  const float* intra = nullptr;
  const float* value_summary = nullptr;
  const float* d_o = nullptr;
  float* d_a_q = nullptr;  // added into
  float* d_intra = nullptr;
  float* d_value_summary = nullptr;
};

void cast_affinities(const CastAffinityParams& p, const ExecContext& ctx);
void cast_affinities_backward(const CastAffinityBackwardParams& p, const ExecContext& ctx);
void cast_assign(const CastAssignParams& p, const ExecContext& ctx);
void cast_gather(const CastGatherParams& p, const ExecContext& ctx);
void cast_gather_backward(const CastGatherBackwardParams& p, const ExecContext& ctx);
void cast_summaries(const CastSummaryParams& p, const ExecContext& ctx);
void cast_summaries_backward(const CastSummaryBackwardParams& p, const ExecContext& ctx);
void cast_mix(const CastMixParams& p, const ExecContext& ctx);
void cast_mix_backward(const CastMixBackwardParams& p, const ExecContext& ctx);

}  // namespace ringcast::kernels
