// ringcast::Model: a decoder-only (causal) transformer whose attention is the distributed operator,
// trained data-parallel over nothing but the sequence: every rank holds the same fp32 parameters and
// its n_loc = n / P rows of each sequence, in the operator's placement order (positions()).
// Parameters live in one flat buffer (decayed tensors first, then the norm gains), gradients in a
// matching one, so a step is one all-reduce and two AdamW calls. Only each layer's input is kept;
// backward recomputes the layer. CPU backend only for now (the per-token layer kernels are host code).
#pragma once

#include <ringcast/attention_options.hpp>
#include <ringcast/session.hpp>

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <string_view>
#include <vector>

namespace ringcast {

struct ModelConfig {
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
  std::uint64_t seed = 0;        // parameter initialisation, identical on every rank
  AttentionOptions attention;
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
  float weight_decay = 0.1f;  // not applied to norm gains
  float max_norm = 1.0f;      // global gradient-norm clip; <= 0 disables it
};

// One named tensor of the flat buffers: elements [offset, offset + rows * cols).
struct ParameterInfo {
  std::string name;  // "embedding", "layers.{i}.{attn_norm,wq,wk,wv,wo,ffn_norm,w1,w3,w2}", "final_norm", "lm_head"
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

class Model {
 public:
  // Collective (builds the attention operator). Throws Error on a configuration that does not fit
  // (the same way on every rank) or on a non-CPU session. The session must outlive the model.
  Model(const Session& session, const ModelConfig& config, const SequenceShape& shape);
  ~Model();
  Model(const Model&) = delete;
  Model& operator=(const Model&) = delete;

  const ModelConfig& config() const;
  // Global positions of this rank's rows: tokens[b, i] sits at position positions()[i] of sequence b.
  std::span<const std::int32_t> positions() const;
  std::int64_t local_len() const;

  // Collective. tokens and targets are [batch, local_len()] of this rank (positions() order);
  // targets < 0 are ignored. Writes the gradient of the global mean loss over every rank's counted
  // targets, summed over ranks (so identical everywhere), and returns that global mean loss.
  double forward_backward(std::span<const std::int32_t> tokens, std::span<const std::int32_t> targets);
  // The target counts of the latest forward_backward() (identical on every rank).
  TargetCounts last_targets() const;

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
  std::span<float> parameters();  // the flat buffers
  std::span<float> gradients();
  // One tensor of the flat buffers; throws Error on an unknown name.
  std::span<float> parameter(std::string_view name);
  std::span<float> gradient(std::string_view name);

 private:
  struct State;
  std::unique_ptr<State> state_;
};

}  // namespace ringcast
