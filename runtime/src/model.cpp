// The decoder-only model: parameters in one flat host buffer (decayed tensors, then norm gains), the
// pre-norm blocks built from the per-token kernels (kernels/layers.hpp) around DistributedAttention,
// per-layer recomputation, the one gradient all-reduce and the AdamW step. Activations are [R, ·]
// token matrices with R = batch · n_loc rows in positions() order; every backward kernel adds into
// its outputs, so each gradient scratch is zeroed right before the calls that fill it.
#include <ringcast/attention.hpp>
#include <ringcast/error.hpp>
#include <ringcast/kernels/layers.hpp>
#include <ringcast/memory.hpp>
#include <ringcast/model.hpp>

#include <algorithm>
#include <cmath>

namespace ringcast {
namespace {

// splitmix64: a counter-based generator, so each tensor's values depend only on (seed, tensor index)
// and are the same on every rank and every platform.
std::uint64_t splitmix64(std::uint64_t& state) {
  std::uint64_t z = (state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// Uniform in [-bound, bound).
void fill_uniform(std::span<float> x, float bound, std::uint64_t seed) {
  std::uint64_t state = seed;
  for (float& v : x) {
    const double u = static_cast<double>(splitmix64(state) >> 11) * 0x1.0p-53;  // [0, 1)
    v = static_cast<float>((2.0 * u - 1.0) * bound);
  }
}

// A host buffer of `count` floats through DeviceBuffer, so peak-memory accounting sees it.
struct HostFloats {
  DeviceBuffer buf;
  std::int64_t count = 0;
  HostFloats() = default;
  HostFloats(std::int64_t n, const Device& device) : buf(static_cast<std::size_t>(n) * sizeof(float), device), count(n) {}
  float* data() const { return buf.as<float>(); }
  std::span<float> span() const { return {data(), static_cast<std::size_t>(count)}; }
  void zero() const { std::fill_n(data(), count, 0.0f); }
};

}  // namespace

struct Model::State {
  const Session& session;
  const ModelConfig config;
  const SequenceShape seq;
  const kernels::ExecContext ctx;
  LayerShape attn_shape;
  std::unique_ptr<DistributedAttention> attention;

  std::vector<ParameterInfo> table;
  std::int64_t decayed = 0;  // the decayed tensors are elements [0, decayed) of the flat buffers
  HostFloats params, grads, adam_m, adam_v;
  std::int64_t steps = 0;
  double grad_norm = 0.0;
  double loss = 0.0;
  TargetCounts targets;
  bool have_gradients = false;

  // One layer's tensors: their offsets in the flat buffers, or pointers into params or grads.
  template <typename T> struct LayerTensors {
    T attn_norm, wq, wk, wv, wo, ffn_norm, w1, w3, w2;
  };
  struct Index {
    std::int64_t embedding = 0, final_norm = 0, lm_head = 0;
    std::vector<LayerTensors<std::int64_t>> layers;
  } index;

  // Activations: layer inputs [L + 1][R, D] (the last is the final hidden state) and one layer's
  // recomputed intermediates, shared by all layers.
  std::int64_t rows = 0;
  HostFloats layer_in, xn, q, k, v, o, lse, mid, a, b, hh, final_norm_out;
  HostFloats d_x, d_xn, d_q, d_k, d_v, d_o, d_a, d_b, d_hh;

  State(const Session& s, const ModelConfig& c, const SequenceShape& sh)
      : session(s), config(c), seq(sh), ctx{s.device(), s.stream()} {}

  LayerTensors<float*> layer(const HostFloats& flat, int l) const {
    const auto& o = index.layers[static_cast<std::size_t>(l)];
    float* p = flat.data();
    return {p + o.attn_norm, p + o.wq, p + o.wk, p + o.wv, p + o.wo, p + o.ffn_norm, p + o.w1, p + o.w3, p + o.w2};
  }

  const ParameterInfo& find(std::string_view name) const {
    for (const auto& t : table)
      if (t.name == name) return t;
    RINGCAST_THROW("Model: no parameter named '{}'", name);
  }

  void build_table();
  void init_parameters();
  void embed(const std::int32_t* tokens);
  void layer_forward(int l, const float* in, float* out);
  void layer_backward(int l, const float* in);
};

void Model::State::build_table() {
  const ModelConfig& c = config;
  const std::int64_t D = c.dim, qd = std::int64_t{c.heads} * c.head_dim, kd = std::int64_t{c.kv_heads} * c.head_dim;
  const std::int64_t F = c.ffn_hidden;
  std::int64_t offset = 0;
  auto add = [&](std::string name, std::int64_t out_dim, std::int64_t in_dim, bool decay) {
    table.push_back({std::move(name), offset, out_dim, in_dim, decay});
    offset += out_dim * in_dim;
    return table.back().offset;
  };
  // Decayed tensors first, so each AdamW call covers one contiguous range.
  index.embedding = add("embedding", c.vocab, D, true);
  index.layers.resize(static_cast<std::size_t>(c.layers));
  for (int l = 0; l < c.layers; ++l) {
    auto& off = index.layers[static_cast<std::size_t>(l)];
    const std::string p = fmt::format("layers.{}.", l);
    off.wq = add(p + "wq", qd, D, true);
    off.wk = add(p + "wk", kd, D, true);
    off.wv = add(p + "wv", kd, D, true);
    off.wo = add(p + "wo", D, qd, true);
    off.w1 = add(p + "w1", F, D, true);
    off.w3 = add(p + "w3", F, D, true);
    off.w2 = add(p + "w2", D, F, true);
  }
  index.lm_head = add("lm_head", c.vocab, D, true);
  decayed = offset;
  for (int l = 0; l < c.layers; ++l) {
    auto& off = index.layers[static_cast<std::size_t>(l)];
    off.attn_norm = add(fmt::format("layers.{}.attn_norm", l), 1, D, false);
    off.ffn_norm = add(fmt::format("layers.{}.ffn_norm", l), 1, D, false);
  }
  index.final_norm = add("final_norm", 1, D, false);
}

void Model::State::init_parameters() {
  // Linear weights U(±1/sqrt(fan_in)) (PyTorch's Linear default), embedding U(±1), norm gains 1.
  for (std::size_t t = 0; t < table.size(); ++t) {
    const ParameterInfo& info = table[t];
    std::span<float> x = params.span().subspan(static_cast<std::size_t>(info.offset), static_cast<std::size_t>(info.numel()));
    if (!info.decay) {
      std::fill(x.begin(), x.end(), 1.0f);
      continue;
    }
    const float bound = info.name == "embedding" ? 1.0f : 1.0f / std::sqrt(static_cast<float>(info.cols));
    fill_uniform(x, bound, config.seed * 0x100000001B3ull + t);
  }
}

void Model::State::embed(const std::int32_t* tokens) {
  kernels::embedding_forward({rows, config.dim, config.vocab, tokens, params.data() + index.embedding, layer_in.data()},
                             ctx);
}

// out = in + Wo·Attn(RoPE(Wq·rms(in)), RoPE(Wk·rms(in)), Wv·rms(in)); out += W2·(silu(W1·rms(out)) ⊙ W3·rms(out)).
// Leaves every intermediate the backward needs in the shared scratch (mid holds the first residual sum);
// out == nullptr (the recompute in backward) skips the W2 product, which nothing downstream reads.
void Model::State::layer_forward(int l, const float* in, float* out) {
  const ModelConfig& c = config;
  const auto w = layer(params, l);
  const int D = c.dim, qd = c.heads * c.head_dim, kd = c.kv_heads * c.head_dim;
  const std::int64_t n = attn_shape.local_len();
  const std::int32_t* pos = attention->positions().data();

  kernels::rms_norm_forward({rows, D, c.norm_eps, in, w.attn_norm, xn.data()}, ctx);
  kernels::linear_forward({rows, D, qd, xn.data(), w.wq, q.data()}, ctx);
  kernels::linear_forward({rows, D, kd, xn.data(), w.wk, k.data()}, ctx);
  kernels::linear_forward({rows, D, kd, xn.data(), w.wv, v.data()}, ctx);
  // Rows are [B][n_loc]: each batch element's rows carry the same positions.
  for (int bi = 0; bi < seq.batch; ++bi) {
    kernels::rope_forward({n, c.heads, c.head_dim, c.rope_theta, pos, q.data() + bi * n * qd}, ctx);
    kernels::rope_forward({n, c.kv_heads, c.head_dim, c.rope_theta, pos, k.data() + bi * n * kd}, ctx);
  }
  auto view = [&](const HostFloats& x, int heads) {
    return TensorView::contiguous(x.data(), DType::kF32, {seq.batch, n, heads, c.head_dim}, session.device());
  };
  attention->forward({view(q, c.heads), view(k, c.kv_heads), view(v, c.kv_heads), view(o, c.heads),
                      TensorView::contiguous(lse.data(), DType::kF32, {seq.batch, c.heads, n}, session.device())});
  std::copy_n(in, rows * D, mid.data());
  kernels::linear_forward({rows, qd, D, o.data(), w.wo, mid.data(), true}, ctx);

  kernels::rms_norm_forward({rows, D, c.norm_eps, mid.data(), w.ffn_norm, xn.data()}, ctx);
  kernels::linear_forward({rows, D, c.ffn_hidden, xn.data(), w.w1, a.data()}, ctx);
  kernels::linear_forward({rows, D, c.ffn_hidden, xn.data(), w.w3, b.data()}, ctx);
  kernels::swiglu_forward({rows * c.ffn_hidden, a.data(), b.data(), hh.data()}, ctx);
  if (out == nullptr) return;
  std::copy_n(mid.data(), rows * D, out);
  kernels::linear_forward({rows, c.ffn_hidden, D, hh.data(), w.w2, out, true}, ctx);
}

// With d_x = dL/d(out) on entry, recomputes the layer from `in` and leaves dL/d(in) in d_x (the
// residual paths are the adds into d_x), adding the layer's parameter gradients into grads.
void Model::State::layer_backward(int l, const float* in) {
  const ModelConfig& c = config;
  layer_forward(l, in, nullptr);
  const auto w = layer(params, l), g = layer(grads, l);
  const int D = c.dim, F = c.ffn_hidden, qd = c.heads * c.head_dim, kd = c.kv_heads * c.head_dim;
  const std::int64_t n = attn_shape.local_len();
  const std::int32_t* pos = attention->positions().data();

  // FFN branch. xn holds rms(mid) from the recompute.
  d_hh.zero();
  kernels::linear_backward({rows, F, D, hh.data(), w.w2, d_x.data(), d_hh.data(), g.w2}, ctx);
  d_a.zero();
  d_b.zero();
  kernels::swiglu_backward({rows * F, a.data(), b.data(), d_hh.data(), d_a.data(), d_b.data()}, ctx);
  d_xn.zero();
  kernels::linear_backward({rows, D, F, xn.data(), w.w1, d_a.data(), d_xn.data(), g.w1}, ctx);
  kernels::linear_backward({rows, D, F, xn.data(), w.w3, d_b.data(), d_xn.data(), g.w3}, ctx);
  kernels::rms_norm_backward({rows, D, c.norm_eps, mid.data(), w.ffn_norm, d_xn.data(), d_x.data(), g.ffn_norm}, ctx);

  // Attention branch; d_x now holds dL/d(mid). xn is overwritten with rms(in) again.
  kernels::rms_norm_forward({rows, D, c.norm_eps, in, w.attn_norm, xn.data()}, ctx);
  d_o.zero();
  kernels::linear_backward({rows, qd, D, o.data(), w.wo, d_x.data(), d_o.data(), g.wo}, ctx);
  auto view = [&](const HostFloats& x, int heads) {
    return TensorView::contiguous(x.data(), DType::kF32, {seq.batch, n, heads, c.head_dim}, session.device());
  };
  attention->backward({view(q, c.heads), view(k, c.kv_heads), view(v, c.kv_heads), view(o, c.heads),
                       TensorView::contiguous(lse.data(), DType::kF32, {seq.batch, c.heads, n}, session.device()),
                       view(d_o, c.heads), view(d_q, c.heads), view(d_k, c.kv_heads), view(d_v, c.kv_heads)});
  for (int bi = 0; bi < seq.batch; ++bi) {
    kernels::rope_backward({n, c.heads, c.head_dim, c.rope_theta, pos, d_q.data() + bi * n * qd}, ctx);
    kernels::rope_backward({n, c.kv_heads, c.head_dim, c.rope_theta, pos, d_k.data() + bi * n * kd}, ctx);
  }
  d_xn.zero();
  kernels::linear_backward({rows, D, qd, xn.data(), w.wq, d_q.data(), d_xn.data(), g.wq}, ctx);
  kernels::linear_backward({rows, D, kd, xn.data(), w.wk, d_k.data(), d_xn.data(), g.wk}, ctx);
  kernels::linear_backward({rows, D, kd, xn.data(), w.wv, d_v.data(), d_xn.data(), g.wv}, ctx);
  kernels::rms_norm_backward({rows, D, c.norm_eps, in, w.attn_norm, d_xn.data(), d_x.data(), g.attn_norm}, ctx);
}

Model::Model(const Session& session, const ModelConfig& config, const SequenceShape& shape)
    : state_(std::make_unique<State>(session, config, shape)) {
  State& s = *state_;
  const ModelConfig& c = config;
  RINGCAST_CHECK(session.device().kind == DeviceKind::kCpu,
                 "Model: only the CPU backend is implemented (the per-token layer kernels are host code)");
  RINGCAST_CHECK(c.vocab > 0 && c.dim > 0 && c.layers > 0 && c.ffn_hidden > 0 && c.ce_chunk > 0,
                 "Model: vocab ({}), dim ({}), layers ({}), ffn_hidden ({}) and ce_chunk ({}) must be positive",
                 c.vocab, c.dim, c.layers, c.ffn_hidden, c.ce_chunk);
  RINGCAST_CHECK(shape.batch > 0 && shape.seq_len > 0, "Model: batch ({}) and seq_len ({}) must be positive",
                 shape.batch, shape.seq_len);
  s.attn_shape.seq_len = shape.seq_len;
  s.attn_shape.ranks = session.size();
  s.attn_shape.batch = shape.batch;
  s.attn_shape.heads = c.heads;
  s.attn_shape.kv_heads = c.kv_heads;
  s.attn_shape.head_dim = c.head_dim;
  s.attn_shape.dtype = DType::kF32;
  s.attn_shape.causal = true;
  s.attention = std::make_unique<DistributedAttention>(session, s.attn_shape, c.attention);

  s.build_table();
  const Device dev = session.device();
  const std::int64_t total = s.table.back().offset + s.table.back().numel();
  s.params = HostFloats(total, dev);
  s.grads = HostFloats(total, dev);
  s.adam_m = HostFloats(total, dev);
  s.adam_v = HostFloats(total, dev);
  s.grads.zero();
  s.adam_m.zero();
  s.adam_v.zero();
  s.init_parameters();

  const std::int64_t R = s.rows = std::int64_t{shape.batch} * s.attn_shape.local_len();
  const std::int64_t D = c.dim, F = c.ffn_hidden;
  const std::int64_t qd = std::int64_t{c.heads} * c.head_dim, kd = std::int64_t{c.kv_heads} * c.head_dim;
  s.layer_in = HostFloats((c.layers + 1) * R * D, dev);
  for (HostFloats* x : {&s.xn, &s.mid, &s.final_norm_out, &s.d_x, &s.d_xn}) *x = HostFloats(R * D, dev);
  for (HostFloats* x : {&s.q, &s.o, &s.d_q, &s.d_o}) *x = HostFloats(R * qd, dev);
  for (HostFloats* x : {&s.k, &s.v, &s.d_k, &s.d_v}) *x = HostFloats(R * kd, dev);
  for (HostFloats* x : {&s.a, &s.b, &s.hh, &s.d_a, &s.d_b, &s.d_hh}) *x = HostFloats(R * F, dev);
  s.lse = HostFloats(R * c.heads, dev);
}

Model::~Model() = default;

const ModelConfig& Model::config() const { return state_->config; }
std::span<const std::int32_t> Model::positions() const { return state_->attention->positions(); }
std::int64_t Model::local_len() const { return state_->attn_shape.local_len(); }
std::int64_t Model::steps_taken() const { return state_->steps; }
double Model::last_grad_norm() const { return state_->grad_norm; }
TargetCounts Model::last_targets() const { return state_->targets; }
std::int64_t Model::num_parameters() const { return state_->params.count; }
std::span<const ParameterInfo> Model::parameter_table() const { return state_->table; }
std::span<float> Model::parameters() { return state_->params.span(); }
std::span<float> Model::gradients() { return state_->grads.span(); }

std::span<float> Model::parameter(std::string_view name) {
  const ParameterInfo& t = state_->find(name);
  return parameters().subspan(static_cast<std::size_t>(t.offset), static_cast<std::size_t>(t.numel()));
}

std::span<float> Model::gradient(std::string_view name) {
  const ParameterInfo& t = state_->find(name);
  return gradients().subspan(static_cast<std::size_t>(t.offset), static_cast<std::size_t>(t.numel()));
}

double Model::forward_backward(std::span<const std::int32_t> tokens, std::span<const std::int32_t> targets) {
  State& s = *state_;
  const ModelConfig& c = s.config;
  const std::int64_t R = s.rows, D = c.dim;
  RINGCAST_CHECK(static_cast<std::int64_t>(tokens.size()) == R && static_cast<std::int64_t>(targets.size()) == R,
                 "Model::forward_backward: tokens ({}) and targets ({}) must hold batch * local_len = {} ids",
                 tokens.size(), targets.size(), R);
  s.have_gradients = false;

  // One all-reduce agrees on the target count (for the mean) and on whether any rank got an id out
  // of range, so a bad batch fails on every rank before the first collective of the pass.
  std::int64_t meta[2] = {0, 0};
  for (std::int64_t i = 0; i < R; ++i) {
    meta[0] += targets[i] >= 0;
    meta[1] += tokens[i] < 0 || tokens[i] >= c.vocab || targets[i] >= c.vocab;
  }
  auto& comm = s.session.comm();
  comm.all_reduce({meta, 2, DType::kI64}, {meta, 2, DType::kI64}, comm::ReduceOp::kSum);
  RINGCAST_CHECK(meta[1] == 0, "Model::forward_backward: {} token or target ids outside [0, {}) (targets may be < 0)",
                 meta[1], c.vocab);
  RINGCAST_CHECK(meta[0] > 0, "Model::forward_backward: no targets >= 0 on any rank");

  s.embed(tokens.data());
  for (int l = 0; l < c.layers; ++l)
    s.layer_forward(l, s.layer_in.data() + l * R * D, s.layer_in.data() + (l + 1) * R * D);

  s.grads.zero();
  const float* hidden = s.layer_in.data() + c.layers * R * D;
  const float* final_g = s.params.data() + s.index.final_norm;
  kernels::rms_norm_forward({R, c.dim, c.norm_eps, hidden, final_g, s.final_norm_out.data()}, s.ctx);
  kernels::CrossEntropyTotals totals;
  kernels::LinearCrossEntropyParams ce;
  ce.rows = R;
  ce.dim = c.dim;
  ce.vocab = c.vocab;
  ce.chunk_rows = c.ce_chunk;
  ce.loss_scale = static_cast<float>(1.0 / static_cast<double>(meta[0]));
  ce.h = s.final_norm_out.data();
  ce.w = s.params.data() + s.index.lm_head;
  ce.targets = targets.data();
  ce.totals = &totals;
  s.d_xn.zero();
  ce.d_h = s.d_xn.data();
  ce.d_w = s.grads.data() + s.index.lm_head;
  kernels::linear_cross_entropy(ce, s.ctx);
  // The correct count rides along in the loss sum's all-reduce (exact in a double up to 2^53).
  double sums[2] = {totals.loss_sum, static_cast<double>(totals.correct)};
  comm.all_reduce({sums, 2, DType::kF64}, {sums, 2, DType::kF64}, comm::ReduceOp::kSum);
  s.loss = sums[0] / static_cast<double>(meta[0]);
  s.targets = {meta[0], static_cast<std::int64_t>(sums[1])};
  // A non-finite loss (the same on every rank) has no gradient worth computing: step() refuses it.
  if (!std::isfinite(s.loss)) {
    s.have_gradients = true;
    return s.loss;
  }
  s.d_x.zero();
  kernels::rms_norm_backward({R, c.dim, c.norm_eps, hidden, final_g, s.d_xn.data(), s.d_x.data(),
                              s.grads.data() + s.index.final_norm},
                             s.ctx);

  for (int l = c.layers - 1; l >= 0; --l) s.layer_backward(l, s.layer_in.data() + l * R * D);
  kernels::embedding_backward({R, c.dim, c.vocab, tokens.data(), s.d_x.data(), s.grads.data() + s.index.embedding},
                              s.ctx);

  // Parameters are replicated: one bucketed sum makes every rank's gradient the global one.
  comm.all_reduce({s.grads.data(), static_cast<std::size_t>(s.grads.count), DType::kF32},
                  {s.grads.data(), static_cast<std::size_t>(s.grads.count), DType::kF32}, comm::ReduceOp::kSum);
  s.have_gradients = true;
  return s.loss;
}

void Model::step(const AdamWConfig& config) {
  State& s = *state_;
  const std::int64_t step = s.steps + 1;
  RINGCAST_CHECK(s.have_gradients, "Model::step {}: no gradients (call forward_backward first)", step);
  RINGCAST_CHECK(std::isfinite(s.loss), "Model::step {}: the loss is not finite ({})", step, s.loss);
  const std::int64_t total = s.grads.count;
  // The gradients are already global and identical on every rank, so is their norm: no all-reduce.
  double sum_sq = 0.0;
  kernels::sum_of_squares(total, s.grads.data(), &sum_sq, s.ctx);
  const double norm = std::sqrt(sum_sq);
  if (!std::isfinite(norm)) {
    for (const ParameterInfo& t : s.table) {
      std::int32_t found = 0;
      kernels::find_non_finite(t.numel(), s.grads.data() + t.offset, &found, s.ctx);
      RINGCAST_CHECK(!found, "Model::step {}: non-finite gradient in '{}'", step, t.name);
    }
    RINGCAST_THROW("Model::step {}: the gradient norm overflowed ({}) though every gradient is finite", step, norm);
  }
  s.grad_norm = norm;
  if (config.max_norm > 0 && norm > config.max_norm)
    kernels::scale_in_place(total, static_cast<float>(config.max_norm / norm), s.grads.data(), s.ctx);

  kernels::AdamWParams p;
  p.step = step;
  p.lr = config.lr;
  p.beta1 = config.beta1;
  p.beta2 = config.beta2;
  p.eps = config.eps;
  p.count = s.decayed;
  p.weight_decay = config.weight_decay;
  p.param = s.params.data();
  p.grad = s.grads.data();
  p.m = s.adam_m.data();
  p.v = s.adam_v.data();
  kernels::adamw_step(p, s.ctx);
  p.count = total - s.decayed;
  p.weight_decay = 0.0f;
  p.param += s.decayed;
  p.grad += s.decayed;
  p.m += s.decayed;
  p.v += s.decayed;
  kernels::adamw_step(p, s.ctx);
  s.steps = step;
  s.have_gradients = false;
}

}  // namespace ringcast
