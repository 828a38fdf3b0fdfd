// Backward attention kernel instance: head dim 128, fp16 (one file per instance keeps rebuilds and
// parallel compiles small).
#include "attention_bwd.cuh"

namespace ringcast::kernels::cuda::detail {
template void launch_attention_backward<__half, 128>(const AttentionBackwardParams&, cudaStream_t);
}  // namespace ringcast::kernels::cuda::detail
