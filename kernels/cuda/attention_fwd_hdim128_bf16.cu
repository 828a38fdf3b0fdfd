// Forward attention kernel instance: head dim 128, bf16 (one file per instance keeps rebuilds and
// parallel compiles small).
#include "attention_fwd.cuh"

namespace ringcast::kernels::cuda::detail {
template void launch_attention_forward<__nv_bfloat16, 128>(const AttentionForwardParams&, cudaStream_t);
}  // namespace ringcast::kernels::cuda::detail
