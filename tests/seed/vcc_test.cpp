// VccBlock (runtime/src/vcc.hpp) on 1, 2 or 4 ranks against a float64 single-process reference of the
// same layer over whole sequences: coarsening, the VIP selection, attention and FFN on the compressed
// sequence with the log(dup) + log σ key bias, and decompression. Every rank draws the same seeded
// inputs and checks its shard. Gradients are compared with central differences of the reference with
// the selection held fixed and σ = 1 + π − π₀ (π₀ the base point's π, a constant): its value is 1
// and its derivative is the straight-through one, so finite differences see what the layer trains.
#include "../../runtime/src/vcc.hpp"

#include "parameter_draw.hpp"
#include "test_util.hpp"

#include <ringcast/kernels/attention.hpp>
#include <ringcast/session.hpp>

#include <gtest/gtest.h>
#include <mpi.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <string>
#include <vector>

namespace ringcast {
namespace {

using model::Geometry;
using model::ParameterTable;
using model::RunContext;
using model::Scratch;
using model::VccBlock;
using test::Vec;

constexpr const char* kPrefix = "layers.1.";

struct Case {
  int batch, dim, heads, kv_heads, head_dim, hidden;
  int vip, block, fine;
  std::int64_t seq;
  std::uint32_t seed;
};

// The layer's parameters in float64, in ParameterTable order of names.
struct Weights {
  Vec attn_norm, wq, wk, wv, wo, ffn_norm, w1, w3, w2;
};
using Member = Vec Weights::*;
const std::vector<std::pair<std::string, Member>> kTensors = {
    {"attn_norm", &Weights::attn_norm}, {"wq", &Weights::wq}, {"wk", &Weights::wk},
    {"wv", &Weights::wv},               {"wo", &Weights::wo}, {"ffn_norm", &Weights::ffn_norm},
    {"w1", &Weights::w1},               {"w3", &Weights::w3}, {"w2", &Weights::w2}};

// Per example: which blocks are fine, and π where the selection was made (the stop-gradient values).
struct Selection {
  std::vector<std::vector<char>> fine;
  std::vector<Vec> pi;
};

constexpr double kEps = 1e-6, kTheta = 10000.0;

void rms(const double* x, const Vec& g, int D, double* y) {
  double ms = 0.0;
  for (int i = 0; i < D; ++i) ms += x[i] * x[i];
  const double r = 1.0 / std::sqrt(ms / D + kEps);
  for (int i = 0; i < D; ++i) y[i] = x[i] * r * g[i];
}

// y = W x, W [out, in].
Vec linear(const Vec& W, int out, int in, const double* x) {
  Vec y(static_cast<std::size_t>(out), 0.0);
  for (int o = 0; o < out; ++o)
    for (int i = 0; i < in; ++i) y[o] += W[o * in + i] * x[i];
  return y;
}

// Rotate-half RoPE of every head of v at position pos.
void rope(double* v, int heads, int hd, double pos) {
  const int half = hd / 2;
  for (int h = 0; h < heads; ++h)
    for (int i = 0; i < half; ++i) {
      const double angle = pos * std::pow(kTheta, -2.0 * i / hd);
      double* a = v + h * hd + i;
      double* b = a + half;
      const double x0 = *a, x1 = *b;
      *a = x0 * std::cos(angle) - x1 * std::sin(angle);
      *b = x1 * std::cos(angle) + x0 * std::sin(angle);
    }
}

// The layer over whole sequences: x [B, n, D] -> [B, n, D]. `fixed` supplies the selections and π₀;
// without it they are made here (explore[e] non-empty: that ranking) and written to `chosen`, and
// `margin` gets the smallest gap between the last fine block's l and the next block's.
// straight_through = false holds σ at 1 (for checking that the test sees the σ path at all).
Vec reference_vcc(const Case& k, const Vec& x, const Weights& w, const Selection* fixed, Selection* chosen,
                  const std::vector<std::vector<std::int32_t>>& explore, double* margin,
                  bool straight_through = true) {
  const int D = k.dim, H = k.heads, KV = k.kv_heads, hd = k.head_dim, F = k.hidden, V = k.vip, b = k.block;
  const int qd = H * hd, kd = KV * hd, G = H / KV;
  const std::int64_t n = k.seq, Nb = (n - V) / b;
  const double scale = 1.0 / std::sqrt(static_cast<double>(hd));
  Vec out(x.size());
  for (int e = 0; e < k.batch; ++e) {
    const double* xe = x.data() + e * n * D;
    double* oe = out.data() + e * n * D;
    // Coarsen and select.
    std::vector<Vec> c(static_cast<std::size_t>(Nb), Vec(D, 0.0)), kc(static_cast<std::size_t>(Nb)), qv(V);
    Vec tmp(D);
    for (std::int64_t j = 0; j < Nb; ++j) {
      for (int t = 0; t < b; ++t)
        for (int i = 0; i < D; ++i) c[j][i] += xe[(V + j * b + t) * D + i] / b;
      rms(c[j].data(), w.attn_norm, D, tmp.data());
      kc[j] = linear(w.wk, kd, D, tmp.data());
      rope(kc[j].data(), KV, hd, static_cast<double>(V + j * b + (b - 1) / 2));
    }
    for (int v = 0; v < V; ++v) {
      rms(xe + v * D, w.attn_norm, D, tmp.data());
      qv[v] = linear(w.wq, qd, D, tmp.data());
      rope(qv[v].data(), H, hd, v);
    }
    Vec p(static_cast<std::size_t>(Nb), 0.0);
    for (int h = 0; h < H; ++h)
      for (int v = 0; v < V; ++v) {
        Vec logit(static_cast<std::size_t>(Nb));
        double mx = -1e300, sum = 0.0;
        for (std::int64_t j = 0; j < Nb; ++j) {
          logit[j] = 0.0;
          for (int i = 0; i < hd; ++i) logit[j] += scale * qv[v][h * hd + i] * kc[j][(h / G) * hd + i];
          mx = std::max(mx, logit[j]);
        }
        for (std::int64_t j = 0; j < Nb; ++j) sum += std::exp(logit[j] - mx);
        for (std::int64_t j = 0; j < Nb; ++j) p[j] += std::exp(logit[j] - mx) / sum / (H * V);
      }
    Vec l(static_cast<std::size_t>(Nb)), pi(static_cast<std::size_t>(Nb));
    double lsum = 0.0;
    for (std::int64_t j = 0; j < Nb; ++j) lsum += std::exp(l[j] = std::log(p[j] + 1e-5));
    for (std::int64_t j = 0; j < Nb; ++j) pi[j] = std::exp(l[j]) / lsum;
    std::vector<char> fine;
    Vec pi0;
    if (fixed) {
      fine = fixed->fine[e];
      pi0 = fixed->pi[e];
    } else {
      std::vector<std::int32_t> order = explore[e];
      if (order.empty()) {
        order.resize(static_cast<std::size_t>(Nb));
        std::iota(order.begin(), order.end(), 0);
        std::stable_sort(order.begin(), order.end(), [&](int i, int j) { return l[i] > l[j]; });
        if (k.fine > 0 && k.fine < Nb) *margin = std::min(*margin, l[order[k.fine - 1]] - l[order[k.fine]]);
      }
      fine.assign(static_cast<std::size_t>(Nb), 0);
      for (int i = 0; i < k.fine; ++i) fine[order[i]] = 1;
      pi0 = pi;
      chosen->fine.push_back(fine);
      chosen->pi.push_back(pi);
    }

    // The compressed sequence: VIP tokens, fine tokens, coarse tokens (bidirectional: order is free).
    struct Token {
      Vec z;
      double pos, bias, sigma;
      std::int64_t block;  // -1: VIP
    };
    std::vector<Token> zs;
    for (int v = 0; v < V; ++v) zs.push_back({Vec(xe + v * D, xe + (v + 1) * D), double(v), 0.0, 1.0, -1});
    for (std::int64_t j = 0; j < Nb; ++j) {
      const double sigma = !straight_through ? 1.0 : fine[j] ? 1.0 + pi[j] - pi0[j] : 1.0 - pi[j] + pi0[j];
      if (fine[j]) {
        for (int t = 0; t < b; ++t) {
          const std::int64_t pos = V + j * b + t;
          zs.push_back({Vec(xe + pos * D, xe + (pos + 1) * D), double(pos), std::log(sigma), sigma, j});
        }
      } else {
        zs.push_back({c[j], double(V + j * b + (b - 1) / 2), std::log(double(b)) + std::log(sigma), sigma, j});
      }
    }
    const std::size_t r = zs.size();
    std::vector<Vec> q(r), kk(r), vv(r);
    for (std::size_t i = 0; i < r; ++i) {
      rms(zs[i].z.data(), w.attn_norm, D, tmp.data());
      q[i] = linear(w.wq, qd, D, tmp.data());
      kk[i] = linear(w.wk, kd, D, tmp.data());
      vv[i] = linear(w.wv, kd, D, tmp.data());
      rope(q[i].data(), H, hd, zs[i].pos);
      rope(kk[i].data(), KV, hd, zs[i].pos);
    }
    std::vector<Vec> u(r);
    for (std::size_t i = 0; i < r; ++i) {
      Vec o(static_cast<std::size_t>(qd), 0.0);
      for (int h = 0; h < H; ++h) {
        Vec logit(r);
        double mx = -1e300, sum = 0.0;
        for (std::size_t j = 0; j < r; ++j) {
          logit[j] = zs[j].bias;
          for (int t = 0; t < hd; ++t) logit[j] += scale * q[i][h * hd + t] * kk[j][(h / G) * hd + t];
          mx = std::max(mx, logit[j]);
        }
        for (std::size_t j = 0; j < r; ++j) sum += std::exp(logit[j] - mx);
        for (std::size_t j = 0; j < r; ++j)
          for (int t = 0; t < hd; ++t) o[h * hd + t] += std::exp(logit[j] - mx) / sum * vv[j][(h / G) * hd + t];
      }
      const Vec A = linear(w.wo, D, qd, o.data());
      Vec y(D), yn(D);
      for (int t = 0; t < D; ++t) y[t] = zs[i].z[t] + A[t];
      rms(y.data(), w.ffn_norm, D, yn.data());
      const Vec a1 = linear(w.w1, F, D, yn.data()), a3 = linear(w.w3, F, D, yn.data());
      Vec hh(F);
      for (int t = 0; t < F; ++t) hh[t] = a1[t] / (1.0 + std::exp(-a1[t])) * a3[t];
      const Vec Fo = linear(w.w2, D, F, hh.data());
      u[i].resize(D);
      for (int t = 0; t < D; ++t) u[i][t] = zs[i].sigma * (A[t] + Fo[t]);
    }
    // Decompress: fine and VIP tokens take z + σU; a coarse block's tokens add their block's σU.
    std::size_t i = 0;
    for (int v = 0; v < V; ++v, ++i)
      for (int t = 0; t < D; ++t) oe[v * D + t] = zs[i].z[t] + u[i][t];
    for (std::int64_t j = 0; j < Nb; ++j) {
      if (fine[j]) {
        for (int s = 0; s < b; ++s, ++i)
          for (int t = 0; t < D; ++t) oe[(V + j * b + s) * D + t] = zs[i].z[t] + u[i][t];
      } else {
        for (int s = 0; s < b; ++s)
          for (int t = 0; t < D; ++t) oe[(V + j * b + s) * D + t] = xe[(V + j * b + s) * D + t] + u[i][t];
        ++i;
      }
    }
  }
  return out;
}

ModelConfig vcc_config(const Case& k, float explore_prob) {
  ModelConfig c;
  c.kind = ModelKind::kEncoder;
  c.num_classes = 2;
  c.dim = k.dim;
  c.heads = k.heads;
  c.kv_heads = k.kv_heads;
  c.head_dim = k.head_dim;
  c.ffn_hidden = k.hidden;
  c.norm_eps = static_cast<float>(kEps);
  c.rope_theta = static_cast<float>(kTheta);
  c.seed = 1234;
  c.vcc.enabled = true;
  c.vcc.vip_tokens = k.vip;
  c.vcc.block = k.block;
  c.vcc.fine_blocks = k.fine;
  c.vcc.explore_prob = explore_prob;
  return c;
}

struct World {
  Session session = Session::from_mpi(MPI_COMM_WORLD, Backend::kCpu);
  int rank = session.rank();
  int ranks = session.size();
};

// Contiguous shards (rank r holds [r n/P, (r+1) n/P)), or every P-th position from the rank's own.
Geometry geometry(std::int64_t seq, int batch, const World& world, bool strided = false) {
  Geometry g;
  g.batch = batch;
  g.seq_len = seq;
  g.local_len = seq / world.ranks;
  g.causal = false;
  for (std::int64_t i = 0; i < g.local_len; ++i)
    g.positions.push_back(static_cast<std::int32_t>(strided ? world.rank + i * world.ranks : world.rank * g.local_len + i));
  return g;
}

struct Harness {
  World world;
  Case k;
  ModelConfig c;
  Geometry g;
  ParameterTable table;
  Scratch scratch;
  std::unique_ptr<VccBlock> layer;
  std::vector<float> params, grads;
  Weights w;

  Harness(const Case& kc, float explore_prob) : k(kc), c(vcc_config(kc, explore_prob)), g(geometry(kc.seq, kc.batch, world)) {
    layer = std::make_unique<VccBlock>(world.session, table, scratch, kPrefix, c, g);
    table.finalize();
    scratch.bind(world.session.device());
    params.assign(static_cast<std::size_t>(table.total()), 0.0f);
    grads.assign(params.size(), 0.0f);
    std::uint32_t seed = k.seed + 100;
    for (const auto& [name, member] : kTensors) {
      const ParameterInfo& info = table.find(kPrefix + name);
      const std::vector<float> v = test::draw_parameter(info, seed++);
      std::copy(v.begin(), v.end(), params.begin() + info.offset);
      w.*member = test::to_double(v);
    }
  }

  RunContext context(std::uint64_t step, bool training) {
    return {world.session, {world.session.device(), world.session.stream()}, table, params.data(), grads.data(),
            scratch, step, training};
  }

  // This rank's rows of a [B, n, D] global tensor.
  template <typename T>
  std::vector<T> shard(const std::vector<T>& global) const {
    const std::int64_t n = k.seq, D = k.dim;
    std::vector<T> local(static_cast<std::size_t>(g.rows() * D));
    for (int b = 0; b < k.batch; ++b)
      for (std::int64_t i = 0; i < g.local_len; ++i)
        std::copy_n(global.begin() + (b * n + g.positions[i]) * D, D, local.begin() + (b * g.local_len + i) * D);
    return local;
  }

  std::vector<std::vector<std::int32_t>> explorations(std::uint64_t step, bool training) const {
    std::vector<std::vector<std::int32_t>> orders(static_cast<std::size_t>(k.batch));
    if (training)
      for (int e = 0; e < k.batch; ++e)
        orders[e] = model::vcc_exploration(c.seed, step, kPrefix, e, (k.seq - k.vip) / k.block, c.vcc.explore_prob);
    return orders;
  }
};

void check_forward_and_gradients(const Case& k) {
  Harness t(k, 0.0f);
  const std::int64_t nb = (k.seq - k.vip) / k.block;
  EXPECT_EQ(t.layer->compressed_len(), k.vip + std::int64_t{k.fine} * k.block + (nb - k.fine));
  RunContext rc = t.context(3, true);
  const std::vector<float> x = test::random_floats(static_cast<std::size_t>(k.batch * k.seq * k.dim), k.seed);
  const std::vector<float> loss_w = test::random_floats(x.size(), k.seed + 1);
  const std::vector<float> x_loc = t.shard(x), loss_w_loc = t.shard(loss_w);

  Selection chosen;
  double margin = 1e300;
  const Vec xd = test::to_double(x);
  const Vec ref = reference_vcc(k, xd, t.w, nullptr, &chosen, t.explorations(3, true), &margin);
  // float32 log scores sit within ~1e-6 of float64's: a wider gap means both select alike.
  ASSERT_GT(margin, 1e-5) << "the seeded block scores nearly tie at the selection boundary";

  std::vector<float> out(x_loc.size());
  t.layer->forward(rc, x_loc.data(), out.data());
  test::expect_close("VCC output (this rank's rows)", out, t.shard(ref), 1e-5);

  std::vector<float> d_in(x_loc.size());
  t.layer->backward(rc, x_loc.data(), loss_w_loc.data(), d_in.data());
  MPI_Allreduce(MPI_IN_PLACE, t.grads.data(), static_cast<int>(t.grads.size()), MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);

  const std::vector<std::vector<std::int32_t>> none(static_cast<std::size_t>(k.batch));
  auto loss = [&](const Vec& xx, const Weights& ww, bool straight_through) {
    double unused = 0.0;
    return test::weighted_sum(reference_vcc(k, xx, ww, &chosen, nullptr, none, &unused, straight_through), loss_w);
  };
  const Vec dx = test::numeric_gradient([&](const Vec& xx) { return loss(xx, t.w, true); }, xd);
  test::expect_close("d x (this rank's rows)", d_in, t.shard(dx), 1e-4);
  for (const auto& [name, member] : kTensors) {
    const ParameterInfo& info = t.table.find(kPrefix + name);
    auto loss_of = [&, member = member](bool st) {
      return [&, member, st](const Vec& p) {
        Weights ww = t.w;
        ww.*member = p;
        return loss(xd, ww, st);
      };
    };
    const Vec ref_g = test::numeric_gradient(loss_of(true), t.w.*member);
    const std::vector<float> got(t.grads.begin() + info.offset, t.grads.begin() + info.offset + info.numel());
    test::expect_close("d " + name + " (summed over ranks)", got, ref_g, 1e-4);
    if (name == "wq") {
      // Without the straight-through score the reference gradient of W_q would differ clearly: the
      // comparison above does see the selection path.
      const Vec plain = test::numeric_gradient(loss_of(false), t.w.*member);
      EXPECT_GT(test::relative_error(plain, ref_g), 1e-2);
    }
  }
}

TEST(VccBlock, ForwardAndGradientsGqa) { check_forward_and_gradients({2, 6, 2, 1, 4, 10, 3, 3, 4, 36, 7}); }
TEST(VccBlock, ForwardAndGradientsPairBlocks) { check_forward_and_gradients({1, 5, 3, 3, 2, 7, 2, 2, 3, 24, 19}); }
TEST(VccBlock, AllCoarse) { check_forward_and_gradients({1, 6, 2, 2, 2, 8, 3, 3, 0, 36, 29}); }
TEST(VccBlock, AllFine) { check_forward_and_gradients({1, 6, 2, 1, 4, 10, 3, 3, 11, 36, 31}); }
// 6 VIP tokens over 24 positions: with 4 ranks, rank 0 holds the VIP tokens and no block.
TEST(VccBlock, RankWithoutBlocks) { check_forward_and_gradients({2, 6, 2, 1, 4, 10, 6, 3, 2, 24, 43}); }

// Training steps explore: examples whose draw says so rank the blocks by a seeded permutation, the
// same on every rank; evaluation never explores.
TEST(VccBlock, ExplorationIsSeededPerStepAndExample) {
  const Case k{6, 6, 2, 1, 4, 10, 3, 3, 4, 36, 41};
  Harness t(k, 0.5f);
  const std::uint64_t step = 17;
  const auto orders = t.explorations(step, true);
  const auto explored = std::count_if(orders.begin(), orders.end(), [](const auto& o) { return !o.empty(); });
  ASSERT_GT(explored, 0);
  ASSERT_LT(explored, k.batch);
  EXPECT_EQ(model::vcc_exploration(t.c.seed, step, kPrefix, 0, 11, 0.5f), orders[0]);
  EXPECT_NE(model::vcc_exploration(t.c.seed, step + 1, kPrefix, 0, 11, 1.0f),
            model::vcc_exploration(t.c.seed, step, kPrefix, 0, 11, 1.0f));

  const std::vector<float> x = test::random_floats(static_cast<std::size_t>(k.batch * k.seq * k.dim), k.seed);
  const std::vector<float> x_loc = t.shard(x);
  std::vector<float> out(x_loc.size());
  for (const bool training : {true, false}) {
    Selection chosen;
    double margin = 1e300;
    const Vec ref = reference_vcc(k, test::to_double(x), t.w, nullptr, &chosen, t.explorations(step, training), &margin);
    ASSERT_GT(margin, 1e-5);
    t.layer->forward(t.context(step, training), x_loc.data(), out.data());
    test::expect_close(training ? "output, training (explores)" : "output, evaluation", out, t.shard(ref), 1e-5);
  }
}

TEST(VccBlock, RejectsConfigurationsThatDoNotFit) {
  World world;
  const Case k{1, 6, 2, 1, 4, 10, 3, 3, 4, 36, 5};
  ParameterTable table;
  Scratch scratch;
  int id = 0;
  auto build = [&](ModelConfig c, const Geometry& g) { VccBlock(world.session, table, scratch, fmt::format("l{}.", id++), c, g); };
  ModelConfig c = vcc_config(k, 0.1f);
  c.vcc.block = 5;  // 36 - 3 = 33 is no multiple of 5
  test::expect_error([&] { build(c, geometry(36, 1, world)); }, "multiple of block");
  c = vcc_config(k, 0.1f);
  c.vcc.fine_blocks = 12;  // 11 blocks
  test::expect_error([&] { build(c, geometry(36, 1, world)); }, "fine_blocks");
  Geometry causal = geometry(36, 1, world);
  causal.causal = true;
  test::expect_error([&] { build(vcc_config(k, 0.1f), causal); }, "bidirectional");
  // 4 VIP tokens and blocks of 8 over 28 tokens: one rank holds them all; with 2 or 4 ranks the shard
  // boundary at 14 or 7 falls inside a block, and every P-th position puts VIP tokens off rank 0.
  c = vcc_config(k, 0.1f);
  c.vcc.vip_tokens = 4;
  c.vcc.block = 8;
  c.vcc.fine_blocks = 1;
  if (world.ranks == 1) {
    build(c, geometry(28, 1, world));
  } else {
    test::expect_error([&] { build(c, geometry(28, 1, world)); }, "split between ranks");
    test::expect_error([&] { build(vcc_config(k, 0.1f), geometry(36, 1, world, true)); }, "VIP");
  }
}

}  // namespace
}  // namespace ringcast
