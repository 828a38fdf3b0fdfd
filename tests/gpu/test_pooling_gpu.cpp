// CUDA successive-halving pooling (pooling.hpp) against the CPU backend on the same seeded inputs (the
// CPU backend is checked against float64 references and finite differences in tests/selection).
// Pooled states and scores, and the backward's d e and d s: relative L2 difference from the CPU <= 1e-5
// (fp32 both sides; expf's last bit in the merge weights and the order of the backward's dot products
// differ). The pairing itself must be the CPU's: with ties planted (scores from a set of five values,
// -0 next to +0) a different pairing would move outputs by O(1), far outside the tolerance. Written
// outputs start poisoned; d e and d s are added into random values. Shapes: odd lengths at every round,
// one token, more rounds than halvings left, dims that are not powers of two, with and without sort_back.
#include <ringcast/error.hpp>
#include <ringcast/kernels/pooling.hpp>

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <sstream>
#include <string>
#include <vector>

#include "backend_compare.hpp"
#include "device_array.hpp"
#include "test_util.hpp"

namespace ringcast::test {
namespace {

using namespace kernels;

const ExecContext kCpu{};
constexpr double kTol = 1e-5;

// (batch, seq, dim, rounds, beta, sort_back)
const HalvingShape kCases[] = {
    {2, 37, 24, 3, 20.0f, true},     // 37 -> 19 -> 10 -> 5
    {1, 64, 128, 2, 20.0f, false},   // even lengths, rank order kept
    {3, 1, 8, 2, 20.0f, true},       // one token
    {1, 1000, 40, 4, 20.0f, true},   // 1000 -> 63
    {2, 9, 5, 1, 2.0f, false},       // a soft beta
    {2, 2, 3, 3, 20.0f, true},       // more rounds than halvings left
    {1, 3001, 17, 5, 20.0f, false},  // odd lengths throughout
};

std::string name(const HalvingShape& s) {
  std::ostringstream os;
  os << 'B' << s.batch << " n" << s.seq << " D" << s.dim << " r" << s.rounds << " beta " << s.beta
     << (s.sort_back ? " sort_back" : "");
  return os.str();
}

// Scores as the Pyramidion scorer makes them: sigmoid(...) + 1e-5, so in (0, 1).
std::vector<float> scores(std::size_t n, std::uint32_t seed) {
  auto s = random_floats(n, seed);
  for (float& x : s) x = 1.0f / (1.0f + std::exp(-3.0f * x)) + 1e-5f;
  return s;
}

// Forward and backward on both backends, compared.
void expect_cpu_pooling(const std::string& what, const HalvingShape& sh, const std::vector<float>& e,
                        const std::vector<float>& s, std::uint32_t seed) {
  const std::int64_t n_out = sh.output_len();
  const auto out_tokens = static_cast<std::size_t>(sh.batch * n_out);
  std::vector<float> e_out(out_tokens * sh.dim), s_out(out_tokens);
  halving_pool({sh, e.data(), s.data(), e_out.data(), s_out.data()}, kCpu);
  const DeviceArray<float> g_e(e), g_s(s);
  DeviceArray<float> g_e_out(e_out.size()), g_s_out(s_out.size());
  halving_pool({sh, g_e.get(), g_s.get(), g_e_out.get(), g_s_out.get()}, cuda_context());
  expect_near_cpu(what + " e_out", g_e_out.download(), e_out, kTol);
  expect_near_cpu(what + " s_out", g_s_out.download(), s_out, kTol);

  const auto d_e_out = random_floats(e_out.size(), seed), d_s_out = random_floats(s_out.size(), seed + 1);
  const auto de0 = random_floats(e.size(), seed + 2), ds0 = random_floats(s.size(), seed + 3);
  std::vector<float> de = de0, ds = ds0;
  halving_pool_backward({sh, e.data(), s.data(), d_e_out.data(), d_s_out.data(), de.data(), ds.data()}, kCpu);
  const DeviceArray<float> g_deo(d_e_out), g_dso(d_s_out);
  DeviceArray<float> g_de(de0), g_ds(ds0);
  halving_pool_backward({sh, g_e.get(), g_s.get(), g_deo.get(), g_dso.get(), g_de.get(), g_ds.get()}, cuda_context());
  expect_near_cpu(what + " d e", added(g_de.download(), de0), added(de, de0), kTol);
  expect_near_cpu(what + " d s", added(g_ds.download(), ds0), added(ds, ds0), kTol);
}

TEST(PoolingGpu, ForwardAndBackwardMatchCpu) {
  RINGCAST_SKIP_WITHOUT_CUDA();
  std::uint32_t seed = 1;
  for (const HalvingShape& sh : kCases) {
    const auto e = random_floats(std::size_t(sh.batch) * sh.seq * sh.dim, seed);
    const auto s = scores(std::size_t(sh.batch) * sh.seq, seed + 1);
    expect_cpu_pooling(name(sh), sh, e, s, seed + 2);
    seed += 10;
  }
}

TEST(PoolingGpu, TiedScoresPairAsOnTheCpu) {
  RINGCAST_SKIP_WITHOUT_CUDA();
  const float values[] = {0.25f, 0.5f, 0.75f, -0.0f, 0.0f};
  std::mt19937 gen(5);
  std::uniform_int_distribution<int> pick(0, 4);
  std::uint32_t seed = 500;
  for (const bool sort_back : {true, false}) {
    const HalvingShape sh{2, 501, 12, 3, 20.0f, sort_back};
    std::vector<float> s(std::size_t(sh.batch) * sh.seq);
    for (float& x : s) x = values[pick(gen)];
    const auto e = random_floats(std::size_t(sh.batch) * sh.seq * sh.dim, seed);
    expect_cpu_pooling(name(sh) + " tied", sh, e, s, seed + 1);
    seed += 10;
  }
}

}  // namespace
}  // namespace ringcast::test
