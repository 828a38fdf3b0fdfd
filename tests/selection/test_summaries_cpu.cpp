// Page and coarse summaries on the CPU backend against a float64 reference computed straight from
// the keys (coarse means included), partial last pages and blocks, padding rows, and the backward of
// both levels by finite differences.
#include "selection_test_util.hpp"

#include <ringcast/error.hpp>
#include <ringcast/kernels/summaries.hpp>

#include <algorithm>
#include <limits>

namespace ringcast::kernels {
namespace {

using test::expect_close;
using test::random_floats;

// Float64 summaries of units of `keys_per_unit` consecutive keys, in the kernel's pool layout.
struct RefLevel {
  std::vector<double> key_mean, value_mean, key_min, key_max;
  std::vector<std::int32_t> count;
};

RefLevel reference_level(const SummaryShape& s, const std::vector<double>& k, const std::vector<double>& v,
                         std::int64_t keys_per_unit) {
  const std::int64_t units = (s.seq + keys_per_unit - 1) / keys_per_unit;
  const std::int64_t rows = s.pool_rows(units);
  const int d = s.head_dim;
  RefLevel r;
  for (auto* a : {&r.key_mean, &r.value_mean, &r.key_min, &r.key_max}) a->assign(s.kv_heads * rows * d, 0.0);
  r.count.assign(s.batch * units, 0);
  for (int h = 0; h < s.kv_heads; ++h) {
    for (int b = 0; b < s.batch; ++b) {
      for (std::int64_t u = 0; u < units; ++u) {
        const std::int64_t i0 = u * keys_per_unit, i1 = std::min(s.seq, i0 + keys_per_unit);
        const std::int64_t row = (h * rows + b * units + u) * d;
        for (int c = 0; c < d; ++c) {
          double ks = 0, vs = 0, lo = std::numeric_limits<double>::infinity(), hi = -lo;
          for (std::int64_t i = i0; i < i1; ++i) {
            const std::int64_t at = ((b * s.seq + i) * s.kv_heads + h) * d + c;
            ks += k[at];
            vs += v[at];
            lo = std::min(lo, k[at]);
            hi = std::max(hi, k[at]);
          }
          r.key_mean[row + c] = ks / (i1 - i0);
          r.value_mean[row + c] = vs / (i1 - i0);
          r.key_min[row + c] = lo;
          r.key_max[row + c] = hi;
        }
        r.count[b * units + u] = static_cast<std::int32_t>(i1 - i0);
      }
    }
  }
  return r;
}

struct Level {
  std::vector<float> key_mean, value_mean, key_min, key_max;
  std::vector<std::int32_t> count;
  Level(const SummaryShape& s, std::int64_t units)
      : key_mean(s.kv_heads * s.pool_rows(units) * s.head_dim, 7.0f), value_mean(key_mean), key_min(key_mean),
        key_max(key_mean), count(s.batch * units, -1) {}
  SummaryPools pools() { return {key_mean.data(), value_mean.data(), key_min.data(), key_max.data(), count.data()}; }
};

void expect_level(const std::string& what, Level& got, const RefLevel& ref) {
  expect_close(what + " key mean", got.key_mean, ref.key_mean, test::kForwardTol);
  expect_close(what + " value mean", got.value_mean, ref.value_mean, test::kForwardTol);
  expect_close(what + " key min", got.key_min, ref.key_min, 0.0);
  expect_close(what + " key max", got.key_max, ref.key_max, 0.0);
  EXPECT_EQ(got.count, ref.count) << what << " counts";
}

class SummariesCpu : public ::testing::TestWithParam<SummaryShape> {};

TEST_P(SummariesCpu, ForwardMatchesFloat64) {
  const SummaryShape s = GetParam();
  const std::size_t size = s.batch * s.seq * s.kv_heads * s.head_dim;
  const auto k = random_floats(size, 11), v = random_floats(size, 12);
  Level pages(s, s.num_pages()), blocks(s, s.num_blocks());
  const ExecContext cpu{};
  page_summaries({s, k.data(), v.data(), pages.pools()}, cpu);
  coarse_summaries({s, pages.key_mean.data(), pages.value_mean.data(), pages.key_min.data(), pages.key_max.data(),
                    pages.count.data(), blocks.pools()},
                   cpu);
  const auto kd = test::to_double(k), vd = test::to_double(v);
  expect_level("pages", pages, reference_level(s, kd, vd, s.page_size));
  expect_level("blocks", blocks, reference_level(s, kd, vd, std::int64_t{s.page_size} * s.coarse_pages));
}

// The loss Σ G·page means + Σ H·block means; its gradient with respect to K and V by both routes.
TEST_P(SummariesCpu, BackwardMatchesFiniteDifferences) {
  SummaryShape s = GetParam();
  s.seq = std::min<std::int64_t>(s.seq, 3 * s.page_size + 5);  // finite differences want few keys
  const std::size_t size = s.batch * s.seq * s.kv_heads * s.head_dim;
  const auto k = random_floats(size, 21), v = random_floats(size, 22);
  const std::size_t page_size = s.kv_heads * s.page_rows() * s.head_dim;
  const std::size_t block_size = s.kv_heads * s.block_rows() * s.head_dim;
  const auto gk = random_floats(page_size, 23), gv = random_floats(page_size, 24);
  const auto hk = random_floats(block_size, 25), hv = random_floats(block_size, 26);

  std::vector<float> d_page_k = gk, d_page_v = gv, d_k(size, 0.0f), d_v(size, 0.0f);
  const ExecContext cpu{};
  coarse_summaries_backward({s, hk.data(), hv.data(), d_page_k.data(), d_page_v.data()}, cpu);
  page_summaries_backward({s, d_page_k.data(), d_page_v.data(), d_k.data(), d_v.data()}, cpu);

  auto loss = [&](const std::vector<double>& kv) {
    const std::vector<double> kk(kv.begin(), kv.begin() + size), vv(kv.begin() + size, kv.end());
    const RefLevel p = reference_level(s, kk, vv, s.page_size);
    const RefLevel b = reference_level(s, kk, vv, std::int64_t{s.page_size} * s.coarse_pages);
    return test::weighted_sum(p.key_mean, gk) + test::weighted_sum(p.value_mean, gv) +
           test::weighted_sum(b.key_mean, hk) + test::weighted_sum(b.value_mean, hv);
  };
  std::vector<double> kv = test::to_double(k);
  kv.insert(kv.end(), v.begin(), v.end());
  const std::vector<double> g = test::numeric_gradient(loss, kv);
  expect_close("d k", d_k, {g.begin(), g.begin() + size}, test::kGradTol);
  expect_close("d v", d_v, {g.begin() + size, g.end()}, test::kGradTol);
}

// (batch, seq, kv_heads, head_dim, page_size, coarse_pages): partial last pages and blocks, one page,
// a page count that is a multiple of the block, pools whose slots do not fill their last page.
INSTANTIATE_TEST_SUITE_P(Shapes, SummariesCpu,
                         ::testing::Values(SummaryShape{2, 150, 3, 5, 64, 2}, SummaryShape{1, 37, 2, 7, 64, 16},
                                           SummaryShape{3, 256, 1, 16, 32, 4}, SummaryShape{2, 1000, 2, 6, 64, 3},
                                           SummaryShape{1, 13, 2, 3, 4, 3}));

TEST(SummariesCpu, RejectsEmptySequenceAndCuda) {
  SummaryShape s{1, 0, 1, 4, 64, 16};
  std::vector<float> buf(256, 1.0f);
  std::vector<std::int32_t> count(4);
  const SummaryPools pools{buf.data(), buf.data(), buf.data(), buf.data(), count.data()};
  EXPECT_THROW(page_summaries({s, buf.data(), buf.data(), pools}, ExecContext{}), Error);
#if !RINGCAST_WITH_CUDA  // with the CUDA backend this is a launch (tests/gpu/test_summaries_gpu.cpp)
  s.seq = 8;
  EXPECT_THROW(page_summaries({s, buf.data(), buf.data(), pools}, ExecContext{Device{DeviceKind::kCuda, 0}}), Error);
#endif
}

}  // namespace
}  // namespace ringcast::kernels
