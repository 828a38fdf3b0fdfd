// PyramidionPool (runtime/src/pyramidion.hpp) on 1, 2 or 4 ranks against a float64 single-process
// reference of the same method over the whole sequence. Every rank draws the same seeded sequence,
// feeds its rows in the placement under test (contiguous or strided shards), and checks its shard of
// the pooled states and of the input gradient; the parameter gradients are summed over ranks and
// checked too. Gradients are compared with central differences of the reference with its pairings
// held fixed (the pairing is a hard choice, as in the layer's backward).
#include "../../runtime/src/pyramidion.hpp"

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
#include <utility>
#include <vector>

namespace ringcast {
namespace {

using model::Geometry;
using model::ParameterTable;
using model::PyramidionPool;
using model::RunContext;
using model::Scratch;
using test::Vec;

struct Case {
  int batch;
  int dim;
  std::int64_t seq;
  std::int64_t pool_to;
  bool strided;  // rank r holds positions r, r + P, ... instead of a contiguous range
  std::uint32_t seed;
};

// Per batch element, per round: the merged pairs (better member first), in output order.
using Pairings = std::vector<std::vector<std::vector<std::pair<int, int>>>>;

// The method in float64 over whole sequences: x [B, n, D] -> [B, pool_to, D]. With `fixed` the
// pairings are taken from it instead of sorting; otherwise they are recorded into `plan`, and
// min_gap receives the smallest score difference any sort had to resolve.
Vec reference_pool(const Case& k, const Vec& x, const Vec& w, double bias, double beta, const Pairings* fixed,
                   Pairings* plan, double* min_gap) {
  const int D = k.dim;
  const int rounds = static_cast<int>(std::log2(static_cast<double>(k.seq / k.pool_to)) + 0.5);
  Vec out(static_cast<std::size_t>(k.batch * k.pool_to * D));
  if (plan) plan->assign(static_cast<std::size_t>(k.batch), {});
  for (int b = 0; b < k.batch; ++b) {
    std::int64_t m = k.seq;
    Vec e(x.begin() + b * m * D, x.begin() + (b + 1) * m * D), s(static_cast<std::size_t>(m));
    for (std::int64_t i = 0; i < m; ++i) {
      double z = bias;
      for (int c = 0; c < D; ++c) z += w[c] * e[i * D + c];
      s[i] = 1.0 / (1.0 + std::exp(-z)) + 1e-5;
    }
    for (int r = 0; r < rounds; ++r) {
      std::vector<std::pair<int, int>> slots;
      if (fixed) {
        slots = (*fixed)[b][r];
      } else {
        std::vector<int> order(static_cast<std::size_t>(m));
        std::iota(order.begin(), order.end(), 0);
        std::stable_sort(order.begin(), order.end(), [&](int i, int j) { return s[i] > s[j]; });
        for (std::int64_t i = 0; i + 1 < m; ++i) *min_gap = std::min(*min_gap, s[order[i]] - s[order[i + 1]]);
        for (std::int64_t i = 0; i < m / 2; ++i) slots.emplace_back(order[i], order[m - 1 - i]);
        std::sort(slots.begin(), slots.end());  // survivors in sequence order
        (*plan)[b].push_back(slots);
      }
      Vec e2(slots.size() * D), s2(slots.size());
      for (std::size_t o = 0; o < slots.size(); ++o) {
        const auto [i, j] = slots[o];
        // (w_i, w_j) = softmax(beta^s_i, beta^s_j) taken as logits: softmax(s_i ln beta, s_j ln beta).
        const double ei = std::exp(s[i] * std::log(beta)), ej = std::exp(s[j] * std::log(beta));
        const double wi = ei / (ei + ej), wj = ej / (ei + ej);
        for (int c = 0; c < D; ++c) e2[o * D + c] = wi * e[i * D + c] + wj * e[j * D + c];
        s2[o] = wi * s[i] + wj * s[j];
      }
      e = std::move(e2);
      s = std::move(s2);
      m /= 2;
    }
    std::copy(e.begin(), e.end(), out.begin() + b * k.pool_to * D);
  }
  return out;
}

struct World {
  Session session = Session::from_mpi(MPI_COMM_WORLD, Backend::kCpu);
  int rank = session.rank();
  int ranks = session.size();
};

Geometry input_geometry(const Case& k, const World& world) {
  Geometry g;
  g.batch = k.batch;
  g.seq_len = k.seq;
  g.local_len = k.seq / world.ranks;
  g.causal = false;
  for (std::int64_t i = 0; i < g.local_len; ++i)
    g.positions.push_back(static_cast<std::int32_t>(k.strided ? world.rank + i * world.ranks : world.rank * g.local_len + i));
  return g;
}

ModelConfig pool_config(const Case& k) {
  ModelConfig c;
  c.kind = ModelKind::kEncoder;
  c.dim = k.dim;
  c.pyramidion.beta = 20.0f;
  return c;
}

void run_case(const Case& k) {
  World world;
  const int D = k.dim, B = k.batch;
  const ModelConfig c = pool_config(k);
  const Geometry in = input_geometry(k, world);
  ParameterTable table;
  Scratch scratch;
  PyramidionPool pool(world.session, table, scratch, "layers.0.", c, in, k.pool_to);
  table.finalize();
  scratch.bind(world.session.device());

  const Geometry& out_g = pool.out_geometry();
  const std::int64_t L = k.pool_to / world.ranks;
  ASSERT_EQ(out_g.seq_len, k.pool_to);
  ASSERT_EQ(out_g.local_len, L);
  EXPECT_FALSE(out_g.causal);
  for (std::int64_t i = 0; i < L; ++i) EXPECT_EQ(out_g.positions[i], world.rank * L + i);

  // Parameters: the scorer's weight and a bias that keeps the scores away from saturation.
  std::vector<float> params(static_cast<std::size_t>(table.total()));
  std::vector<float> grads(params.size(), 0.0f);
  const ParameterInfo& wi = table.find("layers.0.pool_w");
  const ParameterInfo& bi = table.find("layers.0.pool_b");
  EXPECT_TRUE(wi.decay);
  EXPECT_FALSE(bi.decay);
  const std::vector<float> w = test::random_floats(static_cast<std::size_t>(D), k.seed + 1, 1.5f);
  std::copy(w.begin(), w.end(), params.begin() + wi.offset);
  params[bi.offset] = 0.3f;
  const RunContext rc{world.session, {world.session.device(), world.session.stream()}, table, params.data(),
                      grads.data(), scratch, 0, true};

  const std::vector<float> x = test::random_floats(static_cast<std::size_t>(B * k.seq * D), k.seed);
  const std::vector<float> loss_w = test::random_floats(static_cast<std::size_t>(B * k.pool_to * D), k.seed + 2);
  std::vector<float> x_loc(static_cast<std::size_t>(in.rows() * D)), loss_w_loc(static_cast<std::size_t>(B * L * D));
  for (int b = 0; b < B; ++b) {
    for (std::int64_t i = 0; i < in.local_len; ++i)
      std::copy_n(x.begin() + (b * k.seq + in.positions[i]) * D, D, x_loc.begin() + (b * in.local_len + i) * D);
    std::copy_n(loss_w.begin() + (b * k.pool_to + world.rank * L) * D, L * D, loss_w_loc.begin() + b * L * D);
  }

  const double beta = c.pyramidion.beta, bias = params[bi.offset];
  const Vec w_ref = test::to_double(w);
  Pairings plan;
  double min_gap = 1.0;
  const Vec ref = reference_pool(k, test::to_double(x), w_ref, bias, beta, nullptr, &plan, &min_gap);
  // float32 scores sit within ~1e-7 of the float64 ones: a wider gap means both sort alike.
  ASSERT_GT(min_gap, 1e-6) << "the seeded scores nearly tie; float32 and float64 could pair differently";

  std::vector<float> out(static_cast<std::size_t>(B * L * D));
  pool.forward(rc, x_loc.data(), out.data());
  Vec ref_loc(out.size());
  for (int b = 0; b < B; ++b)
    std::copy_n(ref.begin() + (b * k.pool_to + world.rank * L) * D, L * D, ref_loc.begin() + b * L * D);
  test::expect_close("pooled states", out, ref_loc, 1e-5);

  std::vector<float> d_in(x_loc.size(), 0.0f);
  pool.backward(rc, x_loc.data(), loss_w_loc.data(), d_in.data());
  MPI_Allreduce(MPI_IN_PLACE, grads.data(), static_cast<int>(grads.size()), MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);

  // Finite differences of Σ loss_w · pool(x) with the pairings fixed.
  auto loss = [&](const Vec& xx, const Vec& ww, double bb) {
    double tmp = 0.0;
    return test::weighted_sum(reference_pool(k, xx, ww, bb, beta, &plan, nullptr, &tmp), loss_w);
  };
  const Vec dx = test::numeric_gradient([&](const Vec& xx) { return loss(xx, w_ref, bias); }, test::to_double(x));
  Vec dx_loc(d_in.size());
  for (int b = 0; b < B; ++b)
    for (std::int64_t i = 0; i < in.local_len; ++i)
      std::copy_n(dx.begin() + (b * k.seq + in.positions[i]) * D, D, dx_loc.begin() + (b * in.local_len + i) * D);
  test::expect_close("d x (this rank's rows)", d_in, dx_loc, 1e-4);

  const Vec dw = test::numeric_gradient([&](const Vec& ww) { return loss(test::to_double(x), ww, bias); }, w_ref);
  const std::vector<float> gw(grads.begin() + wi.offset, grads.begin() + wi.offset + D);
  test::expect_close("d pool_w (summed over ranks)", gw, dw, 1e-4);
  const Vec db = test::numeric_gradient([&](const Vec& bb) { return loss(test::to_double(x), w_ref, bb[0]); }, {bias});
  test::expect_close("d pool_b (summed over ranks)", std::vector<float>{grads[bi.offset]}, db, 1e-4);
}

TEST(PyramidionPool, TwoRoundsContiguous) { run_case({2, 5, 48, 12, false, 11}); }
TEST(PyramidionPool, OneRoundStrided) { run_case({2, 5, 48, 24, true, 23}); }
TEST(PyramidionPool, ThreeRoundsStrided) { run_case({1, 6, 96, 12, true, 37}); }

TEST(PyramidionPool, RejectsTargetsThatDoNotHalve) {
  World world;
  const Case k{1, 4, 48, 12, false, 5};
  const ModelConfig c = pool_config(k);
  const Geometry in = input_geometry(k, world);
  ParameterTable table;
  Scratch scratch;
  test::expect_error([&] { PyramidionPool(world.session, table, scratch, "a.", c, in, 20); }, "whole number of halvings");
  test::expect_error([&] { PyramidionPool(world.session, table, scratch, "b.", c, in, 48); }, "whole number of halvings");
  Geometry causal = in;
  causal.causal = true;
  test::expect_error([&] { PyramidionPool(world.session, table, scratch, "c.", c, causal, 12); }, "bidirectional");
  // 48 -> 3 halves four times but leaves 3 survivors, which 2 or 4 ranks cannot share equally.
  if (world.ranks > 1)
    test::expect_error([&] { PyramidionPool(world.session, table, scratch, "d.", c, in, 3); }, "multiple of the ranks");
  else
    EXPECT_EQ(PyramidionPool(world.session, table, scratch, "d.", c, in, 3).rounds(), 4);
}

}  // namespace
}  // namespace ringcast
