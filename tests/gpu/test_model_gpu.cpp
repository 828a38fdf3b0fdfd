// ringcast::Model on a CUDA session (NCCL, device memory, bf16 products) against the same model on the
// CPU backend, the oracle (DESIGN.md §7), over 1, 2 and 4 ranks (ranks share one GPU through
// NCCL_HOSTID, see select_device). Every rank builds the same global batch, takes its rows and checks
// its own results; both models start from the same seed. Bounds (relative errors, all printed):
//  - initial parameters: bitwise (one host generator, uploaded);
//  - the first loss: <= 1e-2 with bf16 products; <= 2e-3 with f32 products, where only bf16 storage
//    differs from the CPU: attention's operands and the kept layer inputs (the residual stream is
//    rounded to bf16 once per layer on CUDA), whose independent roundings (2^-9 relative, random sign)
//    largely cancel in a mean over tokens. The layer inputs' rounding is one more of the same size per
//    layer, so the f32 bounds are twice those set for attention's alone; with bf16 products every
//    product input is rounded already and those bounds stand;
//  - each tensor's gradient, ||gpu - cpu|| / ||cpu||: <= 5e-2 with bf16 products, <= 4e-2 with f32
//    products (d_q, d_k, d_v come back in bf16). A layer's gradient carries the rounding of every layer
//    above it, and the norm gains' gradients are sums over rows that cancel, which amplifies it;
//  - five AdamW steps (clipping active): each loss <= 2e-2 (bf16) or <= 1e-2 (f32) from the CPU run's.
//    Adam's first steps move every weight by about lr whatever its gradient's size, so weights whose
//    gradient is below the rounding noise move the other way; the loss barely feels them;
//  - a checkpoint written on one backend loads bitwise into the other; evaluate() repeats forward()'s
//    loss bitwise on the device and leaves the gradients alone.
// These bounds are the first ones (written without a GPU at hand): the printed errors say how much
// margin they leave. Where no CUDA device exists every test skips.
#include "device_array.hpp"
#include "test_util.hpp"

#include <ringcast/error.hpp>
#include <ringcast/memory.hpp>
#include <ringcast/model.hpp>
#include <ringcast/session.hpp>

#include <gtest/gtest.h>
#include <mpi.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include <unistd.h>

namespace ringcast {
namespace {

int world_rank() {
  int r = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &r);
  return r;
}

int world_size() {
  int p = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &p);
  return p;
}

// A tiny model the CUDA attention kernels take (head_dim 64): D, F and the vocabulary not powers of
// two, LM-head chunks that do not divide the rows.
struct Case {
  const char* name;
  ModelKind kind;
  DType compute;
  AttentionMode mode;
  int heads, kv_heads;
};

ModelConfig config_for(const Case& k) {
  ModelConfig c;
  c.kind = k.kind;
  c.num_classes = k.kind == ModelKind::kEncoder ? 5 : 0;
  c.vocab = 37;
  c.dim = 72;
  c.layers = 2;
  c.heads = k.heads;
  c.kv_heads = k.kv_heads;
  c.head_dim = 64;
  c.ffn_hidden = 136;
  c.ce_chunk = 100;
  c.seed = 4242;
  c.compute_dtype = k.compute;
  c.attention.mode = k.mode;
  return c;
}

constexpr int kBatch = 2;
constexpr std::int64_t kSeqLen = 200;  // n_loc = 200 / P: not a multiple of a page or a query tile

// The f32 bounds are twice the ones attention's bf16 operands alone needed: the layer inputs are kept
// in bf16 too (header).
double loss_tolerance(DType compute) { return compute == DType::kBF16 ? 1e-2 : 2e-3; }
double gradient_tolerance(DType compute) { return compute == DType::kBF16 ? 5e-2 : 4e-2; }
double trajectory_tolerance(DType compute) { return compute == DType::kBF16 ? 2e-2 : 1e-2; }

// This rank's tokens and targets (decoder: next tokens, some ignored; encoder: the [batch] labels) of
// a seeded global batch.
struct Batch {
  std::vector<std::int32_t> tokens, targets;
};

Batch local_batch(const Model& model, std::uint32_t seed) {
  const ModelConfig& c = model.config();
  const auto global = test::random_ids(static_cast<std::size_t>(kBatch * kSeqLen), c.vocab, seed);
  std::mt19937 gen(seed + 1);
  std::vector<std::int32_t> next(global.size());
  for (std::size_t i = 0; i < global.size(); ++i) {
    const bool last = (i + 1) % kSeqLen == 0;
    next[i] = !last && gen() % 5 != 0 ? global[i + 1] : -1;
  }
  Batch b;
  for (int bi = 0; bi < kBatch; ++bi)
    for (const std::int32_t p : model.positions()) {
      const std::size_t i = static_cast<std::size_t>(bi * kSeqLen + p);
      b.tokens.push_back(global[i]);
      b.targets.push_back(next[i]);
    }
  if (c.kind == ModelKind::kEncoder) {
    b.targets.clear();
    for (int bi = 0; bi < kBatch; ++bi) b.targets.push_back(static_cast<std::int32_t>((seed + 3 * bi) % c.num_classes));
  }
  return b;
}

std::vector<float> host_copy(std::span<const float> x) { return {x.begin(), x.end()}; }

// Relative error of a device result against the CPU model's, printed; the worst element on failure.
void expect_near_cpu(const std::string& what, const std::vector<float>& gpu, const std::vector<float>& cpu,
                     double tol) {
  ASSERT_EQ(gpu.size(), cpu.size()) << what;
  test::expect_close(what, gpu, test::to_double(cpu), tol);
  if (test::relative_error(gpu, test::to_double(cpu)) <= tol) return;
  std::size_t worst = 0, nans = 0;
  double worst_diff = -1.0;
  for (std::size_t i = 0; i < cpu.size(); ++i) {
    const double diff = std::abs(double(gpu[i]) - double(cpu[i]));
    nans += std::isnan(gpu[i]);
    if (!(diff <= worst_diff)) {
      worst = i;
      worst_diff = diff;
    }
  }
  ADD_FAILURE() << what << ": worst element [" << worst << "] = " << gpu[worst] << " (CUDA) vs " << cpu[worst]
                << " (CPU); " << nans << " NaN of " << cpu.size();
}

void expect_bitwise(const std::string& what, const std::vector<float>& a, const std::vector<float>& b) {
  ASSERT_EQ(a.size(), b.size()) << what;
  std::size_t diffs = 0, first = 0;
  for (std::size_t i = 0; i < a.size(); ++i)
    if (std::memcmp(&a[i], &b[i], sizeof(float)) != 0 && diffs++ == 0) first = i;
  std::printf("    %-44s %s\n", what.c_str(), diffs == 0 ? "bitwise equal" : "DIFFERENT");
  EXPECT_EQ(diffs, 0u) << what << ": " << diffs << " of " << a.size() << " differ; first [" << first
                       << "]: " << a[first] << " vs " << b[first];
}

double relative(double x, double ref) { return std::abs(x - ref) / std::abs(ref); }

class ModelGpu : public ::testing::TestWithParam<Case> {};

// The first forward and backward: the loss, the target counts and every tensor's gradient.
TEST_P(ModelGpu, FirstPassMatchesTheCpuModel) {
  RINGCAST_SKIP_WITHOUT_CUDA();
  const Case k = GetParam();
  const ModelConfig c = config_for(k);
  Session cpu_session = Session::from_mpi(MPI_COMM_WORLD, Backend::kCpu);
  Session gpu_session = Session::from_mpi(MPI_COMM_WORLD, Backend::kCuda);
  Model cpu(cpu_session, c, {kSeqLen, kBatch});
  Model gpu(gpu_session, c, {kSeqLen, kBatch});
  EXPECT_EQ(gpu.compute_dtype(), k.compute);
  ASSERT_TRUE(std::equal(cpu.positions().begin(), cpu.positions().end(), gpu.positions().begin(),
                         gpu.positions().end()));
  expect_bitwise("initial parameters", gpu.to_host(gpu.parameters()), host_copy(cpu.parameters()));

  const Batch b = local_batch(cpu, 11);
  const double loss_cpu = cpu.forward_backward(b.tokens, b.targets);
  const double loss_gpu = gpu.forward_backward(b.tokens, b.targets);
  const double err = relative(loss_gpu, loss_cpu);
  std::printf("    loss %.8f (CUDA, %s products) vs %.8f (CPU): relative error %.2e (tolerance %.0e)\n", loss_gpu,
              std::string(dtype_name(k.compute)).c_str(), loss_cpu, err, loss_tolerance(k.compute));
  EXPECT_LE(err, loss_tolerance(k.compute));
  EXPECT_EQ(gpu.last_targets().count, cpu.last_targets().count);
  std::printf("    correct %lld (CUDA) vs %lld (CPU) of %lld\n", static_cast<long long>(gpu.last_targets().correct),
              static_cast<long long>(cpu.last_targets().correct), static_cast<long long>(cpu.last_targets().count));
  for (const ParameterInfo& t : cpu.parameter_table())
    expect_near_cpu("d " + t.name, gpu.to_host(gpu.gradient(t.name)), host_copy(cpu.gradient(t.name)),
                    gradient_tolerance(k.compute));

  // evaluate(): the same forward on the device, bit for bit, and the gradients stay.
  const std::vector<float> grads = gpu.to_host(gpu.gradients());
  EXPECT_EQ(gpu.evaluate(b.tokens, b.targets), loss_gpu);
  expect_bitwise("gradients after evaluate()", gpu.to_host(gpu.gradients()), grads);
}

// Five AdamW steps on fresh batches, clipping active from the start.
TEST_P(ModelGpu, AdamWTrajectoryFollowsTheCpuModel) {
  RINGCAST_SKIP_WITHOUT_CUDA();
  const Case k = GetParam();
  const ModelConfig c = config_for(k);
  Session cpu_session = Session::from_mpi(MPI_COMM_WORLD, Backend::kCpu);
  Session gpu_session = Session::from_mpi(MPI_COMM_WORLD, Backend::kCuda);
  Model cpu(cpu_session, c, {kSeqLen, kBatch});
  Model gpu(gpu_session, c, {kSeqLen, kBatch});
  AdamWConfig opt;
  opt.lr = 3e-3f;
  opt.max_norm = 0.5f;
  const double tol = trajectory_tolerance(k.compute);
  for (int s = 0; s < 5; ++s) {
    const Batch b = local_batch(cpu, 100 + static_cast<std::uint32_t>(s));
    const double loss_cpu = cpu.forward_backward(b.tokens, b.targets);
    const double loss_gpu = gpu.forward_backward(b.tokens, b.targets);
    cpu.step(opt);
    gpu.step(opt);
    const double err = relative(loss_gpu, loss_cpu);
    std::printf("    step %d: loss %.8f (CUDA) vs %.8f (CPU), relative error %.2e (tolerance %.0e); grad norm %.6f vs "
                "%.6f\n",
                s + 1, loss_gpu, loss_cpu, err, tol, gpu.last_grad_norm(), cpu.last_grad_norm());
    EXPECT_LE(err, tol) << "step " << s + 1;
    EXPECT_LE(relative(gpu.last_grad_norm(), cpu.last_grad_norm()), gradient_tolerance(k.compute)) << "step " << s + 1;
  }
  EXPECT_EQ(gpu.steps_taken(), 5);
}

INSTANTIATE_TEST_SUITE_P(
    Stacks, ModelGpu,
    ::testing::Values(Case{"decoder_ring_bf16", ModelKind::kDecoder, DType::kBF16, AttentionMode::kRing, 4, 2},
                      Case{"decoder_ring_f32", ModelKind::kDecoder, DType::kF32, AttentionMode::kRing, 4, 2},
                      Case{"decoder_ulysses_bf16", ModelKind::kDecoder, DType::kBF16, AttentionMode::kUlysses, 4, 4},
                      Case{"encoder_allgather_bf16", ModelKind::kEncoder, DType::kBF16, AttentionMode::kAllGather, 4,
                           2},
                      Case{"encoder_ring_f32", ModelKind::kEncoder, DType::kF32, AttentionMode::kRing, 2, 1}),
    [](const auto& info) { return std::string(info.param.name); });

// A folder every rank names alike (rank 0's pid), removed at the end.
class CheckpointDir {
 public:
  CheckpointDir() {
    int pid = static_cast<int>(::getpid());
    MPI_Bcast(&pid, 1, MPI_INT, 0, MPI_COMM_WORLD);
    path_ = std::filesystem::temp_directory_path() / ("ringcast-model-gpu-" + std::to_string(pid));
    std::filesystem::create_directories(path_);
  }
  ~CheckpointDir() {
    MPI_Barrier(MPI_COMM_WORLD);
    if (world_rank() == 0) std::filesystem::remove_all(path_);
  }
  std::string file(const std::string& name) const { return (path_ / name).string(); }

 private:
  std::filesystem::path path_;
};

// Written on the GPU after two steps, loaded on the CPU (and back): the same parameters, bit for bit,
// the same step count and user state.
TEST(ModelGpuCheckpoint, MovesBetweenBackendsBitForBit) {
  RINGCAST_SKIP_WITHOUT_CUDA();
  const ModelConfig c = config_for({"", ModelKind::kDecoder, DType::kBF16, AttentionMode::kRing, 4, 2});
  Session cpu_session = Session::from_mpi(MPI_COMM_WORLD, Backend::kCpu);
  Session gpu_session = Session::from_mpi(MPI_COMM_WORLD, Backend::kCuda);
  CheckpointDir dir;
  const std::vector<std::byte> user = {std::byte{1}, std::byte{2}, std::byte{254}};
  Model gpu(gpu_session, c, {kSeqLen, kBatch});
  AdamWConfig opt;
  opt.lr = 5e-3f;
  for (int s = 0; s < 2; ++s) {
    const Batch b = local_batch(gpu, 300 + static_cast<std::uint32_t>(s));
    gpu.forward_backward(b.tokens, b.targets);
    gpu.step(opt);
  }
  gpu.save(dir.file("gpu.ckpt"), user);

  ModelConfig other = c;
  other.seed = 7;  // the load must overwrite every parameter
  Model cpu(cpu_session, other, {kSeqLen, kBatch});
  EXPECT_EQ(cpu.load(dir.file("gpu.ckpt")), user);
  EXPECT_EQ(cpu.steps_taken(), 2);
  expect_bitwise("parameters, GPU -> CPU", host_copy(cpu.parameters()), gpu.to_host(gpu.parameters()));

  // And back: the CPU's file into a fresh GPU model.
  const Batch b = local_batch(cpu, 400);
  cpu.forward_backward(b.tokens, b.targets);
  cpu.step(opt);
  cpu.save(dir.file("cpu.ckpt"));
  Model back(gpu_session, other, {kSeqLen, kBatch});
  EXPECT_TRUE(back.load(dir.file("cpu.ckpt")).empty());
  EXPECT_EQ(back.steps_taken(), 3);
  expect_bitwise("parameters, CPU -> GPU", back.to_host(back.parameters()), host_copy(cpu.parameters()));
}

// Non-finite gradients stop the step on every rank, naming the tensor, with the parameters unchanged;
// ids out of range on one rank fail the batch on every rank; bf16 products need CUDA and the seed-method
// layers need the CPU.
TEST(ModelGpuErrors, AreReportedOnEveryRank) {
  RINGCAST_SKIP_WITHOUT_CUDA();
  const ModelConfig c = config_for({"", ModelKind::kDecoder, DType::kBF16, AttentionMode::kRing, 4, 2});
  Session gpu_session = Session::from_mpi(MPI_COMM_WORLD, Backend::kCuda);
  Model gpu(gpu_session, c, {kSeqLen, kBatch});
  const Batch b = local_batch(gpu, 500);
  AdamWConfig opt;
  gpu.forward_backward(b.tokens, b.targets);
  const float nan = std::numeric_limits<float>::quiet_NaN();
  copy_from_host(gpu.gradient("layers.1.w3").data() + 5, &nan, sizeof(float), gpu_session.device(),
                 gpu_session.stream());
  const std::vector<float> before = gpu.to_host(gpu.parameters());
  test::expect_error([&] { gpu.step(opt); }, "step 1: non-finite gradient in 'layers.1.w3'");
  expect_bitwise("parameters after the refused step", gpu.to_host(gpu.parameters()), before);
  EXPECT_EQ(gpu.steps_taken(), 0);

  auto bad = b.tokens;
  if (world_rank() == world_size() - 1) bad[0] = c.vocab;
  test::expect_error([&] { gpu.forward_backward(bad, b.targets); }, "1 token or target ids outside [0, 37)");

  Session cpu_session = Session::from_mpi(MPI_COMM_WORLD, Backend::kCpu);
  test::expect_error([&] { Model(cpu_session, c, {kSeqLen, kBatch}); },
                     "compute_dtype bf16 is not supported on the CPU");
}

}  // namespace
}  // namespace ringcast
