// CPU backend of the indexed row movement (row_gather.hpp) and the seed layers' scores
// (seed_scores.hpp), called by seed_rows_dispatch.cpp with validated parameters: the reference the CUDA
// backend is compared with. Host memory; rows are independent, so OpenMP splits them without changing
// any sum.
#pragma once

#include <ringcast/kernels/row_gather.hpp>
#include <ringcast/kernels/seed_scores.hpp>

namespace ringcast::kernels::cpu {

void gather_rows(const RowGather& p);
void scatter_add_rows(const RowScatter& p);
void rowwise_dot(const RowwiseDotParams& p);

void vip_block_logits(const VipLogitsParams& p);
void vip_block_softmax(const VipSoftmaxParams& p);
void vip_block_mean(const VipMeanParams& p);
void vip_pi_dot(const VipPiDotParams& p);
void vip_scores_backward_rows(const VipScoresBackwardRowsParams& p);
void vip_scores_backward_inputs(const VipScoresBackwardInputsParams& p);
void pool_scores(const PoolScoreParams& p);
void pool_scores_backward(const PoolScoreBackwardParams& p);

}  // namespace ringcast::kernels::cpu
