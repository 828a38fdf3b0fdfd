// VccBlock and PyramidionPool on a CUDA session (NCCL, device memory) against the same layer on the
// CPU backend, the oracle, over 1, 2 and 4 ranks (ranks share one GPU through NCCL_HOSTID). Both
// layers get the same parameters and inputs; every rank checks its own rows. Bounds (relative L2,
// all printed):
//  - discrete choices: VCC's fine blocks and Pyramidion's pairing (the rows each round sends and
//    receives) must be identical. The inputs make them robust: VCC draws inputs until the CPU run's
//    gap between the last fine block's l and the next one is >= 1e-3 (its scores are fp32 products on
//    both backends, so they differ by ~1e-6), and the Pyramidion scorer sees rows whose logits are
//    spaced 4/n apart (its float64 dot is the CPU's, bit for bit);
//  - VCC, output and log scores: <= 1e-2, and gradients <= 2e-2: the matrix products are fp32 on
//    both, but the attention on Z keeps the CUDA backend's storage precision (bf16 operands, 2^-9
//    relative rounding, as in test_model_gpu.cpp); the norm gains' gradients are sums that cancel;
//  - Pyramidion, output: <= 1e-5 and gradients <= 1e-4: fp32 throughout, the merge weights' expf and
//    the fixed-order sums differ from the CPU by a few ulps.
// Where no CUDA device exists every test skips.
#include "../../runtime/src/pyramidion.hpp"
#include "../../runtime/src/vcc.hpp"

#include "device_array.hpp"
#include "parameter_draw.hpp"
#include "test_util.hpp"

#include <ringcast/memory.hpp>
#include <ringcast/session.hpp>

#include <gtest/gtest.h>
#include <mpi.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <functional>
#include <memory>
#include <numeric>
#include <random>
#include <span>
#include <string>
#include <vector>

namespace ringcast {
namespace {

using model::Geometry;
using model::Layer;
using model::ParameterTable;
using model::RunContext;
using model::Scratch;

// One layer on one session: parameters, gradients and scratch in that session's device memory (host
// memory on the CPU backend), inputs uploaded and results downloaded through DeviceBuffer.
struct Bench {
  using Make = std::function<std::unique_ptr<Layer>(const Session&, ParameterTable&, Scratch&)>;

  const Session& session;
  ParameterTable table;
  Scratch scratch;
  std::unique_ptr<Layer> layer;
  DeviceBuffer params, grads;

  Bench(const Session& s, const Make& make) : session(s) {
    layer = make(s, table, scratch);
    table.finalize();
    scratch.bind(s.device());
    params = DeviceBuffer(static_cast<std::size_t>(table.total()) * sizeof(float), s.device());
    grads = DeviceBuffer(static_cast<std::size_t>(table.total()) * sizeof(float), s.device());
  }

  RunContext context() const {
    return {session, {session.device(), session.stream()}, table, params.as<const float>(), grads.as<float>(),
            scratch, 5, true, DType::kF32};
  }

  DeviceBuffer upload(const std::vector<float>& host) const {
    DeviceBuffer b(std::max<std::size_t>(host.size(), 1) * sizeof(float), session.device());
    b.upload(std::span<const float>(host), session.stream());
    return b;
  }

  std::vector<float> download(const DeviceBuffer& b, std::int64_t count) const {
    std::vector<float> host(static_cast<std::size_t>(count));
    b.download(std::span<float>(host), session.stream());
    return host;
  }

  std::int64_t out_count(int dim) const { return layer->out_geometry().rows() * dim; }

  std::vector<float> forward(const std::vector<float>& x, int dim) {
    const DeviceBuffer in = upload(x);
    DeviceBuffer out(static_cast<std::size_t>(out_count(dim)) * sizeof(float), session.device());
    layer->forward(context(), in.as<const float>(), out.as<float>());
    return download(out, out_count(dim));
  }

  // d_in, with the parameter gradients (started from zero) left in `grads`.
  std::vector<float> backward(const std::vector<float>& x, const std::vector<float>& d_out) {
    grads.upload(std::span<const float>(std::vector<float>(static_cast<std::size_t>(table.total()), 0.0f)),
                 session.stream());
    const DeviceBuffer in = upload(x), dy = upload(d_out);
    DeviceBuffer d_in(std::max<std::size_t>(x.size(), 1) * sizeof(float), session.device());
    layer->backward(context(), in.as<const float>(), dy.as<const float>(), d_in.as<float>());
    return download(d_in, static_cast<std::int64_t>(x.size()));
  }

  std::vector<float> gradient(const std::string& name) const {
    const ParameterInfo& info = table.find(name);
    std::vector<float> all = download(grads, table.total());
    return {all.begin() + info.offset, all.begin() + info.offset + info.numel()};
  }
};

// The same parameters for both backends (test::draw_parameter, one seed per tensor).
std::vector<float> draw_parameters(const ParameterTable& table, std::uint32_t seed) {
  std::vector<float> params(static_cast<std::size_t>(table.total()));
  for (const ParameterInfo& info : table.infos()) {
    const std::vector<float> v = test::draw_parameter(info, seed++);
    std::copy(v.begin(), v.end(), params.begin() + info.offset);
  }
  return params;
}

// This rank's rows of a [B, n, D] global tensor, in the geometry's row order.
std::vector<float> shard(const std::vector<float>& global, const Geometry& g, int dim) {
  std::vector<float> local(static_cast<std::size_t>(g.rows() * dim));
  for (int b = 0; b < g.batch; ++b)
    for (std::int64_t i = 0; i < g.local_len; ++i)
      std::copy_n(global.begin() + (b * g.seq_len + g.positions[i]) * dim, dim,
                  local.begin() + (b * g.local_len + i) * dim);
  return local;
}

Geometry contiguous(std::int64_t seq, int batch, const Session& s) {
  Geometry g;
  g.batch = batch;
  g.seq_len = seq;
  g.local_len = seq / s.size();
  g.causal = false;
  for (std::int64_t i = 0; i < g.local_len; ++i) g.positions.push_back(static_cast<std::int32_t>(s.rank() * g.local_len + i));
  return g;
}

const std::vector<std::string> kVccTensors = {"attn_norm", "wq", "wk", "wv", "wo", "ffn_norm", "w1", "w3", "w2"};

// A VCC layer the CUDA attention kernels take (head_dim 64); blocks align with every shard.
struct VccCase {
  int heads, kv_heads, vip, block, fine;
  std::int64_t seq;
  std::uint32_t seed;
};

void check_vcc(const VccCase& k) {
  RINGCAST_SKIP_WITHOUT_CUDA();
  Session cpu = Session::from_mpi(MPI_COMM_WORLD, Backend::kCpu);
  Session gpu = Session::from_mpi(MPI_COMM_WORLD, Backend::kCuda);
  ModelConfig c;
  c.kind = ModelKind::kEncoder;
  c.dim = 72;
  c.heads = k.heads;
  c.kv_heads = k.kv_heads;
  c.head_dim = 64;
  c.ffn_hidden = 136;
  c.seed = 99;
  c.vcc.enabled = true;
  c.vcc.vip_tokens = k.vip;
  c.vcc.block = k.block;
  c.vcc.fine_blocks = k.fine;
  c.vcc.explore_prob = 0.0f;
  const std::string prefix = "layers.1.";
  const Geometry g = contiguous(k.seq, 1, cpu);
  const Bench::Make make = [&](const Session& s, ParameterTable& table, Scratch& scratch) -> std::unique_ptr<Layer> {
    return std::make_unique<model::VccBlock>(s, table, scratch, prefix, c, g);
  };
  Bench on_cpu(cpu, make), on_gpu(gpu, make);
  const std::vector<float> params = draw_parameters(on_cpu.table, k.seed);
  on_cpu.params.upload(std::span<const float>(params), cpu.stream());
  on_gpu.params.upload(std::span<const float>(params), gpu.stream());
  auto& cpu_layer = static_cast<model::VccBlock&>(*on_cpu.layer);
  auto& gpu_layer = static_cast<model::VccBlock&>(*on_gpu.layer);

  // Inputs whose selection has a clear margin on the CPU (every rank sees the same l, so all agree).
  constexpr double kMinMargin = 1e-3;
  const std::int64_t blocks = (k.seq - k.vip) / k.block;
  std::vector<float> x, out_cpu;
  double margin = 0.0;
  for (std::uint32_t draw = 0; draw < 20 && margin < kMinMargin; ++draw) {
    x = shard(test::random_floats(static_cast<std::size_t>(k.seq * c.dim), k.seed + 1000 * draw), g, c.dim);
    out_cpu = on_cpu.forward(x, c.dim);
    std::vector<float> l = cpu_layer.log_scores();
    std::sort(l.begin(), l.end(), std::greater<>());
    margin = k.fine == 0 || k.fine == blocks ? 1.0 : double{l[k.fine - 1]} - l[k.fine];
  }
  ASSERT_GE(margin, kMinMargin) << "no input draw separates the fine blocks from the rest";

  const std::vector<float> out_gpu = on_gpu.forward(x, c.dim);
  EXPECT_EQ(gpu_layer.fine(), cpu_layer.fine()) << "the backends kept different blocks fine";
  test::expect_close("VCC log scores", gpu_layer.log_scores(), test::to_double(cpu_layer.log_scores()), 1e-2);
  test::expect_close("VCC output", out_gpu, test::to_double(out_cpu), 1e-2);

  const std::vector<float> d_out = shard(test::random_floats(static_cast<std::size_t>(k.seq * c.dim), k.seed + 7), g, c.dim);
  const std::vector<float> dx_cpu = on_cpu.backward(x, d_out), dx_gpu = on_gpu.backward(x, d_out);
  EXPECT_EQ(gpu_layer.fine(), cpu_layer.fine()) << "the backward's recomputation kept different blocks fine";
  test::expect_close("VCC d x", dx_gpu, test::to_double(dx_cpu), 2e-2);
  for (const std::string& name : kVccTensors)
    test::expect_close("VCC d " + name, on_gpu.gradient(prefix + name), test::to_double(on_cpu.gradient(prefix + name)),
                       2e-2);
}

TEST(VccGpu, GqaBlocksOfSix) { check_vcc({2, 1, 6, 6, 4, 96, 11}); }
// With 4 ranks, rank 0 holds only the VIP tokens (no block).
TEST(VccGpu, RankWithoutBlocks) { check_vcc({2, 2, 12, 6, 2, 48, 23}); }
TEST(VccGpu, AllCoarse) { check_vcc({2, 2, 6, 6, 0, 96, 31}); }

struct PoolCase {
  int batch, dim;
  std::int64_t seq, pool_to;
  std::uint32_t seed;
};

void check_pyramidion(const PoolCase& k) {
  RINGCAST_SKIP_WITHOUT_CUDA();
  Session cpu = Session::from_mpi(MPI_COMM_WORLD, Backend::kCpu);
  Session gpu = Session::from_mpi(MPI_COMM_WORLD, Backend::kCuda);
  ModelConfig c;
  c.kind = ModelKind::kEncoder;
  c.dim = k.dim;
  c.pyramidion.beta = 20.0f;
  const std::string prefix = "pool.0.";
  const Geometry g = contiguous(k.seq, k.batch, cpu);
  const Bench::Make make = [&](const Session& s, ParameterTable& table, Scratch& scratch) -> std::unique_ptr<Layer> {
    return std::make_unique<model::PyramidionPool>(s, table, scratch, prefix, c, g, k.pool_to);
  };
  Bench on_cpu(cpu, make), on_gpu(gpu, make);
  // The scorer reads feature 0 (w = e_0, b = 0.1); feature 0 of each sequence is a permutation of
  // evenly spaced logits in [-2, 2), so no two scores of a round-0 sort are close.
  std::vector<float> params(static_cast<std::size_t>(on_cpu.table.total()), 0.0f);
  params[static_cast<std::size_t>(on_cpu.table.find(prefix + "pool_w").offset)] = 1.0f;
  params[static_cast<std::size_t>(on_cpu.table.find(prefix + "pool_b").offset)] = 0.1f;
  on_cpu.params.upload(std::span<const float>(params), cpu.stream());
  on_gpu.params.upload(std::span<const float>(params), gpu.stream());
  std::vector<float> global = test::random_floats(static_cast<std::size_t>(k.batch * k.seq * k.dim), k.seed, 0.5f);
  for (int b = 0; b < k.batch; ++b) {
    std::vector<std::int64_t> order(static_cast<std::size_t>(k.seq));
    std::iota(order.begin(), order.end(), 0);
    std::shuffle(order.begin(), order.end(), std::mt19937(k.seed + b));
    for (std::int64_t t = 0; t < k.seq; ++t)
      global[(b * k.seq + t) * k.dim] = 4.0f * (static_cast<float>(order[t]) / static_cast<float>(k.seq) - 0.5f);
  }
  const std::vector<float> x = shard(global, g, k.dim);
  const std::vector<float> out_cpu = on_cpu.forward(x, k.dim), out_gpu = on_gpu.forward(x, k.dim);
  auto& cpu_pool = static_cast<model::PyramidionPool&>(*on_cpu.layer);
  auto& gpu_pool = static_cast<model::PyramidionPool&>(*on_gpu.layer);
  for (int r = 0; r < cpu_pool.rounds(); ++r) {
    EXPECT_EQ(gpu_pool.sent_rows(r), cpu_pool.sent_rows(r)) << "round " << r << " paired differently";
    EXPECT_EQ(gpu_pool.received_rows(r), cpu_pool.received_rows(r)) << "round " << r << " paired differently";
  }
  test::expect_close("Pyramidion output", out_gpu, test::to_double(out_cpu), 1e-5);

  const Geometry& og = on_cpu.layer->out_geometry();
  std::vector<float> d_out = test::random_floats(static_cast<std::size_t>(og.rows() * k.dim), k.seed + 3);
  const std::vector<float> dx_cpu = on_cpu.backward(x, d_out), dx_gpu = on_gpu.backward(x, d_out);
  test::expect_close("Pyramidion d x", dx_gpu, test::to_double(dx_cpu), 1e-4);
  for (const char* name : {"pool_w", "pool_b"})
    test::expect_close(std::string("Pyramidion d ") + name, on_gpu.gradient(prefix + name),
                       test::to_double(on_cpu.gradient(prefix + name)), 1e-4);
}

TEST(PyramidionGpu, TwoRounds) { check_pyramidion({2, 40, 96, 24, 5}); }
TEST(PyramidionGpu, ThreeRoundsOneSequence) { check_pyramidion({1, 72, 96, 12, 17}); }

}  // namespace
}  // namespace ringcast
