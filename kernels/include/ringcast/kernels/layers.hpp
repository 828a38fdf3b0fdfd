// Per-token layers of the model stack (DESIGN.md §5) and the optimizer update, forward and backward.
//
// Every tensor is fp32 row-major; a token matrix is [rows, dim] with rows = batch * n_loc tokens of
// this rank. Weights use the PyTorch Linear layout W [out, in]. Every backward output (activation or
// parameter gradient) is added into: the caller zeroes the buffers it starts fresh. Reductions that
// the caller needs (losses, norms, flags) are written through pointers into memory of the context's
// device, so a device backend can stay asynchronous. Pointers are host memory on the CPU backend and
// memory of ctx.device on the CUDA backend. CPU results do not depend on the number of OpenMP threads
// except through the matrix products (fp32 rounding of BLAS blocking).
//
// CUDA backend: work is enqueued on ctx.stream (any stream but cudaStreamPerThread) and never
// synchronizes the host; ctx.device must be the current device. Matrix products run on cuBLAS with
// one handle per (device, stream), created on first use and kept for the process, beside a grow-only
// device scratch (bf16 operand copies, the cross-entropy's chunk of logits, partial sums) that is
// reallocated, stream-ordered, only when a call needs more than every call before it on that stream:
// a training loop allocates in its first step only. Calls on one stream from several host threads
// take turns. Every sum runs over fixed blocks in a fixed order (no floating-point atomics), so
// results repeat bitwise on one GPU model. Ids and targets are device memory, so a bad one cannot
// raise an Error without synchronizing: an embedding id outside [0, vocab) gives a NaN row (and no
// gradient), a target >= vocab a NaN loss and NaN gradients, which the non-finite checks
// (find_non_finite, the loss check) then report.
//
// Precision of the matrix products (Linear, linear_cross_entropy): `dtype` and `allow_tf32` below.
// Tensors in memory are fp32 whatever they say, so master weights and optimizer state stay fp32;
// products accumulate in fp32.
//   dtype = kF32 (default): exact fp32 products (SGEMM): CPU and CUDA agree to fp32 rounding.
//   dtype = kBF16, CUDA only: the operands are rounded to bf16 (to nearest even) and multiplied on
//     tensor cores, as in a bf16 training step; the CPU backend refuses it ("not supported").
//   allow_tf32: kF32 products may run on TF32 tensor cores (10-bit mantissa) on CUDA. A permission,
//     not a request: the CPU backend, which has none, computes in fp32; ignored with kBF16.
#pragma once

#include <ringcast/dtype.hpp>
#include <ringcast/kernels/attention.hpp>

#include <cstdint>

namespace ringcast::kernels {

// --- Linear: y = x Wᵀ (or y += x Wᵀ); backward d_x += d_y W, d_w += d_yᵀ x. ---
struct LinearParams {
  std::int64_t rows = 0;
  int in_dim = 0;
  int out_dim = 0;
  const float* x = nullptr;  // [rows, in_dim]
  const float* w = nullptr;  // [out_dim, in_dim]
  float* y = nullptr;        // [rows, out_dim]
  bool accumulate = false;   // y += x Wᵀ (e.g. straight into the residual stream)
  DType dtype = DType::kF32;  // product precision (top of file): kF32, or kBF16 on CUDA
  bool allow_tf32 = false;
};

struct LinearBackwardParams {
  std::int64_t rows = 0;
  int in_dim = 0;
  int out_dim = 0;
  const float* x = nullptr;    // [rows, in_dim], the forward input
  const float* w = nullptr;    // [out_dim, in_dim]
  const float* d_y = nullptr;  // [rows, out_dim]
  float* d_x = nullptr;        // [rows, in_dim], added into
  float* d_w = nullptr;        // [out_dim, in_dim], added into
  DType dtype = DType::kF32;   // product precision (top of file): kF32, or kBF16 on CUDA
  bool allow_tf32 = false;
};

void linear_forward(const LinearParams& p, const ExecContext& ctx);
void linear_backward(const LinearBackwardParams& p, const ExecContext& ctx);

// --- RMSNorm: y = x / sqrt(mean(x²) + eps) ⊙ g, per row. The backward recomputes the row
// statistics from x (nothing is saved): d_x += r (u - x r² mean(u ⊙ x)), u = d_y ⊙ g, r = the
// inverse RMS; d_g += Σ_rows d_y ⊙ x r. ---
struct RmsNormParams {
  std::int64_t rows = 0;
  int dim = 0;
  float eps = 1e-6f;
  const float* x = nullptr;  // [rows, dim]
  const float* g = nullptr;  // [dim]
  float* y = nullptr;        // [rows, dim]
};

struct RmsNormBackwardParams {
  std::int64_t rows = 0;
  int dim = 0;
  float eps = 1e-6f;
  const float* x = nullptr;
  const float* g = nullptr;
  const float* d_y = nullptr;
  float* d_x = nullptr;  // [rows, dim], added into
  float* d_g = nullptr;  // [dim], added into
};

void rms_norm_forward(const RmsNormParams& p, const ExecContext& ctx);
void rms_norm_backward(const RmsNormBackwardParams& p, const ExecContext& ctx);

// --- RoPE, rotate-half (GPT-NeoX) convention, in place on x [rows, heads, head_dim]: for
// i < head_dim / 2, with angle = positions[row] · theta^(-2i / head_dim),
//   (x_i, x_{i+half}) <- (x_i cos - x_{i+half} sin, x_{i+half} cos + x_i sin).
// positions are global (the sequence is sharded across ranks). Angles are formed in float64, since
// positions reach millions. The backward is the transposed rotation (angle -> -angle) applied in
// place to the gradient. Call once for Q (heads) and once for K (kv_heads). ---
struct RopeParams {
  std::int64_t rows = 0;
  int heads = 1;
  int head_dim = 0;  // even; at most 512 on CUDA
  float theta = 10000.0f;
  const std::int32_t* positions = nullptr;  // [rows]
  float* x = nullptr;                       // [rows, heads, head_dim]: Q or K forward, dQ or dK backward
};

void rope_forward(const RopeParams& p, const ExecContext& ctx);
void rope_backward(const RopeParams& p, const ExecContext& ctx);

// --- SwiGLU, elementwise part: h = silu(a) ⊙ b with a = x W1ᵀ, b = x W3ᵀ, and the FFN output
// y = h W2ᵀ; the three products are linear_forward / linear_backward calls of the model. ---
struct SwigluParams {
  std::int64_t count = 0;    // elements of a, b and h (rows * ffn_dim)
  const float* a = nullptr;  // gate pre-activation
  const float* b = nullptr;  // up projection
  float* h = nullptr;
};

struct SwigluBackwardParams {
  std::int64_t count = 0;
  const float* a = nullptr;
  const float* b = nullptr;
  const float* d_h = nullptr;
  float* d_a = nullptr;  // added into
  float* d_b = nullptr;  // added into
};

void swiglu_forward(const SwigluParams& p, const ExecContext& ctx);
void swiglu_backward(const SwigluBackwardParams& p, const ExecContext& ctx);

// --- Token embedding: y[t] = table[ids[t]]. The backward adds d_y[t] into table row ids[t]; tokens
// are bucketed by id and each row summed by one thread in token order, so it is deterministic (on
// CUDA too: a stable sort by id). Ids outside [0, vocab) are an error (on CUDA: see the top). ---
struct EmbeddingParams {
  std::int64_t rows = 0;
  int dim = 0;
  std::int64_t vocab = 0;
  const std::int32_t* ids = nullptr;  // [rows]
  const float* table = nullptr;       // [vocab, dim]
  float* y = nullptr;                 // [rows, dim]
};

struct EmbeddingBackwardParams {
  std::int64_t rows = 0;
  int dim = 0;
  std::int64_t vocab = 0;
  const std::int32_t* ids = nullptr;
  const float* d_y = nullptr;  // [rows, dim]
  float* d_table = nullptr;    // [vocab, dim], added into
};

void embedding_forward(const EmbeddingParams& p, const ExecContext& ctx);
void embedding_backward(const EmbeddingBackwardParams& p, const ExecContext& ctx);

// --- Mean pooling over a sequence sharded across ranks: pooled[b] = scale · Σ_t x[b, t] over this
// rank's tokens, with scale = 1 / (tokens of the whole sequence); the sum of the ranks' results (an
// all-reduce) is the mean over the whole sequence. Backward: d_x[b, t] += scale · d_pooled[b], with
// d_pooled the gradient of the global mean (identical on every rank). ---
struct TokenPoolParams {
  int batch = 1;
  std::int64_t seq = 0;  // this rank's tokens per sequence
  int dim = 0;
  float scale = 1.0f;
  const float* x = nullptr;  // [batch, seq, dim]
  float* pooled = nullptr;   // [batch, dim], written
};

struct TokenPoolBackwardParams {
  int batch = 1;
  std::int64_t seq = 0;
  int dim = 0;
  float scale = 1.0f;
  const float* d_pooled = nullptr;  // [batch, dim]
  float* d_x = nullptr;             // [batch, seq, dim], added into
};

void token_pool_forward(const TokenPoolParams& p, const ExecContext& ctx);
void token_pool_backward(const TokenPoolBackwardParams& p, const ExecContext& ctx);

// --- Linear head with cross-entropy, forward and backward in one pass: logits = h Wᵀ (+ bias),
// loss_r = LSE(logits_r) - logits_r[target_r] (max-subtracted LSE) for rows whose target is >= 0;
// rows with target < 0 are ignored (no loss, no gradient). Rows are processed chunk_rows at a time,
// so only a [chunk_rows, vocab] block of logits exists at once. With d_h and d_w given, the gradient
// of loss_scale · Σ_r loss_r is added into d_h, d_w (and d_bias): pass loss_scale = 1 / (targets
// counted over all ranks) for the global mean; that count is known before the pass (targets >= 0,
// all-reduced). Chunking changes results only by fp32 rounding; the loss sums rows in row order.
//
// LM head: h = the final normed hidden states [T, D], w = the output embedding [vocab, D], no bias.
// Encoder classification head: h = the globally pooled vector [B, D] (token_pool_forward plus an
// all-reduce), w = W_c [classes, D], bias b [classes], targets = labels. That head runs replicated:
// every rank computes the same loss and the same d_w, d_bias, so the caller must count them once in
// the gradient all-reduce (e.g. add them on one rank only); d_h (= d_pooled) feeds
// token_pool_backward on every rank. ---
struct CrossEntropyTotals {
  double loss_sum = 0.0;     // Σ loss_r over counted rows (not scaled)
  std::int64_t count = 0;    // rows with target >= 0
  std::int64_t correct = 0;  // counted rows whose argmax logit (lowest index on ties) is the target
};

struct LinearCrossEntropyParams {
  std::int64_t rows = 0;
  int dim = 0;
  std::int64_t vocab = 0;
  std::int64_t chunk_rows = 1024;
  float loss_scale = 1.0f;
  const float* h = nullptr;               // [rows, dim]
  const float* w = nullptr;               // [vocab, dim]
  const float* bias = nullptr;            // [vocab], or null
  const std::int32_t* targets = nullptr;  // [rows], < 0 ignored, < vocab
  CrossEntropyTotals* totals = nullptr;   // written
  float* d_h = nullptr;                   // [rows, dim], added into; null (with d_w) for evaluation
  float* d_w = nullptr;                   // [vocab, dim], added into
  float* d_bias = nullptr;                // [vocab], added into; required with bias when training
  DType dtype = DType::kF32;              // product precision (top of file): kF32, or kBF16 on CUDA
  bool allow_tf32 = false;
};

void linear_cross_entropy(const LinearCrossEntropyParams& p, const ExecContext& ctx);

// --- AdamW (Loshchilov & Hutter; PyTorch's update order) on a flat buffer, step >= 1:
//   param *= 1 - lr·weight_decay;  m = β1 m + (1-β1) g;  v = β2 v + (1-β2) g²;
//   param -= lr / (1-β1^step) · m / (sqrt(v) / sqrt(1-β2^step) + eps).
// Parameters without decay (norm gains, biases) are a separate call with weight_decay = 0. ---
struct AdamWParams {
  std::int64_t count = 0;
  std::int64_t step = 1;
  float lr = 0.0f;
  float beta1 = 0.9f;
  float beta2 = 0.999f;
  float eps = 1e-8f;
  float weight_decay = 0.0f;
  float* param = nullptr;
  const float* grad = nullptr;
  float* m = nullptr;
  float* v = nullptr;
};

void adamw_step(const AdamWParams& p, const ExecContext& ctx);

// --- Gradient clipping and checks on flat buffers. Clipping by global norm is: sum_of_squares of
// every rank's gradient, all-reduced, then scale_in_place by max_norm / norm when norm > max_norm.
// The sum accumulates in float64 over fixed blocks, independent of the thread count. ---
void sum_of_squares(std::int64_t count, const float* x, double* result, const ExecContext& ctx);
void scale_in_place(std::int64_t count, float scale, float* x, const ExecContext& ctx);
// *found = 1 when any of x[0, count) is NaN or ±Inf, else 0.
void find_non_finite(std::int64_t count, const float* x, std::int32_t* found, const ExecContext& ctx);

}  // namespace ringcast::kernels
