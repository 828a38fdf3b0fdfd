// CoLT5 router scores and the iterative soft top-k on the CPU backend: forward against a float64
// run of the same iterations (with the textbook max-shifted LSE), Σ s̃ ≈ k, the hard top-k against a
// sort (ties to the lower index), the backward through the unrolled iterations against float64
// finite differences, and a sequence split across two "ranks" (threads joined by the reduction hook)
// giving the single-process result.
#include "selection_test_util.hpp"
#include "soft_topk_case.hpp"

#include <ringcast/error.hpp>
#include <ringcast/kernels/routing.hpp>

#include <algorithm>
#include <barrier>
#include <numeric>
#include <thread>

namespace ringcast::kernels {
namespace {

using test::expect_close;
using test::random_floats;
using test::SoftTopkCase;
using test::SoftTopkResult;
using test::cpu_soft_topk;
using test::to_double;

const ExecContext kCpu{};

std::vector<double> ref_scores(const std::vector<double>& x, const std::vector<double>& u) {
  const std::size_t dim = u.size();
  std::vector<double> s(x.size() / dim, 0.0);
  for (std::size_t i = 0; i < s.size(); ++i)
    for (std::size_t c = 0; c < dim; ++c) s[i] += x[i * dim + c] * u[c];
  return s;
}

// ALGORITHMS.md §3, per sequence of length n, in float64.
std::vector<double> ref_soft_topk(const std::vector<double>& s, std::int64_t n, int k, double eps, int iters) {
  std::vector<double> out(s.size());
  for (std::size_t b0 = 0; b0 < s.size(); b0 += n) {
    std::vector<double> bs(n);
    for (std::int64_t j = 0; j < n; ++j) bs[j] = -s[b0 + j];
    double a = 0;
    for (int t = 0; t < iters; ++t) {
      double m = -1e300, sum = 0;
      for (std::int64_t j = 0; j < n; ++j) m = std::max(m, (s[b0 + j] + bs[j]) / eps);
      for (std::int64_t j = 0; j < n; ++j) sum += std::exp((s[b0 + j] + bs[j]) / eps - m);
      a = eps * (std::log(double(k)) - (m + std::log(sum)));
      for (std::int64_t j = 0; j < n; ++j) bs[j] = -std::max(0.0, s[b0 + j] + a);
    }
    for (std::int64_t j = 0; j < n; ++j) out[b0 + j] = std::exp((s[b0 + j] + a + bs[j]) / eps);
  }
  return out;
}

TEST(RouterCpu, ScoresMatchFloat64AndFiniteDifferences) {
  const int batch = 2, dim = 13;
  const std::int64_t seq = 11;
  const auto x = random_floats(batch * seq * dim, 1), u = random_floats(dim, 2);
  std::vector<float> s(batch * seq);
  router_scores({batch, seq, dim, x.data(), u.data(), s.data()}, kCpu);
  expect_close("scores", s, ref_scores(to_double(x), to_double(u)), test::kForwardTol);

  const auto ds = random_floats(s.size(), 3);
  std::vector<float> dx(x.size(), 0.0f), du(u.size(), 0.0f);
  router_scores_backward({batch, seq, dim, x.data(), u.data(), ds.data(), dx.data(), du.data()}, kCpu);
  auto loss = [&](const std::vector<double>& xu) {
    return test::weighted_sum(ref_scores({xu.begin(), xu.end() - dim}, {xu.end() - dim, xu.end()}), ds);
  };
  std::vector<double> xu = to_double(x);
  xu.insert(xu.end(), u.begin(), u.end());
  const auto g = test::numeric_gradient(loss, xu);
  expect_close("d x", dx, {g.begin(), g.end() - dim}, test::kGradTol);
  expect_close("d u", du, {g.end() - dim, g.end()}, test::kGradTol);
}

class SoftTopkCpu : public ::testing::TestWithParam<SoftTopkCase> {};

TEST_P(SoftTopkCpu, MatchesFloat64AndHardTopkIsASort) {
  const SoftTopkCase c = GetParam();
  const auto s = random_floats(std::size_t(c.batch) * c.seq, 4, c.scale);
  const SoftTopkResult r = cpu_soft_topk(c, s);
  expect_close("s~", r.s_tilde, ref_soft_topk(to_double(s), c.seq, c.k, c.epsilon, c.iterations), test::kForwardTol);
  for (int b = 0; b < c.batch; ++b) {
    std::vector<std::int32_t> order(c.seq);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int i, int j) { return s[b * c.seq + i] > s[b * c.seq + j]; });
    order.resize(c.k);
    std::sort(order.begin(), order.end());
    EXPECT_EQ(std::vector<std::int32_t>(r.top.begin() + b * c.k, r.top.begin() + (b + 1) * c.k), order) << "batch " << b;
  }
}

// Σ s̃ = k at the fixed point. The iteration approaches it quickly when the scores are of the order
// of ε (CoLT5's regime) and slowly when they are hundreds of ε apart, so this checks the former.
TEST(SoftTopkCpu, SumsToK) {
  for (const SoftTopkCase& c : {SoftTopkCase{3, 200, 20, 1.0f, 100, 3.0f}, SoftTopkCase{1, 1000, 64, 0.5f, 100, 2.0f},
                                SoftTopkCase{2, 4096, 256, 1.0f, 100, 1.0f}}) {
    const auto s = random_floats(std::size_t(c.batch) * c.seq, 5, c.scale);
    const SoftTopkResult r = cpu_soft_topk(c, s);
    for (int b = 0; b < c.batch; ++b) {
      const double sum = std::accumulate(r.s_tilde.begin() + b * c.seq, r.s_tilde.begin() + (b + 1) * c.seq, 0.0);
      EXPECT_NEAR(sum, c.k, 1e-3) << "n " << c.seq << " k " << c.k << " batch " << b;
      for (std::int64_t j = 0; j < c.seq; ++j) {
        EXPECT_GE(r.s_tilde[b * c.seq + j], 0.0f);
        EXPECT_LE(r.s_tilde[b * c.seq + j], 1.0f + 1e-6f);
      }
    }
  }
}

// (batch, seq, k, epsilon, iterations, score scale): CoLT5's ε = 1 and T = 50, a sharper ε, scores
// large enough that a max-free LSE would overflow, k = n.
INSTANTIATE_TEST_SUITE_P(Cases, SoftTopkCpu,
                         ::testing::Values(SoftTopkCase{3, 200, 20, 1.0f, 50, 3.0f},
                                           SoftTopkCase{1, 1000, 64, 0.5f, 50, 2.0f},
                                           SoftTopkCase{2, 77, 9, 1.0f, 50, 300.0f},
                                           SoftTopkCase{2, 7, 7, 1.0f, 20, 1.0f}));

TEST(SoftTopkCpu, HardTopkTiesGoToLowerIndices) {
  const SoftTopkCase c{1, 10, 4, 1.0f, 10, 1.0f};
  const std::vector<float> s{0.5f, 1.0f, 0.5f, 1.0f, 0.25f, 0.5f, 0.75f, 0.5f, 0.25f, 0.5f};
  EXPECT_EQ(cpu_soft_topk(c, s).top, (std::vector<std::int32_t>{0, 1, 3, 6}));
}

TEST(SoftTopkCpu, BackwardMatchesFiniteDifferences) {
  for (const SoftTopkCase& c : {SoftTopkCase{2, 9, 3, 0.7f, 6, 1.5f}, SoftTopkCase{1, 12, 5, 1.0f, 1, 1.0f},
                                SoftTopkCase{1, 16, 4, 1.0f, 50, 2.0f}}) {
    const auto s = random_floats(std::size_t(c.batch) * c.seq, 6, c.scale);
    const auto g = random_floats(s.size(), 7);
    const SoftTopkResult r = cpu_soft_topk(c, s);
    std::vector<float> ds(s.size(), 0.0f);
    soft_topk_backward({c.batch, c.seq, c.k, c.epsilon, c.iterations, s.data(), r.a_history.data(), g.data(),
                        ds.data(), {}},
                       kCpu);
    auto loss = [&](const std::vector<double>& x) {
      return test::weighted_sum(ref_soft_topk(x, c.seq, c.k, c.epsilon, c.iterations), g);
    };
    expect_close("d s (T = " + std::to_string(c.iterations) + ")", ds, test::numeric_gradient(loss, to_double(s)),
                 test::kGradTol);
  }
}

// Two slices of each sequence run in two threads; the reduction hook combines them like an allreduce.
struct TwoRankReduce {
  std::barrier<> sync{2};
  std::vector<float> slot[2];
};
struct RankHook {
  TwoRankReduce* shared;
  int rank;
};
void two_rank_all_reduce(float* values, int count, ReduceOp op, void* user) {
  auto* hook = static_cast<RankHook*>(user);
  TwoRankReduce& r = *hook->shared;
  r.slot[hook->rank].assign(values, values + count);
  r.sync.arrive_and_wait();
  for (int i = 0; i < count; ++i) {
    values[i] = op == ReduceOp::kSum ? r.slot[0][i] + r.slot[1][i] : std::max(r.slot[0][i], r.slot[1][i]);
  }
  r.sync.arrive_and_wait();  // both have read the slots before either writes again
}

TEST(SoftTopkCpu, SplitSequenceMatchesWholeSequence) {
  const SoftTopkCase c{2, 90, 11, 1.0f, 50, 3.0f};
  const std::int64_t split[3] = {0, 37, c.seq};  // uneven slices
  const auto s = random_floats(std::size_t(c.batch) * c.seq, 8, c.scale);
  const auto g = random_floats(s.size(), 9);
  const SoftTopkResult whole = cpu_soft_topk(c, s);
  std::vector<float> ds_whole(s.size(), 0.0f);
  soft_topk_backward({c.batch, c.seq, c.k, c.epsilon, c.iterations, s.data(), whole.a_history.data(), g.data(),
                      ds_whole.data(), {}},
                     kCpu);

  TwoRankReduce shared;
  std::vector<float> s_tilde(s.size()), ds(s.size());
  auto rank_main = [&](int rank) {
    RankHook hook{&shared, rank};
    const SliceAllReduce reduce{two_rank_all_reduce, &hook};
    const std::int64_t n = split[rank + 1] - split[rank];
    std::vector<float> sl(c.batch * n), gl(c.batch * n), st(c.batch * n), a(c.batch * c.iterations),
        dsl(c.batch * n, 0.0f);
    for (int b = 0; b < c.batch; ++b) {
      std::copy_n(&s[b * c.seq + split[rank]], n, &sl[b * n]);
      std::copy_n(&g[b * c.seq + split[rank]], n, &gl[b * n]);
    }
    soft_topk({c.batch, n, c.k, c.epsilon, c.iterations, sl.data(), st.data(), a.data(), nullptr, reduce}, kCpu);
    soft_topk_backward({c.batch, n, c.k, c.epsilon, c.iterations, sl.data(), a.data(), gl.data(), dsl.data(), reduce},
                       kCpu);
    for (int b = 0; b < c.batch; ++b) {
      std::copy_n(&st[b * n], n, &s_tilde[b * c.seq + split[rank]]);
      std::copy_n(&dsl[b * n], n, &ds[b * c.seq + split[rank]]);
    }
  };
  std::thread other(rank_main, 1);
  rank_main(0);
  other.join();
  expect_close("split s~", s_tilde, to_double(whole.s_tilde), 1e-6);
  expect_close("split d s", ds, to_double(ds_whole), 1e-6);
}

TEST(SoftTopkCpu, RejectsBadArguments) {
  std::vector<float> buf(64, 1.0f), a(64);
  std::vector<std::int32_t> top(64);
  // k larger than an unsplit sequence.
  EXPECT_THROW(soft_topk({1, 8, 9, 1.0f, 5, buf.data(), buf.data(), a.data(), top.data(), {}}, kCpu), Error);
  // A hard top-k requested from one slice of a split sequence.
  const SliceAllReduce reduce{[](float*, int, ReduceOp, void*) {}, nullptr};
  EXPECT_THROW(soft_topk({1, 8, 4, 1.0f, 5, buf.data(), buf.data(), a.data(), top.data(), reduce}, kCpu), Error);
  EXPECT_THROW(soft_topk({1, 8, 4, 0.0f, 5, buf.data(), buf.data(), a.data(), top.data(), {}}, kCpu), Error);
#if !RINGCAST_WITH_CUDA  // with the CUDA backend this is a launch (tests/gpu/test_routing_gpu.cpp)
  EXPECT_THROW(soft_topk({1, 8, 4, 1.0f, 5, buf.data(), buf.data(), a.data(), top.data(), {}},
                         ExecContext{Device{DeviceKind::kCuda, 0}}),
               Error);
#endif
}

}  // namespace
}  // namespace ringcast::kernels
