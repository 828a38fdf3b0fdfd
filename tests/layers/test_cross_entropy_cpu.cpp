// The chunked linear cross-entropy head on the CPU backend: loss, count, accuracy and gradients
// against a float64 reference (its gradients checked by central differences), with a bias (the
// classification head) and without (the LM head), ignored targets, chunk sizes 1, 3 and T giving the
// same results to fp32 rounding, evaluation without gradients, and invalid targets.
#include "layers_test_util.hpp"

#include <algorithm>

namespace ringcast::kernels {
namespace {

using namespace ringcast::test;

struct CrossEntropyRef {
  std::int64_t rows, vocab;
  int dim;
  std::vector<std::int32_t> targets;

  Vec logits(const Vec& h, const Vec& w, const Vec* bias) const {
    Vec z(rows * vocab, 0.0);
    for (std::int64_t i = 0; i < rows; ++i)
      for (std::int64_t j = 0; j < vocab; ++j) {
        double s = bias ? (*bias)[j] : 0.0;
        for (int c = 0; c < dim; ++c) s += h[i * dim + c] * w[j * dim + c];
        z[i * vocab + j] = s;
      }
    return z;
  }
  double lse(const Vec& z, std::int64_t i) const {
    const double m = *std::max_element(z.begin() + i * vocab, z.begin() + (i + 1) * vocab);
    double s = 0.0;
    for (std::int64_t j = 0; j < vocab; ++j) s += std::exp(z[i * vocab + j] - m);
    return m + std::log(s);
  }
  CrossEntropyTotals totals(const Vec& z) const {
    CrossEntropyTotals t;
    for (std::int64_t i = 0; i < rows; ++i) {
      if (targets[i] < 0) continue;
      t.loss_sum += lse(z, i) - z[i * vocab + targets[i]];
      ++t.count;
      const auto row = z.begin() + i * vocab;
      t.correct += std::max_element(row, row + vocab) - row == targets[i];
    }
    return t;
  }
  // d logits of scale · Σ loss, then through the product to h, w and bias.
  void backward(const Vec& h, const Vec& w, const Vec& z, double scale, Vec& dh, Vec& dw, Vec& db) const {
    dh.assign(h.size(), 0.0);
    dw.assign(w.size(), 0.0);
    db.assign(vocab, 0.0);
    for (std::int64_t i = 0; i < rows; ++i) {
      if (targets[i] < 0) continue;
      const double l = lse(z, i);
      for (std::int64_t j = 0; j < vocab; ++j) {
        const double dz = scale * (std::exp(z[i * vocab + j] - l) - (j == targets[i] ? 1.0 : 0.0));
        db[j] += dz;
        for (int c = 0; c < dim; ++c) {
          dh[i * dim + c] += dz * w[j * dim + c];
          dw[j * dim + c] += dz * h[i * dim + c];
        }
      }
    }
  }
};

struct Inputs {
  std::vector<float> h, w, bias;
  std::vector<std::int32_t> targets;
};

// Targets: every third row the float64 argmax (so accuracy is neither 0 nor 1), some ignored.
Inputs make_inputs(std::int64_t rows, int dim, std::int64_t vocab, std::uint32_t seed) {
  Inputs in{random_floats(rows * dim, seed), random_floats(vocab * dim, seed + 1), random_floats(vocab, seed + 2),
            random_ids(rows, std::int32_t(vocab), seed + 3)};
  const CrossEntropyRef ref{rows, vocab, dim, in.targets};
  const Vec bias = to_double(in.bias);
  const Vec z = ref.logits(to_double(in.h), to_double(in.w), &bias);
  for (std::int64_t i = 0; i < rows; i += 3) {
    const auto row = z.begin() + i * vocab;
    in.targets[i] = std::int32_t(std::max_element(row, row + vocab) - row);
  }
  in.targets[1] = -1;
  in.targets[rows - 2] = -100;
  return in;
}

struct Result {
  CrossEntropyTotals totals;
  std::vector<float> dh, dw, db;
};

// Gradient buffers start non-zero so that the add-into contract is exercised, at the scale of the
// gradients (loss_scale / count is small) so that fp32 rounding of the sum does not hide their error.
Result initial_gradients(std::int64_t rows, int dim, std::int64_t vocab) {
  constexpr float kScale = 1e-3f;
  return {{}, random_floats(rows * dim, 901, kScale), random_floats(vocab * dim, 902, kScale),
          random_floats(vocab, 903, kScale)};
}

Result run(const Inputs& in, std::int64_t rows, int dim, std::int64_t vocab, std::int64_t chunk, float scale,
           bool with_bias, bool train = true) {
  Result r = initial_gradients(rows, dim, vocab);
  LinearCrossEntropyParams p{rows, dim, vocab, chunk, scale, in.h.data(), in.w.data(),
                             with_bias ? in.bias.data() : nullptr, in.targets.data(), &r.totals};
  if (train) {
    p.d_h = r.dh.data();
    p.d_w = r.dw.data();
    p.d_bias = with_bias ? r.db.data() : nullptr;
  }
  linear_cross_entropy(p, kCpu);
  return r;
}

void check_against_reference(std::int64_t rows, int dim, std::int64_t vocab, std::int64_t chunk, bool with_bias,
                             bool check_fd) {
  SCOPED_TRACE(testing::Message() << "rows " << rows << " dim " << dim << " vocab " << vocab << " chunk " << chunk
                                  << (with_bias ? " bias" : ""));
  const Inputs in = make_inputs(rows, dim, vocab, 100);
  const CrossEntropyRef ref{rows, vocab, dim, in.targets};
  const Vec h = to_double(in.h), w = to_double(in.w), bias = to_double(in.bias);
  const Vec* b = with_bias ? &bias : nullptr;
  const Vec z = ref.logits(h, w, b);
  const CrossEntropyTotals want = ref.totals(z);
  const float scale = 1.0f / float(want.count);
  Vec dh_ref, dw_ref, db_ref;
  ref.backward(h, w, z, scale, dh_ref, dw_ref, db_ref);

  if (check_fd) {
    const auto loss = [&](const Vec& hv, const Vec& wv, const Vec& bv) {
      return scale * ref.totals(ref.logits(hv, wv, with_bias ? &bv : nullptr)).loss_sum;
    };
    expect_close("reference d_h vs finite differences",
                 numeric_gradient([&](const Vec& v) { return loss(v, w, bias); }, h), dh_ref, kFiniteDiffTol);
    expect_close("reference d_w vs finite differences",
                 numeric_gradient([&](const Vec& v) { return loss(h, v, bias); }, w), dw_ref, kFiniteDiffTol);
    if (with_bias)
      expect_close("reference d_bias vs finite differences",
                   numeric_gradient([&](const Vec& v) { return loss(h, w, v); }, bias), db_ref, kFiniteDiffTol);
  }

  const Result init = initial_gradients(rows, dim, vocab);
  const Result got = run(in, rows, dim, vocab, chunk, scale, with_bias);
  EXPECT_EQ(got.totals.count, want.count);
  EXPECT_EQ(got.totals.correct, want.correct);
  EXPECT_GT(want.correct, 0);
  EXPECT_LT(want.correct, want.count);
  expect_close("loss sum", std::vector<double>{got.totals.loss_sum}, {want.loss_sum}, kKernelTol);
  expect_close("d_h", added(got.dh, init.dh), dh_ref, kKernelTol);
  expect_close("d_w", added(got.dw, init.dw), dw_ref, kKernelTol);
  if (with_bias) expect_close("d_bias", added(got.db, init.db), db_ref, kKernelTol);
  for (const std::int64_t i : {std::int64_t{1}, rows - 2})  // ignored rows get no gradient at all
    for (int c = 0; c < dim; ++c) EXPECT_EQ(got.dh[i * dim + c], init.dh[i * dim + c]) << "ignored row " << i;
}

TEST(LinearCrossEntropyCpu, TinyShapesMatchFloat64AndFiniteDifferences) {
  check_against_reference(7, 12, 11, 3, /*with_bias=*/false, /*check_fd=*/true);
  check_against_reference(7, 12, 11, 3, /*with_bias=*/true, /*check_fd=*/true);
}

TEST(LinearCrossEntropyCpu, LargerShapeMatchesFloat64) {
  check_against_reference(50, 40, 301, 16, /*with_bias=*/false, /*check_fd=*/false);
}

TEST(LinearCrossEntropyCpu, ChunkSizesAgree) {
  for (const auto& [rows, dim, vocab] : {std::tuple<std::int64_t, int, std::int64_t>{7, 12, 11}, {50, 40, 301}}) {
    const Inputs in = make_inputs(rows, dim, vocab, 200);
    const Result whole = run(in, rows, dim, vocab, rows, 0.25f, true);
    for (const std::int64_t chunk : {std::int64_t{1}, std::int64_t{3}, rows + 5}) {
      SCOPED_TRACE(testing::Message() << "rows " << rows << " chunk " << chunk);
      const Result r = run(in, rows, dim, vocab, chunk, 0.25f, true);
      EXPECT_EQ(r.totals.count, whole.totals.count);
      EXPECT_EQ(r.totals.correct, whole.totals.correct);
      expect_close("loss sum", std::vector<double>{r.totals.loss_sum}, {whole.totals.loss_sum}, 1e-6);
      expect_close("d_h", r.dh, to_double(whole.dh), 1e-6);
      expect_close("d_w", r.dw, to_double(whole.dw), 1e-6);
      expect_close("d_bias", r.db, to_double(whole.db), 1e-6);
    }
  }
}

TEST(LinearCrossEntropyCpu, EvaluationGivesTheTrainingTotals) {
  const Inputs in = make_inputs(7, 12, 11, 300);
  const Result train = run(in, 7, 12, 11, 2, 1.0f, true);
  const Result eval = run(in, 7, 12, 11, 2, 1.0f, true, /*train=*/false);
  EXPECT_EQ(eval.totals.loss_sum, train.totals.loss_sum);
  EXPECT_EQ(eval.totals.count, train.totals.count);
  EXPECT_EQ(eval.totals.correct, train.totals.correct);
}

TEST(LinearCrossEntropyCpu, AllTargetsIgnored) {
  Inputs in = make_inputs(7, 12, 11, 400);
  std::fill(in.targets.begin(), in.targets.end(), -1);
  const Result r = run(in, 7, 12, 11, 3, 1.0f, true);
  const Result init = initial_gradients(7, 12, 11);
  EXPECT_EQ(r.totals.count, 0);
  EXPECT_EQ(r.totals.correct, 0);
  EXPECT_EQ(r.totals.loss_sum, 0.0);
  EXPECT_EQ(r.dh, init.dh);
  EXPECT_EQ(r.dw, init.dw);
  EXPECT_EQ(r.db, init.db);
}

TEST(LinearCrossEntropyCpu, RejectsTargetsOutsideTheVocabularyAndMissingGradients) {
  Inputs in = make_inputs(7, 12, 11, 500);
  in.targets[4] = 11;
  expect_error([&] { run(in, 7, 12, 11, 3, 1.0f, true); }, "row 4 has target 11 >= vocab 11");
  CrossEntropyTotals totals;
  std::vector<float> dh(7 * 12);
  expect_error(
      [&] {
        linear_cross_entropy({7, 12, 11, 3, 1.0f, in.h.data(), in.w.data(), nullptr, in.targets.data(), &totals,
                              dh.data(), nullptr},
                             kCpu);
      },
      "d_h and d_w go together");
}

}  // namespace
}  // namespace ringcast::kernels
