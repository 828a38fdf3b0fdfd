// Model checkpoints over 1, 2 and 4 ranks: a resumed run repeats the uninterrupted run's losses bit
// for bit (parameters, AdamW moments and the step count restored; the user state round-trips), and a
// truncated, corrupt, foreign or missing file is refused with the same error on every rank. Also:
// evaluate() is a forward pass that leaves the gradients alone.
#include "test_util.hpp"

#include <ringcast/model.hpp>

#include <gtest/gtest.h>
#include <mpi.h>

#include <cstddef>
#include <filesystem>
#include <fstream>
#include <string>
#include <unistd.h>

namespace ringcast {
namespace {

// A folder every rank names alike (rank 0's pid), removed at the end.
class CheckpointDir {
 public:
  CheckpointDir() {
    int pid = static_cast<int>(::getpid());
    MPI_Bcast(&pid, 1, MPI_INT, 0, MPI_COMM_WORLD);
    path_ = std::filesystem::temp_directory_path() / ("ringcast-ckpt-test-" + std::to_string(pid));
    std::filesystem::create_directories(path_);
  }
  ~CheckpointDir() {
    MPI_Barrier(MPI_COMM_WORLD);
    int rank = 0;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    if (rank == 0) std::filesystem::remove_all(path_);
  }
  std::string file(const std::string& name) const { return (path_ / name).string(); }

 private:
  std::filesystem::path path_;
};

ModelConfig tiny(ModelKind kind) {
  ModelConfig c;
  c.kind = kind;
  c.num_classes = kind == ModelKind::kEncoder ? 3 : 0;
  c.vocab = 13;
  c.dim = 20;
  c.layers = 2;
  c.heads = 2;
  c.kv_heads = 1;
  c.head_dim = 64;
  c.ffn_hidden = 36;
  c.seed = 11;
  return c;
}

struct Data {
  std::vector<std::int32_t> tokens, targets;
};

// Step s's batch: this rank's rows of seeded global sequences, targets or labels.
Data batch_for(const Model& model, int step, int batch, std::int64_t n) {
  const ModelConfig& c = model.config();
  const auto global = test::random_ids(static_cast<std::size_t>(batch * n), c.vocab, 500 + step);
  Data d;
  for (int b = 0; b < batch; ++b)
    for (const std::int32_t p : model.positions()) {
      const std::size_t i = static_cast<std::size_t>(b * n + p);
      d.tokens.push_back(global[i]);
      d.targets.push_back(p + 1 < n ? global[i + 1] : -1);
    }
  if (c.kind == ModelKind::kEncoder) {
    d.targets.clear();
    for (int b = 0; b < batch; ++b) d.targets.push_back((step + b) % c.num_classes);
  }
  return d;
}

double train_step(Model& model, int step, int batch, std::int64_t n) {
  const Data d = batch_for(model, step, batch, n);
  const double loss = model.forward_backward(d.tokens, d.targets);
  AdamWConfig opt;
  opt.lr = 5e-3f;
  model.step(opt);
  return loss;
}

class Resume : public ::testing::TestWithParam<ModelKind> {};

TEST_P(Resume, RepeatsTheUninterruptedLossesBitForBit) {
  Session session = Session::from_mpi(MPI_COMM_WORLD, Backend::kCpu);
  CheckpointDir dir;
  const ModelConfig c = tiny(GetParam());
  const int batch = 2;
  const std::int64_t n = 128;
  const std::vector<std::byte> user = {std::byte{7}, std::byte{0}, std::byte{255}};

  std::vector<double> uninterrupted;
  {
    Model model(session, c, {n, batch});
    for (int s = 0; s < 6; ++s) {
      if (s == 3) model.save(dir.file("step3.ckpt"), user);
      uninterrupted.push_back(train_step(model, s, batch, n));
    }
  }
  ModelConfig other_seed = c;
  other_seed.seed = 99;  // different initial parameters: the checkpoint must overwrite them all
  Model resumed(session, other_seed, {n, batch});
  EXPECT_EQ(resumed.load(dir.file("step3.ckpt")), user);
  EXPECT_EQ(resumed.steps_taken(), 3);
  for (int s = 3; s < 6; ++s) {
    const double loss = train_step(resumed, s, batch, n);
    EXPECT_EQ(loss, uninterrupted[static_cast<std::size_t>(s)]) << "step " << s;
  }
}

INSTANTIATE_TEST_SUITE_P(Kinds, Resume, ::testing::Values(ModelKind::kDecoder, ModelKind::kEncoder),
                         [](const auto& info) { return info.param == ModelKind::kEncoder ? "encoder" : "decoder"; });

TEST(Checkpoint, BadFilesAreRefusedOnEveryRank) {
  Session session = Session::from_mpi(MPI_COMM_WORLD, Backend::kCpu);
  CheckpointDir dir;
  const ModelConfig c = tiny(ModelKind::kDecoder);
  Model model(session, c, {128, 1});
  const std::string good = dir.file("good.ckpt");
  model.save(good);
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  const auto size = std::filesystem::file_size(good);
  if (rank == 0) {
    std::filesystem::copy_file(good, dir.file("truncated.ckpt"));
    std::filesystem::resize_file(dir.file("truncated.ckpt"), size / 2);
    std::filesystem::copy_file(good, dir.file("corrupt.ckpt"));
    std::fstream f(dir.file("corrupt.ckpt"), std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(static_cast<std::streamoff>(size / 2));
    f.put('\x5a');
  }
  MPI_Barrier(MPI_COMM_WORLD);
  test::expect_error([&] { model.load(dir.file("truncated.ckpt")); }, "truncated");
  test::expect_error([&] { model.load(dir.file("corrupt.ckpt")); }, "checksum mismatch");
  test::expect_error([&] { model.load(dir.file("missing.ckpt")); }, "cannot open");

  ModelConfig wider = c;
  wider.dim = 24;
  Model other(session, wider, {128, 1});
  test::expect_error([&] { other.load(good); }, "written for a different model");
  // The file is still good, and a failed load left nothing half-applied.
  model.load(good);
}

TEST(Model, EvaluateIsAForwardPassThatKeepsTheGradients) {
  Session session = Session::from_mpi(MPI_COMM_WORLD, Backend::kCpu);
  const ModelConfig c = tiny(ModelKind::kDecoder);
  Model model(session, c, {128, 2});
  const Data d = batch_for(model, 0, 2, 128);
  const double loss = model.forward_backward(d.tokens, d.targets);
  const std::vector<float> grads(model.gradients().begin(), model.gradients().end());
  const Data other = batch_for(model, 1, 2, 128);
  const double eval = model.evaluate(other.tokens, other.targets);
  EXPECT_TRUE(std::equal(grads.begin(), grads.end(), model.gradients().begin()));
  EXPECT_EQ(model.evaluate(d.tokens, d.targets), loss);
  EXPECT_NE(eval, loss);
  test::expect_error([&] { model.backward(); }, "no training forward()");
}

}  // namespace
}  // namespace ringcast
