// ringcast::Model: a transformer whose attention is the distributed operator, trained data-parallel
// over nothing but the sequence: every rank holds the same fp32 parameters and its n_loc = n / P
// rows of each sequence, in the operator's placement order (positions()). A decoder (causal, LM
// head with a chunked cross-entropy) or an encoder (bidirectional, mean-pooled classification
// head). The seed methods are options of the stack: CAST through attention.clusters, CoLT5,
// Pyramidion and VCC through their configs below (encoder stacks). Parameters live in one flat
// buffer (decayed tensors first, then norm gains and the like), gradients in a matching one, summed
// over ranks in buckets while the backward runs (grad_bucket_bytes), so a step is two AdamW calls.
// Only each layer's input is kept; backward recomputes the layer, and every layer shares one set of
// scratch (a block's norms, projections and FFN in row chunks, one attention operator per layer
// shape), so memory per rank grows as n_loc·D·L plus one layer's working set: estimate_memory().
// Backends: the session's. On the CPU everything is fp32 host memory. On CUDA parameters,
// gradients, optimizer state and the activations inside a layer are fp32 device memory (the spans
// below point there), the kept layer inputs are bf16 (rounded once when a layer stores its output;
// the layer's recompute reads that same value), the matrix products take bf16 inputs with fp32
// accumulation (compute_dtype), attention runs in bf16, and all work is enqueued on the session's
// stream; the calls that return a value wait for it. The seed-method layers (CoLT5, Pyramidion,
// VCC) run on the CPU backend only.
#pragma once

#include <ringcast/attention_options.hpp>
#include <ringcast/dtype.hpp>
#include <ringcast/session.hpp>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace ringcast {

enum class ModelKind { kDecoder, kEncoder };

// CoLT5 conditional computation (ALGORITHMS.md §3), per layer: FFN_light on every token plus
// s̃·FFN_heavy on the top-m routed tokens; light window attention on `light_heads` heads plus heavy
// attention of the top-q routed queries over the top-v routed keys/values on the others.
struct Colt5Config {
  bool enabled = false;
  double ffn_fraction = 1.0 / 16;   // m = fraction · n (global, per sequence)
  double query_fraction = 1.0 / 16; // q
  double kv_fraction = 1.0 / 8;     // v
  int light_heads = 0;              // 0: heads / 4
  int window_radius = 127;          // light attention sees |i - j| <= radius
  int light_ffn_hidden = 0;         // 0: ffn_hidden / 2
  int heavy_ffn_hidden = 0;         // 0: ffn_hidden * 4
  float epsilon = 1.0f;             // soft top-k
  int iterations = 50;
};

// Pyramidion (ALGORITHMS.md §2): after layer i (pool_after[j] = i) a scorer and the successive-halving
// soft top-k shrink the sequence to pool_to[j] tokens (global), rebalanced so that every rank keeps
// pool_to[j] / P of them. Each target must halve the length a whole number of times.
struct PyramidionConfig {
  std::vector<int> pool_after;
  std::vector<std::int64_t> pool_to;
  float beta = 20.0f;
};

// VCC (ALGORITHMS.md §1): the first `vip_tokens` positions of each sequence are VIP tokens; from layer
// `first_layer` on, every layer keeps the `fine_blocks` blocks of `block` tokens the VIP tokens attend
// to most at full resolution and runs on block means (+log(block) logit bias) for the rest, then
// broadcasts the coarse updates back to their tokens.
struct VccConfig {
  bool enabled = false;
  int vip_tokens = 16;
  int block = 16;
  int fine_blocks = 8;
  int first_layer = 0;
  float explore_prob = 0.1f;  // training: a random block ranking instead of the VIP scores
};

struct ModelConfig {
  ModelKind kind = ModelKind::kDecoder;
  int num_classes = 0;  // encoders: the classification head's classes (> 0)
  int vocab = 256;
  int dim = 512;          // D, the residual stream
  int layers = 4;
  int heads = 8;          // h
  int kv_heads = 8;       // h_kv (GQA when < h)
  int head_dim = 64;      // d; Q is [h d], K and V are [h_kv d]; h d need not equal D
  int ffn_hidden = 1536;  // F of the SwiGLU FFN
  float norm_eps = 1e-6f;
  float rope_theta = 10000.0f;
  std::int64_t ce_chunk = 1024;  // rows of logits the LM head materialises at once
  // Rows the token-wise products run at once: the SwiGLU FFN (its scratch is 6 · row_chunk · F
  // floats) and the attention projections around the operator. Results do not depend on it but for
  // the order in which the weight gradients sum over chunks (fp32 rounding).
  std::int64_t row_chunk = 8192;
  std::uint64_t seed = 0;        // parameter initialisation, identical on every rank
  // Gradient buckets: backward() sums the gradients over ranks in buckets of about this many bytes,
  // each as soon as all its gradients are final, beside the backward of the earlier layers (on its
  // own communicator, Session::grad_comm()); 0: one all-reduce of every gradient at the end. Not
  // part of a checkpoint's identity; the sums may round differently for other bucket sizes (fp32).
  std::int64_t grad_bucket_bytes = std::int64_t{25} << 20;
  // Inputs of the matrix products (layers.hpp: fp32 accumulation and fp32 tensors either way):
  // unset picks the backend's default, f32 on the CPU (the only choice there) and bf16 on CUDA;
  // f32 on CUDA gives exact fp32 products (attention stays bf16, its storage dtype on CUDA). Not part
  // of a checkpoint's identity: a run may resume on the other backend.
  std::optional<DType> compute_dtype;
  AttentionOptions attention;
  Colt5Config colt5;
  PyramidionConfig pyramidion;
  VccConfig vcc;
};

// The sequences one forward_backward() sees: batch sequences of seq_len tokens (the global n).
struct SequenceShape {
  std::int64_t seq_len = 0;
  int batch = 1;
};

struct AdamWConfig {
  float lr = 1e-3f;
  float beta1 = 0.9f;
  float beta2 = 0.95f;
  float eps = 1e-8f;
  float weight_decay = 0.1f;  // not applied to norm gains and biases
  float max_norm = 1.0f;      // global gradient-norm clip; <= 0 disables it
};

// One named tensor of the flat buffers: elements [offset, offset + rows * cols).
struct ParameterInfo {
  std::string name;  // "embedding", "layers.{i}.{attn_norm,wq,wk,wv,wo,ffn_norm,w1,w3,w2}", "final_norm",
                     // "lm_head" (decoder) or "classifier", "classifier_bias" (encoder), and the options' own
  std::int64_t offset = 0;
  std::int64_t rows = 0;
  std::int64_t cols = 0;
  bool decay = true;
  std::int64_t numel() const { return rows * cols; }
};

// The counted targets (>= 0) of one forward_backward(), summed over ranks, and how many of them the
// argmax of the logits got right (lowest index on ties).
struct TargetCounts {
  std::int64_t count = 0;
  std::int64_t correct = 0;
};

// What one training step (forward, backward, step) holds per rank, in bytes, by component: the
// figures of estimate_memory(). All but kernel_temporaries and runtime are allocated through
// DeviceBuffer, so peak_allocated_bytes() (memory.hpp) measures their sum, allocated().
struct MemoryEstimate {
  std::int64_t parameters = 0;    // fp32 master weights
  std::int64_t gradients = 0;
  std::int64_t optimizer = 0;     // AdamW first and second moments
  // The kept activations, every layer's input and the last layer's output, in the storage dtype
  // (bf16 on CUDA, fp32 on the CPU).
  std::int64_t layer_inputs = 0;
  // The residual-stream gradient, the ids; encoders: the final norm's output and its gradient.
  std::int64_t residual = 0;
  // One row chunk of a block's (or the LM head's) input or y, normed rows and dL/d(normed).
  std::int64_t block_scratch = 0;
  std::int64_t attention_projections = 0;  // Q|K|V, O, LSE, their gradients; one row chunk in fp32
  std::int64_t ffn_chunks = 0;             // the SwiGLU FFN's six [row_chunk, F] matrices
  std::int64_t attention_workspace = 0;    // the attention operators' own buffers (plan.hpp)
  // The kernels' temporaries outside DeviceBuffer: the loss chunk's logits, on CUDA the stream
  // scratch of the bf16 products.
  std::int64_t kernel_temporaries = 0;
  // CUDA only: an allowance for the CUDA context, cuBLAS and NCCL (not allocated by ringcast).
  std::int64_t runtime = 0;

  std::int64_t allocated() const {
    return parameters + gradients + optimizer + layer_inputs + residual + block_scratch + attention_projections +
           ffn_chunks + attention_workspace;
  }
  std::int64_t total() const { return allocated() + kernel_temporaries + runtime; }
};

// The memory per rank of a Model(config, shape) trained on `ranks` ranks of a `device` backend, from
// the formulas the model allocates by (no allocation, no communicator). The largest layer's scratch
// counts once: layers share it. Throws Error for a configuration the model would refuse, and for
// the seed-method layers (CoLT5, VCC, Pyramidion) and CAST surrogate clusters, which it does not
// estimate.
MemoryEstimate estimate_memory(const ModelConfig& config, const SequenceShape& shape, int ranks, DeviceKind device);

class Model {
 public:
  // Collective (builds the attention operator). Throws Error on a configuration that does not fit
  // (the same way on every rank), e.g. a seed-method layer or bf16 products on a backend without them.
  // The session must outlive the model.
  Model(const Session& session, const ModelConfig& config, const SequenceShape& shape);
  ~Model();
  Model(const Model&) = delete;
  Model& operator=(const Model&) = delete;

  const ModelConfig& config() const;
  // Global positions of this rank's rows: tokens[b, i] sits at position positions()[i] of sequence b.
  std::span<const std::int32_t> positions() const;
  std::int64_t local_len() const;

  // The product precision in use (ModelConfig::compute_dtype resolved for the session's backend).
  DType compute_dtype() const;

  // Collective. tokens are [batch, local_len()] of this rank (positions() order), in host memory
  // whatever the backend (they are copied to the device once per call). Decoder: targets
  // are [batch, local_len()], < 0 ignored, and the loss is the mean over every rank's counted targets.
  // Encoder: targets are the [batch] class labels (the same on every rank), the loss their mean
  // cross-entropy. forward() returns that global loss (identical on every rank) and keeps what
  // backward() needs; backward() writes the gradient of that loss, summed over ranks.
  double forward(std::span<const std::int32_t> tokens, std::span<const std::int32_t> targets);
  void backward();
  double forward_backward(std::span<const std::int32_t> tokens, std::span<const std::int32_t> targets) {
    const double loss = forward(tokens, targets);
    backward();
    return loss;
  }
  // Collective. A forward-only pass (evaluation: no gradients, no randomness, nothing kept for
  // backward()); returns the loss as forward() would and sets last_targets().
  double evaluate(std::span<const std::int32_t> tokens, std::span<const std::int32_t> targets);
  // The target counts of the latest forward() or evaluate() (identical on every rank): counted tokens (decoder) or
  // sequences (encoder), and how many the argmax got right (lowest index on ties).
  TargetCounts last_targets() const;
  // The number of ids targets must hold: batch * local_len() (decoder) or batch (encoder).
  std::int64_t target_count() const;

  // One optimizer step on the gradients of the latest forward_backward(): global-norm clipping,
  // then AdamW. Throws Error naming the step (and the first tensor with a non-finite gradient) when
  // the loss or a gradient is not finite; the parameters are then left unchanged. Replicated state:
  // every rank throws alike.
  void step(const AdamWConfig& config);
  std::int64_t steps_taken() const;
  // The gradient norm (before clipping) of the latest step().
  double last_grad_norm() const;

  std::int64_t num_parameters() const;
  std::span<const ParameterInfo> parameter_table() const;
  // The flat buffers, in the memory of the session's device (device memory on CUDA: read them there
  // or through to_host()).
  std::span<float> parameters();
  std::span<float> gradients();
  // One tensor of the flat buffers; throws Error on an unknown name.
  std::span<float> parameter(std::string_view name);
  std::span<float> gradient(std::string_view name);
  // A host copy of a span of the buffers above (any backend; waits for the session's stream).
  std::vector<float> to_host(std::span<const float> x) const;

  // Collective. Writes parameters, optimizer state, the step count and `user_state` (the trainer's
  // data position, RNG state...) to `path` from rank 0, atomically: a temporary file in the same
  // folder, fsync, rename, fsync of the folder, so a crash leaves the old file or the new one.
  void save(const std::string& path, std::span<const std::byte> user_state = {}) const;
  // Collective. Rank 0 reads and checks the file (magic, version, the model configuration it was
  // written for, size, checksum) and broadcasts it; a missing, truncated, corrupt or mismatched file
  // throws Error on every rank. Returns the user state it was saved with.
  std::vector<std::byte> load(const std::string& path);

 private:
  struct State;
  std::unique_ptr<State> state_;
};

}  // namespace ringcast
