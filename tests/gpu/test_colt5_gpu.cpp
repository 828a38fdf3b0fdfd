// The CoLT5 mixers (runtime/src/colt5.hpp) and GatheredAttention on a CUDA session (NCCL, device
// memory) against the same objects on the CPU session, the oracle, over 1, 2 and 4 ranks (ranks share
// one GPU through NCCL_HOSTID): same parameters, same inputs, each rank checks its own rows and its
// own share of the parameter gradients (both backends split the work alike, so no reduction is needed).
// The inputs are built so that every router's scores are a permutation of a grid 0.02 apart: float32
// rounding (~1e-6 here) cannot reorder them, so both backends route the same tokens and the outputs
// differ by rounding only. Bounds (||gpu - cpu|| / ||cpu||, all printed):
//  - FFN, f32 products: both backends run fp32 arithmetic in different orders (cuBLAS vs BLAS blocking,
//    the soft top-k's chunked sums), ~1e-6 per operation: output <= 1e-4; gradients <= 1e-3, which
//    leaves room for the cancellation in the router's d_u = Σ d_s x;
//  - attention: the light and heavy kernels read q, k, v and dO rounded to bf16 (2^-9 relative, random
//    sign) on CUDA: output <= 1e-2 (the model suite's attention sees ~3e-3); gradients <= 3e-2, their
//    products and softmax derivative add a second rounding and the routers' weights sum dO · A over
//    few rows;
//  - GatheredAttention with a key bias (VCC's call: the bias rides in a padded feature, head 64 -> 128
//    on CUDA): the same bounds as attention.
// These bounds were written without a GPU at hand: the printed errors say how much margin they leave.
#include "../../runtime/src/colt5.hpp"
#include "../../runtime/src/gathered_attention.hpp"

#include "backend_compare.hpp"
#include "device_array.hpp"
#include "test_util.hpp"

#include <ringcast/session.hpp>

#include <gtest/gtest.h>
#include <mpi.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <vector>

namespace ringcast {
namespace {

using model::Geometry;
using model::ParameterTable;
using model::RunContext;
using model::Scratch;

constexpr int kBatch = 2;
constexpr std::int64_t kSeqLen = 200;  // n_loc = 200 / P: not a multiple of a page or a query tile
constexpr double kScoreSpacing = 0.02;

ModelConfig config() {
  ModelConfig c;
  c.kind = ModelKind::kEncoder;
  c.num_classes = 2;
  c.dim = 72;
  c.heads = 4;
  c.kv_heads = 2;
  c.head_dim = 64;  // the CUDA attention kernels take 64 or 128
  c.ffn_hidden = 40;
  c.colt5.enabled = true;
  c.colt5.light_heads = 2;      // one light KV head, one heavy
  c.colt5.window_radius = 70;   // reaches two ranks away at P = 4 (n_loc = 50)
  c.colt5.ffn_fraction = 0.12;  // m = 24
  c.colt5.query_fraction = 0.1;  // q = 20
  c.colt5.kv_fraction = 0.23;    // v = 46
  c.colt5.epsilon = 0.5f;
  c.colt5.iterations = 30;
  return c;
}

// One backend's mixer with its own parameter table, scratch, geometry and buffers.
struct Side {
  Session session;
  Geometry geom;
  ParameterTable table;
  Scratch scratch;
  std::unique_ptr<model::Mixer> mixer;

  Side(Backend backend, bool attention, const ModelConfig& c) : session(Session::from_mpi(MPI_COMM_WORLD, backend)) {
    geom.batch = kBatch;
    geom.seq_len = kSeqLen;
    geom.local_len = kSeqLen / session.size();
    geom.causal = false;
    for (std::int64_t i = 0; i < geom.local_len; ++i)
      geom.positions.push_back(static_cast<std::int32_t>(session.rank() * geom.local_len + i));
    geom.bind_positions(session.device(), session.stream());
    if (attention)
      mixer = std::make_unique<model::Colt5Attention>(session, table, scratch, "layers.0.", c, geom);
    else
      mixer = std::make_unique<model::Colt5Ffn>(session, table, scratch, "layers.0.", c, geom);
    table.finalize();
    scratch.bind(session.device());
  }
};

// Parameters as colt5_test draws them: routers U(±0.6), the rest U(±1/sqrt(cols)).
std::vector<float> draw_parameters(const ParameterTable& table) {
  std::vector<float> params(static_cast<std::size_t>(table.total()));
  for (std::size_t t = 0; t < table.infos().size(); ++t) {
    const ParameterInfo& info = table.infos()[t];
    const bool router = info.name.find("router_") != std::string::npos;
    const float bound = router ? 0.6f : 1.0f / std::sqrt(static_cast<float>(info.cols));
    const auto values =
        test::random_floats(static_cast<std::size_t>(info.numel()), 977 + static_cast<std::uint32_t>(t), bound);
    std::copy(values.begin(), values.end(), params.begin() + info.offset);
  }
  return params;
}

// Global x [B, n, D]: seeded noise with its component in the span of the routers' vectors replaced so
// that router j scores token i of sequence b exactly spacing · (π_jb(i) - n/2), π_jb a seeded
// permutation (Gram-Schmidt basis e of the u_j; coefficients solve the triangular u_j · e system).
std::vector<float> routed_inputs(const std::vector<std::vector<double>>& routers, int dim, std::uint32_t seed) {
  std::vector<std::vector<double>> basis;
  for (const auto& u : routers) {
    std::vector<double> e = u;
    for (const auto& b : basis) {
      const double p = std::inner_product(e.begin(), e.end(), b.begin(), 0.0);
      for (int c = 0; c < dim; ++c) e[c] -= p * b[c];
    }
    const double norm = std::sqrt(std::inner_product(e.begin(), e.end(), e.begin(), 0.0));
    for (double& v : e) v /= norm;
    basis.push_back(e);
  }
  const auto noise = test::random_floats(static_cast<std::size_t>(kBatch * kSeqLen * dim), seed);
  std::mt19937 gen(seed + 1);
  std::vector<std::vector<std::int64_t>> ranks(routers.size() * kBatch);
  for (auto& perm : ranks) {
    perm.resize(kSeqLen);
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), gen);
  }
  std::vector<float> x(noise.size());
  for (int b = 0; b < kBatch; ++b)
    for (std::int64_t i = 0; i < kSeqLen; ++i) {
      const std::size_t row = static_cast<std::size_t>((b * kSeqLen + i) * dim);
      std::vector<double> r(noise.begin() + row, noise.begin() + row + dim);
      for (const auto& e : basis) {
        const double p = std::inner_product(r.begin(), r.end(), e.begin(), 0.0);
        for (int c = 0; c < dim; ++c) r[c] -= p * e[c];
      }
      std::vector<double> coef(basis.size());
      for (std::size_t j = 0; j < routers.size(); ++j) {
        double target = kScoreSpacing * (ranks[j * kBatch + b][i] - kSeqLen / 2.0);
        for (std::size_t e = 0; e < j; ++e)
          target -= coef[e] * std::inner_product(routers[j].begin(), routers[j].end(), basis[e].begin(), 0.0);
        coef[j] = target / std::inner_product(routers[j].begin(), routers[j].end(), basis[j].begin(), 0.0);
        for (int c = 0; c < dim; ++c) r[c] += coef[j] * basis[j][c];
      }
      for (int c = 0; c < dim; ++c) x[row + c] = static_cast<float>(r[c]);
    }
  return x;
}

// The least gap between two scores x · u of one sequence, over the routers (float64 of the float x).
double least_score_gap(const std::vector<float>& x, const std::vector<std::vector<double>>& routers, int dim) {
  double gap = std::numeric_limits<double>::infinity();
  for (const auto& u : routers)
    for (int b = 0; b < kBatch; ++b) {
      std::vector<double> s(kSeqLen);
      for (std::int64_t i = 0; i < kSeqLen; ++i)
        s[i] = std::inner_product(u.begin(), u.end(), x.begin() + (b * kSeqLen + i) * dim, 0.0);
      std::sort(s.begin(), s.end());
      for (std::int64_t i = 1; i < kSeqLen; ++i) gap = std::min(gap, s[i] - s[i - 1]);
    }
  return gap;
}

// This rank's rows [B, n_loc, D] of a global [B, n, D] tensor.
std::vector<float> local_rows(const std::vector<float>& global, const Geometry& g, int dim) {
  std::vector<float> out;
  for (int b = 0; b < g.batch; ++b)
    out.insert(out.end(), global.begin() + (b * g.seq_len + g.positions[0]) * dim,
               global.begin() + (b * g.seq_len + g.positions[0] + g.local_len) * dim);
  return out;
}

std::vector<double> increment(const std::vector<float>& after, const std::vector<float>& before) {
  return test::added(after, before);
}

// Forward and backward of one mixer on both backends; compares y - y0, dx - dx0 and every gradient.
void compare_mixer(bool attention, double out_tol, double grad_tol) {
  const ModelConfig c = config();
  Side cpu(Backend::kCpu, attention, c), gpu(Backend::kCuda, attention, c);
  ASSERT_EQ(cpu.table.total(), gpu.table.total());
  const std::vector<float> params = draw_parameters(cpu.table);

  std::vector<std::vector<double>> routers;
  for (const char* name : {"layers.0.router_ffn", "layers.0.router_q", "layers.0.router_kv"}) {
    const auto& infos = cpu.table.infos();
    const auto it = std::find_if(infos.begin(), infos.end(), [&](const ParameterInfo& i) { return i.name == name; });
    if (it != infos.end()) routers.emplace_back(params.begin() + it->offset, params.begin() + it->offset + it->numel());
  }
  ASSERT_EQ(routers.size(), attention ? 2u : 1u);
  const std::vector<float> x_global = routed_inputs(routers, c.dim, 31);
  ASSERT_GT(least_score_gap(x_global, routers, c.dim), 0.9 * kScoreSpacing) << "the router scores are off their grid";
  const std::vector<float> dy_global = test::random_floats(x_global.size(), 32);
  const auto x = local_rows(x_global, cpu.geom, c.dim), dy = local_rows(dy_global, cpu.geom, c.dim);
  const auto y0 = test::random_floats(x.size(), 33), dx0 = test::random_floats(x.size(), 34);

  // CPU: host buffers.
  std::vector<float> cpu_y = y0, cpu_dx = dx0, cpu_grads(params.size(), 0.0f);
  const RunContext cpu_rc{cpu.session, {cpu.session.device(), cpu.session.stream()}, cpu.table, params.data(),
                          cpu_grads.data(), cpu.scratch, 0, true, DType::kF32};
  cpu.mixer->forward(cpu_rc, x.data(), cpu_y.data());
  cpu.mixer->backward(cpu_rc, x.data(), dy.data(), cpu_dx.data());

  // CUDA: device buffers.
  test::DeviceArray<float> d_params(params), d_grads(std::vector<float>(params.size(), 0.0f)), d_x(x), d_dy(dy),
      d_y(y0), d_dx(dx0);
  const RunContext gpu_rc{gpu.session, {gpu.session.device(), gpu.session.stream()}, gpu.table, d_params.get(),
                          d_grads.get(), gpu.scratch, 0, true, DType::kF32};
  gpu.mixer->forward(gpu_rc, d_x.get(), d_y.get());
  gpu.mixer->backward(gpu_rc, d_x.get(), d_dy.get(), d_dx.get());

  test::expect_near_cpu("f(x), this rank's rows", increment(d_y.download(), y0), increment(cpu_y, y0), out_tol);
  test::expect_near_cpu("d x, this rank's rows", increment(d_dx.download(), dx0), increment(cpu_dx, dx0), grad_tol);
  const std::vector<float> gpu_grads = d_grads.download();
  for (const ParameterInfo& info : cpu.table.infos()) {
    const auto first = static_cast<std::ptrdiff_t>(info.offset), last = first + info.numel();
    test::expect_near_cpu("d " + info.name, std::vector<float>(gpu_grads.begin() + first, gpu_grads.begin() + last),
                          std::vector<float>(cpu_grads.begin() + first, cpu_grads.begin() + last), grad_tol);
  }
}

TEST(Colt5Gpu, FfnMatchesTheCpuBackend) {
  RINGCAST_SKIP_WITHOUT_CUDA();
  compare_mixer(false, 1e-4, 1e-3);
}

TEST(Colt5Gpu, AttentionMatchesTheCpuBackend) {
  RINGCAST_SKIP_WITHOUT_CUDA();
  compare_mixer(true, 1e-2, 3e-2);
}

// GatheredAttention's buffers for one call, wherever they live.
struct GatheredBuffers {
  float *q, *k, *v, *bias, *d_o, *o, *lse, *d_q, *d_k, *d_v, *d_bias;
  void *kept, *workspace;
};

void run_gathered(model::GatheredAttention& attention, const GatheredBuffers& b, std::span<const std::int64_t> q_counts,
                  std::span<const std::int64_t> k_counts) {
  model::GatheredForwardArgs f;
  f.n_q = std::accumulate(q_counts.begin(), q_counts.end(), std::int64_t{0});
  f.n_k = std::accumulate(k_counts.begin(), k_counts.end(), std::int64_t{0});
  f.q_counts = q_counts;
  f.k_counts = k_counts;
  f.q = b.q;
  f.k = b.k;
  f.v = b.v;
  f.key_bias = b.bias;
  f.o = b.o;
  f.lse = b.lse;
  f.kept = b.kept;
  f.workspace = b.workspace;
  attention.forward(f);
  attention.backward({.fwd = f, .d_o = b.d_o, .d_q = b.d_q, .d_k = b.d_k, .d_v = b.d_v, .d_key_bias = b.d_bias});
}

// GatheredAttention's key-bias call (VCC's): uneven per-rank counts, two sequences, GQA, a bias per
// key; forward outputs, LSE and every gradient (d_key_bias included) against the CPU backend.
TEST(GatheredAttentionGpu, KeyBiasCallMatchesTheCpuBackend) {
  RINGCAST_SKIP_WITHOUT_CUDA();
  const Session cpu_session = Session::from_mpi(MPI_COMM_WORLD, Backend::kCpu);
  const Session gpu_session = Session::from_mpi(MPI_COMM_WORLD, Backend::kCuda);
  const int rank = cpu_session.rank(), ranks = cpu_session.size(), h = 4, hkv = 2, d = 64;
  const std::vector<std::int64_t> q_counts{37 + 11 * rank, 5 + 3 * rank}, k_counts{70 - 9 * rank, 1 + 20 * rank};
  const std::int64_t n_q = q_counts[0] + q_counts[1], n_k = k_counts[0] + k_counts[1];
  model::GatheredAttentionShape shape{h, hkv, d, 2, n_q, n_k, 0};
  for (int r = 0; r < ranks; ++r) shape.max_total_keys += 71 + 11 * r;  // every rank's n_k
  model::GatheredAttention cpu(cpu_session, shape), gpu(gpu_session, shape);

  const std::uint32_t seed = 500 + static_cast<std::uint32_t>(rank);
  const std::vector<std::vector<float>> inputs{
      test::random_floats(static_cast<std::size_t>(n_q * h * d), seed),              // q
      test::random_floats(static_cast<std::size_t>(n_k * hkv * d), seed + 10),       // k
      test::random_floats(static_cast<std::size_t>(n_k * hkv * d), seed + 20),       // v
      test::random_floats(static_cast<std::size_t>(n_k), seed + 30, 2.0f),           // key bias
      test::random_floats(static_cast<std::size_t>(n_q * h * d), seed + 40),         // d_o
      std::vector<float>(static_cast<std::size_t>(n_q * h * d)),                     // o
      std::vector<float>(static_cast<std::size_t>(n_q * h)),                         // lse
      test::random_floats(static_cast<std::size_t>(n_q * h * d), seed + 50),         // d_q (added into)
      test::random_floats(static_cast<std::size_t>(n_k * hkv * d), seed + 60),       // d_k
      test::random_floats(static_cast<std::size_t>(n_k * hkv * d), seed + 70),       // d_v
      test::random_floats(static_cast<std::size_t>(n_k), seed + 80),                 // d_key_bias
      std::vector<float>((cpu.kept_bytes() + sizeof(float) - 1) / sizeof(float)),    // kept
      std::vector<float>((cpu.workspace_bytes() + sizeof(float) - 1) / sizeof(float))};
  // The buffers in the order of `inputs`.
  const auto buffers = [](const std::vector<float*>& p) {
    return GatheredBuffers{p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7], p[8], p[9], p[10], p[11], p[12]};
  };
  std::vector<std::vector<float>> host = inputs;
  std::vector<float*> host_ptrs;
  for (auto& x : host) host_ptrs.push_back(x.data());
  run_gathered(cpu, buffers(host_ptrs), q_counts, k_counts);

  // The kept region and workspace are sized by the CUDA object (bf16 pools, padded features).
  std::vector<std::unique_ptr<test::DeviceArray<float>>> device;
  for (std::size_t i = 0; i + 2 < inputs.size(); ++i)
    device.push_back(std::make_unique<test::DeviceArray<float>>(inputs[i]));
  for (const std::size_t bytes : {gpu.kept_bytes(), gpu.workspace_bytes()})
    device.push_back(std::make_unique<test::DeviceArray<float>>((bytes + sizeof(float) - 1) / sizeof(float)));
  std::vector<float*> device_ptrs;
  for (auto& a : device) device_ptrs.push_back(a->get());
  run_gathered(gpu, buffers(device_ptrs), q_counts, k_counts);

  const char* names[] = {"O", "LSE", "d q", "d k", "d v", "d key_bias"};
  for (int i = 0; i < 6; ++i) {
    const std::size_t at = static_cast<std::size_t>(i < 2 ? 5 + i : 7 + (i - 2));
    const std::vector<float> gpu_out = device[at]->download();
    if (i < 2)
      test::expect_near_cpu(names[i], gpu_out, host[at], 1e-2);
    else  // gradients are added into seeded buffers: compare what was added
      test::expect_near_cpu(names[i], increment(gpu_out, inputs[at]), increment(host[at], inputs[at]), 3e-2);
  }
}

}  // namespace
}  // namespace ringcast
