// SelfAttention, SwiGluFfn and PreNormBlock (model_mixers.hpp), on the per-token kernels of either
// backend: every buffer is in the memory of rc.exec's device and every call is enqueued on its stream.
// Scratch keys are per branch kind, shared by every layer of the stack.
#include "model_mixers.hpp"

#include <ringcast/error.hpp>
#include <ringcast/kernels/layers.hpp>
#include <ringcast/kernels/layout.hpp>

#include <array>

namespace ringcast::model {
namespace {

void zero(float* x, std::int64_t count, const RunContext& rc) {
  kernels::fill_zero(x, static_cast<std::size_t>(count) * sizeof(float), rc.exec);
}

// dst = src, n elements, converted when the dtypes differ.
void copy(const void* src, DType from, void* dst, DType to, std::int64_t n, const RunContext& rc) {
  kernels::copy_strided(kernels::StridedCopy::flat(src, from, dst, to, n), rc.exec);
}

// Scratch is reserved in floats: the floats that n elements of dtype fill.
std::int64_t floats_for(std::int64_t n, DType dtype) {
  const auto size = static_cast<std::int64_t>(dtype_size(dtype));
  return (n * size + std::int64_t{sizeof(float)} - 1) / std::int64_t{sizeof(float)};
}

TensorView heads_view(void* x, DType dtype, const Geometry& g, int heads, int head_dim, const Device& device) {
  return TensorView::contiguous(x, dtype, {g.batch, g.local_len, heads, head_dim}, device);
}

// Views of q|k|v (or d_q|d_k|d_v) packed back to back at `base` in `dtype`.
std::array<TensorView, 3> packed_views(void* base, DType dtype, const Geometry& g, const AttentionProjections& p,
                                       const Device& device) {
  char* at = static_cast<char*>(base);
  const std::size_t q_bytes = static_cast<std::size_t>(g.rows() * p.q_width()) * dtype_size(dtype);
  const std::size_t kv_bytes = static_cast<std::size_t>(g.rows() * p.kv_width()) * dtype_size(dtype);
  return {heads_view(at, dtype, g, p.heads, p.head_dim, device),
          heads_view(at + q_bytes, dtype, g, p.kv_heads, p.head_dim, device),
          heads_view(at + q_bytes + kv_bytes, dtype, g, p.kv_heads, p.head_dim, device)};
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
  const std::int32_t* positions = g.kernel_positions(rc.exec.device);
  kernels::linear_forward({rows, dim, static_cast<int>(qd), x, rc.p(wq), q, false, rc.compute}, rc.exec);
  kernels::linear_forward({rows, dim, static_cast<int>(kd), x, rc.p(wk), k, false, rc.compute}, rc.exec);
  kernels::linear_forward({rows, dim, static_cast<int>(kd), x, rc.p(wv), v, false, rc.compute}, rc.exec);
  // Rows are [batch][local_len]: each batch element's rows carry the same positions.
  for (int b = 0; b < g.batch; ++b) {
    kernels::rope_forward({n, heads, head_dim, rope_theta, positions, q + b * n * qd}, rc.exec);
    kernels::rope_forward({n, kv_heads, head_dim, rope_theta, positions, k + b * n * kd}, rc.exec);
  }
}

void AttentionProjections::project_backward(const RunContext& rc, const Geometry& g, const float* x, float* d_q,
                                            float* d_k, const float* d_v, float* dx) const {
  const std::int64_t rows = g.rows(), n = g.local_len, qd = q_width(), kd = kv_width();
  const std::int32_t* positions = g.kernel_positions(rc.exec.device);
  for (int b = 0; b < g.batch; ++b) {
    kernels::rope_backward({n, heads, head_dim, rope_theta, positions, d_q + b * n * qd}, rc.exec);
    kernels::rope_backward({n, kv_heads, head_dim, rope_theta, positions, d_k + b * n * kd}, rc.exec);
  }
  kernels::linear_backward({rows, dim, static_cast<int>(qd), x, rc.p(wq), d_q, dx, rc.g(wq), rc.compute}, rc.exec);
  kernels::linear_backward({rows, dim, static_cast<int>(kd), x, rc.p(wk), d_k, dx, rc.g(wk), rc.compute}, rc.exec);
  kernels::linear_backward({rows, dim, static_cast<int>(kd), x, rc.p(wv), d_v, dx, rc.g(wv), rc.compute}, rc.exec);
}

DType attention_dtype(const Device& device) {
  return device.kind == DeviceKind::kCpu ? DType::kF32 : DType::kBF16;
}

LayerShape attention_shape(const ModelConfig& c, const Geometry& g, int ranks, DType dtype) {
  LayerShape shape;
  shape.seq_len = g.seq_len;
  shape.ranks = ranks;
  shape.batch = g.batch;
  shape.heads = c.heads;
  shape.kv_heads = c.kv_heads;
  shape.head_dim = c.head_dim;
  shape.dtype = dtype;
  shape.causal = g.causal;
  return shape;
}

// The fp32 buffers the projections read and write (q|k|v, o, their gradients, the LSE), and the ones
// the operator reads and writes: the same buffers when its dtype is f32 (CPU), bf16 twins (CUDA).
struct SelfAttention::Buffers {
  float *qkv, *o, *d_qkv, *d_o, *lse;
  void *qkv_s, *o_s, *d_qkv_s, *d_o_s;
};

SelfAttention::SelfAttention(const Session& session, ParameterTable& table, Scratch& scratch,
                             const std::string& prefix, const ModelConfig& c, const Geometry& g)
    : proj_(table, prefix, c), geom_(g), storage_(attention_dtype(session.device())) {
  const LayerShape shape = attention_shape(c, g, session.size(), storage_);
  attention_ = std::make_unique<DistributedAttention>(session, shape, c.attention);
  if (c.attention.uses_surrogates()) {
    RINGCAST_CHECK(storage_ == DType::kF32, "Model: CAST surrogate clusters run on the CPU backend only");
    surrogate_shape_ = surrogate_shape(shape, c.attention);
    const auto [kv_heads, clusters, head_dim] = surrogate_shape_;
    surrogates_ = table.add(prefix + "surrogates", kv_heads * clusters, head_dim, false, Init::kFanIn);
  }
  const std::int64_t rows = g.rows(), qkv = rows * (proj_.q_width() + 2 * proj_.kv_width()), o = rows * proj_.q_width();
  for (const char* key : {"attn.qkv", "attn.d_qkv"}) scratch.reserve(key, qkv);
  for (const char* key : {"attn.o", "attn.d_o"}) scratch.reserve(key, o);
  scratch.reserve("attn.lse", rows * c.heads);
  if (storage_ == DType::kF32) return;
  for (const char* key : {"attn.qkv_s", "attn.d_qkv_s"}) scratch.reserve(key, floats_for(qkv, storage_));
  for (const char* key : {"attn.o_s", "attn.d_o_s"}) scratch.reserve(key, floats_for(o, storage_));
}

TensorView SelfAttention::surrogates(const RunContext& rc) const {
  if (surrogates_.index < 0) return {};
  return TensorView::contiguous(const_cast<float*>(rc.p(surrogates_)), DType::kF32,
                                {surrogate_shape_[0], surrogate_shape_[1], surrogate_shape_[2]}, rc.session.device());
}

TensorView SelfAttention::d_surrogates(const RunContext& rc) const {
  if (surrogates_.index < 0) return {};
  return TensorView::contiguous(rc.g(surrogates_), DType::kF32,
                                {surrogate_shape_[0], surrogate_shape_[1], surrogate_shape_[2]}, rc.session.device());
}

SelfAttention::Buffers SelfAttention::buffers(const RunContext& rc) const {
  const Scratch& s = rc.scratch;
  Buffers b{s.get("attn.qkv"), s.get("attn.o"), s.get("attn.d_qkv"), s.get("attn.d_o"), s.get("attn.lse"),
            nullptr, nullptr, nullptr, nullptr};
  const bool same = storage_ == DType::kF32;
  b.qkv_s = same ? static_cast<void*>(b.qkv) : s.get("attn.qkv_s");
  b.o_s = same ? static_cast<void*>(b.o) : s.get("attn.o_s");
  b.d_qkv_s = same ? static_cast<void*>(b.d_qkv) : s.get("attn.d_qkv_s");
  b.d_o_s = same ? static_cast<void*>(b.d_o) : s.get("attn.d_o_s");
  return b;
}

void SelfAttention::forward(const RunContext& rc, const float* x, float* y) {
  const Device& dev = rc.session.device();
  const Buffers b = buffers(rc);
  const std::int64_t rows = geom_.rows(), qd = proj_.q_width(), kd = proj_.kv_width();
  const bool converted = storage_ != DType::kF32;
  proj_.project(rc, geom_, x, b.qkv, b.qkv + rows * qd, b.qkv + rows * (qd + kd));
  if (converted) copy(b.qkv, DType::kF32, b.qkv_s, storage_, rows * (qd + 2 * kd), rc);
  const auto [q, k, v] = packed_views(b.qkv_s, storage_, geom_, proj_, dev);
  attention_->forward({q, k, v, heads_view(b.o_s, storage_, geom_, proj_.heads, proj_.head_dim, dev),
                       TensorView::contiguous(b.lse, DType::kF32, {geom_.batch, proj_.heads, geom_.local_len}, dev),
                       surrogates(rc)});
  if (converted) copy(b.o_s, storage_, b.o, DType::kF32, rows * qd, rc);
  kernels::linear_forward({rows, static_cast<int>(qd), proj_.dim, b.o, rc.p(proj_.wo), y, true, rc.compute}, rc.exec);
}

void SelfAttention::backward(const RunContext& rc, const float* x, const float* dy, float* dx) {
  const Device& dev = rc.session.device();
  const Buffers b = buffers(rc);
  const int h = proj_.heads, d = proj_.head_dim;
  const std::int64_t rows = geom_.rows(), qd = proj_.q_width(), kd = proj_.kv_width();
  const bool converted = storage_ != DType::kF32;
  zero(b.d_o, rows * qd, rc);
  kernels::linear_backward(
      {rows, static_cast<int>(qd), proj_.dim, b.o, rc.p(proj_.wo), dy, b.d_o, rc.g(proj_.wo), rc.compute}, rc.exec);
  if (converted) copy(b.d_o, DType::kF32, b.d_o_s, storage_, rows * qd, rc);
  const auto [q, k, v] = packed_views(b.qkv_s, storage_, geom_, proj_, dev);
  const auto [d_q, d_k, d_v] = packed_views(b.d_qkv_s, storage_, geom_, proj_, dev);
  attention_->backward({q, k, v, heads_view(b.o_s, storage_, geom_, h, d, dev),
                        TensorView::contiguous(b.lse, DType::kF32, {geom_.batch, h, geom_.local_len}, dev),
                        heads_view(b.d_o_s, storage_, geom_, h, d, dev), d_q, d_k, d_v, surrogates(rc),
                        d_surrogates(rc)});
  if (converted) copy(b.d_qkv_s, storage_, b.d_qkv, DType::kF32, rows * (qd + 2 * kd), rc);
  proj_.project_backward(rc, geom_, x, b.d_qkv, b.d_qkv + rows * qd, b.d_qkv + rows * (qd + kd), dx);
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
  kernels::linear_forward({rows, dim_, hidden_, x, rc.p(w1_), a, false, rc.compute}, rc.exec);
  kernels::linear_forward({rows, dim_, hidden_, x, rc.p(w3_), b, false, rc.compute}, rc.exec);
  kernels::swiglu_forward({rows * hidden_, a, b, h}, rc.exec);
  kernels::linear_forward({rows, hidden_, dim_, h, rc.p(w2_), y, true, rc.compute}, rc.exec);
}

void SwiGluFfn::backward_rows(const RunContext& rc, std::int64_t rows, const float* x, const float* dy, float* dx) {
  const Scratch& s = rc.scratch;
  float *a = s.get(key_ + ".a"), *b = s.get(key_ + ".b"), *h = s.get(key_ + ".h");
  float *d_a = s.get(key_ + ".d_a"), *d_b = s.get(key_ + ".d_b"), *d_h = s.get(key_ + ".d_h");
  const std::int64_t count = rows * hidden_;
  zero(d_h, count, rc);
  kernels::linear_backward({rows, hidden_, dim_, h, rc.p(w2_), dy, d_h, rc.g(w2_), rc.compute}, rc.exec);
  zero(d_a, count, rc);
  zero(d_b, count, rc);
  kernels::swiglu_backward({count, a, b, d_h, d_a, d_b}, rc.exec);
  kernels::linear_backward({rows, dim_, hidden_, x, rc.p(w1_), d_a, dx, rc.g(w1_), rc.compute}, rc.exec);
  kernels::linear_backward({rows, dim_, hidden_, x, rc.p(w3_), d_b, dx, rc.g(w3_), rc.compute}, rc.exec);
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
  copy(in, DType::kF32, out, DType::kF32, count, rc);
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
  copy(in, DType::kF32, mid, DType::kF32, count, rc);
  attention_->forward(rc, xn_a, mid);
  kernels::rms_norm_forward({rows, dim_, eps_, mid, rc.p(ffn_norm_), xn_f}, rc.exec);
  ffn_->forward(rc, xn_f, d_in);

  copy(d_out, DType::kF32, d_in, DType::kF32, count, rc);
  zero(d_xn, count, rc);
  ffn_->backward(rc, xn_f, d_out, d_xn);
  kernels::rms_norm_backward({rows, dim_, eps_, mid, rc.p(ffn_norm_), d_xn, d_in, rc.g(ffn_norm_)}, rc.exec);
  // d_in now holds dL/dy.
  zero(d_xn, count, rc);
  attention_->backward(rc, xn_a, d_in, d_xn);
  kernels::rms_norm_backward({rows, dim_, eps_, in, rc.p(attn_norm_), d_xn, d_in, rc.g(attn_norm_)}, rc.exec);
}

}  // namespace ringcast::model
