// SelfAttention, SwiGluFfn, StandardBlock and PreNormBlock (model_mixers.hpp), on the per-token
// kernels of either backend: every buffer is in the memory of rc.exec's device and every call is enqueued on its stream.
// Scratch keys are per branch kind, shared by every layer of the stack.
#include "model_mixers.hpp"

#include <ringcast/error.hpp>
#include <ringcast/kernels/layers.hpp>
#include <ringcast/kernels/layout.hpp>

#include <algorithm>
#include <array>

namespace ringcast::model {
namespace {

void zero(float* x, std::int64_t count, const RunContext& rc) {
  kernels::fill_zero(x, static_cast<std::size_t>(count) * sizeof(float), rc.exec);
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

namespace {

// RoPE (or its transpose) on q, k holding rows [first, first + rows) of geometry g.
void rope_rows(const AttentionProjections& p, const RunContext& rc, const Geometry& g, std::int64_t first,
               std::int64_t rows, float* q, float* k, bool backward) {
  const int heads = p.heads, kv_heads = p.kv_heads, head_dim = p.head_dim;
  const float rope_theta = p.rope_theta;
  const std::int64_t n = g.local_len, qd = p.q_width(), kd = p.kv_width();
  const std::int32_t* positions = g.kernel_positions(rc.exec.device);
  // Rows are [batch][local_len]: each batch element's rows carry the same positions.
  for (std::int64_t r = first; r < first + rows;) {
    const std::int64_t t = r % n, count = std::min(n - t, first + rows - r), at = r - first;
    const kernels::RopeParams pq{count, heads, head_dim, rope_theta, positions + t, q + at * qd};
    const kernels::RopeParams pk{count, kv_heads, head_dim, rope_theta, positions + t, k + at * kd};
    if (backward) {
      kernels::rope_backward(pq, rc.exec);
      kernels::rope_backward(pk, rc.exec);
    } else {
      kernels::rope_forward(pq, rc.exec);
      kernels::rope_forward(pk, rc.exec);
    }
    r += count;
  }
}

}  // namespace

void AttentionProjections::project_rows(const RunContext& rc, const Geometry& g, std::int64_t first, std::int64_t rows,
                                        const float* x, float* q, float* k, float* v) const {
  const int qd = static_cast<int>(q_width()), kd = static_cast<int>(kv_width());
  kernels::linear_forward({rows, dim, qd, x, rc.p(wq), q, false, rc.compute}, rc.exec);
  kernels::linear_forward({rows, dim, kd, x, rc.p(wk), k, false, rc.compute}, rc.exec);
  kernels::linear_forward({rows, dim, kd, x, rc.p(wv), v, false, rc.compute}, rc.exec);
  rope_rows(*this, rc, g, first, rows, q, k, false);
}

void AttentionProjections::project_rows_backward(const RunContext& rc, const Geometry& g, std::int64_t first,
                                                 std::int64_t rows, const float* x, float* d_q, float* d_k,
                                                 const float* d_v, float* dx) const {
  const int qd = static_cast<int>(q_width()), kd = static_cast<int>(kv_width());
  rope_rows(*this, rc, g, first, rows, d_q, d_k, true);
  kernels::linear_backward({rows, dim, qd, x, rc.p(wq), d_q, dx, rc.g(wq), rc.compute}, rc.exec);
  kernels::linear_backward({rows, dim, kd, x, rc.p(wk), d_k, dx, rc.g(wk), rc.compute}, rc.exec);
  kernels::linear_backward({rows, dim, kd, x, rc.p(wv), d_v, dx, rc.g(wv), rc.compute}, rc.exec);
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

AttentionOperators::AttentionOperators(const Session& session, const AttentionOptions& options)
    : session_(session), options_(options) {}

DistributedAttention& AttentionOperators::get(const LayerShape& shape) {
  const auto same = [&](const std::unique_ptr<DistributedAttention>& op) {
    const LayerShape& s = op->shape();
    return s.seq_len == shape.seq_len && s.ranks == shape.ranks && s.batch == shape.batch && s.heads == shape.heads &&
           s.kv_heads == shape.kv_heads && s.head_dim == shape.head_dim && s.dtype == shape.dtype &&
           s.causal == shape.causal;
  };
  const auto it = std::find_if(operators_.begin(), operators_.end(), same);
  if (it != operators_.end()) return **it;
  operators_.push_back(std::make_unique<DistributedAttention>(session_, shape, options_));
  return *operators_.back();
}

// The operator's buffers, whole, in its storage dtype: q|k|v packed back to back (packed_views), their
// gradients over them (the operator writes them in place), o and d_o; the LSE in fp32. And fp32 buffers for one chunk of rows: the
// projections' q|k|v (or their gradients), then o (or d_o).
namespace {

struct AttentionScratch {
  std::int64_t qkv, o, lse, chunk;  // elements
};

AttentionScratch attention_scratch(const ModelConfig& c, const Geometry& g) {
  const std::int64_t rows = g.rows(), q = std::int64_t{c.heads} * c.head_dim;
  const std::int64_t kv = std::int64_t{c.kv_heads} * c.head_dim;
  return {rows * (q + 2 * kv), rows * q, rows * c.heads, std::min(rows, c.row_chunk) * (2 * q + 2 * kv)};
}

}  // namespace

std::int64_t SelfAttention::scratch_floats(const ModelConfig& c, const Geometry& g, DType storage) {
  const AttentionScratch a = attention_scratch(c, g);
  return floats_for(a.qkv, storage) + 2 * floats_for(a.o, storage) + a.lse + a.chunk;
}

SelfAttention::SelfAttention(const Session& session, ParameterTable& table, Scratch& scratch,
                             AttentionOperators& operators, const std::string& prefix, const ModelConfig& c,
                             const Geometry& g)
    : proj_(table, prefix, c), geom_(g), storage_(attention_dtype(session.device())),
      chunk_(std::max<std::int64_t>(1, std::min(g.rows(), c.row_chunk))) {
  const LayerShape shape = attention_shape(c, g, session.size(), storage_);
  attention_ = &operators.get(shape);
  if (c.attention.uses_surrogates()) {
    surrogate_shape_ = surrogate_shape(shape, c.attention);
    const auto [kv_heads, clusters, head_dim] = surrogate_shape_;
    surrogates_ = table.add(prefix + "surrogates", kv_heads * clusters, head_dim, false, Init::kFanIn);
  }
  const AttentionScratch a = attention_scratch(c, g);
  scratch.reserve("attn.qkv", floats_for(a.qkv, storage_));
  for (const char* key : {"attn.o", "attn.d_o"}) scratch.reserve(key, floats_for(a.o, storage_));
  scratch.reserve("attn.lse", a.lse);
  scratch.reserve("attn.chunk", a.chunk);
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

// Rows [r0, r0 + m) of a [rows, width] matrix of the storage dtype: a pointer offset in bytes.
void* SelfAttention::storage_rows(void* base, std::int64_t r0, std::int64_t width) const {
  return element_at(base, storage_, r0 * width);
}

// Q, K, V are projected into fp32 (the chunk scratch) and stored in the operator's dtype.
void SelfAttention::project(const RunContext& rc, std::int64_t r0, std::int64_t m, const float* xn) const {
  const std::int64_t qd = proj_.q_width(), kd = proj_.kv_width();
  const auto [q, k, v] = packed_views(rc.scratch.get("attn.qkv"), storage_, geom_, proj_, rc.session.device());
  float* qc = rc.scratch.get("attn.chunk");
  float *kc = qc + m * qd, *vc = kc + m * kd;
  proj_.project_rows(rc, geom_, r0, m, xn, qc, kc, vc);
  convert(qc, DType::kF32, storage_rows(q.data, r0, qd), storage_, m * qd, rc.exec);
  convert(kc, DType::kF32, storage_rows(k.data, r0, kd), storage_, m * kd, rc.exec);
  convert(vc, DType::kF32, storage_rows(v.data, r0, kd), storage_, m * kd, rc.exec);
}

void SelfAttention::attend(const RunContext& rc) {
  const Device& dev = rc.session.device();
  const Scratch& s = rc.scratch;
  const auto [q, k, v] = packed_views(s.get("attn.qkv"), storage_, geom_, proj_, dev);
  attention_->forward({q, k, v, heads_view(s.get("attn.o"), storage_, geom_, proj_.heads, proj_.head_dim, dev),
                       TensorView::contiguous(s.get("attn.lse"), DType::kF32, {geom_.batch, proj_.heads, geom_.local_len},
                                              dev),
                       surrogates(rc)});
}

// O is read back into fp32 (the chunk scratch) for W_o, whose product adds straight into y.
void SelfAttention::add_output(const RunContext& rc, std::int64_t r0, std::int64_t m, float* y) const {
  const std::int64_t qd = proj_.q_width();
  float* oc = rc.scratch.get("attn.chunk");
  convert(storage_rows(rc.scratch.get("attn.o"), r0, qd), storage_, oc, DType::kF32, m * qd, rc.exec);
  kernels::linear_forward({m, static_cast<int>(qd), proj_.dim, oc, rc.p(proj_.wo), y, true, rc.compute}, rc.exec);
}

void SelfAttention::output_backward(const RunContext& rc, std::int64_t r0, std::int64_t m, const float* dy) const {
  const std::int64_t qd = proj_.q_width();
  float* oc = rc.scratch.get("attn.chunk");
  float* d_oc = oc + m * qd;
  convert(storage_rows(rc.scratch.get("attn.o"), r0, qd), storage_, oc, DType::kF32, m * qd, rc.exec);
  zero(d_oc, m * qd, rc);
  kernels::linear_backward(
      {m, static_cast<int>(qd), proj_.dim, oc, rc.p(proj_.wo), dy, d_oc, rc.g(proj_.wo), rc.compute}, rc.exec);
  convert(d_oc, DType::kF32, storage_rows(rc.scratch.get("attn.d_o"), r0, qd), storage_, m * qd, rc.exec);
}

// After attend() on the same rows: q|k|v, o and the LSE are the forward's.
void SelfAttention::attend_backward(const RunContext& rc) {
  const Device& dev = rc.session.device();
  const Scratch& s = rc.scratch;
  const int h = proj_.heads, d = proj_.head_dim;
  const auto [q, k, v] = packed_views(s.get("attn.qkv"), storage_, geom_, proj_, dev);
  const auto [d_q, d_k, d_v] = packed_views(s.get("attn.qkv"), storage_, geom_, proj_, dev);  // over q, k, v
  attention_->backward({q, k, v, heads_view(s.get("attn.o"), storage_, geom_, h, d, dev),
                        TensorView::contiguous(s.get("attn.lse"), DType::kF32, {geom_.batch, h, geom_.local_len}, dev),
                        heads_view(s.get("attn.d_o"), storage_, geom_, h, d, dev), d_q, d_k, d_v, surrogates(rc),
                        d_surrogates(rc)});
}

void SelfAttention::project_backward(const RunContext& rc, std::int64_t r0, std::int64_t m, const float* xn,
                                     float* d_xn) const {
  const std::int64_t qd = proj_.q_width(), kd = proj_.kv_width();
  const auto [d_q, d_k, d_v] = packed_views(rc.scratch.get("attn.qkv"), storage_, geom_, proj_, rc.session.device());
  float* d_qc = rc.scratch.get("attn.chunk");
  float *d_kc = d_qc + m * qd, *d_vc = d_kc + m * kd;
  convert(storage_rows(d_q.data, r0, qd), storage_, d_qc, DType::kF32, m * qd, rc.exec);
  convert(storage_rows(d_k.data, r0, kd), storage_, d_kc, DType::kF32, m * kd, rc.exec);
  convert(storage_rows(d_v.data, r0, kd), storage_, d_vc, DType::kF32, m * kd, rc.exec);
  proj_.project_rows_backward(rc, geom_, r0, m, xn, d_qc, d_kc, d_vc, d_xn);
}

std::int64_t SwiGluFfn::scratch_floats(int hidden, std::int64_t max_rows, std::int64_t chunk_rows) {
  return 6 * std::min(max_rows, chunk_rows) * hidden;
}

SwiGluFfn::SwiGluFfn(ParameterTable& table, Scratch& scratch, const std::string& prefix, const std::string& scratch_key,
                     int dim, int hidden, std::int64_t max_rows, std::int64_t chunk_rows)
    : dim_(dim),
      hidden_(hidden),
      max_rows_(max_rows),
      chunk_(std::max<std::int64_t>(1, std::min(max_rows, chunk_rows))),
      key_(scratch_key) {
  RINGCAST_CHECK(chunk_rows > 0, "SwiGluFfn: chunk_rows ({}) must be positive", chunk_rows);
  w1_ = table.add(prefix + "w1", hidden, dim, true, Init::kFanIn);
  w3_ = table.add(prefix + "w3", hidden, dim, true, Init::kFanIn);
  w2_ = table.add(prefix + "w2", dim, hidden, true, Init::kFanIn);
  scratch.reserve(key_, scratch_floats(hidden, max_rows, chunk_rows));
}

// The six [chunk, F] matrices a, b, h, d_a, d_b, d_h, back to back in one scratch buffer.
std::array<float*, 6> SwiGluFfn::chunk_buffers(const RunContext& rc) const {
  float* base = rc.scratch.get(key_);
  const std::int64_t size = chunk_ * hidden_;
  return {base, base + size, base + 2 * size, base + 3 * size, base + 4 * size, base + 5 * size};
}

void SwiGluFfn::forward_rows(const RunContext& rc, std::int64_t rows, const float* x, float* y) {
  RINGCAST_CHECK(rows <= max_rows_, "SwiGluFfn: {} rows, at most {} reserved", rows, max_rows_);
  const auto [a, b, h, d_a, d_b, d_h] = chunk_buffers(rc);
  for (std::int64_t r0 = 0; r0 < rows; r0 += chunk_) {
    const std::int64_t m = std::min(chunk_, rows - r0);
    const float* xc = x + r0 * dim_;
    kernels::linear_forward({m, dim_, hidden_, xc, rc.p(w1_), a, false, rc.compute}, rc.exec);
    kernels::linear_forward({m, dim_, hidden_, xc, rc.p(w3_), b, false, rc.compute}, rc.exec);
    kernels::swiglu_forward({m * hidden_, a, b, h}, rc.exec);
    kernels::linear_forward({m, hidden_, dim_, h, rc.p(w2_), y + r0 * dim_, true, rc.compute}, rc.exec);
  }
}

// Chunks run last to first: the last one's a, b, h are still in scratch from the forward (the Mixer
// contract), the others are recomputed. With more than one chunk the weight gradients sum over rows
// in another order than one product would (equal up to fp32 rounding).
void SwiGluFfn::backward_rows(const RunContext& rc, std::int64_t rows, const float* x, const float* dy, float* dx) {
  RINGCAST_CHECK(rows <= max_rows_, "SwiGluFfn: {} rows, at most {} reserved", rows, max_rows_);
  const auto [a, b, h, d_a, d_b, d_h] = chunk_buffers(rc);
  if (rows == 0) return;
  const std::int64_t last = (rows - 1) / chunk_ * chunk_;
  for (std::int64_t r0 = last; r0 >= 0; r0 -= chunk_) {
    const std::int64_t m = std::min(chunk_, rows - r0), count = m * hidden_;
    const float *xc = x + r0 * dim_, *dyc = dy + r0 * dim_;
    float* dxc = dx + r0 * dim_;
    if (r0 != last) {
      kernels::linear_forward({m, dim_, hidden_, xc, rc.p(w1_), a, false, rc.compute}, rc.exec);
      kernels::linear_forward({m, dim_, hidden_, xc, rc.p(w3_), b, false, rc.compute}, rc.exec);
      kernels::swiglu_forward({count, a, b, h}, rc.exec);
    }
    zero(d_h, count, rc);
    kernels::linear_backward({m, hidden_, dim_, h, rc.p(w2_), dyc, d_h, rc.g(w2_), rc.compute}, rc.exec);
    zero(d_a, count, rc);
    zero(d_b, count, rc);
    kernels::swiglu_backward({count, a, b, d_h, d_a, d_b}, rc.exec);
    kernels::linear_backward({m, dim_, hidden_, xc, rc.p(w1_), d_a, dxc, rc.g(w1_), rc.compute}, rc.exec);
    kernels::linear_backward({m, dim_, hidden_, xc, rc.p(w3_), d_b, dxc, rc.g(w3_), rc.compute}, rc.exec);
  }
}

std::int64_t StandardBlock::scratch_floats(const ModelConfig& c, const Geometry& g) {
  return RowChunks::floats(chunk_rows(g.rows(), c.row_chunk), c.dim);
}

StandardBlock::StandardBlock(const Session& session, ParameterTable& table, Scratch& scratch,
                             AttentionOperators& operators, const std::string& prefix, const ModelConfig& c,
                             Geometry geometry)
    : dim_(c.dim),
      eps_(c.norm_eps),
      geom_(std::move(geometry)),
      stored_(attention_dtype(session.device())),
      chunk_(chunk_rows(geom_.rows(), c.row_chunk)),
      attn_norm_(table.add(prefix + "attn_norm", 1, c.dim, false, Init::kOnes)),
      ffn_norm_(table.add(prefix + "ffn_norm", 1, c.dim, false, Init::kOnes)),
      ffn_(table, scratch, prefix, "ffn", c.dim, c.ffn_hidden, geom_.rows(), c.row_chunk),
      attention_(session, table, scratch, operators, prefix, c, geom_) {
  RINGCAST_CHECK(attention_.chunk_rows() == chunk_, "StandardBlock: the attention's row chunk ({}) is not the block's ({})",
                 attention_.chunk_rows(), chunk_);
  RowChunks::reserve(scratch, chunk_, dim_);
}

void RowChunks::reserve(Scratch& scratch, std::int64_t chunk_rows, int dim) {
  for (const char* key : {"rows.x", "rows.normed", "rows.d_normed"}) scratch.reserve(key, chunk_rows * dim);
}

RowChunks RowChunks::get(const Scratch& scratch) {
  return {scratch.get("rows.x"), scratch.get("rows.normed"), scratch.get("rows.d_normed")};
}

void StandardBlock::load_rows(const RunContext& rc, const void* in, std::int64_t r0, std::int64_t m, float* x) const {
  convert(element_at(in, stored_, r0 * dim_), stored_, x, DType::kF32, m * dim_, rc.exec);
}

void StandardBlock::attend(const RunContext& rc, const void* in) {
  const RowChunks b = RowChunks::get(rc.scratch);
  for (std::int64_t r0 = 0; r0 < geom_.rows(); r0 += chunk_) {
    const std::int64_t m = std::min(chunk_, geom_.rows() - r0);
    load_rows(rc, in, r0, m, b.x);
    kernels::rms_norm_forward({m, dim_, eps_, b.x, rc.p(attn_norm_), b.normed}, rc.exec);
    attention_.project(rc, r0, m, b.normed);
  }
  attention_.attend(rc);
}

// out = y + F(rms(y)), y = in + A(rms(in)), chunk by chunk once the operator has run.
void StandardBlock::forward(const RunContext& rc, const void* in, void* out) {
  attend(rc, in);
  const RowChunks b = RowChunks::get(rc.scratch);
  for (std::int64_t r0 = 0; r0 < geom_.rows(); r0 += chunk_) {
    const std::int64_t m = std::min(chunk_, geom_.rows() - r0);
    float* y = b.x;
    load_rows(rc, in, r0, m, y);
    attention_.add_output(rc, r0, m, y);
    kernels::rms_norm_forward({m, dim_, eps_, y, rc.p(ffn_norm_), b.normed}, rc.exec);
    ffn_.forward_rows(rc, m, b.normed, y);
    convert(y, DType::kF32, element_at(out, stored_, r0 * dim_), stored_, m * dim_, rc.exec);
  }
}

// Recomputes the forward chunk by chunk (y, the FFN's a, b, h) right before differentiating it: the
// FFN and W_o per chunk, the operator, then the projections per chunk. A chunk's dL/dout is read (as
// the FFN's dy) before dL/dy is added into d_in, so d_in may be d_out.
void StandardBlock::backward(const RunContext& rc, const void* in, const float* d_out, float* d_in) {
  attend(rc, in);
  const RowChunks b = RowChunks::get(rc.scratch);
  const std::int64_t rows = geom_.rows();
  for (std::int64_t r0 = 0; r0 < rows; r0 += chunk_) {
    const std::int64_t m = std::min(chunk_, rows - r0), count = m * dim_;
    const float* d_out_c = d_out + r0 * dim_;
    float* d_in_c = d_in + r0 * dim_;
    float* y = b.x;
    load_rows(rc, in, r0, m, y);
    attention_.add_output(rc, r0, m, y);
    kernels::rms_norm_forward({m, dim_, eps_, y, rc.p(ffn_norm_), b.normed}, rc.exec);
    ffn_.forward_rows(rc, m, b.normed, b.d_normed);  // leaves the chunk's a, b, h for backward_rows
    if (d_in != d_out) convert(d_out_c, DType::kF32, d_in_c, DType::kF32, count, rc.exec);
    zero(b.d_normed, count, rc);
    ffn_.backward_rows(rc, m, b.normed, d_out_c, b.d_normed);
    kernels::rms_norm_backward({m, dim_, eps_, y, rc.p(ffn_norm_), b.d_normed, d_in_c, rc.g(ffn_norm_)}, rc.exec);
    // d_in_c now holds dL/dy.
    attention_.output_backward(rc, r0, m, d_in_c);
  }
  attention_.attend_backward(rc);
  for (std::int64_t r0 = 0; r0 < rows; r0 += chunk_) {
    const std::int64_t m = std::min(chunk_, rows - r0), count = m * dim_;
    load_rows(rc, in, r0, m, b.x);
    kernels::rms_norm_forward({m, dim_, eps_, b.x, rc.p(attn_norm_), b.normed}, rc.exec);
    zero(b.d_normed, count, rc);
    attention_.project_backward(rc, r0, m, b.normed, b.d_normed);
    kernels::rms_norm_backward(
        {m, dim_, eps_, b.x, rc.p(attn_norm_), b.d_normed, d_in + r0 * dim_, rc.g(attn_norm_)}, rc.exec);
  }
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
  convert(in, DType::kF32, out, DType::kF32, count, rc.exec);
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
  convert(in, DType::kF32, mid, DType::kF32, count, rc.exec);
  attention_->forward(rc, xn_a, mid);
  kernels::rms_norm_forward({rows, dim_, eps_, mid, rc.p(ffn_norm_), xn_f}, rc.exec);
  ffn_->forward(rc, xn_f, d_in);

  convert(d_out, DType::kF32, d_in, DType::kF32, count, rc.exec);
  zero(d_xn, count, rc);
  ffn_->backward(rc, xn_f, d_out, d_xn);
  kernels::rms_norm_backward({rows, dim_, eps_, mid, rc.p(ffn_norm_), d_xn, d_in, rc.g(ffn_norm_)}, rc.exec);
  // d_in now holds dL/dy.
  zero(d_xn, count, rc);
  attention_->backward(rc, xn_a, d_in, d_xn);
  kernels::rms_norm_backward({rows, dim_, eps_, in, rc.p(attn_norm_), d_xn, d_in, rc.g(attn_norm_)}, rc.exec);
}

}  // namespace ringcast::model
