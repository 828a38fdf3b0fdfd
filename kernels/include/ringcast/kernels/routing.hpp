// CoLT5 routing (ALGORITHMS.md §3): router scores s = X·u and the iterative soft top-k
//   a = 0, b = -s; repeat T: a = ε(log k - LSE_j((s_j + b_j)/ε)); b_j = -relu(s_j + a);
//   s̃_j = exp((s_j + a + b_j)/ε)  (each in [0, 1], Σ s̃ ≈ k),
// with its exact backward through the T unrolled iterations. X [B, n, D], u [D], s and s̃ [B, n],
// fp32. The forward records a_t of every iteration ([B, T]); the backward rebuilds b from them.
//
// Split sequences: LSE_j runs over the whole sequence. When the n tokens of a call are one rank's
// slice of each sequence, `reduce` must combine values across the ranks holding the slices (an
// allreduce). Since s_j + b_j = min(s_j, -a_{t-1}), the LSE's maximum is min(max_j s_j, -a_{t-1})/ε
// (0 in the first iteration), so the forward needs one max over the sequence and then one sum per
// iteration, and the backward one sum per iteration: B floats each. Backward passes add into outputs.
#pragma once

#include <ringcast/kernels/attention.hpp>

#include <cstdint>

namespace ringcast::kernels {

struct RouterScoreParams {
  int batch = 1;
  std::int64_t seq = 0;
  int dim = 0;               // D
  const float* x = nullptr;  // [B, n, D]
  const float* u = nullptr;  // [D]
  float* s = nullptr;        // [B, n]
};

struct RouterScoreBackwardParams {
  int batch = 1;
  std::int64_t seq = 0;
  int dim = 0;
  const float* x = nullptr;
  const float* u = nullptr;
  const float* d_s = nullptr;
  float* d_x = nullptr;  // added into
  float* d_u = nullptr;
};

enum class ReduceOp { kSum, kMax };

// Replaces values[0, count) in place by their reduction over the ranks that hold slices of the same
// sequences, e.g. an MPI/NCCL allreduce over those ranks. fn == nullptr: each slice is a whole sequence.
// values lives where the backend computes. CPU backend: host memory, reduced before fn returns. CUDA
// backend: device memory; fn is called from the host while the kernels producing the values are
// enqueued on ExecContext::stream but not yet run, and must enqueue its reduction on that stream (an
// ncclAllReduce on it), so the T iterations run without a host synchronization.
struct SliceAllReduce {
  void (*fn)(float* values, int count, ReduceOp op, void* user) = nullptr;
  void* user = nullptr;
};

struct SoftTopkParams {
  int batch = 1;
  std::int64_t seq = 0;  // tokens of this call per sequence (the slice, when split)
  int k = 1;             // tokens to route per whole sequence
  float epsilon = 1.0f;
  int iterations = 50;   // T
  const float* s = nullptr;          // [B, n]
  float* s_tilde = nullptr;          // [B, n]
  float* a_history = nullptr;        // [B, T], kept for the backward
  std::int32_t* top_indices = nullptr;  // [B, k] the hard top-k, increasing token index; optional,
                                        // and only for unsplit sequences (a slice has no global view)
  SliceAllReduce reduce;
};

struct SoftTopkBackwardParams {
  int batch = 1;
  std::int64_t seq = 0;
  int k = 1;
  float epsilon = 1.0f;
  int iterations = 50;
  const float* s = nullptr;
  const float* a_history = nullptr;  // from the forward
  const float* d_s_tilde = nullptr;
  float* d_s = nullptr;  // added into
  SliceAllReduce reduce;
};

void router_scores(const RouterScoreParams& p, const ExecContext& ctx);
void router_scores_backward(const RouterScoreBackwardParams& p, const ExecContext& ctx);
void soft_topk(const SoftTopkParams& p, const ExecContext& ctx);
void soft_topk_backward(const SoftTopkBackwardParams& p, const ExecContext& ctx);

}  // namespace ringcast::kernels
