// VCC layer (ALGORITHMS.md §1) over a sequence sharded across ranks: a pre-norm block that runs on a
// compressed sequence Z chosen by the VIP tokens, then decompresses. Positions [0, vip) are the VIP
// tokens (all on rank 0); the rest form blocks of `block` consecutive positions, each block whole on one
// rank. Per example: the VIP queries score every block's mean (global softmax), the top fine_blocks
// blocks stay fine and the others become one coarse token (their mean, at the block's centre position
// floor(first + (block - 1) / 2), key bias +log(block)); every rank's Z attends over all ranks' Z
// (GatheredAttention), and coarse blocks add their token's update to each of their tokens. Selection is
// hard; it is trained through the straight-through score σ (value 1, gradient of π). Encoder only.
// Both backends run one code path: activations live in the session device's memory (scratch), and
// only per-block metadata crosses to the host (vcc.cpp says where).
#pragma once

#include "gathered_attention.hpp"
#include "model_mixers.hpp"
#include "model_parts.hpp"

#include <ringcast/memory.hpp>
#include <ringcast/model.hpp>
#include <ringcast/session.hpp>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace ringcast::model {

// The block ranking one example uses in a training step that explores: a permutation of [0, blocks)
// drawn from (seed, step, layer, example), so every rank and every recomputation draws the same one;
// empty when the example does not explore this step (it explores with probability explore_prob).
std::vector<std::int32_t> vcc_exploration(std::uint64_t seed, std::uint64_t step, std::string_view layer, int example,
                                          std::int64_t blocks, float explore_prob);

class VccBlock final : public Layer {
 public:
  // Collective (agrees on the placement and builds GatheredAttention). Declares the parameters of a
  // pre-norm block under `prefix`: attn_norm, wq, wk, wv, wo, ffn_norm, w1, w3, w2 (no new ones).
  // Throws Error, alike on every rank, when c.vcc does not fit the geometry: (seq_len - vip_tokens) not
  // a multiple of block, fine_blocks above the block count, VIP tokens off rank 0, a block split
  // between ranks, or a causal geometry.
  VccBlock(const Session& session, ParameterTable& table, Scratch& scratch, const std::string& prefix,
           const ModelConfig& c, const Geometry& geometry);
  ~VccBlock() override;

  const Geometry& in_geometry() const override { return geom_; }
  const Geometry& out_geometry() const override { return geom_; }
  // Tokens of one example's compressed sequence, over all ranks: vip + fine_blocks·block + the coarse rest.
  std::int64_t compressed_len() const;
  void forward(const RunContext& rc, const float* in, float* out) override;
  void backward(const RunContext& rc, const float* in, const float* d_out, float* d_in) override;
  // The last example's selection, for comparing backends: l_j of every block (identical on every
  // rank) and which of this rank's blocks stayed fine.
  const std::vector<float>& log_scores() const { return log_p_; }
  const std::vector<char>& fine() const { return fine_; }

 private:
  // One example (x: its [local_len, D] rows); each step leaves its results in scratch and members for
  // the next, and the backward steps read what the forward steps of the same example left.
  void select(const RunContext& rc, int example, const float* x);
  void compress(const RunContext& rc, const float* x);
  void block_forward(const RunContext& rc);
  void block_backward(const RunContext& rc);  // d_u -> d_z, and d_sigma += the key bias gradient
  GatheredForwardArgs attention_args(const RunContext& rc) const;  // the block's attention over Z
  void select_backward(const RunContext& rc, float* d_x);

  // This rank's share of the sequence, fixed at construction. Rank 0 holds the VIP tokens:
  // vip_rows[v] is position v's row. Blocks are listed by global id, their rows in position order.
  struct Placement {
    std::int64_t num_blocks = 0;  // over the whole sequence
    std::int64_t max_rows = 0;    // most Z rows this rank can hold
    std::vector<std::int64_t> vip_rows;
    std::vector<std::int32_t> vip_positions;
    std::vector<std::int64_t> blocks;            // global ids, ascending
    std::vector<std::int64_t> block_rows;        // [blocks.size(), block]
    std::vector<std::int32_t> block_positions;   // [blocks.size(), block]
    std::vector<std::int32_t> coarse_positions;  // [blocks.size()]
  };
  static Placement place(const Session& session, const std::string& prefix, const ModelConfig& c, const Geometry& g);

  // The placement's index lists where the kernels read them (the session's device), uploaded once.
  struct DeviceIndex {
    DeviceBuffer words;      // int64: the lists below, end to end
    DeviceBuffer positions;  // int32: coarse positions, then VIP positions
    const std::int64_t* block_offsets = nullptr;  // [blocks + 1]: block lb's rows are [lb·block, (lb+1)·block)
    const std::int64_t* block_rows = nullptr;     // Placement::block_rows
    const std::int64_t* block_of_row = nullptr;   // [blocks·block]: the local block of each block row
    const std::int64_t* vip_rows = nullptr;
    const std::int64_t* block_ids = nullptr;      // Placement::blocks
    const std::int32_t* coarse_positions = nullptr;
    const std::int32_t* vip_positions = nullptr;
  };
  void upload_index(const Session& session);

  // One example's index lists and weights, built on the host by compress() and uploaded in one copy
  // into the "vcc.meta" scratch: byte offsets there.
  struct ExampleIndex {
    std::int64_t x_rows = 0, c_rows = 0;  // Z rows copied from x (VIP and fine), from c (coarse)
    std::size_t z_of_row = 0;     // int64 [local_len]
    std::size_t du_offsets = 0;   // int64 [Z rows + 1], CSR of the tokens by Z row, tokens ascending
    std::size_t du_tokens = 0;    // int64 [local_len]
    std::size_t x_dst = 0, x_src = 0;  // int64 [x_rows]: Z row <- token row
    std::size_t c_dst = 0, c_src = 0;  // int64 [c_rows]: Z row <- local block
    std::size_t pi_offsets = 0;   // int64 [blocks + 1]: each local block's Z rows
    std::size_t bias = 0;         // f32 [Z rows]: log(dup)
    std::size_t dx_weights = 0;   // f32 [local_len]: 1, or 1/block for a coarse block's token
    std::size_t pi_signs = 0;     // f32 [blocks]: +1 fine, -1 coarse (dσ/dπ)
    std::size_t pi = 0;           // f32 [blocks]: π of this rank's blocks
  };
  static std::size_t example_index_bytes(std::int64_t local_len, std::int64_t max_rows, std::int64_t blocks);
  template <typename T>
  const T* example(const RunContext& rc, std::size_t offset) const;

  std::string prefix_;
  int dim_;
  float eps_;
  int vip_, block_;
  std::int64_t fine_blocks_;
  float explore_prob_;
  std::uint64_t seed_;
  Geometry geom_;
  Placement place_;
  AttentionProjections proj_;
  ParamRef attn_norm_, ffn_norm_;
  SwiGluFfn ffn_;
  std::unique_ptr<GatheredAttention> attention_;

  DeviceIndex index_;

  // The current example (host).
  std::vector<float> log_p_;         // [num_blocks] l_j = log(p_j + 1e-5), identical on every rank
  std::vector<float> pi_;            // [num_blocks] softmax(l)
  std::vector<char> fine_;           // [blocks_.size()]
  ExampleIndex example_;
  std::vector<std::byte> staging_;   // example_'s lists before the upload
  Geometry z_geom_;                  // batch 1, this rank's Z rows at their RoPE positions
  std::shared_ptr<DeviceBuffer> z_positions_;  // z_geom_'s device positions, [max_rows]
};

}  // namespace ringcast::model
