// Linear and RMSNorm on the CPU backend: forward against float64, backward against the float64
// analytic gradient, which is itself checked by float64 central differences. Backward outputs start
// non-zero, so the add-into contract is checked too. A larger Linear runs on 3 threads (the blocked
// gemm path) and RMSNorm's d_g is compared bit for bit across thread counts.
#include "layers_test_util.hpp"

#include <omp.h>

namespace ringcast::kernels {
namespace {

using namespace ringcast::test;

struct LinearRef {
  std::int64_t rows;
  int in, out;
  Vec forward(const Vec& x, const Vec& w) const {
    Vec y(rows * out, 0.0);
    for (std::int64_t i = 0; i < rows; ++i)
      for (int o = 0; o < out; ++o)
        for (int c = 0; c < in; ++c) y[i * out + o] += x[i * in + c] * w[o * in + c];
    return y;
  }
  // d_x = d_y W, d_w = d_yᵀ x.
  void backward(const Vec& x, const Vec& w, const Vec& dy, Vec& dx, Vec& dw) const {
    dx.assign(rows * in, 0.0);
    dw.assign(std::size_t(out) * in, 0.0);
    for (std::int64_t i = 0; i < rows; ++i)
      for (int o = 0; o < out; ++o)
        for (int c = 0; c < in; ++c) {
          dx[i * in + c] += dy[i * out + o] * w[o * in + c];
          dw[o * in + c] += dy[i * out + o] * x[i * in + c];
        }
  }
};

void check_linear(std::int64_t rows, int in, int out, bool check_fd) {
  SCOPED_TRACE(testing::Message() << "rows " << rows << " in " << in << " out " << out);
  const LinearRef ref{rows, in, out};
  const auto x = random_floats(rows * in, 1);
  const auto w = random_floats(std::size_t(out) * in, 2);
  const auto dy = random_floats(rows * out, 3);
  const auto y0 = random_floats(rows * out, 4);

  const Vec y_ref = ref.forward(to_double(x), to_double(w));
  std::vector<float> y(rows * out);
  linear_forward({rows, in, out, x.data(), w.data(), y.data(), false}, kCpu);
  expect_close("y", y, y_ref, kKernelTol);
  std::vector<float> y_acc = y0;
  linear_forward({rows, in, out, x.data(), w.data(), y_acc.data(), true}, kCpu);
  expect_close("y accumulated", added(y_acc, y0), y_ref, kKernelTol);

  Vec dx_ref, dw_ref;
  ref.backward(to_double(x), to_double(w), to_double(dy), dx_ref, dw_ref);
  if (check_fd) {
    const auto loss_x = [&](const Vec& xv) { return weighted_sum(ref.forward(xv, to_double(w)), dy); };
    const auto loss_w = [&](const Vec& wv) { return weighted_sum(ref.forward(to_double(x), wv), dy); };
    expect_close("reference d_x vs finite differences", numeric_gradient(loss_x, to_double(x)), dx_ref,
                 kFiniteDiffTol);
    expect_close("reference d_w vs finite differences", numeric_gradient(loss_w, to_double(w)), dw_ref,
                 kFiniteDiffTol);
  }
  const auto dx0 = random_floats(rows * in, 5);
  const auto dw0 = random_floats(std::size_t(out) * in, 6);
  auto dx = dx0;
  auto dw = dw0;
  linear_backward({rows, in, out, x.data(), w.data(), dy.data(), dx.data(), dw.data()}, kCpu);
  expect_close("d_x", added(dx, dx0), dx_ref, kKernelTol);
  expect_close("d_w", added(dw, dw0), dw_ref, kKernelTol);
}

TEST(LinearCpu, TinyShapesMatchFloat64AndFiniteDifferences) {
  check_linear(7, 12, 5, true);
  check_linear(1, 3, 11, true);
}

TEST(LinearCpu, BlockedAcrossThreadsMatchesFloat64) {
  const int saved = omp_get_max_threads();
  omp_set_num_threads(3);
  check_linear(157, 96, 75, false);  // splits rows (forward, d_x) and columns (d_w)
  check_linear(5, 131, 203, false);  // splits columns of y
  omp_set_num_threads(saved);
}

struct RmsNormRef {
  std::int64_t rows;
  int dim;
  double eps;
  double inv_rms(const Vec& x, std::int64_t i) const {
    double s = 0.0;
    for (int c = 0; c < dim; ++c) s += x[i * dim + c] * x[i * dim + c];
    return 1.0 / std::sqrt(s / dim + eps);
  }
  Vec forward(const Vec& x, const Vec& g) const {
    Vec y(x.size());
    for (std::int64_t i = 0; i < rows; ++i) {
      const double r = inv_rms(x, i);
      for (int c = 0; c < dim; ++c) y[i * dim + c] = x[i * dim + c] * r * g[c];
    }
    return y;
  }
  void backward(const Vec& x, const Vec& g, const Vec& dy, Vec& dx, Vec& dg) const {
    dx.assign(x.size(), 0.0);
    dg.assign(dim, 0.0);
    for (std::int64_t i = 0; i < rows; ++i) {
      const double r = inv_rms(x, i);
      double ux = 0.0;
      for (int c = 0; c < dim; ++c) ux += dy[i * dim + c] * g[c] * x[i * dim + c];
      for (int c = 0; c < dim; ++c) {
        dx[i * dim + c] = r * dy[i * dim + c] * g[c] - r * r * r * ux / dim * x[i * dim + c];
        dg[c] += dy[i * dim + c] * x[i * dim + c] * r;
      }
    }
  }
};

TEST(RmsNormCpu, MatchesFloat64AndFiniteDifferences) {
  const std::int64_t rows = 7;
  const int dim = 12;
  const float eps = 1e-5f;
  const RmsNormRef ref{rows, dim, eps};
  const auto x = random_floats(rows * dim, 11);
  const auto g = random_floats(dim, 12);
  const auto dy = random_floats(rows * dim, 13);

  std::vector<float> y(rows * dim);
  rms_norm_forward({rows, dim, eps, x.data(), g.data(), y.data()}, kCpu);
  expect_close("y", y, ref.forward(to_double(x), to_double(g)), kKernelTol);

  Vec dx_ref, dg_ref;
  ref.backward(to_double(x), to_double(g), to_double(dy), dx_ref, dg_ref);
  const auto loss_x = [&](const Vec& xv) { return weighted_sum(ref.forward(xv, to_double(g)), dy); };
  const auto loss_g = [&](const Vec& gv) { return weighted_sum(ref.forward(to_double(x), gv), dy); };
  expect_close("reference d_x vs finite differences", numeric_gradient(loss_x, to_double(x)), dx_ref, kFiniteDiffTol);
  expect_close("reference d_g vs finite differences", numeric_gradient(loss_g, to_double(g)), dg_ref, kFiniteDiffTol);

  const auto dx0 = random_floats(rows * dim, 14);
  const auto dg0 = random_floats(dim, 15);
  auto dx = dx0;
  auto dg = dg0;
  rms_norm_backward({rows, dim, eps, x.data(), g.data(), dy.data(), dx.data(), dg.data()}, kCpu);
  expect_close("d_x", added(dx, dx0), dx_ref, kKernelTol);
  expect_close("d_g", added(dg, dg0), dg_ref, kKernelTol);
}

TEST(RmsNormCpu, GainGradientIsIndependentOfThreadCount) {
  const std::int64_t rows = 301;
  const int dim = 150;  // three column blocks, the last partial
  const auto x = random_floats(rows * dim, 21);
  const auto g = random_floats(dim, 22);
  const auto dy = random_floats(rows * dim, 23);
  const auto run = [&](int threads) {
    const int saved = omp_get_max_threads();
    omp_set_num_threads(threads);
    std::vector<float> dx(rows * dim, 0.0f), dg(dim, 0.0f);
    rms_norm_backward({rows, dim, 1e-6f, x.data(), g.data(), dy.data(), dx.data(), dg.data()}, kCpu);
    omp_set_num_threads(saved);
    return dg;
  };
  EXPECT_EQ(run(1), run(3));
}

TEST(LayersDispatch, RejectsBadParametersAndBf16) {
  const auto x = random_floats(12, 31);
  const auto g = random_floats(4, 32);
  std::vector<float> y(12);
  expect_error([&] { linear_forward({3, 4, 3, x.data(), x.data(), y.data(), false, DType::kBF16}, kCpu); },
               "bf16 products are not supported on the CPU backend");
  expect_error([&] { rms_norm_forward({3, 4, 1e-6f, x.data(), nullptr, y.data()}, kCpu); }, "null");
  expect_error([&] { linear_forward({3, 0, 4, x.data(), g.data(), y.data(), false}, kCpu); }, "positive width");
}

}  // namespace
}  // namespace ringcast::kernels
