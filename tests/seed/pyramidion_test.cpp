// PyramidionPool (runtime/src/pyramidion.hpp) on 1, 2 or 4 ranks against a float64 single-process
// reference of the same method over the whole sequence, and against the same layer run by this process
// alone. Every rank draws the same seeded sequence, feeds its rows in the placement under test
// (contiguous or strided shards), and checks its shard of the pooled states and of the input gradient;
// the parameter gradients are summed over ranks and checked too. Gradients are compared with central
// differences of the reference with its pairings held fixed (the pairing is a hard choice, as in the
// layer's backward). Rows that repeat (exact ties) or repeat within an ulp (near ties) check that the
// pairing, a discontinuous function of the scores, is the same at every P.
#include "../../runtime/src/pyramidion.hpp"

#include "test_util.hpp"

#include <ringcast/kernels/attention.hpp>
#include <ringcast/session.hpp>

#include <gtest/gtest.h>
#include <mpi.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
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

// How the rows of a sequence are drawn.
enum class Rows {
  kDistinct,        // independent: every score gap lies far above float32 rounding
  kRepeated,        // rows repeat with period kPeriod: exact ties, broken by sequence position
  kNearlyRepeated,  // repeats nudged by 0, 1 or 2 ulps in one component: scores tie or differ by an ulp
};
constexpr std::int64_t kPeriod = 5;

struct Case {
  int batch;
  int dim;
  std::int64_t seq;
  std::int64_t pool_to;
  bool strided;  // rank r holds positions r, r + P, ... instead of a contiguous range
  std::uint32_t seed;
  Rows rows = Rows::kDistinct;
};

// Per batch element, per round: the merged pairs (better member first), in output order.
using Pairings = std::vector<std::vector<std::vector<std::pair<int, int>>>>;

// The method in float64 over whole sequences: x [B, n, D] -> [B, pool_to, D]. With `fixed` the
// pairings are taken from it instead of sorting; otherwise they are recorded into `plan`, and
// min_gap receives the smallest nonzero score difference any sort had to resolve (a zero one is a tie
// of identical rows, which float32 and float64 both break by index).
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
        for (std::int64_t i = 0; i + 1 < m; ++i) {
          const double gap = s[order[i]] - s[order[i + 1]];
          if (gap > 0.0) *min_gap = std::min(*min_gap, gap);
        }
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

// The global input [B, n, D], drawn as k.rows says.
std::vector<float> draw_rows(const Case& k) {
  const std::int64_t D = k.dim;
  std::vector<float> x = test::random_floats(static_cast<std::size_t>(k.batch * k.seq * D), k.seed);
  if (k.rows == Rows::kDistinct) return x;
  for (int b = 0; b < k.batch; ++b)
    for (std::int64_t i = kPeriod; i < k.seq; ++i) {
      float* row = x.data() + (b * k.seq + i) * D;
      std::copy_n(x.data() + (b * k.seq + i % kPeriod) * D, D, row);
      if (k.rows == Rows::kNearlyRepeated)
        for (std::int64_t u = 0; u < (i / kPeriod) % 3; ++u)
          row[0] = std::nextafter(row[0], std::copysign(std::numeric_limits<float>::infinity(), row[0]));
    }
  return x;
}

struct World {
  Session session = Session::from_mpi(MPI_COMM_WORLD, Backend::kCpu);
  int rank = session.rank();
  int ranks = session.size();
};

Geometry input_geometry(const Case& k, int rank, int ranks) {
  Geometry g;
  g.batch = k.batch;
  g.seq_len = k.seq;
  g.local_len = k.seq / ranks;
  g.causal = false;
  for (std::int64_t i = 0; i < g.local_len; ++i)
    g.positions.push_back(static_cast<std::int32_t>(k.strided ? rank + i * ranks : rank * g.local_len + i));
  return g;
}

ModelConfig pool_config(const Case& k) {
  ModelConfig c;
  c.kind = ModelKind::kEncoder;
  c.dim = k.dim;
  c.pyramidion.beta = 20.0f;
  return c;
}

// One forward and backward of the layer on `session`: this rank's pooled states [B, L, D], input
// gradient [B, n_loc, D] (rows in the placement of the session's input geometry) and its share of
// the parameter gradients, for the loss Σ loss_w · pool(x) over the whole sequence.
struct Pass {
  std::vector<float> out, d_in, d_w;
  float d_b = 0.0f;
};

Pass run_layer(const Session& session, const Case& k, const std::vector<float>& w, float bias,
               const std::vector<float>& x, const std::vector<float>& loss_w) {
  const int D = k.dim, B = k.batch;
  const Geometry in = input_geometry(k, session.rank(), session.size());
  ParameterTable table;
  Scratch scratch;
  PyramidionPool pool(session, table, scratch, "layers.0.", pool_config(k), in, k.pool_to);
  table.finalize();
  scratch.bind(session.device());

  const Geometry& out_g = pool.out_geometry();
  const std::int64_t L = k.pool_to / session.size();
  EXPECT_EQ(out_g.seq_len, k.pool_to);
  EXPECT_EQ(out_g.local_len, L);
  EXPECT_FALSE(out_g.causal);
  for (std::int64_t i = 0; i < L; ++i) EXPECT_EQ(out_g.positions[i], session.rank() * L + i);

  std::vector<float> params(static_cast<std::size_t>(table.total()));
  std::vector<float> grads(params.size(), 0.0f);
  const ParameterInfo& wi = table.find("layers.0.pool_w");
  const ParameterInfo& bi = table.find("layers.0.pool_b");
  EXPECT_TRUE(wi.decay);
  EXPECT_FALSE(bi.decay);
  std::copy(w.begin(), w.end(), params.begin() + wi.offset);
  params[bi.offset] = bias;
  const RunContext rc{session, {session.device(), session.stream()}, table, params.data(), grads.data(), scratch, 0, true};

  std::vector<float> x_loc(static_cast<std::size_t>(in.rows() * D)), loss_w_loc(static_cast<std::size_t>(B * L * D));
  for (int b = 0; b < B; ++b) {
    for (std::int64_t i = 0; i < in.local_len; ++i)
      std::copy_n(x.begin() + (b * k.seq + in.positions[i]) * D, D, x_loc.begin() + (b * in.local_len + i) * D);
    std::copy_n(loss_w.begin() + (b * k.pool_to + session.rank() * L) * D, L * D, loss_w_loc.begin() + b * L * D);
  }
  std::vector<float> out(static_cast<std::size_t>(B * L * D)), d_in(x_loc.size());
  pool.forward(rc, x_loc.data(), out.data());
  pool.backward(rc, x_loc.data(), loss_w_loc.data(), d_in.data());
  return {std::move(out), std::move(d_in), {grads.begin() + wi.offset, grads.begin() + wi.offset + D}, grads[bi.offset]};
}

// Bit-for-bit equality, with the count and size of the differences printed either way.
void expect_bitwise_equal(const std::string& what, const std::vector<float>& x, const std::vector<float>& want) {
  ASSERT_EQ(x.size(), want.size()) << what;
  std::size_t differ = 0;
  double largest = 0.0;
  for (std::size_t i = 0; i < x.size(); ++i)
    if (std::bit_cast<std::uint32_t>(x[i]) != std::bit_cast<std::uint32_t>(want[i])) {
      ++differ;
      largest = std::max(largest, std::abs(double{x[i]} - double{want[i]}));
    }
  std::printf("    %-44s %zu of %zu elements differ (largest by %.2e)\n", what.c_str(), differ, x.size(), largest);
  EXPECT_EQ(differ, 0u) << what << ": not bitwise equal (largest difference " << largest << ")";
}

void run_case(const Case& k) {
  World world;
  const int D = k.dim, B = k.batch;
  const std::int64_t L = k.pool_to / world.ranks;
  const Geometry in = input_geometry(k, world.rank, world.ranks);

  // The scorer's weight, and a bias that keeps the scores away from saturation.
  const std::vector<float> w = test::random_floats(static_cast<std::size_t>(D), k.seed + 1, 1.5f);
  const float bias = 0.3f;
  const std::vector<float> x = draw_rows(k);
  const std::vector<float> loss_w = test::random_floats(static_cast<std::size_t>(B * k.pool_to * D), k.seed + 2);

  Pass pass = run_layer(world.session, k, w, bias, x, loss_w);
  MPI_Allreduce(MPI_IN_PLACE, pass.d_w.data(), D, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
  MPI_Allreduce(MPI_IN_PLACE, &pass.d_b, 1, MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);

  // The same layer over the whole sequence in this process alone: the pairing is a hard choice on the
  // scores, so the pooled states must be its rows bit for bit; the gradients pass through sums whose
  // order depends on P.
  const Pass single = run_layer(Session::from_mpi(MPI_COMM_SELF, Backend::kCpu), k, w, bias, x, loss_w);
  std::vector<float> single_out(pass.out.size()), single_d_in(pass.d_in.size());
  for (int b = 0; b < B; ++b) {
    std::copy_n(single.out.begin() + (b * k.pool_to + world.rank * L) * D, L * D, single_out.begin() + b * L * D);
    for (std::int64_t i = 0; i < in.local_len; ++i)
      std::copy_n(single.d_in.begin() + (b * k.seq + in.positions[i]) * D, D,
                  single_d_in.begin() + (b * in.local_len + i) * D);
  }
  expect_bitwise_equal("pooled states vs one process", pass.out, single_out);
  test::expect_close("d x vs one process", pass.d_in, test::to_double(single_d_in), 1e-6);
  test::expect_close("d pool_w vs one process", pass.d_w, test::to_double(single.d_w), 1e-5);
  test::expect_close("d pool_b vs one process", std::vector<float>{pass.d_b}, {double{single.d_b}}, 1e-5);

  const double beta = pool_config(k).pyramidion.beta;
  const Vec w_ref = test::to_double(w);
  Pairings plan;
  double min_gap = 1.0;
  const Vec ref = reference_pool(k, test::to_double(x), w_ref, bias, beta, nullptr, &plan, &min_gap);
  if (k.rows == Rows::kNearlyRepeated) {
    // Within float32 rounding float64 may sort otherwise: the one-process run above is the reference.
    EXPECT_LT(min_gap, 1e-7) << "the case holds no near ties";
    return;
  }
  // float32 scores sit within ~1e-7 of the float64 ones: a wider gap means both sort alike.
  ASSERT_GT(min_gap, 1e-6) << "the seeded scores nearly tie; float32 and float64 could pair differently";

  Vec ref_loc(pass.out.size());
  for (int b = 0; b < B; ++b)
    std::copy_n(ref.begin() + (b * k.pool_to + world.rank * L) * D, L * D, ref_loc.begin() + b * L * D);
  test::expect_close("pooled states", pass.out, ref_loc, 1e-5);

  // Finite differences of Σ loss_w · pool(x) with the pairings fixed.
  auto loss = [&](const Vec& xx, const Vec& ww, double bb) {
    double tmp = 0.0;
    return test::weighted_sum(reference_pool(k, xx, ww, bb, beta, &plan, nullptr, &tmp), loss_w);
  };
  const Vec dx = test::numeric_gradient([&](const Vec& xx) { return loss(xx, w_ref, bias); }, test::to_double(x));
  Vec dx_loc(pass.d_in.size());
  for (int b = 0; b < B; ++b)
    for (std::int64_t i = 0; i < in.local_len; ++i)
      std::copy_n(dx.begin() + (b * k.seq + in.positions[i]) * D, D, dx_loc.begin() + (b * in.local_len + i) * D);
  test::expect_close("d x (this rank's rows)", pass.d_in, dx_loc, 1e-4);

  const Vec dw = test::numeric_gradient([&](const Vec& ww) { return loss(test::to_double(x), ww, bias); }, w_ref);
  test::expect_close("d pool_w (summed over ranks)", pass.d_w, dw, 1e-4);
  const Vec db = test::numeric_gradient([&](const Vec& bb) { return loss(test::to_double(x), w_ref, bb[0]); }, {bias});
  test::expect_close("d pool_b (summed over ranks)", std::vector<float>{pass.d_b}, db, 1e-4);
}

TEST(PyramidionPool, TwoRoundsContiguous) { run_case({2, 5, 48, 12, false, 11}); }
TEST(PyramidionPool, OneRoundStrided) { run_case({2, 5, 48, 24, true, 23}); }
TEST(PyramidionPool, ThreeRoundsStrided) { run_case({1, 6, 96, 12, true, 37}); }

// Exact ties between identical rows on different ranks break by sequence position, as in the reference
// (the placement must not leak into the order). The first is the model's shape: n = 256 pooled to 64,
// two rounds, 16 survivors per rank at P = 4.
TEST(PyramidionPool, RepeatedRowsTieByPositionContiguous) { run_case({2, 24, 256, 64, false, 41, Rows::kRepeated}); }
TEST(PyramidionPool, RepeatedRowsTieByPositionStrided) { run_case({2, 6, 96, 12, true, 43, Rows::kRepeated}); }

// Scores an ulp apart (float64 may sort them otherwise): every P must pair as one process does.
TEST(PyramidionPool, NearTiesPairAsOneProcessContiguous) {
  run_case({2, 24, 256, 64, false, 47, Rows::kNearlyRepeated});
}
TEST(PyramidionPool, NearTiesPairAsOneProcessStrided) { run_case({2, 24, 256, 16, true, 53, Rows::kNearlyRepeated}); }

TEST(PyramidionPool, RejectsTargetsThatDoNotHalve) {
  World world;
  const Case k{1, 4, 48, 12, false, 5};
  const ModelConfig c = pool_config(k);
  const Geometry in = input_geometry(k, world.rank, world.ranks);
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
