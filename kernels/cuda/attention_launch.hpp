// Launch layer of the CUDA attention backend: one launch function per (dtype, head dim), each
// explicitly instantiated in its own attention_{fwd,bwd}_hdim*_*.cu file (FlashAttention style), and the
// host helpers they share. Included only by CUDA sources of this folder.
#pragma once

#include <ringcast/kernels/attention.hpp>

#include <cuda_runtime_api.h>

#include <cstddef>

#include "attention_device.cuh"

namespace ringcast::kernels::cuda::detail {

AttentionArgs forward_args(const AttentionForwardParams& p);
AttentionArgs backward_args(const AttentionBackwardParams& p);

// Pipeline depth for a kernel whose shared memory is bytes(stages): the largest stages <= max_stages
// that fits the device's per-block opt-in limit, or RINGCAST_CUDA_SMEM_LIMIT (bytes) where that is
// lower (101376 makes an H100 run the pipelines of an RTX 4090); throws when even one stage does not fit.
int pick_stages(const char* kernel, std::size_t (*bytes)(int), int max_stages);

// Raises the kernel's dynamic shared memory limit to `bytes` (needed above 48 KB).
void set_smem_limit(const void* kernel, std::size_t bytes);

template <typename T, int kHeadDim>
void launch_attention_forward(const AttentionForwardParams& p, cudaStream_t stream);
template <typename T, int kHeadDim>
void launch_attention_backward(const AttentionBackwardParams& p, cudaStream_t stream);

}  // namespace ringcast::kernels::cuda::detail
