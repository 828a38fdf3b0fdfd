// CPU backend of the selection building blocks: summaries, CAST, routing, pooling and the clustered
// mode's page selection (fp32, OpenMP threads, OpenBLAS for the larger products). Parameters arrive validated (selection_dispatch.cpp).
// Host scratch is allocated here; a device backend will add workspace queries.
#pragma once

#include <ringcast/kernels/cast.hpp>
#include <ringcast/kernels/pooling.hpp>
#include <ringcast/kernels/routing.hpp>
#include <ringcast/kernels/selection.hpp>
#include <ringcast/kernels/summaries.hpp>

namespace ringcast::kernels::cpu {

void page_summaries(const PageSummaryParams& p);
void coarse_summaries(const CoarseSummaryParams& p);
void page_summaries_backward(const PageSummaryBackwardParams& p);
void coarse_summaries_backward(const CoarseSummaryBackwardParams& p);

void cast_affinities(const CastAffinityParams& p);
void cast_affinities_backward(const CastAffinityBackwardParams& p);
void cast_assign(const CastAssignParams& p);
void cast_gather(const CastGatherParams& p);
void cast_gather_backward(const CastGatherBackwardParams& p);
void cast_summaries(const CastSummaryParams& p);
void cast_summaries_backward(const CastSummaryBackwardParams& p);
void cast_mix(const CastMixParams& p);
void cast_mix_backward(const CastMixBackwardParams& p);

void router_scores(const RouterScoreParams& p);
void router_scores_backward(const RouterScoreBackwardParams& p);
void soft_topk(const SoftTopkParams& p);
void soft_topk_backward(const SoftTopkBackwardParams& p);

void halving_pool(const HalvingParams& p);
void halving_pool_backward(const HalvingBackwardParams& p);

RemoteSelection select_remote_blocks(const RemoteSelectionParams& p);
ClusteredSelection select_pages(const SelectionParams& p);

}  // namespace ringcast::kernels::cpu
