// CPU backend of the attention kernels (fp32, OpenMP threads, OpenBLAS for the tile products).
#pragma once

#include <ringcast/kernels/attention.hpp>

namespace ringcast::kernels::cpu {

std::size_t attention_forward_workspace_bytes(const AttentionShape& shape);
std::size_t attention_backward_workspace_bytes(const AttentionShape& shape);
void attention_forward(const AttentionForwardParams& p);
void attention_backward(const AttentionBackwardParams& p);
void merge_by_lse(const MergeParams& p);

}  // namespace ringcast::kernels::cpu
