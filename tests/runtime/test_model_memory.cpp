// The memory of a training step on the CPU backend, over 1 and 2 ranks: estimate_memory() against
// the peak that DeviceBuffer measures for one forward, backward and step (decoder and encoder, the
// exact modes and clustered), attention_workspace_bytes() against the operators the model builds,
// one operator shared by every layer, and the FFN's row chunks giving the unchunked results.
#include "clustered_budgets.hpp"
#include "test_util.hpp"

#include <ringcast/attention.hpp>
#include <ringcast/memory.hpp>
#include <ringcast/model.hpp>
#include <ringcast/plan.hpp>

#include <gtest/gtest.h>
#include <mpi.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <string>

namespace ringcast {
namespace {

// Small enough for 2 cores, with D, F and the vocabulary not powers of two and GQA.
ModelConfig small_config(AttentionMode mode, ModelKind kind) {
  ModelConfig c;
  c.kind = kind;
  c.num_classes = kind == ModelKind::kEncoder ? 5 : 0;
  c.vocab = 37;
  c.dim = 48;
  c.layers = 3;
  c.heads = 4;
  c.kv_heads = 2;
  c.head_dim = 64;
  c.ffn_hidden = 136;
  c.ce_chunk = 100;
  c.row_chunk = 200;  // several chunks per layer
  c.seed = 7;
  c.attention.mode = mode;
  if (mode == AttentionMode::kClustered) {
    AttentionOptions& o = c.attention;
    test::use_small_clustered_budgets(o);
  }
  return c;
}

// One training step's tokens and targets for this rank (random ids: memory does not depend on them).
double train_step(Model& model, const ModelConfig& c, const SequenceShape& shape, std::uint32_t seed) {
  const auto rows = static_cast<std::size_t>(shape.batch * model.local_len());
  const std::vector<std::int32_t> tokens = test::random_ids(rows, c.vocab, seed);
  std::vector<std::int32_t> targets;
  if (c.kind == ModelKind::kEncoder)
    for (int b = 0; b < shape.batch; ++b) targets.push_back(b % c.num_classes);
  else
    targets = test::random_ids(rows, c.vocab, seed + 1);
  const double loss = model.forward_backward(tokens, targets);
  model.step(AdamWConfig{});
  return loss;
}

using Case = std::tuple<AttentionMode, ModelKind>;
class MemoryEstimateTest : public ::testing::TestWithParam<Case> {};

// The estimate counts what DeviceBuffer allocates (allocated()) as an upper bound of the measured
// peak, within 10% of it. Ranks: the world's.
TEST_P(MemoryEstimateTest, BoundsTheMeasuredPeakWithin10Percent) {
  const auto [mode, kind] = GetParam();
  Session session = Session::from_mpi(MPI_COMM_WORLD, Backend::kCpu);
  const ModelConfig c = small_config(mode, kind);
  const SequenceShape shape{1536, 2};  // n_loc = 768 at P = 2: 6 tiles, 12 pages of 64
  const MemoryEstimate est = estimate_memory(c, shape, session.size(), DeviceKind::kCpu);

  reset_peak_allocated_bytes();
  const auto baseline = static_cast<std::int64_t>(peak_allocated_bytes());  // what was live before
  std::int64_t measured = 0;
  {
    Model model(session, c, shape);
    EXPECT_EQ(model.num_parameters() * 4, est.parameters);
    for (std::uint32_t s = 0; s < 2; ++s) train_step(model, c, shape, 11 + s);
    measured = static_cast<std::int64_t>(peak_allocated_bytes()) - baseline;
  }
  // The rank that needs the most sets the figure the estimate stands for.
  MPI_Allreduce(MPI_IN_PLACE, &measured, 1, MPI_INT64_T, MPI_MAX, MPI_COMM_WORLD);
  const double ratio = static_cast<double>(est.allocated()) / static_cast<double>(measured);
  std::printf("    %s %s P=%d: estimate %lld bytes (attention workspace %lld), measured peak %lld, ratio %.4f\n",
              name(mode).data(), kind == ModelKind::kEncoder ? "encoder" : "decoder", session.size(),
              static_cast<long long>(est.allocated()), static_cast<long long>(est.attention_workspace),
              static_cast<long long>(measured), ratio);
  EXPECT_GE(ratio, 1.0) << "the estimate must bound the measured peak";
  EXPECT_LE(ratio, 1.10);
}

INSTANTIATE_TEST_SUITE_P(Modes, MemoryEstimateTest,
                         ::testing::Values(Case{AttentionMode::kRing, ModelKind::kDecoder},
                                           Case{AttentionMode::kUlysses, ModelKind::kDecoder},
                                           Case{AttentionMode::kClustered, ModelKind::kDecoder},
                                           Case{AttentionMode::kAllGather, ModelKind::kEncoder},
                                           Case{AttentionMode::kClustered, ModelKind::kEncoder}),
                         [](const auto& info) {
                           return std::string(name(std::get<0>(info.param))) +
                                  (std::get<1>(info.param) == ModelKind::kEncoder ? "_encoder" : "_decoder");
                         });

// Exactly what the operators the model builds hold (their tables included) for the exact modes; for
// clustered, at least the built operator's workspace (the estimate adds a bound on the tables a
// forward builds).
TEST(MemoryEstimate, AttentionWorkspaceMatchesTheBuiltOperator) {
  Session session = Session::from_mpi(MPI_COMM_WORLD, Backend::kCpu);
  for (const AttentionMode mode :
       {AttentionMode::kRing, AttentionMode::kAllGather, AttentionMode::kUlysses, AttentionMode::kClustered})
    for (const bool causal : {true, false}) {
      const ModelConfig c = small_config(mode, ModelKind::kDecoder);
      LayerShape shape{1536, session.size(), 2, c.heads, c.kv_heads, c.head_dim, DType::kF32, causal};
      const DistributedAttention op(session, shape, c.attention);
      auto built = static_cast<std::int64_t>(op.workspace_bytes());
      MPI_Allreduce(MPI_IN_PLACE, &built, 1, MPI_INT64_T, MPI_MAX, MPI_COMM_WORLD);
      const std::int64_t est = attention_workspace_bytes(shape, c.attention, DeviceKind::kCpu);
      std::printf("    %s causal=%d: estimate %lld, built %lld\n", name(mode).data(), causal,
                  static_cast<long long>(est), static_cast<long long>(built));
      if (mode == AttentionMode::kClustered) {
        EXPECT_GE(est, built);
        EXPECT_LE(est, built + built / 5);
      } else {
        EXPECT_EQ(est, built) << name(mode);
      }
    }
}

// Layers of one shape share one operator: the model's peak grows by a layer's input, not by a
// workspace, when a layer is added.
TEST(MemoryEstimate, LayersShareOneAttentionOperator) {
  Session session = Session::from_mpi(MPI_COMM_WORLD, Backend::kCpu);
  ModelConfig c = small_config(AttentionMode::kRing, ModelKind::kDecoder);
  const SequenceShape shape{1536, 2};
  std::int64_t peak[2] = {0, 0};
  for (const int layers : {2, 3}) {
    c.layers = layers;
    reset_peak_allocated_bytes();
    const auto baseline = static_cast<std::int64_t>(peak_allocated_bytes());
    {
      Model model(session, c, shape);
      train_step(model, c, shape, 5);
    }
    peak[layers - 2] = static_cast<std::int64_t>(peak_allocated_bytes()) - baseline;
  }
  // A block's parameters, gradients and AdamW moments, its input, and the step's flags for its 9 tensors.
  const std::int64_t q = std::int64_t{c.heads} * c.head_dim, kv = std::int64_t{c.kv_heads} * c.head_dim;
  const std::int64_t block = 2 * c.dim + (q + 2 * kv) * c.dim + c.dim * q + 3 * std::int64_t{c.ffn_hidden} * c.dim;
  const std::int64_t input = std::int64_t{shape.batch} * (shape.seq_len / session.size()) * c.dim * 4;
  const std::int64_t workspace = attention_workspace_bytes(
      {shape.seq_len, session.size(), shape.batch, c.heads, c.kv_heads, c.head_dim, DType::kF32, true}, c.attention,
      DeviceKind::kCpu);
  std::printf("    peak with 2 layers %lld, with 3 layers %lld: +%lld (a block's state %lld and input %lld; one "
              "operator's workspace %lld)\n",
              static_cast<long long>(peak[0]), static_cast<long long>(peak[1]),
              static_cast<long long>(peak[1] - peak[0]), static_cast<long long>(16 * block),
              static_cast<long long>(input), static_cast<long long>(workspace));
  EXPECT_EQ(peak[1] - peak[0], 16 * block + input + 9 * 4);
}

// The figures a CUDA session would allocate, which no CPU run measures: the layer inputs in bf16 (the
// storage dtype; the last layer's output lives in d_a on either backend), the block's scratch in
// [row_chunk, D] chunks, one residual-stream gradient buffer (and for the decoder no [rows, D] buffer
// of the head's).
TEST(MemoryEstimate, CudaKeepsLayerInputsInBf16) {
  Session session = Session::from_mpi(MPI_COMM_WORLD, Backend::kCpu);
  const SequenceShape shape{1536, 2};
  for (const ModelKind kind : {ModelKind::kDecoder, ModelKind::kEncoder}) {
    const ModelConfig c = small_config(AttentionMode::kRing, kind);
    const MemoryEstimate cpu = estimate_memory(c, shape, session.size(), DeviceKind::kCpu);
    const MemoryEstimate gpu = estimate_memory(c, shape, session.size(), DeviceKind::kCuda);
    const std::int64_t local_len = shape.seq_len / session.size(), rows = shape.batch * local_len;
    const std::int64_t inputs = c.layers * rows * c.dim;
    EXPECT_EQ(cpu.layer_inputs, inputs * 4);
    EXPECT_EQ(gpu.layer_inputs, inputs * 2);
    EXPECT_EQ(cpu.block_scratch, 3 * std::min(rows, c.row_chunk) * c.dim * 4);
    EXPECT_EQ(gpu.block_scratch, cpu.block_scratch);
    // d_a is [rows, D] fp32 (d_b one float); the encoder adds its final norm's output and d_final,
    // the decoder's LM head runs in the blocks' row chunks.
    const std::int64_t stream = (kind == ModelKind::kEncoder ? 3 : 1) * rows * c.dim * 4;
    EXPECT_GE(cpu.residual, stream);
    EXPECT_LE(cpu.residual, stream + rows * 16 + 4096);
    EXPECT_EQ(gpu.residual - cpu.residual, local_len * 4) << "CUDA adds the device copy of the positions";
  }
}

// The FFN's row chunks: the loss of a forward depends on them only through fp32 rounding (each row's
// products are the same sums, but OpenBLAS may pick another kernel, with another order, for another
// row count: bitwise equal on some machines, ~1e-9 apart on AMD EPYC), the gradients also through the
// order of the weight gradients' sums.
TEST(MemoryEstimate, FfnChunksGiveTheUnchunkedResults) {
  Session session = Session::from_mpi(MPI_COMM_WORLD, Backend::kCpu);
  const SequenceShape shape{1536, 2};
  ModelConfig whole = small_config(AttentionMode::kRing, ModelKind::kDecoder);
  whole.row_chunk = 1 << 20;
  ModelConfig chunked = whole;
  chunked.row_chunk = 97;  // divides no row count
  Model a(session, whole, shape), b(session, chunked, shape);
  for (std::uint32_t s = 0; s < 3; ++s) {
    const double la = train_step(a, whole, shape, 20 + s), lb = train_step(b, chunked, shape, 20 + s);
    if (s == 0) {
      EXPECT_LE(std::abs(la - lb), 1e-7 * la) << "the first forward differs by more than fp32 rounding";
      const std::vector<float> ga = a.to_host(a.gradients()), gb = b.to_host(b.gradients());
      double num = 0, den = 0;
      for (std::size_t i = 0; i < ga.size(); ++i) {
        num += (double{ga[i]} - gb[i]) * (double{ga[i]} - gb[i]);
        den += double{ga[i]} * ga[i];
      }
      const double rel = std::sqrt(num / den);
      std::printf("    gradients (clipped, after the step): relative difference %.3e\n", rel);
      EXPECT_LE(rel, 1e-5);
    }
    const double rel = std::abs(la - lb) / la;
    std::printf("    step %u: loss %.9f (one chunk) vs %.9f (97-row chunks), relative difference %.2e\n", s + 1, la, lb,
                rel);
    EXPECT_LE(rel, 1e-5);
  }
}

}  // namespace
}  // namespace ringcast
