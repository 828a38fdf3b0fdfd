// CUDA backend of the surrogate clusters' cluster operations (cluster_ops.hpp), called by
// selection_dispatch.cpp with validated parameters. Pointers are device memory of the current device;
// work is enqueued on ctx.stream and nothing synchronizes the host.
#pragma once

#include <ringcast/kernels/cluster_ops.hpp>

namespace ringcast::kernels::cuda {

void page_key_bounds(const PageBoundsParams& p, const ExecContext& ctx);
void cluster_blocks(const ClusterBlockParams& p, const ExecContext& ctx);
void cluster_blocks_backward(const ClusterBlockBackwardParams& p, const ExecContext& ctx);
void unit_queries(const UnitQueryParams& p, const ExecContext& ctx);
void member_lse(const MemberLseParams& p, const ExecContext& ctx);
void member_lse_merge_backward(const MemberLseMergeBackwardParams& p, const ExecContext& ctx);

}  // namespace ringcast::kernels::cuda
