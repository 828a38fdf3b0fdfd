// AdamW, gradient clipping and the non-finite check on the CPU backend: three AdamW steps against a
// float64 reimplementation of PyTorch's update, the sum of squares against float64 (and across
// thread counts), a full clip-by-global-norm, and NaN / ±Inf found wherever they sit.
#include "layers_test_util.hpp"

#include <omp.h>

#include <limits>

namespace ringcast::kernels {
namespace {

using namespace ringcast::test;

TEST(AdamWCpu, ThreeStepsMatchFloat64) {
  const std::int64_t count = 1003;
  const double lr = 3e-3, beta1 = 0.9, beta2 = 0.95, eps = 1e-8, wd = 0.1;
  // Parameters of the size of a few updates: an fp32 parameter of magnitude 1 would hold a 3e-3
  // update only to ~2e-5 relative, too coarse to check it to 1e-5.
  auto param = random_floats(count, 1, 0.05f);
  std::vector<float> m(count, 0.0f), v(count, 0.0f);
  Vec param_ref = to_double(param), m_ref(count, 0.0), v_ref(count, 0.0);
  const Vec param0 = param_ref;
  for (std::int64_t step = 1; step <= 3; ++step) {
    const auto grad = random_floats(count, 10 + std::uint32_t(step), 0.5f);
    adamw_step({count, step, float(lr), float(beta1), float(beta2), float(eps), float(wd), param.data(), grad.data(),
                m.data(), v.data()},
               kCpu);
    const double bias1 = 1.0 - std::pow(beta1, step), bias2 = 1.0 - std::pow(beta2, step);
    for (std::int64_t i = 0; i < count; ++i) {
      param_ref[i] *= 1.0 - lr * wd;
      m_ref[i] = beta1 * m_ref[i] + (1.0 - beta1) * grad[i];
      v_ref[i] = beta2 * v_ref[i] + (1.0 - beta2) * double(grad[i]) * grad[i];
      param_ref[i] -= lr / bias1 * m_ref[i] / (std::sqrt(v_ref[i]) / std::sqrt(bias2) + eps);
    }
    SCOPED_TRACE(testing::Message() << "step " << step);
    expect_close("m", m, m_ref, kKernelTol);
    expect_close("v", v, v_ref, kKernelTol);
    // The update itself, not just the parameters it barely moves.
    Vec delta_ref(count);
    for (std::int64_t i = 0; i < count; ++i) delta_ref[i] = param_ref[i] - param0[i];
    std::vector<float> param_start(param0.begin(), param0.end());
    expect_close("param - param0", added(param, param_start), delta_ref, kKernelTol);
  }
}

TEST(ClippingCpu, SumOfSquaresAndScaleClipToTheMaxNorm) {
  const std::int64_t count = 10007;  // not a multiple of the reduction block
  auto grad = random_floats(count, 21, 2.0f);
  double ref = 0.0;
  for (const float g : grad) ref += double(g) * g;
  double sum = 0.0;
  sum_of_squares(count, grad.data(), &sum, kCpu);
  expect_close("sum of squares", std::vector<double>{sum}, {ref}, 1e-12);

  const auto sum_with = [&](int threads) {
    const int saved = omp_get_max_threads();
    omp_set_num_threads(threads);
    double s = 0.0;
    sum_of_squares(count, grad.data(), &s, kCpu);
    omp_set_num_threads(saved);
    return s;
  };
  EXPECT_EQ(sum_with(1), sum_with(3));

  const double max_norm = 1.0, norm = std::sqrt(sum);
  ASSERT_GT(norm, max_norm);
  const float scale = float(max_norm / norm);
  const auto before = grad;
  scale_in_place(count, scale, grad.data(), kCpu);
  for (std::int64_t i = 0; i < count; ++i) ASSERT_EQ(grad[i], before[i] * scale) << i;
  sum_of_squares(count, grad.data(), &sum, kCpu);
  EXPECT_NEAR(std::sqrt(sum), max_norm, 1e-6);
}

TEST(NonFiniteCpu, FindsNaNAndInfAnywhere) {
  const std::int64_t count = 5001;
  const auto clean = random_floats(count, 31, 1e30f);  // large but finite
  std::int32_t found = -1;
  find_non_finite(count, clean.data(), &found, kCpu);
  EXPECT_EQ(found, 0);
  find_non_finite(0, clean.data(), &found, kCpu);
  EXPECT_EQ(found, 0);
  const float bad[] = {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(),
                       -std::numeric_limits<float>::infinity()};
  for (const float value : bad)
    for (const std::int64_t at : {std::int64_t{0}, count / 2, count - 1}) {
      auto x = clean;
      x[at] = value;
      find_non_finite(count, x.data(), &found, kCpu);
      EXPECT_EQ(found, 1) << value << " at " << at;
    }
}

}  // namespace
}  // namespace ringcast::kernels
