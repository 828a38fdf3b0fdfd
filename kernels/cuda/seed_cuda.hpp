// CUDA backend of the seed methods' building blocks: CAST clustering (cast.hpp), CoLT5 routing
// (routing.hpp) and Pyramidion pooling (pooling.hpp), called by selection_dispatch.cpp with validated
// parameters. Pointers are device memory of ctx.device (the current device); work is enqueued on
// ctx.stream and nothing synchronizes the host. These interfaces have no workspace argument, so scratch
// is stream-ordered (cudaMallocAsync / cudaFreeAsync on ctx.stream, as the selection code does). The
// soft top-k hands its reduction hook device pointers, in stream order (routing.hpp).
#pragma once

#include <ringcast/kernels/cast.hpp>
#include <ringcast/kernels/pooling.hpp>
#include <ringcast/kernels/routing.hpp>

namespace ringcast::kernels::cuda {

void cast_affinities(const CastAffinityParams& p, const ExecContext& ctx);
void cast_affinities_backward(const CastAffinityBackwardParams& p, const ExecContext& ctx);
void cast_assign(const CastAssignParams& p, const ExecContext& ctx);
void cast_gather(const CastGatherParams& p, const ExecContext& ctx);
void cast_gather_backward(const CastGatherBackwardParams& p, const ExecContext& ctx);
void cast_summaries(const CastSummaryParams& p, const ExecContext& ctx);
void cast_summaries_backward(const CastSummaryBackwardParams& p, const ExecContext& ctx);
void cast_mix(const CastMixParams& p, const ExecContext& ctx);
void cast_mix_backward(const CastMixBackwardParams& p, const ExecContext& ctx);

void router_scores(const RouterScoreParams& p, const ExecContext& ctx);
void router_scores_backward(const RouterScoreBackwardParams& p, const ExecContext& ctx);
void soft_topk(const SoftTopkParams& p, const ExecContext& ctx);
void soft_topk_backward(const SoftTopkBackwardParams& p, const ExecContext& ctx);

void halving_pool(const HalvingParams& p, const ExecContext& ctx);
void halving_pool_backward(const HalvingBackwardParams& p, const ExecContext& ctx);

}  // namespace ringcast::kernels::cuda
