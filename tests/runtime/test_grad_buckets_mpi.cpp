// The model's bucketed gradient all-reduce (ModelConfig::grad_bucket_bytes) on the CPU backend over 1,
// 2 and 4 ranks: the gradients after backward() with one bucket at the end (0), tiny buckets (1 byte:
// one per tensor; 1 KiB) and one huge bucket agree -- bit for bit at P <= 2, where a sum of two is
// the same in any order, to fp32 rounding at P = 4 -- and match a single-rank run of the whole
// sequence, which sums nothing; the gradient communicator (Session::grad_comm()) counts one
// all-reduce per bucket and every gradient byte once; training with tiny buckets repeats the losses
// of bucket 0. A decoder, and an encoder with a Pyramidion pooling stage (a layer of its own).
#include "test_util.hpp"

#include <ringcast/model.hpp>

#include <gtest/gtest.h>
#include <mpi.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

namespace ringcast {
namespace {

constexpr int kBatch = 2;
constexpr std::int64_t kSeqLen = 256;  // pooled to 128: a whole number of halvings, divisible by 4 ranks

int world_size() {
  int p = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &p);
  return p;
}

ModelConfig decoder() {
  ModelConfig c;
  c.vocab = 11;
  c.dim = 24;
  c.layers = 2;
  c.heads = 2;
  c.kv_heads = 1;
  c.head_dim = 64;
  c.ffn_hidden = 40;
  c.ce_chunk = 100;
  c.seed = 2024;
  c.attention.mode = AttentionMode::kRing;
  return c;
}

ModelConfig pooled_encoder() {
  ModelConfig c = decoder();
  c.kind = ModelKind::kEncoder;
  c.num_classes = 5;
  c.attention.mode = AttentionMode::kAllGather;
  c.pyramidion.pool_after = {0};
  c.pyramidion.pool_to = {128};
  return c;
}

ModelConfig with_bucket(ModelConfig c, std::int64_t bytes) {
  c.grad_bucket_bytes = bytes;
  return c;
}

// Step `step`'s global tokens [kBatch, kSeqLen] and targets: next tokens (decoder) or class labels.
struct Batch {
  std::vector<std::int32_t> tokens, targets;
};

Batch make_batch(const ModelConfig& c, int step) {
  Batch b;
  b.tokens = test::random_ids(static_cast<std::size_t>(kBatch * kSeqLen), c.vocab, 300 + step);
  if (c.kind == ModelKind::kEncoder) {
    for (int i = 0; i < kBatch; ++i) b.targets.push_back((step + 2 * i) % c.num_classes);
  } else {
    b.targets = test::random_ids(b.tokens.size(), c.vocab, 400 + step);
  }
  return b;
}

// The model's own rows of `batch`: [kBatch, local_len] in positions() order (targets: per row for a
// decoder, the labels as they are for an encoder).
double forward_backward(Model& model, const Batch& batch) {
  std::vector<std::int32_t> tokens, targets;
  for (int b = 0; b < kBatch; ++b)
    for (const std::int32_t p : model.positions()) {
      const std::size_t i = static_cast<std::size_t>(b * kSeqLen + p);
      tokens.push_back(batch.tokens[i]);
      if (model.config().kind == ModelKind::kDecoder) targets.push_back(batch.targets[i]);
    }
  if (model.config().kind == ModelKind::kEncoder) targets = batch.targets;
  return model.forward_backward(tokens, targets);
}

std::vector<float> gradients_of(const Session& session, const ModelConfig& c) {
  Model model(session, c, {kSeqLen, kBatch});
  forward_backward(model, make_batch(c, 0));
  return model.to_host(model.gradients());
}

// Exact at P <= 2 (each element is a + b whatever the bucketing), fp32 rounding at P = 4.
void expect_same_sums(const std::string& what, const std::vector<float>& got, const std::vector<float>& want) {
  ASSERT_EQ(got.size(), want.size()) << what;
  if (world_size() <= 2) {
    std::size_t differ = 0;
    for (std::size_t i = 0; i < got.size(); ++i) differ += got[i] != want[i];
    EXPECT_EQ(differ, 0u) << what << ": elements that differ from bucket 0";
  } else {
    test::expect_close(what, got, test::to_double(want), 1e-6);
  }
}

class GradBuckets : public ::testing::TestWithParam<bool> {
 protected:
  ModelConfig config() const { return GetParam() ? pooled_encoder() : decoder(); }
};

TEST_P(GradBuckets, AnyBucketSizeGivesTheSameSums) {
  const Session session = Session::from_mpi(MPI_COMM_WORLD, Backend::kCpu);
  const ModelConfig c = config();
  const std::vector<float> one = gradients_of(session, with_bucket(c, 0));
  for (const std::int64_t bytes : {std::int64_t{1}, std::int64_t{1024}, std::int64_t{1} << 30})
    expect_same_sums(fmt::format("bucket {} B", bytes), gradients_of(session, with_bucket(c, bytes)), one);
}

// The whole sequence on one rank sums nothing: the sharded gradients, summed in buckets, must match.
// (Not for the pooled encoder: Pyramidion pairs tokens by a hard sort of fp32 scores, which may differ
// across P by one rounding; test_model_mpi.cpp says more.)
TEST(GradBucketsSingleRank, TinyBucketsMatchTheWholeSequenceOnOneRank) {
  const Session world = Session::from_mpi(MPI_COMM_WORLD, Backend::kCpu);
  const Session self = Session::from_mpi(MPI_COMM_SELF, Backend::kCpu);
  const ModelConfig c = with_bucket(decoder(), 1024);
  const std::vector<float> sharded = gradients_of(world, c), single = gradients_of(self, c);
  test::expect_close("1 KiB buckets vs one rank", sharded, test::to_double(single), 1e-5);
}

TEST_P(GradBuckets, TheGradientCommunicatorCountsOneAllReducePerBucket) {
  const Session session = Session::from_mpi(MPI_COMM_WORLD, Backend::kCpu);
  const int p = world_size();
  comm::Communicator& grads = session.grad_comm();
  ASSERT_NE(&grads, &session.comm());
  for (const std::int64_t bytes : {std::int64_t{0}, std::int64_t{1}, std::int64_t{1024}, std::int64_t{1} << 30}) {
    Model model(session, with_bucket(config(), bytes), {kSeqLen, kBatch});
    const auto table = model.parameter_table();
    // 1 KiB: every tensor of 1 KiB or more is a bucket of its own. Of the smaller ones, the decoder's
    // norm gains (96 B each) lie together at the end of the buffer and share one bucket (the LM head
    // before them is 1056 B); the encoder's norm gains and biases share one with the classifier
    // (480 B) just before them, and its pooling weight (96 B), between two layers' matrices, is one.
    std::size_t large = 0;
    for (const ParameterInfo& t : table) large += t.numel() * std::int64_t{sizeof(float)} >= 1024;
    const std::size_t small_groups = config().kind == ModelKind::kEncoder ? 2 : 1;
    const std::size_t want = bytes == 1 ? table.size() : bytes == 1024 ? large + small_groups : 1;

    grads.reset_counters();
    forward_backward(model, make_batch(model.config(), 0));
    const comm::OpCounters sums = grads.counters()[comm::OpKind::kAllReduce];
    const std::string what = fmt::format("bucket {} B", bytes);
    EXPECT_EQ(sums.calls, want) << what;
    EXPECT_EQ(grads.counters().total().calls, sums.calls) << what << ": the gradient communicator only sums";
    const std::uint64_t gradient_bytes = static_cast<std::uint64_t>(model.num_parameters()) * sizeof(float);
    EXPECT_EQ(sums.bytes_sent, gradient_bytes * static_cast<std::uint64_t>(p - 1)) << what;
    EXPECT_EQ(sums.bytes_received, gradient_bytes * static_cast<std::uint64_t>(p - 1)) << what;
  }
}

TEST_P(GradBuckets, TrainingWithTinyBucketsRepeatsTheLosses) {
  const Session session = Session::from_mpi(MPI_COMM_WORLD, Backend::kCpu);
  const auto train = [&](std::int64_t bytes) {
    Model model(session, with_bucket(config(), bytes), {kSeqLen, kBatch});
    AdamWConfig opt;
    opt.lr = 3e-3f;
    std::vector<double> losses;
    for (int s = 0; s < 4; ++s) {
      losses.push_back(forward_backward(model, make_batch(model.config(), s)));
      model.step(opt);
    }
    return losses;
  };
  const std::vector<double> one = train(0), tiny = train(1024);
  for (std::size_t s = 0; s < one.size(); ++s) {
    std::printf("    step %zu: loss %.8f (bucket 0) vs %.8f (1 KiB buckets)\n", s + 1, one[s], tiny[s]);
    if (world_size() <= 2)
      EXPECT_EQ(tiny[s], one[s]) << "step " << s + 1;
    else
      EXPECT_LE(std::abs(tiny[s] - one[s]) / one[s], 1e-6) << "step " << s + 1;
  }
}

INSTANTIATE_TEST_SUITE_P(Models, GradBuckets, ::testing::Bool(),
                         [](const auto& info) { return info.param ? "pooled_encoder" : "decoder"; });

}  // namespace
}  // namespace ringcast
