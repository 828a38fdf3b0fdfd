// ringcast::Model: assembles the stack of model_parts.hpp layers from the ModelConfig (pre-norm
// blocks with standard or CoLT5 branches, VCC blocks, Pyramidion pooling stages), runs the embedding,
// the layers, the final norm and the head (LM: chunked cross-entropy over every rank's rows; encoder:
// mean pooling over the whole sequence and a classification head), the one gradient all-reduce and the
// AdamW step. Layer inputs are the only activations kept; every layer recomputes itself in backward.
#include "checkpoint.hpp"
#include "colt5.hpp"
#include "model_mixers.hpp"
#include "model_parts.hpp"
#include "pyramidion.hpp"
#include "vcc.hpp"

#include <ringcast/error.hpp>
#include <ringcast/kernels/layers.hpp>
#include <ringcast/kernels/layout.hpp>
#include <ringcast/model.hpp>

#include <algorithm>
#include <cmath>

namespace ringcast {
namespace {

using model::Geometry;
using model::Init;
using model::Layer;
using model::ParamRef;

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
  HostFloats(std::int64_t n, const Device& device)
      : buf(static_cast<std::size_t>(std::max<std::int64_t>(n, 1)) * sizeof(float), device), count(n) {}
  float* data() const { return buf.as<float>(); }
  std::span<float> span() const { return {data(), static_cast<std::size_t>(count)}; }
  void zero() const { std::fill_n(data(), count, 0.0f); }
};

void validate_config(const ModelConfig& c, const SequenceShape& shape) {
  RINGCAST_CHECK(c.vocab > 0 && c.dim > 0 && c.layers > 0 && c.ffn_hidden > 0 && c.ce_chunk > 0,
                 "Model: vocab ({}), dim ({}), layers ({}), ffn_hidden ({}) and ce_chunk ({}) must be positive",
                 c.vocab, c.dim, c.layers, c.ffn_hidden, c.ce_chunk);
  RINGCAST_CHECK(shape.batch > 0 && shape.seq_len > 0, "Model: batch ({}) and seq_len ({}) must be positive",
                 shape.batch, shape.seq_len);
  const bool encoder = c.kind == ModelKind::kEncoder;
  RINGCAST_CHECK(!encoder || c.num_classes > 0, "Model: an encoder needs num_classes > 0 (got {})", c.num_classes);
  RINGCAST_CHECK(encoder || c.num_classes == 0, "Model: num_classes ({}) is for encoders; a decoder has an LM head",
                 c.num_classes);
  const bool seed_options = c.colt5.enabled || c.vcc.enabled || !c.pyramidion.pool_after.empty();
  RINGCAST_CHECK(encoder || !seed_options,
                 "Model: CoLT5, Pyramidion and VCC are encoder (bidirectional) options; set the model kind to encoder");
  RINGCAST_CHECK(c.pyramidion.pool_after.size() == c.pyramidion.pool_to.size(),
                 "Model: pyramidion pool_after ({} entries) and pool_to ({} entries) must pair up",
                 c.pyramidion.pool_after.size(), c.pyramidion.pool_to.size());
  for (std::size_t j = 0; j < c.pyramidion.pool_after.size(); ++j) {
    const int after = c.pyramidion.pool_after[j];
    RINGCAST_CHECK(after >= 0 && after < c.layers - 1 && (j == 0 || after > c.pyramidion.pool_after[j - 1]),
                   "Model: pyramidion pool_after must list increasing layers in [0, {}) (pooling after the last layer "
                   "has no layer to serve); got {}", c.layers - 1, after);
  }
  // Pooled sequences are contiguous per rank (pyramidion.hpp): later layers must place rows so too.
  RINGCAST_CHECK(c.pyramidion.pool_after.empty() || c.attention.placement != Placement::kZigzag,
                 "Model: Pyramidion pooling needs contiguous placement (the pooled sequence is contiguous per rank)");
}

}  // namespace

struct Model::State {
  const Session& session;
  const ModelConfig config;
  const SequenceShape seq;
  const kernels::ExecContext ctx;
  const bool encoder;

  model::ParameterTable table;
  model::Scratch scratch;
  ParamRef embedding, final_norm, head_w, head_b;
  std::vector<std::unique_ptr<Layer>> layers;
  Geometry input;  // the embedding's rows

  HostFloats params, grads, adam_m, adam_v, head_sink;
  std::int64_t steps = 0;
  double grad_norm = 0.0;
  double loss = 0.0;
  TargetCounts targets;
  bool have_forward = false, have_gradients = false;

  // Layer inputs: layer l reads activations + in_offset[l]; the final hidden state sits at
  // in_offset[L]. d_a, d_b ping-pong the residual-stream gradient between layers.
  std::vector<std::int64_t> in_offset;
  HostFloats activations, final_out, d_final, d_a, d_b, pooled, d_pooled;
  std::vector<std::int32_t> tokens;  // of the latest forward, for the embedding backward

  State(const Session& s, const ModelConfig& c, const SequenceShape& sh)
      : session(s), config(c), seq(sh), ctx{s.device(), s.stream()}, encoder(c.kind == ModelKind::kEncoder) {}

  const Geometry& output() const { return layers.back()->out_geometry(); }
  model::RunContext run_context(bool training) {
    return {session, ctx, table, params.data(), grads.data(), scratch, static_cast<std::uint64_t>(steps), training};
  }

  void build();
  void init_parameters();
  void forward_layers(const model::RunContext& rc, std::span<const std::int32_t> ids);
  double head(std::span<const std::int32_t> targets, bool with_gradient);
  void check_ids(std::span<const std::int32_t> ids, std::span<const std::int32_t> targets);
};

void Model::State::build() {
  const ModelConfig& c = config;
  input.batch = seq.batch;
  input.seq_len = seq.seq_len;
  input.causal = !encoder;
  const LayerShape shape = model::attention_shape(c, input, session.size());
  validate(shape, c.attention);
  input.local_len = shape.local_len();
  input.positions = shard_positions(shape, c.attention, session.rank());

  embedding = table.add("embedding", c.vocab, c.dim, true, Init::kUnit);
  const Geometry* g = &input;
  for (int l = 0; l < c.layers; ++l) {
    const std::string prefix = fmt::format("layers.{}.", l);
    if (c.vcc.enabled && l >= c.vcc.first_layer) {
      layers.push_back(std::make_unique<model::VccBlock>(session, table, scratch, prefix, c, *g));
    } else {
      auto block = std::make_unique<model::PreNormBlock>(table, scratch, prefix, c, *g);
      const Geometry& bg = block->in_geometry();
      if (c.colt5.enabled)
        block->set_branches(std::make_unique<model::Colt5Attention>(session, table, scratch, prefix, c, bg),
                            std::make_unique<model::Colt5Ffn>(session, table, scratch, prefix, c, bg));
      else
        block->set_branches(std::make_unique<model::SelfAttention>(session, table, scratch, prefix, c, bg),
                            std::make_unique<model::SwiGluFfn>(table, scratch, prefix, "ffn", c.dim, c.ffn_hidden,
                                                               bg.rows()));
      layers.push_back(std::move(block));
    }
    g = &layers.back()->out_geometry();
    // Pyramidion: pooling stages after the layers the config names.
    for (std::size_t j = 0; j < c.pyramidion.pool_after.size(); ++j)
      if (c.pyramidion.pool_after[j] == l) {
        layers.push_back(std::make_unique<model::PyramidionPool>(session, table, scratch, fmt::format("pool.{}.", l), c,
                                                                 *g, c.pyramidion.pool_to[j]));
        g = &layers.back()->out_geometry();
      }
  }
  final_norm = table.add("final_norm", 1, c.dim, false, Init::kOnes);
  if (encoder) {
    head_w = table.add("classifier", c.num_classes, c.dim, true, Init::kFanIn);
    head_b = table.add("classifier_bias", 1, c.num_classes, false, Init::kZeros);
  } else {
    head_w = table.add("lm_head", c.vocab, c.dim, true, Init::kFanIn);
  }
  table.finalize();
  scratch.bind(session.device());
}

void Model::State::init_parameters() {
  for (std::size_t t = 0; t < table.infos().size(); ++t) {
    const ParameterInfo& info = table.infos()[t];
    std::span<float> x = params.span().subspan(static_cast<std::size_t>(info.offset), static_cast<std::size_t>(info.numel()));
    switch (table.init(t)) {
      case Init::kOnes: std::fill(x.begin(), x.end(), 1.0f); break;
      case Init::kZeros: std::fill(x.begin(), x.end(), 0.0f); break;
      case Init::kUnit: fill_uniform(x, 1.0f, config.seed * 0x100000001B3ull + t); break;
      case Init::kFanIn:
        fill_uniform(x, 1.0f / std::sqrt(static_cast<float>(info.cols)), config.seed * 0x100000001B3ull + t);
        break;
    }
  }
}

// One all-reduce agrees on the target count and on whether any rank got an id out of range (or, for
// an encoder, labels that differ between ranks), so a bad batch fails on every rank before any layer.
void Model::State::check_ids(std::span<const std::int32_t> ids, std::span<const std::int32_t> labels) {
  const ModelConfig& c = config;
  const std::int64_t R = input.rows();
  const std::int64_t want = encoder ? seq.batch : R;
  RINGCAST_CHECK(static_cast<std::int64_t>(ids.size()) == R && static_cast<std::int64_t>(labels.size()) == want,
                 "Model: tokens ({}) must hold batch * local_len = {} ids and targets ({}) {} ids", ids.size(), R,
                 labels.size(), want);
  std::int64_t meta[4] = {0, 0, 0, 0};  // counted targets, bad ids, Σ labels, -Σ labels
  for (const std::int32_t t : ids) meta[1] += t < 0 || t >= c.vocab;
  const int classes = encoder ? c.num_classes : c.vocab;
  for (const std::int32_t t : labels) {
    meta[0] += t >= 0;
    meta[1] += t >= classes || (encoder && t < 0);
    meta[2] += t;
  }
  meta[3] = -meta[2];
  std::int64_t sums[2] = {meta[0], meta[1]}, extremes[2] = {meta[2], meta[3]};
  auto& comm = session.comm();
  comm.all_reduce({sums, 2, DType::kI64}, {sums, 2, DType::kI64}, comm::ReduceOp::kSum);
  comm.all_reduce({extremes, 2, DType::kI64}, {extremes, 2, DType::kI64}, comm::ReduceOp::kMax);
  if (encoder)
    RINGCAST_CHECK(sums[1] == 0, "Model: {} token ids outside [0, {}) or class labels outside [0, {})", sums[1],
                   c.vocab, c.num_classes);
  else
    RINGCAST_CHECK(sums[1] == 0, "Model: {} token or target ids outside [0, {}) (targets may be < 0)", sums[1], c.vocab);
  RINGCAST_CHECK(!encoder || extremes[0] == -extremes[1], "Model: the class labels differ between ranks");
  RINGCAST_CHECK(sums[0] > 0, "Model: no targets >= 0 on any rank");
  targets.count = encoder ? seq.batch : sums[0];
}

void Model::State::forward_layers(const model::RunContext& rc, std::span<const std::int32_t> ids) {
  const int D = config.dim;
  kernels::embedding_forward({input.rows(), D, config.vocab, ids.data(), params.data() + table.info(embedding).offset,
                              activations.data() + in_offset[0]},
                             ctx);
  for (std::size_t l = 0; l < layers.size(); ++l)
    layers[l]->forward(rc, activations.data() + in_offset[l], activations.data() + in_offset[l + 1]);
}

// The final norm and the head on the output of the last layer: sets loss and targets, and with
// with_gradient adds the head's parameter gradients into grads and leaves dL/d(hidden) in d_final.
double Model::State::head(std::span<const std::int32_t> labels, bool with_gradient) {
  const ModelConfig& c = config;
  const Geometry& out = output();
  const std::int64_t R = out.rows();
  const float* hidden = activations.data() + in_offset[layers.size()];
  const float* gain = params.data() + table.info(final_norm).offset;
  kernels::rms_norm_forward({R, c.dim, c.norm_eps, hidden, gain, final_out.data()}, ctx);
  auto& comm = session.comm();
  kernels::CrossEntropyTotals totals;
  kernels::LinearCrossEntropyParams ce;
  ce.dim = c.dim;
  ce.chunk_rows = c.ce_chunk;
  ce.w = params.data() + table.info(head_w).offset;
  ce.targets = labels.data();
  ce.totals = &totals;
  ce.loss_scale = static_cast<float>(1.0 / static_cast<double>(targets.count));
  if (!encoder) {
    ce.rows = R;
    ce.vocab = c.vocab;
    ce.h = final_out.data();
    if (with_gradient) {
      d_pooled.zero();  // d_pooled doubles as dL/d(final_out) of the decoder
      ce.d_h = d_pooled.data();
      ce.d_w = grads.data() + table.info(head_w).offset;
    }
    kernels::linear_cross_entropy(ce, ctx);
    // The correct count rides along in the loss sum's all-reduce (exact in a double up to 2^53).
    double sums[2] = {totals.loss_sum, static_cast<double>(totals.correct)};
    comm.all_reduce({sums, 2, DType::kF64}, {sums, 2, DType::kF64}, comm::ReduceOp::kSum);
    loss = sums[0] / static_cast<double>(targets.count);
    targets.correct = static_cast<std::int64_t>(sums[1]);
  } else {
    // Mean over the whole sequence: local sums scaled by 1/n, then summed over ranks.
    const float scale = static_cast<float>(1.0 / static_cast<double>(out.seq_len));
    kernels::token_pool_forward({out.batch, out.local_len, c.dim, scale, final_out.data(), pooled.data()}, ctx);
    comm.all_reduce({pooled.data(), static_cast<std::size_t>(pooled.count), DType::kF32},
                    {pooled.data(), static_cast<std::size_t>(pooled.count), DType::kF32}, comm::ReduceOp::kSum);
    ce.rows = out.batch;
    ce.vocab = c.num_classes;
    ce.h = pooled.data();
    ce.bias = params.data() + table.info(head_b).offset;
    // The head runs replicated: rank 0 alone adds its parameter gradients, so the all-reduce counts
    // them once; every rank needs d_pooled.
    if (with_gradient) {
      d_pooled.zero();
      head_sink.zero();
      const bool mine = session.rank() == 0;
      ce.d_h = d_pooled.data();
      ce.d_w = mine ? grads.data() + table.info(head_w).offset : head_sink.data();
      ce.d_bias = mine ? grads.data() + table.info(head_b).offset : head_sink.data() + table.info(head_w).numel();
    }
    kernels::linear_cross_entropy(ce, ctx);
    loss = totals.loss_sum / static_cast<double>(targets.count);
    targets.correct = totals.correct;
  }
  if (!with_gradient || !std::isfinite(loss)) return loss;
  const float* d_out = d_pooled.data();
  if (encoder) {
    d_final.zero();
    const float scale = static_cast<float>(1.0 / static_cast<double>(out.seq_len));
    kernels::token_pool_backward({out.batch, out.local_len, c.dim, scale, d_pooled.data(), d_final.data()}, ctx);
    d_out = d_final.data();
  }
  float* d_hidden = d_a.data();
  std::fill_n(d_hidden, R * c.dim, 0.0f);
  kernels::rms_norm_backward({R, c.dim, c.norm_eps, hidden, gain, d_out, d_hidden, grads.data() + table.info(final_norm).offset},
                             ctx);
  return loss;
}

Model::Model(const Session& session, const ModelConfig& config, const SequenceShape& shape)
    : state_(std::make_unique<State>(session, config, shape)) {
  State& s = *state_;
  RINGCAST_CHECK(session.device().kind == DeviceKind::kCpu,
                 "Model: only the CPU backend is implemented (the per-token layer kernels are host code)");
  validate_config(config, shape);
  s.build();
  const Device dev = session.device();
  const std::int64_t total = s.table.total();
  s.params = HostFloats(total, dev);
  s.grads = HostFloats(total, dev);
  s.adam_m = HostFloats(total, dev);
  s.adam_v = HostFloats(total, dev);
  s.grads.zero();
  s.adam_m.zero();
  s.adam_v.zero();
  s.init_parameters();

  const std::int64_t D = config.dim;
  std::int64_t offset = 0, max_rows = s.input.rows();
  for (const auto& layer : s.layers) {
    s.in_offset.push_back(offset);
    offset += layer->in_geometry().rows() * D;
    max_rows = std::max(max_rows, layer->in_geometry().rows());
  }
  s.in_offset.push_back(offset);
  offset += s.output().rows() * D;
  s.activations = HostFloats(offset, dev);
  const std::int64_t out_rows = s.output().rows();
  s.final_out = HostFloats(out_rows * D, dev);
  s.d_a = HostFloats(max_rows * D, dev);
  s.d_b = HostFloats(max_rows * D, dev);
  if (s.encoder) {
    s.d_final = HostFloats(out_rows * D, dev);
    s.pooled = HostFloats(shape.batch * D, dev);
    s.d_pooled = HostFloats(shape.batch * D, dev);
    s.head_sink = HostFloats(s.table.info(s.head_w).numel() + config.num_classes, dev);
  } else {
    s.d_pooled = HostFloats(out_rows * D, dev);
  }
}

Model::~Model() = default;

const ModelConfig& Model::config() const { return state_->config; }
std::span<const std::int32_t> Model::positions() const { return state_->input.positions; }
std::int64_t Model::local_len() const { return state_->input.local_len; }
std::int64_t Model::target_count() const {
  return state_->encoder ? state_->seq.batch : state_->input.rows();
}
std::int64_t Model::steps_taken() const { return state_->steps; }
double Model::last_grad_norm() const { return state_->grad_norm; }
TargetCounts Model::last_targets() const { return state_->targets; }
std::int64_t Model::num_parameters() const { return state_->params.count; }
std::span<const ParameterInfo> Model::parameter_table() const { return state_->table.infos(); }
std::span<float> Model::parameters() { return state_->params.span(); }
std::span<float> Model::gradients() { return state_->grads.span(); }

std::span<float> Model::parameter(std::string_view name) {
  const ParameterInfo& t = state_->table.find(name);
  return parameters().subspan(static_cast<std::size_t>(t.offset), static_cast<std::size_t>(t.numel()));
}

std::span<float> Model::gradient(std::string_view name) {
  const ParameterInfo& t = state_->table.find(name);
  return gradients().subspan(static_cast<std::size_t>(t.offset), static_cast<std::size_t>(t.numel()));
}

double Model::forward(std::span<const std::int32_t> tokens, std::span<const std::int32_t> targets) {
  State& s = *state_;
  s.have_forward = s.have_gradients = false;
  s.check_ids(tokens, targets);
  s.tokens.assign(tokens.begin(), tokens.end());
  const model::RunContext rc = s.run_context(true);
  s.forward_layers(rc, tokens);
  s.grads.zero();
  s.head(targets, true);
  s.have_forward = true;
  return s.loss;
}

double Model::evaluate(std::span<const std::int32_t> tokens, std::span<const std::int32_t> targets) {
  State& s = *state_;
  s.have_forward = s.have_gradients = false;
  s.check_ids(tokens, targets);
  const model::RunContext rc = s.run_context(false);
  s.forward_layers(rc, tokens);
  return s.head(targets, false);
}

void Model::backward() {
  State& s = *state_;
  RINGCAST_CHECK(s.have_forward, "Model::backward: no training forward() to differentiate");
  s.have_forward = false;
  const ModelConfig& c = s.config;
  // A non-finite loss (the same on every rank) has no gradient worth computing: step() refuses it.
  if (std::isfinite(s.loss)) {
    const model::RunContext rc = s.run_context(true);
    float *d_out = s.d_a.data(), *d_in = s.d_b.data();
    for (std::size_t l = s.layers.size(); l-- > 0;) {
      s.layers[l]->backward(rc, s.activations.data() + s.in_offset[l], d_out, d_in);
      std::swap(d_out, d_in);
    }
    kernels::embedding_backward({s.input.rows(), c.dim, c.vocab, s.tokens.data(), d_out,
                                 s.grads.data() + s.table.info(s.embedding).offset},
                                s.ctx);
    // Parameters are replicated: one bucketed sum makes every rank's gradient the global one.
    auto& comm = s.session.comm();
    comm.all_reduce({s.grads.data(), static_cast<std::size_t>(s.grads.count), DType::kF32},
                    {s.grads.data(), static_cast<std::size_t>(s.grads.count), DType::kF32}, comm::ReduceOp::kSum);
  }
  s.have_gradients = true;
}

void Model::step(const AdamWConfig& config) {
  State& s = *state_;
  const std::int64_t step = s.steps + 1;
  RINGCAST_CHECK(s.have_gradients, "Model::step {}: no gradients (call forward and backward first)", step);
  RINGCAST_CHECK(std::isfinite(s.loss), "Model::step {}: the loss is not finite ({})", step, s.loss);
  const std::int64_t total = s.grads.count;
  // The gradients are already global and identical on every rank, so is their norm: no all-reduce.
  double sum_sq = 0.0;
  kernels::sum_of_squares(total, s.grads.data(), &sum_sq, s.ctx);
  const double norm = std::sqrt(sum_sq);
  if (!std::isfinite(norm)) {
    for (const ParameterInfo& t : s.table.infos()) {
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
  p.count = s.table.decayed();
  p.weight_decay = config.weight_decay;
  p.param = s.params.data();
  p.grad = s.grads.data();
  p.m = s.adam_m.data();
  p.v = s.adam_v.data();
  kernels::adamw_step(p, s.ctx);
  const std::int64_t decayed = s.table.decayed();
  p.count = total - decayed;
  p.weight_decay = 0.0f;
  p.param += decayed;
  p.grad += decayed;
  p.m += decayed;
  p.v += decayed;
  kernels::adamw_step(p, s.ctx);
  s.steps = step;
  s.have_gradients = false;
}

void Model::save(const std::string& path, std::span<const std::byte> user_state) const {
  const State& s = *state_;
  model::CheckpointData data;
  data.fingerprint = model::fingerprint(s.config, s.table);
  data.steps = s.steps;
  data.params = s.params.span();
  data.adam_m = s.adam_m.span();
  data.adam_v = s.adam_v.span();
  data.user_state = user_state;
  model::save_checkpoint(s.session, path, data);
}

std::vector<std::byte> Model::load(const std::string& path) {
  State& s = *state_;
  model::LoadedCheckpoint loaded =
      model::load_checkpoint(s.session, path, model::fingerprint(s.config, s.table), s.params.count);
  std::copy(loaded.params.begin(), loaded.params.end(), s.params.data());
  std::copy(loaded.adam_m.begin(), loaded.adam_m.end(), s.adam_m.data());
  std::copy(loaded.adam_v.begin(), loaded.adam_v.end(), s.adam_v.data());
  s.steps = loaded.steps;
  s.have_forward = s.have_gradients = false;
  return std::move(loaded.user_state);
}

}  // namespace ringcast
