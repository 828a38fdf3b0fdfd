// CUDA backend of the attention kernels. Everything is enqueued on the given stream (a cudaStream_t
// passed as ringcast::Stream); nothing allocates.
#pragma once

#include <ringcast/kernels/attention.hpp>

namespace ringcast::kernels::cuda {

std::size_t attention_forward_workspace_bytes(const AttentionShape& shape);
std::size_t attention_backward_workspace_bytes(const AttentionShape& shape);
void attention_forward(const AttentionForwardParams& p, Stream stream);
void attention_backward(const AttentionBackwardParams& p, Stream stream);
void merge_by_lse(const MergeParams& p, Stream stream);

}  // namespace ringcast::kernels::cuda
