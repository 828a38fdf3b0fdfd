// The standard mixers and block of the stack: SelfAttention (Q/K/V/O projections, RoPE at the
// geometry's global positions, GQA, and the distributed attention operator), SwiGluFfn, and the
// pre-norm residual block out = y + F(rms(y)), y = x + A(rms(x)) that most layers are. These run on
// both backends; the matrix products take rc.compute inputs, attention its storage dtype.
#pragma once

#include "model_parts.hpp"

#include <ringcast/attention.hpp>
#include <ringcast/model.hpp>

#include <array>
#include <memory>

namespace ringcast::model {

// The attention operator's storage dtype on `device`: f32 on the CPU, bf16 on CUDA.
DType attention_dtype(const Device& device);

// The distributed attention operator's shape for a layer of geometry g.
LayerShape attention_shape(const ModelConfig& c, const Geometry& g, int ranks, DType dtype);

// The Q/K/V/O weights and RoPE of one attention branch, shared by every attention core.
struct AttentionProjections {
  int dim = 0, heads = 0, kv_heads = 0, head_dim = 0;
  float rope_theta = 10000.0f;
  ParamRef wq, wk, wv, wo;
  AttentionProjections(ParameterTable& table, const std::string& prefix, const ModelConfig& c);
  std::int64_t q_width() const { return std::int64_t{heads} * head_dim; }
  std::int64_t kv_width() const { return std::int64_t{kv_heads} * head_dim; }
  // q, k, v [rows, ·] from x [rows, D]; RoPE on q and k at `positions` (rows are [batch][positions]).
  void project(const RunContext& rc, const Geometry& g, const float* x, float* q, float* k, float* v) const;
  // dx += from d_q, d_k, d_v (RoPE undone in place on d_q, d_k); weight gradients added.
  void project_backward(const RunContext& rc, const Geometry& g, const float* x, float* d_q, float* d_k,
                        const float* d_v, float* dx) const;
};

// Q, K, V sit back to back in one buffer (and their gradients in another), so that on CUDA one
// conversion each way moves them to and from the operator's bf16 storage; on the CPU the operator
// works on the fp32 buffers themselves.
class SelfAttention final : public Mixer {
 public:
  SelfAttention(const Session& session, ParameterTable& table, Scratch& scratch, const std::string& prefix,
                const ModelConfig& c, const Geometry& g);
  void forward(const RunContext& rc, const float* x, float* y) override;
  void backward(const RunContext& rc, const float* x, const float* dy, float* dx) override;

 private:
  struct Buffers;
  Buffers buffers(const RunContext& rc) const;

  // CAST (attention.clusters = surrogate): the surrogate tokens [h_kv, c, d] are this layer's
  // parameters ("surrogates", no weight decay); the operator adds this rank's part of their gradient.
  TensorView surrogates(const RunContext& rc) const;
  TensorView d_surrogates(const RunContext& rc) const;

  AttentionProjections proj_;
  const Geometry& geom_;
  DType storage_;  // the operator's dtype (attention_dtype)
  std::unique_ptr<DistributedAttention> attention_;
  std::array<std::int64_t, 3> surrogate_shape_{};
  ParamRef surrogates_;
};

class SwiGluFfn final : public Mixer {
 public:
  // Reserves scratch for max_rows rows under `scratch_key` (branches of different widths need
  // different keys).
  SwiGluFfn(ParameterTable& table, Scratch& scratch, const std::string& prefix, const std::string& scratch_key,
            int dim, int hidden, std::int64_t max_rows);
  void forward(const RunContext& rc, const float* x, float* y) override { forward_rows(rc, max_rows_, x, y); }
  void backward(const RunContext& rc, const float* x, const float* dy, float* dx) override {
    backward_rows(rc, max_rows_, x, dy, dx);
  }
  // Token-wise, so any rows <= max_rows may run (CoLT5's heavy branch on the routed tokens).
  void forward_rows(const RunContext& rc, std::int64_t rows, const float* x, float* y);
  void backward_rows(const RunContext& rc, std::int64_t rows, const float* x, const float* dy, float* dx);

 private:
  int dim_, hidden_;
  std::int64_t max_rows_;
  std::string key_;
  ParamRef w1_, w3_, w2_;
};

class PreNormBlock final : public Layer {
 public:
  PreNormBlock(ParameterTable& table, Scratch& scratch, const std::string& prefix, const ModelConfig& c,
               Geometry geometry);
  // The branches are made after the block so that they can refer to its geometry.
  void set_branches(std::unique_ptr<Mixer> attention, std::unique_ptr<Mixer> ffn);
  const Geometry& in_geometry() const override { return geom_; }
  const Geometry& out_geometry() const override { return geom_; }
  void forward(const RunContext& rc, const float* in, float* out) override;
  void backward(const RunContext& rc, const float* in, const float* d_out, float* d_in) override;

 private:
  int dim_;
  float eps_;
  Geometry geom_;
  ParamRef attn_norm_, ffn_norm_;
  std::unique_ptr<Mixer> attention_, ffn_;
};

}  // namespace ringcast::model
