// SelfAttention, SwiGluFfn and PreNormBlock (model_mixers.hpp). Host code on the CPU backend's
// per-token kernels; scratch keys are per branch kind, shared by every layer of the stack.
#include "model_mixers.hpp"

#include <ringcast/error.hpp>
#include <ringcast/kernels/layers.hpp>
#include <ringcast/kernels/layout.hpp>

#include <algorithm>

namespace ringcast::model {
namespace {

void zero(float* x, std::int64_t count, const RunContext& rc) {
  kernels::fill_zero(x, static_cast<std::size_t>(count) * sizeof(float), rc.exec);
}

TensorView heads_view(float* x, const Geometry& g, int heads, int head_dim, const Device& device) {
  return TensorView::contiguous(x, DType::kF32, {g.batch, g.local_len, heads, head_dim}, device);
}

}  // namespace

AttentionProjections::AttentionProjections(ParameterTable& table, const std::string& prefix, const ModelConfig& c)
    : dim(c.dim), heads(c.heads), kv_heads(c.kv_heads), head_dim(c.head_dim), rope_theta(c.rope_theta) {
  wq = table.add(prefix + "wq", q_width(), dim, true, Init::kFanIn);
  wk = table.add(prefix + "wk", kv_width(), dim, true, Init::kFanIn);
  wv = table.add(prefix + "wv", kv_width(), dim, true, Init::kFanIn);
  wo = table.add(prefix + "wo", dim, q_width(), true, Init::kFanIn);
}

void AttentionProjections::project(const RunContext& rc, const Geometry& g, const float* x, float* q, float* k,
                                   float* v) const {
  const std::int64_t rows = g.rows(), n = g.local_len, qd = q_width(), kd = kv_width();
  kernels::linear_forward({rows, dim, static_cast<int>(qd), x, rc.p(wq), q}, rc.exec);
  kernels::linear_forward({rows, dim, static_cast<int>(kd), x, rc.p(wk), k}, rc.exec);
  kernels::linear_forward({rows, dim, static_cast<int>(kd), x, rc.p(wv), v}, rc.exec);
  // Rows are [batch][local_len]: each batch element's rows carry the same positions.
  for (int b = 0; b < g.batch; ++b) {
    kernels::rope_forward({n, heads, head_dim, rope_theta, g.positions.data(), q + b * n * qd}, rc.exec);
    kernels::rope_forward({n, kv_heads, head_dim, rope_theta, g.positions.data(), k + b * n * kd}, rc.exec);
  }
}

void AttentionProjections::project_backward(const RunContext& rc, const Geometry& g, const float* x, float* d_q,
                                            float* d_k, const float* d_v, float* dx) const {
  const std::int64_t rows = g.rows(), n = g.local_len, qd = q_width(), kd = kv_width();
  for (int b = 0; b < g.batch; ++b) {
    kernels::rope_backward({n, heads, head_dim, rope_theta, g.positions.data(), d_q + b * n * qd}, rc.exec);
    kernels::rope_backward({n, kv_heads, head_dim, rope_theta, g.positions.data(), d_k + b * n * kd}, rc.exec);
  }
  kernels::linear_backward({rows, dim, static_cast<int>(qd), x, rc.p(wq), d_q, dx, rc.g(wq)}, rc.exec);
  kernels::linear_backward({rows, dim, static_cast<int>(kd), x, rc.p(wk), d_k, dx, rc.g(wk)}, rc.exec);
  kernels::linear_backward({rows, dim, static_cast<int>(kd), x, rc.p(wv), d_v, dx, rc.g(wv)}, rc.exec);
}

LayerShape attention_shape(const ModelConfig& c, const Geometry& g, int ranks) {
  LayerShape shape;
  shape.seq_len = g.seq_len;
  shape.ranks = ranks;
  shape.batch = g.batch;
  shape.heads = c.heads;
  shape.kv_heads = c.kv_heads;
  shape.head_dim = c.head_dim;
  shape.dtype = DType::kF32;
  shape.causal = g.causal;
  return shape;
}

SelfAttention::SelfAttention(const Session& session, ParameterTable& table, Scratch& scratch,
                             const std::string& prefix, const ModelConfig& c, const Geometry& g)
    : proj_(table, prefix, c), geom_(g) {
  attention_ = std::make_unique<DistributedAttention>(session, attention_shape(c, g, session.size()), c.attention);
  const std::int64_t rows = g.rows();
  for (const char* key : {"attn.q", "attn.o", "attn.d_q", "attn.d_o"}) scratch.reserve(key, rows * proj_.q_width());
  for (const char* key : {"attn.k", "attn.v", "attn.d_k", "attn.d_v"}) scratch.reserve(key, rows * proj_.kv_width());
  scratch.reserve("attn.lse", rows * c.heads);
}

void SelfAttention::forward(const RunContext& rc, const float* x, float* y) {
  const Scratch& s = rc.scratch;
  const Device& dev = rc.session.device();
  float *q = s.get("attn.q"), *k = s.get("attn.k"), *v = s.get("attn.v"), *o = s.get("attn.o");
  proj_.project(rc, geom_, x, q, k, v);
  attention_->forward({heads_view(q, geom_, proj_.heads, proj_.head_dim, dev),
                       heads_view(k, geom_, proj_.kv_heads, proj_.head_dim, dev),
                       heads_view(v, geom_, proj_.kv_heads, proj_.head_dim, dev),
                       heads_view(o, geom_, proj_.heads, proj_.head_dim, dev),
                       TensorView::contiguous(s.get("attn.lse"), DType::kF32, {geom_.batch, proj_.heads, geom_.local_len}, dev)});
  kernels::linear_forward({geom_.rows(), static_cast<int>(proj_.q_width()), proj_.dim, o, rc.p(proj_.wo), y, true},
                          rc.exec);
}

void SelfAttention::backward(const RunContext& rc, const float* x, const float* dy, float* dx) {
  const Scratch& s = rc.scratch;
  const Device& dev = rc.session.device();
  const int h = proj_.heads, hkv = proj_.kv_heads, d = proj_.head_dim;
  float *q = s.get("attn.q"), *k = s.get("attn.k"), *v = s.get("attn.v"), *o = s.get("attn.o");
  float *d_q = s.get("attn.d_q"), *d_k = s.get("attn.d_k"), *d_v = s.get("attn.d_v"), *d_o = s.get("attn.d_o");
  zero(d_o, geom_.rows() * proj_.q_width(), rc);
  kernels::linear_backward({geom_.rows(), static_cast<int>(proj_.q_width()), proj_.dim, o, rc.p(proj_.wo), dy, d_o,
                            rc.g(proj_.wo)},
                           rc.exec);
  attention_->backward({heads_view(q, geom_, h, d, dev), heads_view(k, geom_, hkv, d, dev),
                        heads_view(v, geom_, hkv, d, dev), heads_view(o, geom_, h, d, dev),
                        TensorView::contiguous(s.get("attn.lse"), DType::kF32, {geom_.batch, h, geom_.local_len}, dev),
                        heads_view(d_o, geom_, h, d, dev), heads_view(d_q, geom_, h, d, dev),
                        heads_view(d_k, geom_, hkv, d, dev), heads_view(d_v, geom_, hkv, d, dev)});
  proj_.project_backward(rc, geom_, x, d_q, d_k, d_v, dx);
}

SwiGluFfn::SwiGluFfn(ParameterTable& table, Scratch& scratch, const std::string& prefix, const std::string& scratch_key,
                     int dim, int hidden, std::int64_t max_rows)
    : dim_(dim), hidden_(hidden), max_rows_(max_rows), key_(scratch_key) {
  w1_ = table.add(prefix + "w1", hidden, dim, true, Init::kFanIn);
  w3_ = table.add(prefix + "w3", hidden, dim, true, Init::kFanIn);
  w2_ = table.add(prefix + "w2", dim, hidden, true, Init::kFanIn);
  for (const char* part : {".a", ".b", ".h", ".d_a", ".d_b", ".d_h"}) scratch.reserve(key_ + part, max_rows * hidden);
}

void SwiGluFfn::forward_rows(const RunContext& rc, std::int64_t rows, const float* x, float* y) {
  RINGCAST_CHECK(rows <= max_rows_, "SwiGluFfn: {} rows, at most {} reserved", rows, max_rows_);
  const Scratch& s = rc.scratch;
  float *a = s.get(key_ + ".a"), *b = s.get(key_ + ".b"), *h = s.get(key_ + ".h");
  kernels::linear_forward({rows, dim_, hidden_, x, rc.p(w1_), a}, rc.exec);
  kernels::linear_forward({rows, dim_, hidden_, x, rc.p(w3_), b}, rc.exec);
  kernels::swiglu_forward({rows * hidden_, a, b, h}, rc.exec);
  kernels::linear_forward({rows, hidden_, dim_, h, rc.p(w2_), y, true}, rc.exec);
}

void SwiGluFfn::backward_rows(const RunContext& rc, std::int64_t rows, const float* x, const float* dy, float* dx) {
  const Scratch& s = rc.scratch;
  float *a = s.get(key_ + ".a"), *b = s.get(key_ + ".b"), *h = s.get(key_ + ".h");
  float *d_a = s.get(key_ + ".d_a"), *d_b = s.get(key_ + ".d_b"), *d_h = s.get(key_ + ".d_h");
  const std::int64_t count = rows * hidden_;
  zero(d_h, count, rc);
  kernels::linear_backward({rows, hidden_, dim_, h, rc.p(w2_), dy, d_h, rc.g(w2_)}, rc.exec);
  zero(d_a, count, rc);
  zero(d_b, count, rc);
  kernels::swiglu_backward({count, a, b, d_h, d_a, d_b}, rc.exec);
  kernels::linear_backward({rows, dim_, hidden_, x, rc.p(w1_), d_a, dx, rc.g(w1_)}, rc.exec);
  kernels::linear_backward({rows, dim_, hidden_, x, rc.p(w3_), d_b, dx, rc.g(w3_)}, rc.exec);
}

PreNormBlock::PreNormBlock(ParameterTable& table, Scratch& scratch, const std::string& prefix, const ModelConfig& c,
                           Geometry geometry)
    : dim_(c.dim), eps_(c.norm_eps), geom_(std::move(geometry)) {
  attn_norm_ = table.add(prefix + "attn_norm", 1, c.dim, false, Init::kOnes);
  ffn_norm_ = table.add(prefix + "ffn_norm", 1, c.dim, false, Init::kOnes);
  for (const char* key : {"block.xn_attn", "block.xn_ffn", "block.mid", "block.d_xn"})
    scratch.reserve(key, geom_.rows() * c.dim);
}

void PreNormBlock::set_branches(std::unique_ptr<Mixer> attention, std::unique_ptr<Mixer> ffn) {
  attention_ = std::move(attention);
  ffn_ = std::move(ffn);
}

// out = y + F(rms(y)), y = in + A(rms(in)).
void PreNormBlock::forward(const RunContext& rc, const float* in, float* out) {
  const std::int64_t rows = geom_.rows(), count = rows * dim_;
  float *xn_a = rc.scratch.get("block.xn_attn"), *xn_f = rc.scratch.get("block.xn_ffn");
  kernels::rms_norm_forward({rows, dim_, eps_, in, rc.p(attn_norm_), xn_a}, rc.exec);
  std::copy_n(in, count, out);
  attention_->forward(rc, xn_a, out);
  kernels::rms_norm_forward({rows, dim_, eps_, out, rc.p(ffn_norm_), xn_f}, rc.exec);
  ffn_->forward(rc, xn_f, out);
}

// Recomputes y (in block.mid) and both branches, then differentiates. The FFN's recomputed output is
// not needed; d_in, overwritten right after, takes it.
void PreNormBlock::backward(const RunContext& rc, const float* in, const float* d_out, float* d_in) {
  const std::int64_t rows = geom_.rows(), count = rows * dim_;
  const Scratch& s = rc.scratch;
  float *xn_a = s.get("block.xn_attn"), *xn_f = s.get("block.xn_ffn"), *mid = s.get("block.mid");
  float* d_xn = s.get("block.d_xn");
  kernels::rms_norm_forward({rows, dim_, eps_, in, rc.p(attn_norm_), xn_a}, rc.exec);
  std::copy_n(in, count, mid);
  attention_->forward(rc, xn_a, mid);
  kernels::rms_norm_forward({rows, dim_, eps_, mid, rc.p(ffn_norm_), xn_f}, rc.exec);
  ffn_->forward(rc, xn_f, d_in);

  std::copy_n(d_out, count, d_in);
  zero(d_xn, count, rc);
  ffn_->backward(rc, xn_f, d_out, d_xn);
  kernels::rms_norm_backward({rows, dim_, eps_, mid, rc.p(ffn_norm_), d_xn, d_in, rc.g(ffn_norm_)}, rc.exec);
  // d_in now holds dL/dy.
  zero(d_xn, count, rc);
  attention_->backward(rc, xn_a, d_in, d_xn);
  kernels::rms_norm_backward({rows, dim_, eps_, in, rc.p(attn_norm_), d_xn, d_in, rc.g(attn_norm_)}, rc.exec);
}

}  // namespace ringcast::model
