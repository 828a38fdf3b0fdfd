// CPU backend of the surrogate clusters' cluster operations (cluster_ops.hpp): the reference
// the CUDA backend is compared with. Parameters arrive validated (selection_dispatch.cpp).
#pragma once

#include <ringcast/kernels/cluster_ops.hpp>

namespace ringcast::kernels::cpu {

void page_key_bounds(const PageBoundsParams& p);
void cluster_blocks(const ClusterBlockParams& p);
void cluster_blocks_backward(const ClusterBlockBackwardParams& p);
void unit_queries(const UnitQueryParams& p);
void member_lse(const MemberLseParams& p);
void member_lse_merge_backward(const MemberLseMergeBackwardParams& p);

}  // namespace ringcast::kernels::cpu
