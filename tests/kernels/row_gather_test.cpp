// The indexed row movement on the CPU backend (row_gather.hpp) on the cases of row_gather_cases.hpp,
// against two references of the documented semantics: evaluated in fp32 in the documented order (the
// result must equal it bitwise; for the scatter that is a sequential dst[index[i]] += src[i] in
// ascending i, the order the CPU backend has always used), and in float64, within the error bound of
// that fp32 evaluation, (n + 2) u (|y0| + sum |w x|) per element for n terms. Also the bf16 / f16 bit
// copies, the parameter checks and rowwise_dot.
#include <ringcast/kernels/row_gather.hpp>

#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <limits>
#include <string>
#include <vector>

#include "row_gather_cases.hpp"
#include "test_util.hpp"

namespace ringcast::test {
namespace {

using kernels::RowGather;
using kernels::RowIndex;
using kernels::RowScatter;

const kernels::ExecContext kCpu{};
constexpr double kUnit = 0x1p-24;  // fp32 unit roundoff

std::int64_t entry(RowIndex index, std::int64_t k) {
  return index.wide ? static_cast<const std::int64_t*>(index.data)[k] : static_cast<const std::int32_t*>(index.data)[k];
}

// The gather of row_gather.hpp evaluated in T; bound[e] receives the float64 error bound of the fp32
// evaluation of element e.
template <typename T>
std::vector<T> reference(const RowGather& p, const std::vector<float>& dst0, std::vector<double>& bound) {
  std::vector<T> y(dst0.begin(), dst0.end());
  bound.assign(dst0.size(), 0.0);
  const auto* src = static_cast<const float*>(p.src);
  const std::int64_t src_rs = p.src_row_stride ? p.src_row_stride : p.width;
  const std::int64_t dst_rs = p.dst_row_stride ? p.dst_row_stride : p.width;
  for (int h = 0; h < p.heads; ++h)
    for (std::int64_t o = 0; o < p.rows; ++o) {
      const std::int64_t list = h / p.group;
      const std::int64_t begin = p.offsets ? p.offsets[list * (p.rows + 1) + o] : o;
      const std::int64_t end = p.offsets ? p.offsets[list * (p.rows + 1) + o + 1] : o + 1;
      const T w = p.weights ? p.weights[o] : p.scale;
      const std::int64_t row = (p.dst_rows ? entry(p.dst_rows, o) : o) * dst_rs + h * p.dst_head_stride;
      for (std::int64_t e = 0; e < p.width; ++e) {
        const auto at = static_cast<std::size_t>(row + e);
        T acc = p.accumulate ? y[at] : T(p.fill);
        double magnitude = p.accumulate ? std::abs(double(dst0[at])) : 0.0;
        int terms = 0;
        for (std::int64_t k = begin; k < end; ++k) {
          const std::int64_t j = p.index ? entry(p.index, list * p.index_stride + k) : k;
          if (j < 0) continue;
          const T x = src[j * src_rs + h * p.src_head_stride + e];
          acc = p.accumulate ? acc + w * x : (terms == 0 ? x : acc + x);
          magnitude += std::abs(double(w) * double(x));
          ++terms;
        }
        y[at] = p.accumulate ? acc : w * acc;
        bound[at] = (terms + 2) * kUnit * magnitude;
      }
    }
  return y;
}

// The scatter as a sequential loop over i ascending, in T.
template <typename T>
std::vector<T> reference(const RowScatter& p, const std::vector<float>& dst0, std::vector<double>& bound) {
  std::vector<T> y(dst0.begin(), dst0.end());
  std::vector<int> terms(dst0.size(), 0);
  Vec magnitude(dst0.size());
  for (std::size_t i = 0; i < dst0.size(); ++i) magnitude[i] = std::abs(double(dst0[i]));
  const std::int64_t src_rs = p.src_row_stride ? p.src_row_stride : p.width;
  const std::int64_t dst_rs = p.dst_row_stride ? p.dst_row_stride : p.width;
  for (int h = 0; h < p.heads; ++h)
    for (std::int64_t i = 0; i < p.rows; ++i) {
      const std::int64_t j = entry(p.index, (h / p.group) * p.index_stride + i);
      if (j < 0) continue;
      for (std::int64_t e = 0; e < p.width; ++e) {
        const auto at = static_cast<std::size_t>(j * dst_rs + h * p.dst_head_stride + e);
        const T x = p.src[i * src_rs + h * p.src_head_stride + e];
        y[at] = y[at] + x;
        magnitude[at] += std::abs(double(x));
        ++terms[at];
      }
    }
  bound.resize(dst0.size());
  for (std::size_t i = 0; i < dst0.size(); ++i) bound[i] = (terms[i] + 2) * kUnit * magnitude[i];
  return y;
}

// got == ordered bitwise, and |got - exact| <= bound everywhere (infinities equal).
void expect_matches(const std::string& what, const std::vector<float>& got, const std::vector<float>& ordered,
                    const Vec& exact, const Vec& bound) {
  ASSERT_EQ(got.size(), ordered.size()) << what;
  std::size_t diffs = 0, outside = 0, first = 0;
  double worst = 0.0;
  for (std::size_t i = 0; i < got.size(); ++i) {
    if (std::memcmp(&got[i], &ordered[i], sizeof(float)) != 0 && diffs++ == 0) first = i;
    const double err =
        std::isinf(exact[i]) ? (double(got[i]) == exact[i] ? 0.0 : INFINITY) : std::abs(got[i] - exact[i]);
    if (!(err <= bound[i])) ++outside;
    if (bound[i] > 0.0) worst = std::max(worst, err / bound[i]);
  }
  std::printf("    %-52s fp32 order: %s; float64: max |err| / bound %.2f\n", what.c_str(),
              diffs == 0 ? "bitwise equal" : "DIFFERENT", worst);
  EXPECT_EQ(diffs, 0u) << what << ": " << diffs << " elements differ from the fp32 reference; first [" << first
                       << "]: " << got[first] << " vs " << ordered[first];
  EXPECT_EQ(outside, 0u) << what << ": " << outside << " elements outside the float64 bound";
}

const auto host = [](const auto& v) { return v.data(); };

// Runs case c on the CPU backend and compares it with both references.
template <typename Case>
void expect_references(const Case& c) {
  std::vector<float> got = c.dst;
  const auto p = bind(c, host, got.data());
  run(p, kCpu);
  Vec bound;
  const std::vector<float> ordered = reference<float>(p, c.dst, bound);
  const std::vector<double> exact = reference<double>(p, c.dst, bound);
  expect_matches(c.name, got, ordered, exact, bound);
}

TEST(RowGather, GatherMatchesReferences) {
  for (const GatherCase& c : gather_cases()) expect_references(c);
}

TEST(RowGather, ScatterAddsInAscendingSourceOrder) {
  for (const ScatterCase& c : scatter_cases()) expect_references(c);
}

TEST(RowGather, SixteenBitRowsAreCopiedBits) {
  // heads 3 in groups of 1, rows of 5 elements with a gap of 2; negative entries give zero bits.
  const std::int64_t rows = 13, width = 5, src_rows = 17, row_stride = 3 * 7;
  const std::vector<std::int32_t> index = random_index<std::int32_t>(3 * rows, src_rows, 0.2, 41);
  std::vector<std::uint16_t> src(static_cast<std::size_t>(src_rows * row_stride));
  std::mt19937 gen(42);
  for (auto& v : src) v = static_cast<std::uint16_t>(gen());
  for (const DType dtype : {DType::kBF16, DType::kF16}) {
    std::vector<std::uint16_t> dst(static_cast<std::size_t>(rows * row_stride), 0xABCD), want = dst;
    RowGather p;
    p.rows = rows;
    p.width = width;
    p.heads = 3;
    p.index = index.data();
    p.index_stride = rows;
    p.dtype = dtype;
    p.src = src.data();
    p.dst = dst.data();
    p.src_row_stride = p.dst_row_stride = row_stride;
    p.src_head_stride = p.dst_head_stride = 7;
    kernels::gather_rows(p, kCpu);
    for (int h = 0; h < 3; ++h)
      for (std::int64_t i = 0; i < rows; ++i) {
        const std::int32_t j = index[static_cast<std::size_t>(h * rows + i)];
        for (std::int64_t e = 0; e < width; ++e)
          want[static_cast<std::size_t>(i * row_stride + h * 7 + e)] =
              j < 0 ? 0 : src[static_cast<std::size_t>(j * row_stride + h * 7 + e)];
      }
    EXPECT_EQ(dst, want) << dtype_name(dtype);
  }
}

TEST(RowGather, RejectsWhatItCannotDo) {
  std::vector<float> x(64, 1.0f), y(64);
  const std::vector<std::int32_t> index{0, 1, 2, 9};
  RowGather g;
  g.rows = 4;
  g.width = 4;
  g.src = x.data();
  g.dst = y.data();
  g.dtype = DType::kBF16;
  g.accumulate = true;
  expect_error([&] { kernels::gather_rows(g, kCpu); }, "copied bits");
  g.dtype = DType::kF32;
  g.src_row_stride = 3;
  expect_error([&] { kernels::gather_rows(g, kCpu); }, "row strides");
  g.src_row_stride = 0;
  g.heads = 3;
  g.group = 2;
  expect_error([&] { kernels::gather_rows(g, kCpu); }, "multiple of group");
  RowScatter s;
  s.rows = 4;
  s.out_rows = 5;
  s.width = 4;
  s.index = index.data();
  s.src = x.data();
  s.dst = y.data();
  expect_error([&] { kernels::scatter_add_rows(s, kCpu); }, "not below out_rows");
}

TEST(RowGather, RowwiseDotMatchesFloat64) {
  const std::int64_t rows = 17;
  const int dim = 45;
  const std::vector<float> a = random_floats(static_cast<std::size_t>(rows * dim), 51),
                           b = random_floats(static_cast<std::size_t>(rows * dim), 52);
  std::vector<float> out(static_cast<std::size_t>(rows));
  kernels::rowwise_dot({rows, dim, a.data(), b.data(), out.data()}, kCpu);
  for (std::int64_t r = 0; r < rows; ++r) {
    double exact = 0.0, magnitude = 0.0;
    for (int i = 0; i < dim; ++i) {
      const double t = double(a[static_cast<std::size_t>(r * dim + i)]) * b[static_cast<std::size_t>(r * dim + i)];
      exact += t;
      magnitude += std::abs(t);
    }
    EXPECT_LE(std::abs(out[static_cast<std::size_t>(r)] - exact), (dim + 1) * kUnit * magnitude) << "row " << r;
  }
}

}  // namespace
}  // namespace ringcast::test
