// ringcast::Model: assembles the stack of model_parts.hpp layers from the ModelConfig (standard
// blocks; through Fp32Layer, pre-norm blocks with CoLT5 branches, VCC blocks, Pyramidion pooling
// stages), runs the embedding, the layers, the final norm and the head (LM: chunked cross-entropy over
// every rank's rows; encoder: mean pooling over the whole sequence and a classification head), the
// bucketed gradient all-reduce beside the backward (grad_buckets.hpp) and the AdamW step. Layer inputs
// (model::attention_dtype) are the only activations kept; every layer recomputes itself in backward.
// Every buffer lives in the memory of the session's device, and so do the communicator's buffers:
// host memory and MPI on the CPU; device memory, NCCL and the session's stream on CUDA. The host
// touches that memory only through synchronous copies: ids in, parameters at initialisation and load,
// the few scalars a call returns or decides on (Scalars) out, checkpoints out.
#include "checkpoint.hpp"
#include "colt5.hpp"
#include "grad_buckets.hpp"
#include "model_mixers.hpp"
#include "model_parts.hpp"
#include "overlap.hpp"
#include "pyramidion.hpp"
#include "vcc.hpp"

#include <ringcast/error.hpp>
#include <ringcast/kernels/layers.hpp>
#include <ringcast/kernels/layout.hpp>
#include <ringcast/log.hpp>
#include <ringcast/memory.hpp>
#include <ringcast/model.hpp>
#include <ringcast/plan.hpp>

#include <algorithm>
#include <cmath>
#include <type_traits>

namespace ringcast {
namespace {

using model::Geometry;
using model::Init;
using model::Layer;
using model::StackLayer;
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

// `count` floats in the memory of the session's device, through DeviceBuffer so that peak-memory
// accounting sees them.
struct Floats {
  DeviceBuffer buf;
  std::int64_t count = 0;
  Floats() = default;
  Floats(std::int64_t n, const Device& device)
      : buf(static_cast<std::size_t>(std::max<std::int64_t>(n, 1)) * sizeof(float), device), count(n) {}
  float* data() const { return buf.as<float>(); }
  std::span<float> span() const { return {data(), static_cast<std::size_t>(count)}; }
  std::size_t bytes() const { return static_cast<std::size_t>(count) * sizeof(float); }
  void zero(const kernels::ExecContext& ctx) const { kernels::fill_zero(data(), bytes(), ctx); }
};

// What a call reduces over ranks or reads back, in the kernels' memory: one allocation, one
// synchronous copy back. Written by the kernels (totals, sum_sq) or uploaded (the id checks).
struct Scalars {
  kernels::CrossEntropyTotals totals;
  double sum_sq = 0.0;
  std::int64_t id_counts[2] = {0, 0};   // counted targets, ids out of range; summed over ranks
  // Σ labels and -Σ labels, maxed over ranks: the two maxima cancel iff every rank has the same Σ.
  std::int64_t label_sums[2] = {0, 0};
};
static_assert(std::is_trivially_copyable_v<Scalars>);

// ModelConfig::compute_dtype for the session's backend (model.hpp).
DType resolve_compute_dtype(const ModelConfig& c, const Device& device) {
  const bool cuda = device.kind == DeviceKind::kCuda;
  const DType t = c.compute_dtype.value_or(cuda ? DType::kBF16 : DType::kF32);
  RINGCAST_CHECK(t == DType::kF32 || (cuda && t == DType::kBF16),
                 "Model: compute_dtype {} is not supported on the {} backend (CPU: f32; CUDA: bf16 or f32)",
                 dtype_name(t), cuda ? "CUDA" : "CPU");
  return t;
}

void validate_config(const ModelConfig& c, const SequenceShape& shape) {
  RINGCAST_CHECK(c.vocab > 0 && c.dim > 0 && c.layers > 0 && c.ffn_hidden > 0 && c.ce_chunk > 0 && c.row_chunk > 0,
                 "Model: vocab ({}), dim ({}), layers ({}), ffn_hidden ({}), ce_chunk ({}) and row_chunk ({}) must be "
                 "positive", c.vocab, c.dim, c.layers, c.ffn_hidden, c.ce_chunk, c.row_chunk);
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

// The model's own buffers besides the layers' scratch: layer inputs (elements of the activation
// dtype), the encoder head's and the residual stream's (floats; the LM head runs in RowChunks). The constructor allocates by it and
// estimate_memory() counts by it. layer_rows: each layer's input rows; out_rows: the last layer's
// output rows; head: the head weight's size; in_place: every layer's backward takes d_in == d_out, so
// one residual-stream gradient buffer serves the whole backward (d_b is empty). The last layer's
// output, the final hidden state, has no slot of its own: it lives at the end of d_a (Model::State::
// hidden()), which is free from the embedding until the head turns it into the hidden state's gradient.
struct StackFloats {
  std::int64_t activations = 0, final_out = 0, d_a = 0, d_b = 0, d_final = 0, pooled = 0, d_pooled = 0,
               head_sink = 0;
  std::vector<std::int64_t> in_offset;  // layer l reads activations + in_offset[l]
};

StackFloats stack_floats(const ModelConfig& c, const SequenceShape& shape, std::span<const std::int64_t> layer_rows,
                         std::int64_t out_rows, std::int64_t head, bool in_place) {
  const std::int64_t D = c.dim;
  StackFloats f;
  std::int64_t max_rows = out_rows;
  for (const std::int64_t rows : layer_rows) {
    f.in_offset.push_back(f.activations);
    f.activations += rows * D;
    max_rows = std::max(max_rows, rows);
  }
  // d_a also stages the embedding's fp32 output in the forward, then holds the final hidden state at
  // its end (and the encoder's final norm output); final_out keeps the encoder's final norm input.
  f.d_a = max_rows * D;
  f.d_b = in_place ? 0 : max_rows * D;
  if (c.kind == ModelKind::kEncoder) {
    f.final_out = f.d_final = out_rows * D;
    f.pooled = f.d_pooled = std::int64_t{shape.batch} * D;
    f.head_sink = head + c.num_classes;
  }
  return f;
}

// How many row chunks the LM head runs `rows` rows in (the blocks' chunks: RowChunks).
std::int64_t head_chunks(const ModelConfig& c, std::int64_t rows) {
  const std::int64_t chunk = model::chunk_rows(rows, c.row_chunk);
  return (rows + chunk - 1) / chunk;
}

// The bytes of Floats(n) (never empty), and of n elements of `dtype` (the layer inputs).
std::int64_t float_bytes(std::int64_t n) { return std::max<std::int64_t>(n, 1) * std::int64_t{sizeof(float)}; }
std::int64_t element_bytes(std::int64_t n, DType dtype) {
  return std::max<std::int64_t>(n, 1) * static_cast<std::int64_t>(dtype_size(dtype));
}

}  // namespace

struct Model::State {
  const Session& session;
  const ModelConfig config;
  const SequenceShape seq;
  const kernels::ExecContext ctx;
  const bool encoder;
  const DType compute;  // inputs of the matrix products
  const DType stored;   // the layer inputs (model::attention_dtype)

  model::ParameterTable table;
  model::Scratch scratch;
  model::AttentionOperators attention_ops;  // before the layers, which point into it
  ParamRef embedding, final_norm, head_w, head_b;
  std::vector<std::unique_ptr<StackLayer>> layers;
  std::vector<std::int32_t> first_param;  // layer l declared the tensors [first_param[l], first_param[l + 1])
  Geometry input;  // the embedding's rows

  Floats params, grads, adam_m, adam_v, head_sink;
  std::int64_t steps = 0;
  double grad_norm = 0.0;
  double loss = 0.0;
  TargetCounts targets;
  bool have_forward = false, have_gradients = false;

  // Layer inputs, `stored` elements: layer l reads layer_input(l); the final hidden state is
  // layer_input(L) = hidden(). The residual-stream gradient stays in d_a when every layer's backward
  // runs in place, else d_a and d_b ping-pong it between layers.
  std::vector<std::int64_t> in_offset;
  DeviceBuffer activations;
  Floats final_out, d_final, d_a, d_b, pooled, d_pooled;  // final_out..d_pooled: the encoder's head
  DeviceBuffer ce_totals;  // the LM head's loss totals, one per row chunk
  // The latest pass's ids: tokens [input.rows()] (kept for the embedding backward), then targets.
  DeviceBuffer ids;
  DeviceBuffer scalars_buf;  // one Scalars
  DeviceBuffer flags;        // one int32 per tensor: which gradients are not finite
  // The gradient buckets in the order they start, and the sums running beside the backward.
  std::vector<model::GradRegion> buckets;
  CommOverlap grad_sums;
  bool sums_in_flight = false;

  State(const Session& s, const ModelConfig& c, const SequenceShape& sh)
      : session(s),
        config(c),
        seq(sh),
        ctx{s.device(), s.stream()},
        encoder(c.kind == ModelKind::kEncoder),
        compute(resolve_compute_dtype(c, s.device())),
        stored(model::attention_dtype(s.device())),
        attention_ops(s, c.attention),
        grad_sums(s, s.grad_comm(), CallerComm::kBusy) {}

  const Geometry& output() const { return layers.back()->out_geometry(); }
  bool gradient_in_place() const {
    return std::all_of(layers.begin(), layers.end(), [](const auto& l) { return l->gradient_in_place(); });
  }
  void* layer_input(std::size_t l) const {
    if (l == layers.size()) return hidden();
    return activations.as<char>() + static_cast<std::size_t>(in_offset[l]) * dtype_size(stored);
  }
  // The final hidden state, `stored` elements at the end of d_a (at least as many fp32 rows). The head
  // reads each row before it writes that row's gradient, and a gradient row i (bytes [4 D i, 4 D (i +
  // 1)) of d_a) never reaches a hidden row j > i (which starts at byte 4 D R_a - e D R + e D j, R_a >= R
  // rows in d_a, element size e <= 4): the gradient replaces the hidden state as the head runs.
  void* hidden() const {
    const std::size_t bytes = static_cast<std::size_t>(output().rows() * config.dim) * dtype_size(stored);
    return d_a.buf.as<char>() + d_a.bytes() - bytes;
  }
  model::RunContext run_context(bool training) {
    return {session, ctx, table, params.data(), grads.data(), scratch, static_cast<std::uint64_t>(steps), training,
            compute};
  }
  const std::int32_t* token_ids() const { return ids.as<const std::int32_t>(); }
  const std::int32_t* target_ids() const { return ids.as<const std::int32_t>() + input.rows(); }
  Scalars* scalars() const { return scalars_buf.as<Scalars>(); }
  // Waits for the stream through the communicator (a failed or stuck collective raises instead of
  // hanging) and copies the scalars back.
  Scalars read_scalars() const;
  // A host view of x: x itself on the CPU, else a copy into `copy`.
  std::span<const float> host_view(const Floats& x, std::vector<float>& copy) const;

  void build();
  void plan_buckets();
  // Starts the sums of the buckets that are ready at backward point `point` (grad_buckets.hpp), from
  // buckets[next] on, behind those in flight (CUDA: queued on the comm stream; CPU: after them);
  // advances next.
  void start_sums(int point, std::size_t& next);
  void wait_sums();
  void init_parameters();
  void forward_layers(const model::RunContext& rc);
  double head(bool with_gradient);
  void load_ids(std::span<const std::int32_t> tokens, std::span<const std::int32_t> targets);
};

void Model::State::build() {
  const ModelConfig& c = config;
  input.batch = seq.batch;
  input.seq_len = seq.seq_len;
  input.causal = !encoder;
  const LayerShape shape = model::attention_shape(c, input, session.size(), model::attention_dtype(session.device()));
  validate(shape, c.attention);
  input.local_len = shape.local_len();
  input.positions = shard_positions(shape, c.attention, session.rank());
  input.bind_positions(session.device(), session.stream());  // before the blocks copy the geometry

  embedding = table.add("embedding", c.vocab, c.dim, true, Init::kUnit);
  const Geometry* g = &input;
  for (int l = 0; l < c.layers; ++l) {
    const std::string prefix = fmt::format("layers.{}.", l);
    // The seed-method layers are fp32 Layers, run through Fp32Layer.
    const auto add_fp32 = [&](std::unique_ptr<Layer> layer) {
      layers.push_back(std::make_unique<model::Fp32Layer>(std::move(layer), scratch, c.dim, stored));
    };
    first_param.push_back(table.declared());
    if (c.vcc.enabled && l >= c.vcc.first_layer) {
      add_fp32(std::make_unique<model::VccBlock>(session, table, scratch, prefix, c, *g));
    } else if (c.colt5.enabled) {
      auto block = std::make_unique<model::PreNormBlock>(table, scratch, prefix, c, *g);
      const Geometry& bg = block->in_geometry();
      block->set_branches(std::make_unique<model::Colt5Attention>(session, table, scratch, prefix, c, bg),
                          std::make_unique<model::Colt5Ffn>(session, table, scratch, prefix, c, bg));
      add_fp32(std::move(block));
    } else {
      layers.push_back(std::make_unique<model::StandardBlock>(session, table, scratch, attention_ops, prefix, c, *g));
    }
    g = &layers.back()->out_geometry();
    // Pyramidion: pooling stages after the layers the config names.
    for (std::size_t j = 0; j < c.pyramidion.pool_after.size(); ++j)
      if (c.pyramidion.pool_after[j] == l) {
        first_param.push_back(table.declared());
        add_fp32(std::make_unique<model::PyramidionPool>(session, table, scratch, fmt::format("pool.{}.", l), c, *g,
                                                         c.pyramidion.pool_to[j]));
        g = &layers.back()->out_geometry();
      }
  }
  first_param.push_back(table.declared());  // the end of the last layer's tensors
  final_norm = table.add("final_norm", 1, c.dim, false, Init::kOnes);
  if (encoder) {
    head_w = table.add("classifier", c.num_classes, c.dim, true, Init::kFanIn);
    head_b = table.add("classifier_bias", 1, c.num_classes, false, Init::kZeros);
  } else {
    head_w = table.add("lm_head", c.vocab, c.dim, true, Init::kFanIn);
  }
  if (!encoder) model::RowChunks::reserve(scratch, model::chunk_rows(output().rows(), c.row_chunk), c.dim);
  table.finalize();
  scratch.bind(session.device());
}

// When each gradient is final: the head's and the final norm's after forward() (point 0), a layer's
// once its backward ran (layers.size() - l), the embedding's at the end (layers.size() + 1). The
// parameters are not tied: no tensor gets gradient from two of these.
void Model::State::plan_buckets() {
  const int L = static_cast<int>(layers.size());
  std::vector<model::GradRegion> tensors;
  for (std::int32_t i = 0; i < table.declared(); ++i) {
    const ParameterInfo& t = table.info(ParamRef{i});
    int ready = 0;
    if (i == embedding.index) ready = L + 1;
    for (std::size_t l = 0; l < layers.size(); ++l)
      if (i >= first_param[l] && i < first_param[l + 1]) ready = L - static_cast<int>(l);
    tensors.push_back({t.offset, t.numel(), ready});
  }
  buckets = model::plan_grad_buckets(std::move(tensors), config.grad_bucket_bytes);
  log::debug("model: {} gradient bucket(s) of up to {} bytes, summed {}", buckets.size(), config.grad_bucket_bytes,
             grad_sums.concurrent() ? "beside the backward"
                                    : "inline at the same points (MPI gives less than MPI_THREAD_MULTIPLE)");
}

void Model::State::start_sums(int point, std::size_t& next) {
  const std::size_t first = next;
  while (next < buckets.size() && buckets[next].ready <= point) ++next;
  if (next == first) return;
  sums_in_flight = true;  // behind the buckets in flight (CommOverlap::start)
  grad_sums.start([this, first, last = next](Stream stream) {
    comm::Communicator& comm = session.grad_comm();
    for (std::size_t b = first; b < last; ++b) {
      const comm::Buffer region{grads.data() + buckets[b].offset, static_cast<std::size_t>(buckets[b].count),
                                DType::kF32};
      comm.all_reduce(region, region, comm::ReduceOp::kSum, stream);
    }
  });
}

void Model::State::wait_sums() {
  if (!sums_in_flight) return;
  sums_in_flight = false;
  grad_sums.wait();
}

Scalars Model::State::read_scalars() const {
  session.comm().synchronize(session.stream());
  Scalars h;
  copy_to_host(&h, scalars(), sizeof(Scalars), session.device(), session.stream());
  return h;
}

std::span<const float> Model::State::host_view(const Floats& x, std::vector<float>& copy) const {
  if (session.device().kind == DeviceKind::kCpu) return x.span();
  copy.resize(static_cast<std::size_t>(x.count));
  copy_to_host(copy.data(), x.data(), x.bytes(), session.device(), session.stream());
  return copy;
}

// On the host (the generator is host code), then one copy to the device on CUDA.
void Model::State::init_parameters() {
  const bool cpu = session.device().kind == DeviceKind::kCpu;
  std::vector<float> staging(cpu ? 0 : static_cast<std::size_t>(params.count));
  const std::span<float> all = cpu ? params.span() : std::span<float>(staging);
  for (std::size_t t = 0; t < table.infos().size(); ++t) {
    const ParameterInfo& info = table.infos()[t];
    std::span<float> x = all.subspan(static_cast<std::size_t>(info.offset), static_cast<std::size_t>(info.numel()));
    switch (table.init(t)) {
      case Init::kOnes: std::fill(x.begin(), x.end(), 1.0f); break;
      case Init::kZeros: std::fill(x.begin(), x.end(), 0.0f); break;
      case Init::kUnit: fill_uniform(x, 1.0f, config.seed * 0x100000001B3ull + t); break;
      case Init::kFanIn:
        fill_uniform(x, 1.0f / std::sqrt(static_cast<float>(info.cols)), config.seed * 0x100000001B3ull + t);
        break;
    }
  }
  if (!cpu) copy_from_host(params.data(), staging.data(), params.bytes(), session.device(), session.stream());
}

// One pair of all-reduces agrees on the target count and on whether any rank got an id out of range
// (or, for an encoder, labels that differ between ranks), so a bad batch fails on every rank before
// any layer; then the ids go to the device.
void Model::State::load_ids(std::span<const std::int32_t> tokens, std::span<const std::int32_t> labels) {
  const ModelConfig& c = config;
  const std::int64_t R = input.rows();
  const std::int64_t want = encoder ? seq.batch : R;
  RINGCAST_CHECK(static_cast<std::int64_t>(tokens.size()) == R && static_cast<std::int64_t>(labels.size()) == want,
                 "Model: tokens ({}) must hold batch * local_len = {} ids and targets ({}) {} ids", tokens.size(), R,
                 labels.size(), want);
  Scalars h;
  for (const std::int32_t t : tokens) h.id_counts[1] += t < 0 || t >= c.vocab;
  const int classes = encoder ? c.num_classes : c.vocab;
  for (const std::int32_t t : labels) {
    h.id_counts[0] += t >= 0;
    h.id_counts[1] += t >= classes || (encoder && t < 0);
    h.label_sums[0] += t;
  }
  h.label_sums[1] = -h.label_sums[0];
  Scalars* d = scalars();
  copy_from_host(d, &h, sizeof(Scalars), session.device(), session.stream());
  auto& comm = session.comm();
  comm.all_reduce({d->id_counts, 2, DType::kI64}, {d->id_counts, 2, DType::kI64}, comm::ReduceOp::kSum,
                  session.stream());
  comm.all_reduce({d->label_sums, 2, DType::kI64}, {d->label_sums, 2, DType::kI64}, comm::ReduceOp::kMax,
                  session.stream());
  h = read_scalars();
  if (encoder)
    RINGCAST_CHECK(h.id_counts[1] == 0, "Model: {} token ids outside [0, {}) or class labels outside [0, {})",
                   h.id_counts[1], c.vocab, c.num_classes);
  else
    RINGCAST_CHECK(h.id_counts[1] == 0, "Model: {} token or target ids outside [0, {}) (targets may be < 0)",
                   h.id_counts[1], c.vocab);
  RINGCAST_CHECK(!encoder || h.label_sums[0] == -h.label_sums[1], "Model: the class labels differ between ranks");
  RINGCAST_CHECK(h.id_counts[0] > 0, "Model: no targets >= 0 on any rank");
  targets.count = encoder ? seq.batch : h.id_counts[0];
  std::int32_t* dst = ids.as<std::int32_t>();
  copy_from_host(dst, tokens.data(), tokens.size_bytes(), session.device(), session.stream());
  copy_from_host(dst + R, labels.data(), labels.size_bytes(), session.device(), session.stream());
}

// The embedding runs in fp32 into d_a (free until the head), then is stored like every layer input.
void Model::State::forward_layers(const model::RunContext& rc) {
  const int D = config.dim;
  kernels::embedding_forward(
      {input.rows(), D, config.vocab, token_ids(), params.data() + table.info(embedding).offset, d_a.data()}, ctx);
  model::convert(d_a.data(), DType::kF32, layer_input(0), stored, input.rows() * D, ctx);
  for (std::size_t l = 0; l < layers.size(); ++l) layers[l]->forward(rc, layer_input(l), layer_input(l + 1));
}

// The final norm and the head on the output of the last layer: sets loss and targets, and with
// with_gradient adds the head's parameter gradients into grads and leaves dL/d(hidden) in d_a.
double Model::State::head(bool with_gradient) {
  const ModelConfig& c = config;
  const Geometry& out = output();
  const std::int64_t R = out.rows();
  const void* hidden = layer_input(layers.size());
  const float* gain = params.data() + table.info(final_norm).offset;
  float* d_gain = grads.data() + table.info(final_norm).offset;
  auto& comm = session.comm();
  const Stream stream = session.stream();
  Scalars* d = scalars();
  kernels::LinearCrossEntropyParams ce;
  ce.dim = c.dim;
  ce.chunk_rows = c.ce_chunk;
  ce.w = params.data() + table.info(head_w).offset;
  ce.loss_scale = static_cast<float>(1.0 / static_cast<double>(targets.count));
  ce.dtype = compute;
  if (!encoder) {
    // Token-wise: the final norm, the loss and their backward run over row chunks (the blocks' fp32
    // RowChunks), each chunk's totals to ce_totals, summed here in chunk order. The norm's backward
    // runs whatever the loss: backward() ignores d_a and step() refuses the gradients when it is not finite.
    const model::RowChunks b = model::RowChunks::get(scratch);
    const std::int64_t chunk = model::chunk_rows(R, c.row_chunk);
    auto* parts = ce_totals.as<kernels::CrossEntropyTotals>();
    ce.vocab = c.vocab;
    for (std::int64_t r0 = 0, i = 0; r0 < R; r0 += chunk, ++i) {
      const std::int64_t m = std::min(chunk, R - r0), count = m * c.dim;
      // The chunk's hidden rows are read, then their gradient rows are zeroed and written (hidden()).
      model::convert(model::element_at(hidden, stored, r0 * c.dim), stored, b.x, DType::kF32, count, ctx);
      if (with_gradient) kernels::fill_zero(d_a.data() + r0 * c.dim, static_cast<std::size_t>(count) * sizeof(float), ctx);
      kernels::rms_norm_forward({m, c.dim, c.norm_eps, b.x, gain, b.normed}, ctx);
      ce.rows = m;
      ce.h = b.normed;
      ce.targets = target_ids() + r0;
      ce.totals = parts + i;
      if (with_gradient) {
        kernels::fill_zero(b.d_normed, static_cast<std::size_t>(count) * sizeof(float), ctx);
        ce.d_h = b.d_normed;
        ce.d_w = grads.data() + table.info(head_w).offset;
      }
      kernels::linear_cross_entropy(ce, ctx);
      if (with_gradient)
        kernels::rms_norm_backward({m, c.dim, c.norm_eps, b.x, gain, b.d_normed, d_a.data() + r0 * c.dim, d_gain},
                                   ctx);
    }
    std::vector<kernels::CrossEntropyTotals> host(static_cast<std::size_t>(head_chunks(c, R)));
    comm.synchronize(stream);
    copy_to_host(host.data(), parts, host.size() * sizeof(kernels::CrossEntropyTotals), session.device(), stream);
    kernels::CrossEntropyTotals sum;
    for (const kernels::CrossEntropyTotals& t : host) {
      sum.loss_sum += t.loss_sum;
      sum.count += t.count;
      sum.correct += t.correct;
    }
    copy_from_host(&d->totals, &sum, sizeof(sum), session.device(), stream);
    comm.all_reduce({&d->totals.loss_sum, 1, DType::kF64}, {&d->totals.loss_sum, 1, DType::kF64},
                    comm::ReduceOp::kSum, stream);
    comm.all_reduce({&d->totals.correct, 1, DType::kI64}, {&d->totals.correct, 1, DType::kI64}, comm::ReduceOp::kSum,
                    stream);
  } else {
    // The final norm's input in fp32 stays in final_out for the backward; its output goes to d_a,
    // over the hidden state (read by then), until the backward writes the gradient there.
    model::convert(hidden, stored, final_out.data(), DType::kF32, R * c.dim, ctx);
    kernels::rms_norm_forward({R, c.dim, c.norm_eps, final_out.data(), gain, d_a.data()}, ctx);
    // Mean over the whole sequence: local sums scaled by 1/n, then summed over ranks.
    const float scale = static_cast<float>(1.0 / static_cast<double>(out.seq_len));
    kernels::token_pool_forward({out.batch, out.local_len, c.dim, scale, d_a.data(), pooled.data()}, ctx);
    comm.all_reduce({pooled.data(), static_cast<std::size_t>(pooled.count), DType::kF32},
                    {pooled.data(), static_cast<std::size_t>(pooled.count), DType::kF32}, comm::ReduceOp::kSum, stream);
    ce.rows = out.batch;
    ce.vocab = c.num_classes;
    ce.h = pooled.data();
    ce.bias = params.data() + table.info(head_b).offset;
    ce.targets = target_ids();
    ce.totals = &d->totals;
    // The head runs replicated: rank 0 alone adds its parameter gradients, so the all-reduce counts
    // them once; every rank needs d_pooled.
    if (with_gradient) {
      d_pooled.zero(ctx);
      head_sink.zero(ctx);
      const bool mine = session.rank() == 0;
      ce.d_h = d_pooled.data();
      ce.d_w = mine ? grads.data() + table.info(head_w).offset : head_sink.data();
      ce.d_bias = mine ? grads.data() + table.info(head_b).offset : head_sink.data() + table.info(head_w).numel();
    }
    kernels::linear_cross_entropy(ce, ctx);
  }
  const Scalars h = read_scalars();
  loss = h.totals.loss_sum / static_cast<double>(targets.count);
  targets.correct = h.totals.correct;
  if (!with_gradient || !std::isfinite(loss) || !encoder) return loss;
  d_final.zero(ctx);
  kernels::fill_zero(d_a.data(), static_cast<std::size_t>(R * c.dim) * sizeof(float), ctx);
  const float scale = static_cast<float>(1.0 / static_cast<double>(out.seq_len));
  kernels::token_pool_backward({out.batch, out.local_len, c.dim, scale, d_pooled.data(), d_final.data()}, ctx);
  kernels::rms_norm_backward({R, c.dim, c.norm_eps, final_out.data(), gain, d_final.data(), d_a.data(), d_gain}, ctx);
  return loss;
}

Model::Model(const Session& session, const ModelConfig& config, const SequenceShape& shape)
    : state_(std::make_unique<State>(session, config, shape)) {
  State& s = *state_;
  const Device dev = session.device();
  RINGCAST_CHECK(session.comm().memory() == dev.kind,
                 "Model: the {} communicator works on {} memory but the session's device is {}",
                 session.comm().backend_name(), session.comm().memory() == DeviceKind::kCpu ? "host" : "device",
                 dev.kind == DeviceKind::kCpu ? "the CPU" : "a CUDA device");
  validate_config(config, shape);
  s.build();
  s.plan_buckets();
  const std::int64_t total = s.table.total();
  s.params = Floats(total, dev);
  s.grads = Floats(total, dev);
  s.adam_m = Floats(total, dev);
  s.adam_v = Floats(total, dev);
  s.grads.zero(s.ctx);
  s.adam_m.zero(s.ctx);
  s.adam_v.zero(s.ctx);
  s.init_parameters();

  std::vector<std::int64_t> layer_rows;
  for (const auto& layer : s.layers) layer_rows.push_back(layer->in_geometry().rows());
  const StackFloats f = stack_floats(config, shape, layer_rows, s.output().rows(), s.table.info(s.head_w).numel(),
                                     s.gradient_in_place());
  s.in_offset = f.in_offset;
  s.activations = DeviceBuffer(static_cast<std::size_t>(element_bytes(f.activations, s.stored)), dev);
  s.d_a = Floats(f.d_a, dev);
  s.d_b = Floats(f.d_b, dev);
  if (s.encoder) {
    s.final_out = Floats(f.final_out, dev);
    s.d_final = Floats(f.d_final, dev);
    s.pooled = Floats(f.pooled, dev);
    s.d_pooled = Floats(f.d_pooled, dev);
    s.head_sink = Floats(f.head_sink, dev);
  } else {
    s.ce_totals = DeviceBuffer(static_cast<std::size_t>(head_chunks(config, s.output().rows())) *
                                   sizeof(kernels::CrossEntropyTotals),
                               dev);
  }
  s.ids = DeviceBuffer(static_cast<std::size_t>(s.input.rows() + target_count()) * sizeof(std::int32_t), dev);
  s.scalars_buf = DeviceBuffer(sizeof(Scalars), dev);
  s.flags = DeviceBuffer(s.table.infos().size() * sizeof(std::int32_t), dev);
}

Model::~Model() = default;

const ModelConfig& Model::config() const { return state_->config; }
DType Model::compute_dtype() const { return state_->compute; }
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

std::vector<float> Model::to_host(std::span<const float> x) const {
  const State& s = *state_;
  s.session.comm().synchronize(s.session.stream());
  std::vector<float> out(x.size());
  copy_to_host(out.data(), x.data(), x.size_bytes(), s.session.device(), s.session.stream());
  return out;
}

double Model::forward(std::span<const std::int32_t> tokens, std::span<const std::int32_t> targets) {
  State& s = *state_;
  s.have_forward = s.have_gradients = false;
  s.load_ids(tokens, targets);
  const model::RunContext rc = s.run_context(true);
  s.forward_layers(rc);
  s.grads.zero(s.ctx);
  s.head(true);
  s.have_forward = true;
  return s.loss;
}

double Model::evaluate(std::span<const std::int32_t> tokens, std::span<const std::int32_t> targets) {
  State& s = *state_;
  s.have_forward = s.have_gradients = false;
  s.load_ids(tokens, targets);
  const model::RunContext rc = s.run_context(false);
  s.forward_layers(rc);
  return s.head(false);
}

void Model::backward() {
  State& s = *state_;
  RINGCAST_CHECK(s.have_forward, "Model::backward: no training forward() to differentiate");
  s.have_forward = false;
  const ModelConfig& c = s.config;
  // A non-finite loss (the same on every rank) has no gradient worth computing: step() refuses it.
  // Parameters are replicated: summing the gradients over ranks, bucket by bucket as they become
  // final, makes every rank's gradient the global one.
  if (std::isfinite(s.loss)) {
    const model::RunContext rc = s.run_context(true);
    const bool in_place = s.gradient_in_place();
    float *d_out = s.d_a.data(), *d_in = in_place ? d_out : s.d_b.data();
    const std::size_t L = s.layers.size();
    std::size_t next = 0;
    try {
      s.start_sums(0, next);
      for (std::size_t l = L; l-- > 0;) {
        s.layers[l]->backward(rc, s.layer_input(l), d_out, d_in);
        std::swap(d_out, d_in);
        s.start_sums(static_cast<int>(L - l), next);
      }
      kernels::embedding_backward({s.input.rows(), c.dim, c.vocab, s.token_ids(), d_out,
                                   s.grads.data() + s.table.info(s.embedding).offset},
                                  s.ctx);
      s.start_sums(static_cast<int>(L) + 1, next);
      s.wait_sums();
    } catch (...) {
      // No sum stays in flight; the error being thrown is the one to report.
      try {
        s.wait_sums();
      } catch (const std::exception&) {
      }
      throw;
    }
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
  kernels::sum_of_squares(total, s.grads.data(), &s.scalars()->sum_sq, s.ctx);
  const double norm = std::sqrt(s.read_scalars().sum_sq);
  if (!std::isfinite(norm)) {
    const auto& infos = s.table.infos();
    std::int32_t* flags = s.flags.as<std::int32_t>();
    for (std::size_t t = 0; t < infos.size(); ++t)
      kernels::find_non_finite(infos[t].numel(), s.grads.data() + infos[t].offset, flags + t, s.ctx);
    std::vector<std::int32_t> found(infos.size());
    copy_to_host(found.data(), flags, s.flags.bytes(), s.session.device(), s.session.stream());
    for (std::size_t t = 0; t < infos.size(); ++t)
      RINGCAST_CHECK(!found[t], "Model::step {}: non-finite gradient in '{}'", step, infos[t].name);
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
  // Rank 0 alone writes, so it alone needs the buffers in host memory.
  std::vector<float> copies[3];
  if (s.session.rank() == 0) {
    data.params = s.host_view(s.params, copies[0]);
    data.adam_m = s.host_view(s.adam_m, copies[1]);
    data.adam_v = s.host_view(s.adam_v, copies[2]);
  }
  data.user_state = user_state;
  model::save_checkpoint(s.session, path, data);
}

std::vector<std::byte> Model::load(const std::string& path) {
  State& s = *state_;
  model::LoadedCheckpoint loaded = model::load_checkpoint(s.session, path, model::fingerprint(s.config, s.table),
                                                          {s.params.data(), s.adam_m.data(), s.adam_v.data()},
                                                          s.params.count);
  s.steps = loaded.steps;
  s.have_forward = s.have_gradients = false;
  return std::move(loaded.user_state);
}

MemoryEstimate estimate_memory(const ModelConfig& c, const SequenceShape& shape, int ranks, DeviceKind device) {
  validate_config(c, shape);
  RINGCAST_CHECK(!c.colt5.enabled && !c.vcc.enabled && c.pyramidion.pool_after.empty(),
                 "estimate_memory: CoLT5, VCC and Pyramidion stacks are not estimated (standard blocks only)");
  RINGCAST_CHECK(!c.attention.uses_surrogates(), "estimate_memory: CAST surrogate clusters are not estimated");
  RINGCAST_CHECK(ranks > 0, "estimate_memory: ranks ({}) must be positive", ranks);
  const Device dev{device, 0};
  const DType compute = resolve_compute_dtype(c, dev);
  const DType storage = model::attention_dtype(dev);
  const bool encoder = c.kind == ModelKind::kEncoder;
  Geometry g;
  g.batch = shape.batch;
  g.seq_len = shape.seq_len;
  g.causal = !encoder;
  const LayerShape layer = model::attention_shape(c, g, ranks, storage);
  validate(layer, c.attention);
  g.local_len = layer.local_len();
  constexpr std::int64_t kF32 = sizeof(float);
  const std::int64_t D = c.dim, F = c.ffn_hidden, V = c.vocab, rows = g.rows();
  const std::int64_t q = std::int64_t{c.heads} * c.head_dim, kv = std::int64_t{c.kv_heads} * c.head_dim;

  // The parameter table of build(): embedding, per block two norm gains, Q/K/V/O and W1/W3/W2, the
  // final norm and the head.
  const std::int64_t head = encoder ? std::int64_t{c.num_classes} * D : V * D;
  const std::int64_t per_layer = 2 * D + (q + 2 * kv) * D + D * q + 3 * F * D;
  const std::int64_t params = V * D + c.layers * per_layer + D + head + (encoder ? c.num_classes : 0);
  const std::int64_t tensors = 1 + 9 * std::int64_t{c.layers} + 1 + (encoder ? 2 : 1);

  MemoryEstimate m;
  m.parameters = m.gradients = float_bytes(params);
  m.optimizer = 2 * float_bytes(params);
  const std::vector<std::int64_t> layer_rows(static_cast<std::size_t>(c.layers), rows);
  const StackFloats f = stack_floats(c, shape, layer_rows, rows, head, true);  // standard blocks: in place
  m.layer_inputs = element_bytes(f.activations, storage);
  m.residual = float_bytes(f.d_a) + float_bytes(f.d_b);
  if (encoder)
    m.residual += float_bytes(f.final_out) + float_bytes(f.d_final) + float_bytes(f.pooled) + float_bytes(f.d_pooled) +
                  float_bytes(f.head_sink);
  else
    m.residual += head_chunks(c, rows) * std::int64_t{sizeof(kernels::CrossEntropyTotals)};
  const std::int64_t targets = encoder ? shape.batch : rows;
  m.residual += (rows + targets) * std::int64_t{sizeof(std::int32_t)} + std::int64_t{sizeof(Scalars)} +
                tensors * std::int64_t{sizeof(std::int32_t)};
  if (device == DeviceKind::kCuda) m.residual += g.local_len * std::int64_t{sizeof(std::int32_t)};  // positions
  m.block_scratch = float_bytes(model::StandardBlock::scratch_floats(c, g));
  m.attention_projections = model::SelfAttention::scratch_floats(c, g, storage) * kF32;
  m.ffn_chunks = float_bytes(model::SwiGluFfn::scratch_floats(c.ffn_hidden, rows, c.row_chunk));
  m.attention_workspace = attention_workspace_bytes(layer, c.attention, device);
  // The input checks' counters and their all-gather, alive during a call (agreement.cpp).
  if (c.attention.check_inputs) m.attention_workspace += (6 + 3 * std::int64_t{ranks}) * 8;

  // The loss chunk: its fp32 logits on either backend (CPU: a host vector per call); on CUDA the
  // stream scratch grows to the largest call's needs: the loss chunk with its bf16 copies, or a bf16
  // product's rounded weight and row chunk (8192 rows, layers_gemm_cuda.cu).
  const std::int64_t ce_rows = std::min(c.ce_chunk, encoder ? std::int64_t{shape.batch} : rows);
  const std::int64_t classes = encoder ? c.num_classes : V;
  std::int64_t ce = ce_rows * classes * kF32 + 2 * rows * kF32;
  if (device == DeviceKind::kCuda && compute == DType::kBF16) {
    ce += (classes * D + ce_rows * D + ce_rows * classes) * 2;
    const std::int64_t chunk = std::min<std::int64_t>(rows, 8192), widest = std::max({q, kv, F, D});
    m.kernel_temporaries = std::max(ce, (widest * D + chunk * (widest + D)) * 2);
    m.runtime = std::int64_t{1} << 30;
  } else {
    m.kernel_temporaries = ce;
    if (device == DeviceKind::kCuda) m.runtime = std::int64_t{1} << 30;
  }
  return m;
}

}  // namespace ringcast
