// Helpers of the selection building-block tests: seeded inputs that are never zero, the relative
// error against a float64 reference, and central finite differences of float64 reference functions.
#pragma once

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <functional>
#include <random>
#include <string>
#include <vector>

namespace ringcast::test {

// Uniform in ±[0.1, 1] (no zeros, no near-zeros), from a seed.
inline std::vector<float> random_floats(std::size_t n, std::uint32_t seed, float scale = 1.0f) {
  std::mt19937 gen(seed);
  std::uniform_real_distribution<float> mag(0.1f, 1.0f);
  std::bernoulli_distribution sign(0.5);
  std::vector<float> x(n);
  for (float& v : x) v = scale * (sign(gen) ? mag(gen) : -mag(gen));
  return x;
}

inline std::vector<double> to_double(const std::vector<float>& x) { return {x.begin(), x.end()}; }

// ||x - ref|| / ||ref||, or the absolute norm when ref is zero. NaN in x gives NaN (never passes).
template <typename T>
double relative_error(const std::vector<T>& x, const std::vector<double>& ref) {
  double num = 0.0, den = 0.0;
  for (std::size_t i = 0; i < ref.size(); ++i) {
    const double e = static_cast<double>(x[i]) - ref[i];
    num += e * e;
    den += ref[i] * ref[i];
  }
  return den > 0.0 ? std::sqrt(num / den) : std::sqrt(num);
}

template <typename T>
void expect_close(const std::string& what, const std::vector<T>& x, const std::vector<double>& ref, double tol) {
  ASSERT_EQ(x.size(), ref.size()) << what;
  const double err = relative_error(x, ref);
  EXPECT_TRUE(err <= tol) << what << ": relative error " << err << " > " << tol;
}

// Central differences of a scalar function of x, in float64: d f / d x_i ≈ (f(x + h e_i) - f(x - h e_i)) / 2h.
inline std::vector<double> numeric_gradient(const std::function<double(const std::vector<double>&)>& f,
                                            std::vector<double> x, double h = 1e-6) {
  std::vector<double> g(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) {
    const double x0 = x[i];
    x[i] = x0 + h;
    const double up = f(x);
    x[i] = x0 - h;
    const double down = f(x);
    x[i] = x0;
    g[i] = (up - down) / (2.0 * h);
  }
  return g;
}

// Σ w_i x_i: the scalar loss whose gradient with respect to an output is the random weight w.
inline double weighted_sum(const std::vector<double>& x, const std::vector<float>& w) {
  double s = 0.0;
  for (std::size_t i = 0; i < x.size(); ++i) s += w[i] * x[i];
  return s;
}

// fp32 kernel against float64 references: the 1e-5 relative budget of DESIGN.md §7.
inline constexpr double kForwardTol = 1e-5;
// fp32 analytic gradients against float64 central differences (whose own error is ~1e-9).
inline constexpr double kGradTol = 1e-4;

}  // namespace ringcast::test
