// RoPE, SwiGLU, embedding and token pooling on the CPU backend: forward against float64, backward
// against the float64 analytic gradient (checked by float64 central differences). RoPE uses global
// positions up to ~2^21, as on a rank far into a sharded sequence; the embedding backward sees
// repeated ids; pooling is also split into two "ranks" whose partial means add to the global mean.
#include "layers_test_util.hpp"

#include <omp.h>

namespace ringcast::kernels {
namespace {

using namespace ringcast::test;

struct RopeRef {
  std::int64_t rows;
  int heads, head_dim;
  double theta;
  std::vector<std::int32_t> pos;
  // sign = -1 applies the transposed rotation.
  Vec apply(const Vec& x, double sign = 1.0) const {
    const int half = head_dim / 2;
    Vec y(x.size());
    for (std::int64_t t = 0; t < rows; ++t)
      for (int h = 0; h < heads; ++h)
        for (int i = 0; i < half; ++i) {
          const double angle = pos[t] * std::pow(theta, -2.0 * i / head_dim);
          const double c = std::cos(angle), s = sign * std::sin(angle);
          const std::size_t base = (t * heads + h) * head_dim;
          y[base + i] = x[base + i] * c - x[base + i + half] * s;
          y[base + i + half] = x[base + i + half] * c + x[base + i] * s;
        }
    return y;
  }
};

TEST(RopeCpu, GlobalPositionsMatchFloat64AndFiniteDifferences) {
  const std::int64_t rows = 7;
  const int heads = 3, head_dim = 10;
  const RopeRef ref{rows, heads, head_dim, 500000.0, {0, 1, 5, 1000003, 2097161, 77, 1048575}};
  const auto x = random_floats(rows * heads * head_dim, 41);
  const auto w = random_floats(x.size(), 42);

  auto q = x;
  rope_forward({rows, heads, head_dim, 500000.0f, ref.pos.data(), q.data()}, kCpu);
  expect_close("rotated", q, ref.apply(to_double(x)), kKernelTol);

  const Vec dx_ref = ref.apply(to_double(w), -1.0);
  const auto loss = [&](const Vec& xv) { return weighted_sum(ref.apply(xv), w); };
  expect_close("reference d_x vs finite differences", numeric_gradient(loss, to_double(x)), dx_ref, kFiniteDiffTol);
  auto dq = w;
  rope_backward({rows, heads, head_dim, 500000.0f, ref.pos.data(), dq.data()}, kCpu);
  expect_close("d_x", dq, dx_ref, kKernelTol);

  rope_backward({rows, heads, head_dim, 500000.0f, ref.pos.data(), q.data()}, kCpu);
  expect_close("backward undoes forward", q, to_double(x), kKernelTol);
}

TEST(RopeCpu, RejectsOddHeadDim) {
  std::vector<float> x(9, 1.0f);
  const std::int32_t pos[3] = {0, 1, 2};
  expect_error([&] { rope_forward({3, 1, 3, 10000.0f, pos, x.data()}, kCpu); }, "head_dim must be even");
}

double silu(double a) { return a / (1.0 + std::exp(-a)); }

TEST(SwigluCpu, MatchesFloat64AndFiniteDifferences) {
  const std::int64_t count = 7 * 12;
  const auto a = random_floats(count, 51, 4.0f);  // reaches both tails of the sigmoid
  const auto b = random_floats(count, 52);
  const auto dh = random_floats(count, 53);
  const auto forward = [&](const Vec& av, const Vec& bv) {
    Vec h(count);
    for (std::int64_t i = 0; i < count; ++i) h[i] = silu(av[i]) * bv[i];
    return h;
  };
  std::vector<float> h(count);
  swiglu_forward({count, a.data(), b.data(), h.data()}, kCpu);
  expect_close("h", h, forward(to_double(a), to_double(b)), kKernelTol);

  Vec da_ref(count), db_ref(count);
  for (std::int64_t i = 0; i < count; ++i) {
    const double s = 1.0 / (1.0 + std::exp(-double(a[i])));
    da_ref[i] = dh[i] * b[i] * s * (1.0 + a[i] * (1.0 - s));
    db_ref[i] = dh[i] * silu(a[i]);
  }
  const auto loss_a = [&](const Vec& av) { return weighted_sum(forward(av, to_double(b)), dh); };
  const auto loss_b = [&](const Vec& bv) { return weighted_sum(forward(to_double(a), bv), dh); };
  expect_close("reference d_a vs finite differences", numeric_gradient(loss_a, to_double(a)), da_ref, kFiniteDiffTol);
  expect_close("reference d_b vs finite differences", numeric_gradient(loss_b, to_double(b)), db_ref, kFiniteDiffTol);

  const auto da0 = random_floats(count, 54);
  const auto db0 = random_floats(count, 55);
  auto da = da0;
  auto db = db0;
  swiglu_backward({count, a.data(), b.data(), dh.data(), da.data(), db.data()}, kCpu);
  expect_close("d_a", added(da, da0), da_ref, kKernelTol);
  expect_close("d_b", added(db, db0), db_ref, kKernelTol);
}

TEST(EmbeddingCpu, RepeatedIdsMatchFloat64AndFiniteDifferences) {
  const std::int64_t rows = 13, vocab = 11;
  const int dim = 12;
  const std::vector<std::int32_t> ids = {3, 7, 3, 0, 10, 3, 7, 5, 5, 3, 1, 10, 3};  // 2, 4, 6, 8, 9 unused
  const auto table = random_floats(vocab * dim, 61);
  const auto dy = random_floats(rows * dim, 62);
  const auto forward = [&](const Vec& e) {
    Vec y(rows * dim);
    for (std::int64_t t = 0; t < rows; ++t)
      for (int c = 0; c < dim; ++c) y[t * dim + c] = e[ids[t] * dim + c];
    return y;
  };
  std::vector<float> y(rows * dim);
  embedding_forward({rows, dim, vocab, ids.data(), table.data(), y.data()}, kCpu);
  expect_close("y", y, forward(to_double(table)), 0.0);

  Vec de_ref(vocab * dim, 0.0);
  for (std::int64_t t = 0; t < rows; ++t)
    for (int c = 0; c < dim; ++c) de_ref[ids[t] * dim + c] += dy[t * dim + c];
  const auto loss = [&](const Vec& e) { return weighted_sum(forward(e), dy); };
  expect_close("reference d_table vs finite differences", numeric_gradient(loss, to_double(table)), de_ref,
               kFiniteDiffTol);
  const auto de0 = random_floats(vocab * dim, 63);
  auto de = de0;
  embedding_backward({rows, dim, vocab, ids.data(), dy.data(), de.data()}, kCpu);
  expect_close("d_table", added(de, de0), de_ref, kKernelTol);
  for (const int unused : {2, 4, 6, 8, 9})
    for (int c = 0; c < dim; ++c) EXPECT_EQ(de[unused * dim + c], de0[unused * dim + c]) << "row " << unused;
}

TEST(EmbeddingCpu, BackwardIsIndependentOfThreadCount) {
  const std::int64_t rows = 1001, vocab = 37;
  const int dim = 24;
  const auto ids = random_ids(rows, vocab, 71);
  const auto dy = random_floats(rows * dim, 72);
  const auto run = [&](int threads) {
    const int saved = omp_get_max_threads();
    omp_set_num_threads(threads);
    std::vector<float> de(vocab * dim, 0.5f);
    embedding_backward({rows, dim, vocab, ids.data(), dy.data(), de.data()}, kCpu);
    omp_set_num_threads(saved);
    return de;
  };
  EXPECT_EQ(run(1), run(3));
}

TEST(EmbeddingCpu, RejectsIdsOutsideTheVocabulary) {
  const auto table = random_floats(4 * 3, 81);
  std::vector<float> y(2 * 3);
  const std::vector<std::int32_t> ids = {1, 4};
  expect_error([&] { embedding_forward({2, 3, 4, ids.data(), table.data(), y.data()}, kCpu); },
               "token 1 has id 4 outside [0, 4)");
}

TEST(TokenPoolCpu, MatchesFloat64AndSplitsAcrossRanks) {
  const int batch = 2, dim = 70;  // two column blocks, the second partial
  const std::int64_t seq = 7;
  const float scale = 1.0f / seq;
  const auto x = random_floats(batch * seq * dim, 91);
  const auto dp = random_floats(batch * dim, 92);
  const auto forward = [&](const Vec& xv) {
    Vec pooled(batch * dim, 0.0);
    for (int b = 0; b < batch; ++b)
      for (std::int64_t t = 0; t < seq; ++t)
        for (int c = 0; c < dim; ++c) pooled[b * dim + c] += xv[(b * seq + t) * dim + c] / seq;
    return pooled;
  };
  std::vector<float> pooled(batch * dim);
  token_pool_forward({batch, seq, dim, scale, x.data(), pooled.data()}, kCpu);
  const Vec pooled_ref = forward(to_double(x));
  expect_close("pooled", pooled, pooled_ref, kKernelTol);

  // Two ranks holding tokens [0, 3) and [3, 7) of each sequence, each scaling by 1 / 7.
  std::vector<float> sum(batch * dim, 0.0f);
  for (const auto& [t0, t1] : {std::pair<std::int64_t, std::int64_t>{0, 3}, {3, 7}}) {
    std::vector<float> shard, part(batch * dim);
    for (int b = 0; b < batch; ++b)
      shard.insert(shard.end(), x.begin() + (b * seq + t0) * dim, x.begin() + (b * seq + t1) * dim);
    token_pool_forward({batch, t1 - t0, dim, scale, shard.data(), part.data()}, kCpu);
    for (std::size_t i = 0; i < sum.size(); ++i) sum[i] += part[i];
  }
  expect_close("sum of the ranks' partial means", sum, pooled_ref, kKernelTol);

  Vec dx_ref(x.size());
  for (int b = 0; b < batch; ++b)
    for (std::int64_t t = 0; t < seq; ++t)
      for (int c = 0; c < dim; ++c) dx_ref[(b * seq + t) * dim + c] = dp[b * dim + c] / double(seq);
  const auto loss = [&](const Vec& xv) { return weighted_sum(forward(xv), dp); };
  expect_close("reference d_x vs finite differences", numeric_gradient(loss, to_double(x)), dx_ref, kFiniteDiffTol);
  const auto dx0 = random_floats(x.size(), 93);
  auto dx = dx0;
  token_pool_backward({batch, seq, dim, scale, dp.data(), dx.data()}, kCpu);
  expect_close("d_x", added(dx, dx0), dx_ref, kKernelTol);
}

}  // namespace
}  // namespace ringcast::kernels
