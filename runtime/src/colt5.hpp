// CoLT5 conditional computation (ALGORITHMS.md §3) as the two mixers of an encoder block:
//   Colt5Ffn:       y += FFN_light(x) + s̃_i · FFN_heavy(x_i) on the top-m routed tokens;
//   Colt5Attention: y += Wo [A_light | s̃^q_i · A_heavy(x_i, s̃^kv X)], one Wq/Wk/Wv/Wo over all heads:
//                   light heads attend |i - j| <= window_radius, heavy heads let the top-q routed
//                   queries attend over the top-v routed keys, whose V is scaled by s̃^kv.
// Routing is global: scores s = x·u, the soft top-k s̃ over each whole sequence (one all-reduce per
// iteration) and the hard top-k with ties toward the lower position, identical on every rank; each
// rank holds its own routed rows, so per-rank counts vary. Bidirectional stacks with the contiguous
// placement only (rank r holds positions [r n_loc, (r + 1) n_loc)). Scratch keys start with "colt5.";
// what forward() leaves there and in the mixers' members is what backward() reads. Both backends run
// the same code: activations in the session device's memory, attention in its storage dtype
// (attention_dtype: f32 on the CPU, bf16 on CUDA, head_dim 64 or 128 there).
#pragma once

#include "attention_internal.hpp"
#include "gathered_attention.hpp"
#include "model_mixers.hpp"
#include "model_parts.hpp"

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

namespace ringcast::model {

// The configuration resolved against a geometry: defaults filled in, routed tokens per sequence
// round(fraction · seq_len) (at least 1).
struct Colt5Plan {
  int light_heads = 0;            // query heads [0, light_heads) are light, the rest heavy
  std::int64_t ffn_tokens = 0;    // m
  std::int64_t query_tokens = 0;  // q
  std::int64_t kv_tokens = 0;     // v
  int light_ffn_hidden = 0;
  int heavy_ffn_hidden = 0;
};

// Validates c.colt5 (and the heads it splits) against g; throws Error naming the field. Depends on
// nothing rank-specific but `rank` for the placement check, so every rank throws alike.
Colt5Plan plan_colt5(const ModelConfig& c, const Geometry& g, int ranks, int rank);

// One router: u [D] (parameter `name`, not decayed), its scores over the rows of a geometry, their
// soft top-k weights over each whole sequence, and the hard top-k rows this rank holds.
class Router {
 public:
  Router(const Session& session, ParameterTable& table, Scratch& scratch, const std::string& name,
         const std::string& scratch_key, const ModelConfig& c, const Geometry& g, std::int64_t k);
  // Collective. Scores and routes x [rows, D].
  void forward(const RunContext& rc, const float* x);
  // dx += (∂s̃/∂x)ᵀ d_s̃ and d_u likewise, where d_s̃ is d_routed [count()] on the routed rows (in
  // rows() order) and zero elsewhere.
  void backward(const RunContext& rc, const float* x, const float* d_routed, float* dx);

  // Routed rows (indices into [rows], increasing); those of batch element b are
  // rows()[offsets()[b], offsets()[b + 1]). Host memory; device_rows() is the same list where the
  // kernels read it, and routed_weights() their s̃ [count()] (the session device's memory).
  std::int64_t count() const { return static_cast<std::int64_t>(rows_.size()); }
  std::span<const std::int64_t> rows() const { return rows_; }
  std::span<const std::int64_t> offsets() const { return offsets_; }
  const std::int64_t* device_rows(const RunContext& rc) const;
  const float* routed_weights(const RunContext& rc) const;
  // The most routed rows one sequence can have on a rank.
  std::int64_t max_local() const;

 private:
  void select_hard(const RunContext& rc, const float* s);
  // SoftTopkParams or SoftTopkBackwardParams with the settings both passes share; buffers left null.
  template <class Params>
  Params soft_topk_settings() const;

  const Session& session_;
  const Geometry& geom_;
  int dim_;
  std::int64_t k_;
  float epsilon_;
  int iterations_;
  std::string key_;
  ParamRef u_;
  std::vector<std::int64_t> rows_, offsets_;
};

// Parameters: prefix + router_ffn, ffn_light.{w1,w3,w2}, ffn_heavy.{w1,w3,w2}.
class Colt5Ffn final : public Mixer {
 public:
  Colt5Ffn(const Session& session, ParameterTable& table, Scratch& scratch, const std::string& prefix,
           const ModelConfig& c, const Geometry& g);
  void forward(const RunContext& rc, const float* x, float* y) override;
  void backward(const RunContext& rc, const float* x, const float* dy, float* dx) override;

 private:
  const Geometry& geom_;
  const Colt5Plan plan_;
  int dim_;
  Router router_;
  SwiGluFfn light_, heavy_;
};

// Parameters: prefix + wq, wk, wv, wo (AttentionProjections), router_q, router_kv.
class Colt5Attention final : public Mixer {
 public:
  Colt5Attention(const Session& session, ParameterTable& table, Scratch& scratch, const std::string& prefix,
                 const ModelConfig& c, const Geometry& g);
  void forward(const RunContext& rc, const float* x, float* y) override;
  void backward(const RunContext& rc, const float* x, const float* dy, float* dx) override;

 private:
  // Another rank's share of the light window: my rows it needs, and its rows my window holds.
  struct HaloPeer {
    int rank = 0;
    std::int64_t send_first = 0, send_count = 0;  // local rows
    std::int64_t recv_slot = 0, recv_count = 0;   // window slots
  };

  void light_forward(const RunContext& rc);
  void light_backward(const RunContext& rc);
  void heavy_forward(const RunContext& rc);
  void heavy_backward(const RunContext& rc);
  // The gathered attention over the routed rows; q_counts and k_counts: routed rows per sequence.
  GatheredForwardArgs heavy_args(const RunContext& rc, std::span<const std::int64_t> q_counts,
                                 std::span<const std::int64_t> k_counts) const;
  void build_window(int ranks, int rank);
  // The light kernel's q and d_o in the storage dtype: scratch twins on CUDA, the fp32 buffers on the CPU.
  void* storage_twin(const RunContext& rc, const char* fp32_key, const char* twin_key) const;

  const Session& session_;
  const Geometry& geom_;
  const Colt5Plan plan_;
  const DType storage_;  // the attention kernels' dtype of q, k, v, d_o (attention_dtype)
  AttentionProjections proj_;
  int light_heads_, light_kv_heads_;
  std::int64_t radius_;
  Router router_q_, router_kv_;
  GatheredAttention gathered_;

  // The light window: positions from window_first on, in pools of [kv_heads, batch, window_pages *
  // page size, d] (slot j holds position window_first + j); only the light KV heads are filled.
  std::int64_t window_first_ = 0, window_pages_ = 0;
  std::vector<HaloPeer> peers_;
  kernels::AttentionShape light_shape_;
  std::unique_ptr<DeviceTables> light_tables_;  // the light table and its transpose, built once
};

}  // namespace ringcast::model
