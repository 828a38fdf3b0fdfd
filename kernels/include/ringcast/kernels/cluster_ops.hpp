// Cluster operations of the clustered mode with surrogate clusters (runtime/src/attention_cast_*.cpp;
// DESIGN.md §4.1, docs/clustered-design.md "Surrogate clusters"), so that the mode touches activations
// only through kernels (its rows move between token order, cluster order and cluster pages by
// row_gather.hpp): key bounds of partly filled pages; coarse blocks of clusters; selection queries of
// rows in cluster order; the log-sum-exp merge of CAST summaries. fp32; CPU and CUDA produce the same
// values bitwise except where a comment says otherwise.
#pragma once

#include <ringcast/kernels/attention.hpp>

#include <cstdint>

namespace ringcast::kernels {

// Per page of [pages, page_size, head_dim] keys: the channel-wise min and max over slots [0, count);
// zeros for an empty page. Outputs [pages, head_dim].
struct PageBoundsParams {
  std::int64_t pages = 0;
  int page_size = 64;
  int head_dim = 64;
  const float* keys = nullptr;
  const std::int32_t* counts = nullptr;  // [pages]
  float* key_min = nullptr;
  float* key_max = nullptr;
};
void page_key_bounds(const PageBoundsParams& p, const ExecContext& ctx);

// Block l of coarse_pages consecutive clusters: count-weighted means of the clusters' key and value
// summaries, min of their minima and max of their maxima over its non-empty clusters (zeros when
// all are empty). Cluster arrays [blocks * coarse_pages, head_dim], block arrays [blocks, head_dim].
struct ClusterBlockParams {
  std::int64_t blocks = 0;
  int coarse_pages = 1;
  int head_dim = 64;
  const std::int32_t* counts = nullptr;  // [blocks * coarse_pages]
  const float* key_mean = nullptr;
  const float* value_mean = nullptr;
  const float* key_min = nullptr;
  const float* key_max = nullptr;
  float* block_key_mean = nullptr;
  float* block_value_mean = nullptr;
  float* block_key_min = nullptr;
  float* block_key_max = nullptr;
};
// The means' adjoint: d mean[cl] += count[cl] / count[block] * d block_mean[block] (added into).
struct ClusterBlockBackwardParams {
  std::int64_t blocks = 0;
  int coarse_pages = 1;
  int head_dim = 64;
  const std::int32_t* counts = nullptr;
  const float* d_block_key_mean = nullptr;
  const float* d_block_value_mean = nullptr;
  float* d_key_mean = nullptr;
  float* d_value_mean = nullptr;
};
void cluster_blocks(const ClusterBlockParams& p, const ExecContext& ctx);
void cluster_blocks_backward(const ClusterBlockBackwardParams& p, const ExecContext& ctx);

// Selection queries of rows in a permuted order: unit u covers rows [u * unit_rows, min(rows, (u + 1)
// * unit_rows)); its query is the mean over them of the query of token order[r] summed over the heads
// of KV head kv_head's group, added rows then heads in ascending order.
struct UnitQueryParams {
  const float* q = nullptr;  // [tokens, heads, head_dim]
  int heads = 1;
  int kv_heads = 1;
  int head_dim = 64;
  int kv_head = 0;
  const std::int32_t* order = nullptr;  // [rows] token of each row
  std::int64_t rows = 0;
  int unit_rows = kQueryTile;
  float* out = nullptr;  // [ceil(rows / unit_rows), head_dim]
};
void unit_queries(const UnitQueryParams& p, const ExecContext& ctx);

// CAST's summaries merged over ranks (cast combine). Clusters are slots s = b * clusters + cl of
// each KV head; members as in cast.hpp: [B, kv_heads, clusters, page_size], counts [B, kv_heads,
// clusters]; a_k [B, kv_heads, seq, clusters]. Per-cluster scalars are [kv_heads, B * clusters],
// summaries the pool layout [kv_heads, summary_rows, head_dim] of cast.hpp.
struct ClusterMembers {
  int batch = 1;
  int kv_heads = 1;
  std::int64_t seq = 0;  // tokens per element
  int clusters = 1;
  int page_size = 64;
  const std::int32_t* members = nullptr;
  const std::int32_t* counts = nullptr;
};

// lse_r = log Σ_{members j} exp(A_k[j, cl]); -inf for an empty cluster.
struct MemberLseParams {
  ClusterMembers m;
  const float* a_k = nullptr;
  float* lse = nullptr;
};
void member_lse(const MemberLseParams& p, const ExecContext& ctx);

// The adjoint of R = Σ_r α_r R_r, α_r = exp(lse_r - lse), for this rank r: dR_r = α_r dR, and
// dlse_r = α_r (R_r - R)·dR reaches A_k through lse_r: dA_k[j, cl] += exp(A_k[j, cl] - lse_r) dlse_r.
struct MemberLseMergeBackwardParams {
  ClusterMembers m;
  int head_dim = 64;
  std::int64_t summary_rows = 0;
  const float* a_k = nullptr;
  const float* lse = nullptr;             // lse_r
  const float* merged_lse = nullptr;      // lse
  const float* local_value = nullptr;     // R_r
  const float* merged_value = nullptr;    // R
  const float* d_merged_value = nullptr;  // dR
  float* d_local_value = nullptr;         // written for the non-empty clusters
  float* d_a_k = nullptr;                 // added into
};
void member_lse_merge_backward(const MemberLseMergeBackwardParams& p, const ExecContext& ctx);

}  // namespace ringcast::kernels
