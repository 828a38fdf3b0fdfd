// GatheredAttention: bidirectional attention of each rank's own query subset over the union of every
// rank's key subset, where the subsets have any size per rank (CoLT5's routed queries and keys; VCC's
// compressed sequence). Keys travel by one all-gather with per-rank counts; each rank attends its own
// queries with the block-sparse kernel (one softmax over all gathered keys of the query's sequence,
// in rank order, plus an optional per-key logit bias such as VCC's +log(block size)); the backward
// returns every key's gradient to its owner, summed over all ranks' queries (the transpose of the
// all-gather). One call carries the `sequences` of a batch, so a layer costs one gather and one
// return whatever the batch. Softmax scale 1/sqrt(head_dim); query head h uses KV head
// h / (heads / kv_heads).
// Layouts (fp32, in the session device's memory: host on the CPU, device memory on CUDA, every call
// enqueued on the session's stream), rows sequence after sequence: q, o [n_q, h, d]; k, v [n_k, h_kv, d];
// key_bias [n_k] (shared by the heads); lse [h, n_q]. Queries whose sequence has no key on any rank get
// O = 0 and LSE = -inf. On CUDA the kernel reads q, k, v and d_o rounded to bf16 (its storage dtype)
// and head_dim must be 64 or 128 (64 for calls with a key bias, whose feature pads the head to 128).
// Memory comes from the caller, so a stack can share it between layers: `kept` (kept_bytes()) carries
// the gathered keys from forward() to the backward() of the same call -- one region per call in
// flight between the passes; `workspace` (workspace_bytes()) holds one call's temporaries.
// Collective: every rank calls forward / backward alike, also with no queries or keys; argument
// errors on any rank throw the same Error on every rank before data moves.
#pragma once

#include <ringcast/session.hpp>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <span>

namespace ringcast::model {

struct GatheredAttentionShape {
  int heads = 0, kv_heads = 0, head_dim = 0;
  int sequences = 1;                // sequences per call (the same on every rank)
  std::int64_t max_queries = 0;     // most queries, summed over the sequences, this rank passes in a call
  std::int64_t max_keys = 0;        // most keys, summed over the sequences, this rank passes in a call
  std::int64_t max_total_keys = 0;  // most keys of a call summed over ranks and sequences (same everywhere)
  bool key_bias = true;             // whether calls may pass a key bias (false: no memory for its padded feature)
};

struct GatheredForwardArgs {
  std::int64_t n_q = 0, n_k = 0;  // this rank's queries and keys, over all sequences of the call
  // [sequences]: how n_q and n_k divide among the sequences, in order; may stay empty for one sequence.
  std::span<const std::int64_t> q_counts, k_counts;
  const float* q = nullptr;
  const float* k = nullptr;
  const float* v = nullptr;
  // Optional. The call has a bias when any rank passes one; then every rank with keys must.
  const float* key_bias = nullptr;
  float* o = nullptr;
  float* lse = nullptr;
  void* kept = nullptr;       // kept_bytes(), 64-byte aligned; read by the backward of this call
  void* workspace = nullptr;  // workspace_bytes(), 64-byte aligned
};

struct GatheredBackwardArgs {
  // The forward call's arguments, as they were: its inputs, O, LSE and `kept` are read, untouched since;
  // its `workspace` holds this call's temporaries.
  GatheredForwardArgs fwd;
  const float* d_o = nullptr;
  float* d_q = nullptr;         // added into
  float* d_k = nullptr;         // added into: this rank's keys, summed over every rank's queries
  float* d_v = nullptr;         // added into
  float* d_key_bias = nullptr;  // added into; optional, only in a call with a bias
};

class GatheredAttention {
 public:
  // Collective (agrees on heads, kv_heads, head_dim, sequences, max_total_keys and the backend across
  // ranks). The session must outlive the object.
  GatheredAttention(const Session& session, const GatheredAttentionShape& shape);
  ~GatheredAttention();
  GatheredAttention(const GatheredAttention&) = delete;
  GatheredAttention& operator=(const GatheredAttention&) = delete;

  // Multiples of 64, so that regions laid end to end stay aligned.
  std::size_t kept_bytes() const;
  std::size_t workspace_bytes() const;

  void forward(const GatheredForwardArgs& args);
  // Reads the keys gathered by the forward that wrote args.kept.
  void backward(const GatheredBackwardArgs& args);

 private:
  struct State;
  std::unique_ptr<State> state_;
};

}  // namespace ringcast::model
