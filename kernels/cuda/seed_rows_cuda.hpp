// CUDA backend of the indexed row movement (row_gather.hpp) and the seed layers' scores
// (seed_scores.hpp), called by seed_rows_dispatch.cpp with validated parameters. Pointers are device
// memory of ctx.device (the current device); work is enqueued on ctx.stream and nothing synchronizes
// the host (the scatter's inverse index lives in the stream's grow-only scratch, layers_cuda.cuh).
// Sums are fixed-order (no floating-point atomics): results repeat bitwise on one GPU model.
#pragma once

#include <ringcast/kernels/row_gather.hpp>
#include <ringcast/kernels/seed_scores.hpp>

namespace ringcast::kernels::cuda {

void gather_rows(const RowGather& p, const ExecContext& ctx);
void scatter_add_rows(const RowScatter& p, const ExecContext& ctx);
void rowwise_dot(const RowwiseDotParams& p, const ExecContext& ctx);

void vip_block_logits(const VipLogitsParams& p, const ExecContext& ctx);
void vip_block_softmax(const VipSoftmaxParams& p, const ExecContext& ctx);
void vip_block_mean(const VipMeanParams& p, const ExecContext& ctx);
void vip_pi_dot(const VipPiDotParams& p, const ExecContext& ctx);
void vip_scores_backward_rows(const VipScoresBackwardRowsParams& p, const ExecContext& ctx);
void vip_scores_backward_inputs(const VipScoresBackwardInputsParams& p, const ExecContext& ctx);
void pool_scores(const PoolScoreParams& p, const ExecContext& ctx);
void pool_scores_backward(const PoolScoreBackwardParams& p, const ExecContext& ctx);

}  // namespace ringcast::kernels::cuda
