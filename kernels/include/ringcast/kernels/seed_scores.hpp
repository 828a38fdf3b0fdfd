// Scores of the seed layers that pick tokens: VCC's VIP-over-blocks selection scores (ALGORITHMS.md §1)
// and the Pyramidion scorer (§2), forward and backward. fp32 tensors (float64 where noted); pointers
// are host memory on the CPU backend and device memory of ctx.device on CUDA (enqueued on ctx.stream,
// no host synchronization). The VCC softmax runs over every rank's blocks, so its steps are split
// where the caller all-reduces: logits -> (max) -> softmax -> (sum) -> mean; backward pi_dot -> (sum)
// -> rows -> (sum) -> inputs. Backward outputs named "added into" are accumulated.
#pragma once

#include <ringcast/kernels/attention.hpp>

#include <cstdint>

namespace ringcast::kernels {

// VIP queries q [vip, heads, head_dim] against this rank's block keys k [blocks, kv_heads, head_dim]
// (query head h reads KV head h / (heads / kv_heads)); hv = h · vip + v indexes the [heads · vip] rows.
struct VipScoreShape {
  int heads = 1, kv_heads = 1, head_dim = 1;
  std::int64_t vip = 0;
  std::int64_t blocks = 0;  // this rank's
  float scale = 1.0f;       // logit scale, 1 / sqrt(head_dim)
};

// probs[hv, j] = scale · q_vh · k_j; row_max[hv] = max_j (-inf without blocks). Written.
struct VipLogitsParams {
  VipScoreShape shape;
  const float* q = nullptr;
  const float* k = nullptr;
  float* probs = nullptr;    // [heads · vip, blocks]
  float* row_max = nullptr;  // [heads · vip]
};

// probs = exp(probs - row_max) in place (row_max: the max over every rank); row_sum[hv] written.
struct VipSoftmaxParams {
  VipScoreShape shape;
  const float* row_max = nullptr;
  float* probs = nullptr;
  float* row_sum = nullptr;
};

// probs /= row_sum (the sum over every rank) in place; p[j] = mean_hv probs[hv, j];
// log_p[block_ids[j]] = log(p[j] + floor) (other entries untouched).
struct VipMeanParams {
  VipScoreShape shape;
  const float* row_sum = nullptr;
  const std::int64_t* block_ids = nullptr;  // [blocks], global block ids
  float floor = 1e-5f;
  float* probs = nullptr;
  float* p = nullptr;      // [blocks]
  float* log_p = nullptr;  // [all blocks]
};

// *pi_dot = Σ_j pi[j] · d_pi[j] over this rank's blocks, in float64 (written).
struct VipPiDotParams {
  std::int64_t blocks = 0;
  const float* pi = nullptr;
  const float* d_pi = nullptr;
  double* pi_dot = nullptr;
};

// With π = softmax(l), l = log(p + floor) and pi_dot = Σ π dπ over every rank:
// d_p[j] = π_j (dπ_j − pi_dot) / (p_j + floor), in place over d_pi; then
// row_dot[hv] = Σ_j probs[hv, j] d_p[j] (written).
struct VipScoresBackwardRowsParams {
  VipScoreShape shape;
  const float* pi = nullptr;      // [blocks]
  const float* p = nullptr;       // [blocks]
  const double* pi_dot = nullptr;
  float floor = 1e-5f;
  const float* probs = nullptr;   // normalized
  float* d_pi = nullptr;          // [blocks], becomes d_p
  float* row_dot = nullptr;       // [heads · vip]
};

// g[hv, j] = scale / (heads · vip) · probs[hv, j] (d_p[j] − row_dot[hv]) (row_dot over every rank):
// d_q[v, h] += Σ_j g k_j, d_k[j, h / group] += Σ_hv g q_vh.
struct VipScoresBackwardInputsParams {
  VipScoreShape shape;
  const float* q = nullptr;
  const float* k = nullptr;
  const float* probs = nullptr;
  const float* d_p = nullptr;
  const float* row_dot = nullptr;
  float* d_q = nullptr;  // added into
  float* d_k = nullptr;  // added into
};

void vip_block_logits(const VipLogitsParams& p, const ExecContext& ctx);
void vip_block_softmax(const VipSoftmaxParams& p, const ExecContext& ctx);
void vip_block_mean(const VipMeanParams& p, const ExecContext& ctx);
void vip_pi_dot(const VipPiDotParams& p, const ExecContext& ctx);
void vip_scores_backward_rows(const VipScoresBackwardRowsParams& p, const ExecContext& ctx);
void vip_scores_backward_inputs(const VipScoresBackwardInputsParams& p, const ExecContext& ctx);

// Pyramidion scorer, per row: logits[i] = w · x_i (a float64 dot in column order, so a row's score
// depends on that row alone, whatever the rows around it), scores[i] = sigmoid(logits[i] + *bias) + floor.
struct PoolScoreParams {
  std::int64_t rows = 0;
  int dim = 0;
  float floor = 1e-5f;
  const float* x = nullptr;     // [rows, dim]
  const float* w = nullptr;     // [dim]
  const float* bias = nullptr;  // [1]
  float* logits = nullptr;      // [rows]
  float* scores = nullptr;      // [rows]
};

// d_scores[i] *= σ'(logits[i] + *bias) in place (it becomes dL/dlogits); *d_bias += their float64 sum
// in row order.
struct PoolScoreBackwardParams {
  std::int64_t rows = 0;
  const float* logits = nullptr;
  const float* bias = nullptr;
  float* d_scores = nullptr;
  float* d_bias = nullptr;  // [1], added into
};

void pool_scores(const PoolScoreParams& p, const ExecContext& ctx);
void pool_scores_backward(const PoolScoreBackwardParams& p, const ExecContext& ctx);

}  // namespace ringcast::kernels
