// Helpers shared by the kernel test suites: seeded inputs that are never zero, relative errors
// against float64 references, central finite differences of float64 functions, error expectations.
#pragma once

#include <ringcast/error.hpp>

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <random>
#include <string>
#include <vector>

namespace ringcast::test {

using Vec = std::vector<double>;

// Uniform in ±[0.1, 1] times scale (no zeros, no near-zeros), from a seed.
inline std::vector<float> random_floats(std::size_t n, std::uint32_t seed, float scale = 1.0f) {
  std::mt19937 gen(seed);
  std::uniform_real_distribution<float> mag(0.1f, 1.0f);
  std::bernoulli_distribution sign(0.5);
  std::vector<float> x(n);
  for (float& v : x) v = scale * (sign(gen) ? mag(gen) : -mag(gen));
  return x;
}

inline std::vector<std::int32_t> random_ids(std::size_t n, std::int32_t limit, std::uint32_t seed) {
  std::mt19937 gen(seed);
  std::uniform_int_distribution<std::int32_t> id(0, limit - 1);
  std::vector<std::int32_t> ids(n);
  for (auto& v : ids) v = id(gen);
  return ids;
}

inline Vec to_double(const std::vector<float>& x) { return {x.begin(), x.end()}; }

// What a kernel added into a buffer that held `before`.
inline Vec added(const std::vector<float>& after, const std::vector<float>& before) {
  Vec d(after.size());
  for (std::size_t i = 0; i < d.size(); ++i) d[i] = double(after[i]) - double(before[i]);
  return d;
}

// ||x - ref|| / ||ref||, or the absolute norm when ref is zero. NaN in x gives NaN (never passes).
template <typename T>
double relative_error(const std::vector<T>& x, const Vec& ref) {
  double num = 0.0, den = 0.0;
  for (std::size_t i = 0; i < ref.size(); ++i) {
    const double e = double(x[i]) - ref[i];
    num += e * e;
    den += ref[i] * ref[i];
  }
  return den > 0.0 ? std::sqrt(num / den) : std::sqrt(num);
}

// Prints the error of every comparison, passing or not: the margin is worth seeing.
template <typename T>
void expect_close(const std::string& what, const std::vector<T>& x, const Vec& ref, double tol) {
  ASSERT_EQ(x.size(), ref.size()) << what;
  const double err = relative_error(x, ref);
  std::printf("    %-44s relative error %.2e (tolerance %.0e)\n", what.c_str(), err, tol);
  EXPECT_TRUE(err <= tol) << what << ": relative error " << err << " > " << tol;
}

// Central differences d f / d x_i ≈ (f(x + h e_i) - f(x - h e_i)) / 2h, in float64.
inline Vec numeric_gradient(const std::function<double(const Vec&)>& f, Vec x, double h = 1e-6) {
  Vec g(x.size());
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

// Σ w_i y_i: the scalar loss whose gradient with respect to the output y is w.
inline double weighted_sum(const Vec& y, const std::vector<float>& w) {
  double s = 0.0;
  for (std::size_t i = 0; i < y.size(); ++i) s += double(w[i]) * y[i];
  return s;
}

// Runs fn, which must throw ringcast::Error whose message contains `needle`.
inline void expect_error(const std::function<void()>& fn, const std::string& needle) {
  try {
    fn();
    ADD_FAILURE() << "expected an Error containing \"" << needle << "\"";
  } catch (const Error& e) {
    EXPECT_NE(e.message().find(needle), std::string::npos) << e.message();
  }
}

}  // namespace ringcast::test
