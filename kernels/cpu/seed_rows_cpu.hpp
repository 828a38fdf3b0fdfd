// CPU backend of the indexed row movement (segment_gather.hpp) and the seed layers' scores
// (seed_scores.hpp), called by seed_rows_dispatch.cpp with validated parameters. Host memory; rows are
// independent, so OpenMP splits them without changing any sum.
#pragma once

#include <ringcast/kernels/segment_gather.hpp>
#include <ringcast/kernels/seed_scores.hpp>

namespace ringcast::kernels::cpu {

void gather_segments(const SegmentGatherParams& p);
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
