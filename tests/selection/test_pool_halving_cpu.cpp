// Pyramidion successive-halving pooling on the CPU backend: forward against a float64 run of the
// same rounds, output lengths (n / 2^r, odd lengths rounding up), stable ties, sort_back order, and
// the backward for states and scores against float64 finite differences.
#include "selection_test_util.hpp"

#include <ringcast/error.hpp>
#include <ringcast/kernels/pooling.hpp>

#include <algorithm>
#include <numeric>

namespace ringcast::kernels {

// Readable names for the parameterized tests (found by argument-dependent lookup).
void PrintTo(const HalvingShape& s, std::ostream* os) {
  *os << "B" << s.batch << " n" << s.seq << " D" << s.dim << " r" << s.rounds << (s.sort_back ? " sort_back" : "");
}

namespace {

using test::expect_close;
using test::random_floats;
using test::to_double;

const ExecContext kCpu{};

// ALGORITHMS.md §2 in float64; e [B, n, D], s [B, n] -> the concatenation of e_out and s_out.
std::vector<double> ref_halving(const HalvingShape& sh, const std::vector<double>& e_all,
                                const std::vector<double>& s_all) {
  std::vector<double> e_out, s_out;
  const double log_beta = std::log(double(sh.beta));
  for (int b = 0; b < sh.batch; ++b) {
    std::vector<double> e(e_all.begin() + b * sh.seq * sh.dim, e_all.begin() + (b + 1) * sh.seq * sh.dim);
    std::vector<double> s(s_all.begin() + b * sh.seq, s_all.begin() + (b + 1) * sh.seq);
    for (int r = 0; r < sh.rounds; ++r) {
      const std::int64_t m = s.size();
      std::vector<std::int64_t> order(m);
      std::iota(order.begin(), order.end(), 0);
      std::stable_sort(order.begin(), order.end(), [&](auto i, auto j) { return s[i] > s[j]; });
      std::vector<std::pair<std::int64_t, std::int64_t>> slots;
      for (std::int64_t i = 0; i < m / 2; ++i) slots.emplace_back(order[i], order[m - 1 - i]);
      if (m % 2) slots.emplace_back(order[m / 2], -1);
      if (sh.sort_back) std::sort(slots.begin(), slots.end());
      std::vector<double> e2, s2;
      for (const auto& [ia, ib] : slots) {
        if (ib < 0) {
          e2.insert(e2.end(), e.begin() + ia * sh.dim, e.begin() + (ia + 1) * sh.dim);
          s2.push_back(s[ia]);
          continue;
        }
        const double za = s[ia] * log_beta, zb = s[ib] * log_beta, mx = std::max(za, zb);
        const double wa = std::exp(za - mx) / (std::exp(za - mx) + std::exp(zb - mx)), wb = 1.0 - wa;
        for (int c = 0; c < sh.dim; ++c) e2.push_back(wa * e[ia * sh.dim + c] + wb * e[ib * sh.dim + c]);
        s2.push_back(wa * s[ia] + wb * s[ib]);
      }
      e = std::move(e2);
      s = std::move(s2);
    }
    e_out.insert(e_out.end(), e.begin(), e.end());
    s_out.insert(s_out.end(), s.begin(), s.end());
  }
  e_out.insert(e_out.end(), s_out.begin(), s_out.end());
  return e_out;
}

// Scores as the Pyramidion scorer makes them: sigmoid(...) + 1e-5, so in (0, 1).
std::vector<float> scores(std::size_t n, std::uint32_t seed) {
  auto s = random_floats(n, seed);
  for (float& x : s) x = 1.0f / (1.0f + std::exp(-3.0f * x)) + 1e-5f;
  return s;
}

class HalvingCpu : public ::testing::TestWithParam<HalvingShape> {};

TEST_P(HalvingCpu, MatchesFloat64) {
  const HalvingShape sh = GetParam();
  const auto e = random_floats(std::size_t(sh.batch) * sh.seq * sh.dim, 1);
  const auto s = scores(std::size_t(sh.batch) * sh.seq, 2);
  const std::int64_t n_out = sh.output_len();
  std::vector<float> e_out(sh.batch * n_out * sh.dim, 5.0f), s_out(sh.batch * n_out, 5.0f);
  halving_pool({sh, e.data(), s.data(), e_out.data(), s_out.data()}, kCpu);
  const auto ref = ref_halving(sh, to_double(e), to_double(s));
  expect_close("e out", e_out, {ref.begin(), ref.begin() + e_out.size()}, test::kForwardTol);
  expect_close("s out", s_out, {ref.begin() + e_out.size(), ref.end()}, test::kForwardTol);
}

TEST_P(HalvingCpu, BackwardMatchesFiniteDifferences) {
  HalvingShape sh = GetParam();
  sh.seq = std::min<std::int64_t>(sh.seq, 24);
  sh.dim = std::min(sh.dim, 4);
  const auto e = random_floats(std::size_t(sh.batch) * sh.seq * sh.dim, 3);
  const auto s = scores(std::size_t(sh.batch) * sh.seq, 4);
  const std::int64_t n_out = sh.output_len();
  const auto ge = random_floats(sh.batch * n_out * sh.dim, 5), gs = random_floats(sh.batch * n_out, 6);
  std::vector<float> de(e.size(), 0.0f), ds(s.size(), 0.0f);
  halving_pool_backward({sh, e.data(), s.data(), ge.data(), gs.data(), de.data(), ds.data()}, kCpu);
  std::vector<float> g = ge;
  g.insert(g.end(), gs.begin(), gs.end());
  auto loss = [&](const std::vector<double>& x) {
    return test::weighted_sum(ref_halving(sh, {x.begin(), x.begin() + e.size()}, {x.begin() + e.size(), x.end()}), g);
  };
  std::vector<double> x = to_double(e);
  x.insert(x.end(), s.begin(), s.end());
  const auto grad = test::numeric_gradient(loss, x);
  expect_close("d e", de, {grad.begin(), grad.begin() + e.size()}, test::kGradTol);
  expect_close("d s", ds, {grad.begin() + e.size(), grad.end()}, test::kGradTol);
}

// (batch, seq, dim, rounds, beta, sort_back): 2048 -> 512 as in the README example, odd lengths in
// every round (13 -> 7 -> 4 -> 2), one round, rank order.
INSTANTIATE_TEST_SUITE_P(Shapes, HalvingCpu,
                         ::testing::Values(HalvingShape{1, 2048, 8, 2, 20.0f, true}, HalvingShape{2, 13, 5, 3, 20.0f, true},
                                           HalvingShape{3, 24, 6, 1, 20.0f, true}, HalvingShape{2, 40, 3, 3, 20.0f, false},
                                           HalvingShape{1, 7, 2, 3, 20.0f, false}));

TEST(HalvingCpu, OutputLengths) {
  EXPECT_EQ((HalvingShape{1, 2048, 1, 2}.output_len()), 512);
  EXPECT_EQ((HalvingShape{1, 96, 1, 5}.output_len()), 3);
  EXPECT_EQ((HalvingShape{1, 13, 1, 1}.output_len()), 7);
  EXPECT_EQ((HalvingShape{1, 13, 1, 3}.output_len()), 2);
  EXPECT_EQ((HalvingShape{1, 1, 1, 4}.output_len()), 1);
}

// Tied scores keep input order in the sort; pairs are then best-with-worst, the median passes through.
TEST(HalvingCpu, TiesPairingAndSortBack) {
  const HalvingShape sh{1, 5, 1, 1, 20.0f, false};
  const std::vector<float> e{10.0f, 20.0f, 30.0f, 40.0f, 50.0f};
  const std::vector<float> s{0.5f, 0.9f, 0.5f, 0.1f, 0.5f};
  // Rank order: 1 (0.9), 0, 2, 4 (ties by index), 3 (0.1); pairs (1, 3) and (0, 4); token 2 is the median.
  std::vector<float> e_out(3), s_out(3);
  halving_pool({sh, e.data(), s.data(), e_out.data(), s_out.data()}, kCpu);
  const double w13 = 1.0 / (1.0 + std::pow(20.0, 0.1 - 0.9));
  EXPECT_NEAR(e_out[0], w13 * 20.0 + (1.0 - w13) * 40.0, 1e-4);
  EXPECT_NEAR(e_out[1], 0.5 * 10.0 + 0.5 * 50.0, 1e-4);
  EXPECT_EQ(e_out[2], 30.0f);
  HalvingShape back = sh;
  back.sort_back = true;  // by the top member's position: pair (0, 4), pair (1, 3), token 2
  halving_pool({back, e.data(), s.data(), e_out.data(), s_out.data()}, kCpu);
  EXPECT_NEAR(e_out[0], 30.0, 1e-4);
  EXPECT_NEAR(e_out[1], w13 * 20.0 + (1.0 - w13) * 40.0, 1e-4);
  EXPECT_EQ(e_out[2], 30.0f);
}

TEST(HalvingCpu, RejectsBadShapesAndCuda) {
  std::vector<float> buf(64, 1.0f);
  EXPECT_THROW(halving_pool({HalvingShape{1, 8, 2, 0}, buf.data(), buf.data(), buf.data(), buf.data()}, kCpu), Error);
#if !RINGCAST_WITH_CUDA  // with the CUDA backend this is a launch (tests/gpu/test_pooling_gpu.cpp)
  EXPECT_THROW(halving_pool({HalvingShape{1, 8, 2, 1}, buf.data(), buf.data(), buf.data(), buf.data()},
                            ExecContext{Device{DeviceKind::kCuda, 0}}),
               Error);
#endif
}

}  // namespace
}  // namespace ringcast::kernels
