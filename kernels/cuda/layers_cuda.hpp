// CUDA backend of the per-token layers and the optimizer (layers.hpp), called by layers_dispatch.cpp
// with validated parameters. Pointers are device memory of ctx.device (the current device); work is
// enqueued on ctx.stream and nothing synchronizes the host. The context, not only its stream, is
// passed because cuBLAS handles and scratch are kept per (device, stream) (layers_cuda.cuh).
#pragma once

#include <ringcast/kernels/layers.hpp>

#include <cstdint>

namespace ringcast::kernels::cuda {

void linear_forward(const LinearParams& p, const ExecContext& ctx);
void linear_backward(const LinearBackwardParams& p, const ExecContext& ctx);
void rms_norm_forward(const RmsNormParams& p, const ExecContext& ctx);
void rms_norm_backward(const RmsNormBackwardParams& p, const ExecContext& ctx);
void rope_forward(const RopeParams& p, const ExecContext& ctx);
void rope_backward(const RopeParams& p, const ExecContext& ctx);
void swiglu_forward(const SwigluParams& p, const ExecContext& ctx);
void swiglu_backward(const SwigluBackwardParams& p, const ExecContext& ctx);
void embedding_forward(const EmbeddingParams& p, const ExecContext& ctx);
void token_pool_forward(const TokenPoolParams& p, const ExecContext& ctx);
void token_pool_backward(const TokenPoolBackwardParams& p, const ExecContext& ctx);
void linear_cross_entropy(const LinearCrossEntropyParams& p, const ExecContext& ctx);
void adamw_step(const AdamWParams& p, const ExecContext& ctx);
void sum_of_squares(std::int64_t count, const float* x, double* result, const ExecContext& ctx);
void scale_in_place(std::int64_t count, float scale, float* x, const ExecContext& ctx);
void find_non_finite(std::int64_t count, const float* x, std::int32_t* found, const ExecContext& ctx);

}  // namespace ringcast::kernels::cuda
