// The standard pieces of the stack: SelfAttention (Q/K/V/O projections, RoPE at the geometry's
// global positions, GQA, and the distributed attention operator), SwiGluFfn, and the pre-norm
// residual block out = y + F(rms(y)), y = x + A(rms(x)): StandardBlock with those two branches in row
// chunks, PreNormBlock around any Mixer. These run on both backends; the matrix products take
// rc.compute inputs, attention and the stack's layer inputs the storage dtype.
#pragma once

#include "model_parts.hpp"

#include <ringcast/attention.hpp>
#include <ringcast/model.hpp>

#include <algorithm>
#include <array>
#include <memory>
#include <vector>

namespace ringcast::model {

// The attention operator's storage dtype on `device`, and the stack's kept layer inputs': f32 on the
// CPU, bf16 on CUDA.
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
  // q, k, v [rows, ·] from x, rows [first, first + rows) of geometry g ([rows, D]); RoPE on q and k
  // at the rows' global positions (rows are [batch][local_len]).
  void project_rows(const RunContext& rc, const Geometry& g, std::int64_t first, std::int64_t rows, const float* x,
                    float* q, float* k, float* v) const;
  // dx += from d_q, d_k, d_v of the same rows (RoPE undone in place on d_q, d_k); weight gradients added.
  void project_rows_backward(const RunContext& rc, const Geometry& g, std::int64_t first, std::int64_t rows,
                             const float* x, float* d_q, float* d_k, const float* d_v, float* dx) const;
  // Every row of g.
  void project(const RunContext& rc, const Geometry& g, const float* x, float* q, float* k, float* v) const {
    project_rows(rc, g, 0, g.rows(), x, q, k, v);
  }
  void project_backward(const RunContext& rc, const Geometry& g, const float* x, float* d_q, float* d_k,
                        const float* d_v, float* dx) const {
    project_rows_backward(rc, g, 0, g.rows(), x, d_q, d_k, d_v, dx);
  }
};

// The distributed attention operators of a stack, one per distinct layer shape, all with the model's
// AttentionOptions. Every layer of that shape shares it: a layer's backward recomputes its forward
// right before (the Mixer contract), so no operator state has to outlive one layer's pass, and the
// mode's workspace (at 1M tokens the clustered pools are GBs) exists once instead of once per layer.
// Operators are made in the order the stack asks for them, the same on every rank (collective).
class AttentionOperators {
 public:
  AttentionOperators(const Session& session, const AttentionOptions& options);
  DistributedAttention& get(const LayerShape& shape);

 private:
  const Session& session_;
  AttentionOptions options_;
  std::vector<std::unique_ptr<DistributedAttention>> operators_;
};

// The attention branch of a StandardBlock, in row-chunk steps around the distributed operator. The
// operator reads Q, K, V and writes O in its storage dtype, whole; the projections around it run over
// chunks of rows in fp32 (chunk_rows(), ModelConfig::row_chunk), so that no fp32 copy of Q, K, V or O
// exists (on CUDA those would be twice the bf16 ones), and the block can feed them normed rows one
// chunk at a time. Q, K, V sit back to back in one buffer, and the operator writes their gradients
// over them (in place: AttentionBackwardArgs).
// Forward: project() every chunk, attend(), add_output() every chunk. Backward, right after a forward
// on the same rows: output_backward() every chunk, attend_backward(), project_backward() every chunk.
// Weight gradients sum over chunks in call order (fp32 rounding differs from one product's).
class SelfAttention {
 public:
  // The operator comes from `operators`, which must outlive the branch.
  SelfAttention(const Session& session, ParameterTable& table, Scratch& scratch, AttentionOperators& operators,
                const std::string& prefix, const ModelConfig& c, const Geometry& g);
  // The scratch floats the constructor reserves (the memory estimate uses it too).
  static std::int64_t scratch_floats(const ModelConfig& c, const Geometry& g, DType storage);
  std::int64_t chunk_rows() const { return chunk_; }

  // Q, K, V of rows [r0, r0 + m) (m <= chunk_rows()) from their normed inputs xn [m, D].
  void project(const RunContext& rc, std::int64_t r0, std::int64_t m, const float* xn) const;
  void attend(const RunContext& rc);
  // y [m, D] += O W_oᵀ of rows [r0, r0 + m).
  void add_output(const RunContext& rc, std::int64_t r0, std::int64_t m, float* y) const;
  // dO of rows [r0, r0 + m) from dy [m, D]; W_o's gradient added.
  void output_backward(const RunContext& rc, std::int64_t r0, std::int64_t m, const float* dy) const;
  void attend_backward(const RunContext& rc);
  // d_xn [m, D] += from dQ, dK, dV of rows [r0, r0 + m); the projections' gradients added.
  void project_backward(const RunContext& rc, std::int64_t r0, std::int64_t m, const float* xn, float* d_xn) const;

 private:
  void* storage_rows(void* base, std::int64_t r0, std::int64_t width) const;

  // CAST (attention.clusters = surrogate): the surrogate tokens [h_kv, c, d] are this layer's
  // parameters ("surrogates", no weight decay); the operator adds this rank's part of their gradient.
  TensorView surrogates(const RunContext& rc) const;
  TensorView d_surrogates(const RunContext& rc) const;

  AttentionProjections proj_;
  const Geometry& geom_;
  DType storage_;  // the operator's dtype (attention_dtype)
  std::int64_t chunk_;  // rows per projection chunk
  DistributedAttention* attention_;
  std::array<std::int64_t, 3> surrogate_shape_{};
  ParamRef surrogates_;
};

// Token-wise, so it runs over row chunks of at most chunk_rows: its scratch is six [chunk, F]
// matrices (a = x W1ᵀ, b = x W3ᵀ, h = silu(a) b and their gradients), not six [rows, F].
class SwiGluFfn final : public Mixer {
 public:
  // Reserves scratch for chunks of min(max_rows, chunk_rows) rows under `scratch_key` (branches of
  // different widths need different keys).
  SwiGluFfn(ParameterTable& table, Scratch& scratch, const std::string& prefix, const std::string& scratch_key,
            int dim, int hidden, std::int64_t max_rows, std::int64_t chunk_rows);
  // The floats the constructor reserves (the memory estimate uses it too).
  static std::int64_t scratch_floats(int hidden, std::int64_t max_rows, std::int64_t chunk_rows);
  void forward(const RunContext& rc, const float* x, float* y) override { forward_rows(rc, max_rows_, x, y); }
  void backward(const RunContext& rc, const float* x, const float* dy, float* dx) override {
    backward_rows(rc, max_rows_, x, dy, dx);
  }
  // Any rows <= max_rows may run (CoLT5's heavy branch on the routed tokens).
  void forward_rows(const RunContext& rc, std::int64_t rows, const float* x, float* y);
  void backward_rows(const RunContext& rc, std::int64_t rows, const float* x, const float* dy, float* dx);

 private:
  std::array<float*, 6> chunk_buffers(const RunContext& rc) const;

  int dim_, hidden_;
  std::int64_t max_rows_, chunk_;
  std::string key_;
  ParamRef w1_, w3_, w2_;
};

// The pre-norm residual block with any Mixer branches (CoLT5's, which route over all rows): fp32
// [rows, D] normed inputs, y and dL/d(normed) as scratch.
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

// The rows of one chunk of `rows` rows processed `row_chunk` at a time (at least 1).
inline std::int64_t chunk_rows(std::int64_t rows, std::int64_t row_chunk) {
  return std::max<std::int64_t>(1, std::min(rows, row_chunk));
}

// Three [chunk, D] fp32 matrices in scratch that the standard blocks and the LM head share (they never
// run at once): x (input rows, or y), normed (their RMSNorm), d_normed (dL/d(normed), or a sink).
struct RowChunks {
  float *x, *normed, *d_normed;
  static std::int64_t floats(std::int64_t chunk_rows, int dim) { return 3 * chunk_rows * dim; }
  static void reserve(Scratch& scratch, std::int64_t chunk_rows, int dim);
  static RowChunks get(const Scratch& scratch);
};

// The standard transformer block, the same function as a PreNormBlock with SelfAttention and
// SwiGluFfn branches but with every token-wise step in chunks of row_chunk rows: the RMSNorms, the
// projections, the residual adds and the FFN, so its own scratch is RowChunks (x or y, normed rows,
// dL/d(normed) or the FFN's output sink) besides the branches'. in and out are in the stack's
// activation dtype (attention_dtype()); y = in + A(rms(in)) lives in fp32 one chunk at a time
// and out is rounded once, when stored. The norm gains' gradients add up chunk by chunk in row order.
// backward takes d_in == d_out: each chunk's dL/dout is read before the chunk's dL/dy replaces it.
class StandardBlock final : public StackLayer {
 public:
  StandardBlock(const Session& session, ParameterTable& table, Scratch& scratch, AttentionOperators& operators,
                const std::string& prefix, const ModelConfig& c, Geometry geometry);
  // The block's own scratch floats (the memory estimate uses it too; the branches' are theirs).
  static std::int64_t scratch_floats(const ModelConfig& c, const Geometry& g);
  const Geometry& in_geometry() const override { return geom_; }
  const Geometry& out_geometry() const override { return geom_; }
  void forward(const RunContext& rc, const void* in, void* out) override;
  void backward(const RunContext& rc, const void* in, const float* d_out, float* d_in) override;
  bool gradient_in_place() const override { return true; }

 private:
  // Rows [r0, r0 + m) of `in` (stored dtype) into x [m, D] fp32.
  void load_rows(const RunContext& rc, const void* in, std::int64_t r0, std::int64_t m, float* x) const;
  // rms(in) W_q, W_k, W_v of every chunk and the attention operator: the forward up to O.
  void attend(const RunContext& rc, const void* in);

  int dim_;
  float eps_;
  Geometry geom_;
  DType stored_;  // the activation dtype of in and out
  std::int64_t chunk_;
  ParamRef attn_norm_, ffn_norm_;
  // The FFN declares its weights before the attention's: the parameter table's order (initial values
  // and checkpoints depend on it).
  SwiGluFfn ffn_;
  SelfAttention attention_;
};

}  // namespace ringcast::model
