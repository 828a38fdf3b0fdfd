// CPU backend of the per-token layers and the optimizer (layers.hpp): fp32, OpenMP threads. Matrix
// products go through `parallel_gemm`, which splits C into blocks across OpenMP threads with single-threaded
// OpenBLAS in each (the policy of the attention kernels, tile_math.hpp). Parameters arrive validated
// (layers_dispatch.cpp); host scratch is allocated here.
#pragma once

#include <ringcast/kernels/layers.hpp>

#include <cstdint>

namespace ringcast::kernels::cpu {

// C = op(A) op(B) + beta C, row-major, op(X) = Xᵀ when trans_x; C is [m, n], the inner size k.
void parallel_gemm(bool trans_a, bool trans_b, std::int64_t m, std::int64_t n, std::int64_t k, const float* a,
                   std::int64_t lda, const float* b, std::int64_t ldb, float beta, float* c, std::int64_t ldc);

void linear_forward(const LinearParams& p);
void linear_backward(const LinearBackwardParams& p);
void rms_norm_forward(const RmsNormParams& p);
void rms_norm_backward(const RmsNormBackwardParams& p);
void rope_forward(const RopeParams& p);
void rope_backward(const RopeParams& p);
void swiglu_forward(const SwigluParams& p);
void swiglu_backward(const SwigluBackwardParams& p);
void embedding_forward(const EmbeddingParams& p);
// Throws unless every id of ids[0, rows) lies in [0, vocab), naming `op` and the first bad token.
void check_embedding_ids(const std::int32_t* ids, std::int64_t rows, std::int64_t vocab, const char* op);
void token_pool_forward(const TokenPoolParams& p);
void token_pool_backward(const TokenPoolBackwardParams& p);
void linear_cross_entropy(const LinearCrossEntropyParams& p);
void adamw_step(const AdamWParams& p);
double sum_of_squares(std::int64_t count, const float* x);
void scale_in_place(std::int64_t count, float scale, float* x);
bool has_non_finite(std::int64_t count, const float* x);

}  // namespace ringcast::kernels::cpu
