// CUDA per-token layers and optimizer (layers.hpp) against the CPU backend and float64 references on
// the same seeded inputs. Outputs that are written start poisoned (NaN, -1); outputs that are added
// into start random, and what was added is compared. Tolerances (relative L2 error):
//  - pointwise ops and reductions: <= 1e-5 against the CPU backend (fp32 both sides);
//  - copies and sums in the CPU backend's order (embedding, scale): bitwise equal;
//  - exact-fp32 products (Linear, the cross-entropy head): against float64, within twice the CPU
//    backend's error or eps·sqrt(K), whichever is larger (K the inner dimension, eps = 2^-23): a dot
//    product summed in sequence, as a cuBLAS thread sums it, errs by about 0.2 eps·sqrt(K), and
//    OpenBLAS's several accumulators err less, so twice the CPU's error alone would be too tight;
//  - TF32 products: <= 5e-3 against float64 (10-bit mantissa: ~5e-4 from the operands' rounding);
//  - bf16 products: <= 1e-2 against float64 and within twice the error of a float64 emulation that
//    rounds to bf16 where the kernel does (the operands; the cross-entropy's d logits).
// Shapes: rows that are not multiples of a tile, warp or chunk, dims that are not powers of two, one
// row, zero rows; failures print the case, the error and the worst element.
#include <ringcast/error.hpp>
#include <ringcast/kernels/layers.hpp>

#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <limits>
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
constexpr double kEps = 1.0 / (1 << 23);
constexpr double kTf32Tol = 5e-3;
constexpr double kBf16Tol = 1e-2;
constexpr std::int64_t kBf16ChunkRows = 8192;  // layers_gemm_cuda.cu: bf16 products go 8192 rows at a time

// expect_close, plus the worst element (and the NaN count) when it fails.
template <typename T>
void expect_near(const std::string& what, const std::vector<T>& x, const Vec& ref, double tol) {
  expect_close(what, x, ref, tol);
  const double err = relative_error(x, ref);
  if (err <= tol) return;
  std::size_t worst = 0, nans = 0;
  double worst_diff = -1.0;
  for (std::size_t i = 0; i < ref.size(); ++i) {
    const double diff = std::abs(double(x[i]) - ref[i]);
    nans += std::isnan(double(x[i]));
    if (!(diff <= worst_diff)) {
      worst = i;
      worst_diff = diff;
    }
  }
  ADD_FAILURE() << what << ": worst element [" << worst << "] = " << double(x[worst]) << ", reference " << ref[worst]
                << "; " << nans << " NaN of " << ref.size();
}

// Exact-fp32 products with inner dimension `inner`: within twice the CPU backend's error against
// float64, or eps·sqrt(inner).
template <typename T>
void expect_like_cpu(const std::string& what, const std::vector<T>& gpu, const Vec& cpu, const Vec& ref,
                     std::int64_t inner) {
  const double cpu_err = relative_error(cpu, ref);
  const double tol = std::max(2.0 * cpu_err, kEps * std::sqrt(double(inner)));
  expect_near(what + " (CPU " + std::to_string(cpu_err) + ")", gpu, ref, tol);
}

// bf16 products: <= kBf16Tol against float64 and within twice the error of the bf16 emulation.
template <typename T>
void expect_bf16(const std::string& what, const std::vector<T>& gpu, const Vec& emulation, const Vec& ref) {
  const double emu_err = relative_error(emulation, ref);
  expect_near(what + " (emulation " + std::to_string(emu_err) + ")", gpu, ref, std::min(kBf16Tol, 2.0 * emu_err));
}

double round_bf16(double x) { return bf16_value(bf16_bits(static_cast<float>(x))); }

Vec bf16_rounded(Vec x) {
  for (double& v : x) v = round_bf16(v);
  return x;
}

// --- float64 products of the Linear layer: y = x Wᵀ [rows, out], d_x = d_y W [rows, in], d_w = d_yᵀ x. ---

Vec product_xwt(const Vec& x, const Vec& w, std::int64_t rows, int in, int out) {
  Vec y(static_cast<std::size_t>(rows * out));
  for (std::int64_t r = 0; r < rows; ++r)
    for (int o = 0; o < out; ++o) {
      double s = 0.0;
      for (int i = 0; i < in; ++i) s += x[r * in + i] * w[std::int64_t{o} * in + i];
      y[r * out + o] = s;
    }
  return y;
}

Vec product_dyw(const Vec& dy, const Vec& w, std::int64_t rows, int in, int out) {
  Vec dx(static_cast<std::size_t>(rows * in), 0.0);
  for (std::int64_t r = 0; r < rows; ++r)
    for (int o = 0; o < out; ++o)
      for (int i = 0; i < in; ++i) dx[r * in + i] += dy[r * out + o] * w[std::int64_t{o} * in + i];
  return dx;
}

Vec product_dytx(const Vec& dy, const Vec& x, std::int64_t rows, int in, int out) {
  Vec dw(static_cast<std::size_t>(std::int64_t{out} * in), 0.0);
  for (std::int64_t r = 0; r < rows; ++r)
    for (int o = 0; o < out; ++o)
      for (int i = 0; i < in; ++i) dw[std::int64_t{o} * in + i] += dy[r * out + o] * x[r * in + i];
  return dw;
}

struct LinearCase {
  std::int64_t rows;
  int in, out;
};

std::string name(const LinearCase& c) {
  std::ostringstream os;
  os << "rows " << c.rows << " in " << c.in << " out " << c.out;
  return os.str();
}

const LinearCase kLinearCases[] = {
    {1000, 96, 200},                 // rows not a multiple of any tile
    {257, 1000, 72},                 // long inner dimension
    {1, 33, 5},                      // one row
    {kBf16ChunkRows + 777, 64, 48},  // a partial second bf16 chunk
};

struct LinearRun {
  std::vector<float> y, d_x, d_w;
};

// One Linear forward (accumulating into y0 when given) and backward on either backend.
LinearRun run_linear(const ExecContext& ctx, const LinearCase& c, DType dtype, bool tf32, const std::vector<float>& x,
                     const std::vector<float>& w, const std::vector<float>* y0, const std::vector<float>& d_y,
                     const std::vector<float>& d_x0, const std::vector<float>& d_w0) {
  const std::size_t ys = static_cast<std::size_t>(c.rows * c.out);
  if (ctx.device.kind == DeviceKind::kCpu) {
    LinearRun r{y0 ? *y0 : std::vector<float>(ys, std::numeric_limits<float>::quiet_NaN()), d_x0, d_w0};
    linear_forward({c.rows, c.in, c.out, x.data(), w.data(), r.y.data(), y0 != nullptr, dtype, tf32}, ctx);
    linear_backward({c.rows, c.in, c.out, x.data(), w.data(), d_y.data(), r.d_x.data(), r.d_w.data(), dtype, tf32},
                    ctx);
    return r;
  }
  DeviceArray<float> dx(x), dw(w), dy(d_y), ddx(d_x0), ddw(d_w0);
  DeviceArray<float> y(ys);  // poisoned
  if (y0) y.upload(*y0);
  linear_forward({c.rows, c.in, c.out, dx.get(), dw.get(), y.get(), y0 != nullptr, dtype, tf32}, ctx);
  linear_backward({c.rows, c.in, c.out, dx.get(), dw.get(), dy.get(), ddx.get(), ddw.get(), dtype, tf32}, ctx);
  return {y.download(), ddx.download(), ddw.download()};
}

struct LinearInputs {
  std::vector<float> x, w, y0, d_y, d_x0, d_w0;
};

LinearInputs linear_inputs(const LinearCase& c, std::uint32_t seed) {
  const auto n = [](std::int64_t v) { return static_cast<std::size_t>(v); };
  return {random_floats(n(c.rows * c.in), seed),      random_floats(n(std::int64_t{c.out} * c.in), seed + 1, 0.1f),
          random_floats(n(c.rows * c.out), seed + 2), random_floats(n(c.rows * c.out), seed + 3),
          random_floats(n(c.rows * c.in), seed + 4),  random_floats(n(std::int64_t{c.out} * c.in), seed + 5)};
}

TEST(LayersGpu, LinearFp32MatchesFloat64LikeTheCpuBackend) {
  RINGCAST_SKIP_WITHOUT_CUDA();
  std::uint32_t seed = 100;
  for (const LinearCase& c : kLinearCases) {
    for (const bool accumulate : {false, true}) {
      const LinearInputs in = linear_inputs(c, seed += 10);
      const std::vector<float>* y0 = accumulate ? &in.y0 : nullptr;
      const LinearRun cpu = run_linear(kCpu, c, DType::kF32, false, in.x, in.w, y0, in.d_y, in.d_x0, in.d_w0);
      const LinearRun gpu = run_linear(cuda_context(), c, DType::kF32, false, in.x, in.w, y0, in.d_y, in.d_x0, in.d_w0);
      const Vec y_ref = product_xwt(to_double(in.x), to_double(in.w), c.rows, c.in, c.out);
      const auto y_of = [&](const std::vector<float>& y) { return accumulate ? added(y, in.y0) : to_double(y); };
      const std::string what = name(c) + (accumulate ? " y +=" : " y");
      expect_like_cpu(what, y_of(gpu.y), y_of(cpu.y), y_ref, c.in);
      expect_like_cpu(name(c) + " d_x", added(gpu.d_x, in.d_x0), added(cpu.d_x, in.d_x0),
                      product_dyw(to_double(in.d_y), to_double(in.w), c.rows, c.in, c.out), c.out);
      expect_like_cpu(name(c) + " d_w", added(gpu.d_w, in.d_w0), added(cpu.d_w, in.d_w0),
                      product_dytx(to_double(in.d_y), to_double(in.x), c.rows, c.in, c.out), c.rows);
    }
  }
}

TEST(LayersGpu, LinearTf32IsWithinItsMantissa) {
  RINGCAST_SKIP_WITHOUT_CUDA();
  const LinearCase c = kLinearCases[0];
  const LinearInputs in = linear_inputs(c, 7);
  const LinearRun gpu = run_linear(cuda_context(), c, DType::kF32, true, in.x, in.w, nullptr, in.d_y, in.d_x0, in.d_w0);
  expect_near("tf32 " + name(c) + " y", gpu.y, product_xwt(to_double(in.x), to_double(in.w), c.rows, c.in, c.out),
              kTf32Tol);
  expect_near("tf32 " + name(c) + " d_x", added(gpu.d_x, in.d_x0),
              product_dyw(to_double(in.d_y), to_double(in.w), c.rows, c.in, c.out), kTf32Tol);
  expect_near("tf32 " + name(c) + " d_w", added(gpu.d_w, in.d_w0),
              product_dytx(to_double(in.d_y), to_double(in.x), c.rows, c.in, c.out), kTf32Tol);
}

TEST(LayersGpu, LinearBf16IsWithinTwiceItsEmulation) {
  RINGCAST_SKIP_WITHOUT_CUDA();
  std::uint32_t seed = 300;
  for (const LinearCase& c : kLinearCases) {
    const LinearInputs in = linear_inputs(c, seed += 10);
    const LinearRun gpu =
        run_linear(cuda_context(), c, DType::kBF16, false, in.x, in.w, &in.y0, in.d_y, in.d_x0, in.d_w0);
    const Vec x = to_double(in.x), w = to_double(in.w), d_y = to_double(in.d_y);
    const Vec x16 = bf16_rounded(x), w16 = bf16_rounded(w), d_y16 = bf16_rounded(d_y);
    expect_bf16("bf16 " + name(c) + " y +=", added(gpu.y, in.y0), product_xwt(x16, w16, c.rows, c.in, c.out),
                product_xwt(x, w, c.rows, c.in, c.out));
    expect_bf16("bf16 " + name(c) + " d_x", added(gpu.d_x, in.d_x0), product_dyw(d_y16, w16, c.rows, c.in, c.out),
                product_dyw(d_y, w, c.rows, c.in, c.out));
    expect_bf16("bf16 " + name(c) + " d_w", added(gpu.d_w, in.d_w0), product_dytx(d_y16, x16, c.rows, c.in, c.out),
                product_dytx(d_y, x, c.rows, c.in, c.out));
  }
}

TEST(LayersGpu, LinearWithNoRowsLeavesEverythingAlone) {
  RINGCAST_SKIP_WITHOUT_CUDA();
  const LinearCase c{0, 16, 8};
  const std::vector<float> w = random_floats(16 * 8, 1), d_w0 = random_floats(16 * 8, 2);
  for (const DType dtype : {DType::kF32, DType::kBF16}) {
    const LinearRun gpu = run_linear(cuda_context(), c, dtype, false, {}, w, nullptr, {}, {}, d_w0);
    expect_bitwise(std::string("no rows, ") + std::string(dtype_name(dtype)) + " d_w", gpu.d_w, d_w0);
  }
}

// bf16 products run on CUDA; the CPU backend has none and says so, as both do for fp16.
TEST(LayersGpu, Bf16ProductsAreCudaOnly) {
  RINGCAST_SKIP_WITHOUT_CUDA();
  const std::vector<float> x(6, 1.0f), w(6, 1.0f);
  std::vector<float> y(4);
  expect_error(
      [&] {
        linear_forward({2, 3, 2, x.data(), w.data(), y.data(), false, DType::kBF16}, kCpu);
      },
      "not supported on the CPU backend");
  DeviceArray<float> gx(x), gw(w), gy(4);
  linear_forward({2, 3, 2, gx.get(), gw.get(), gy.get(), false, DType::kBF16}, cuda_context());
  expect_bitwise("bf16 product of ones", gy.download(), std::vector<float>(4, 3.0f));
  for (const ExecContext& ctx : {kCpu, cuda_context()})
    expect_error(
        [&] {
          linear_forward({2, 3, 2, gx.get(), gw.get(), gy.get(), false, DType::kF16}, ctx);
        },
        "not supported");
}

// --- RMSNorm ---

struct NormCase {
  std::int64_t rows;
  int dim;
};

const NormCase kNormCases[] = {{1000, 200}, {37, 1000}, {3, 4099}, {1, 1}, {9, 31}};

TEST(LayersGpu, RmsNormMatchesTheCpuBackend) {
  RINGCAST_SKIP_WITHOUT_CUDA();
  std::uint32_t seed = 500;
  for (const NormCase& c : kNormCases) {
    const std::size_t n = static_cast<std::size_t>(c.rows * c.dim);
    const std::vector<float> x = random_floats(n, ++seed), g = random_floats(c.dim, ++seed),
                             d_y = random_floats(n, ++seed), d_x0 = random_floats(n, ++seed),
                             d_g0 = random_floats(c.dim, ++seed);
    const float eps = 1e-5f;
    std::vector<float> y(n), d_x = d_x0, d_g = d_g0;
    rms_norm_forward({c.rows, c.dim, eps, x.data(), g.data(), y.data()}, kCpu);
    rms_norm_backward({c.rows, c.dim, eps, x.data(), g.data(), d_y.data(), d_x.data(), d_g.data()}, kCpu);
    DeviceArray<float> gx(x), gg(g), gy(n), gdy(d_y), gdx(d_x0), gdg(d_g0);
    rms_norm_forward({c.rows, c.dim, eps, gx.get(), gg.get(), gy.get()}, cuda_context());
    rms_norm_backward({c.rows, c.dim, eps, gx.get(), gg.get(), gdy.get(), gdx.get(), gdg.get()}, cuda_context());
    const std::string what = "rms_norm rows " + std::to_string(c.rows) + " dim " + std::to_string(c.dim);
    expect_near(what + " y", gy.download(), to_double(y), kTol);
    expect_near(what + " d_x", added(gdx.download(), d_x0), added(d_x, d_x0), kTol);
    expect_near(what + " d_g", added(gdg.download(), d_g0), added(d_g, d_g0), kTol);
  }
}

// --- RoPE and SwiGLU ---

TEST(LayersGpu, RopeMatchesTheCpuBackendAndInverts) {
  RINGCAST_SKIP_WITHOUT_CUDA();
  struct Case {
    std::int64_t rows;
    int heads, head_dim;
    std::int32_t first_position;
  };
  const Case cases[] = {{300, 3, 10, 0}, {129, 4, 128, 1'000'000}, {7, 2, 2, 2'000'000'000}, {50, 1, 512, 12345}};
  std::uint32_t seed = 700;
  for (const Case& c : cases) {
    const std::size_t n = static_cast<std::size_t>(c.rows * c.heads * c.head_dim);
    std::vector<std::int32_t> positions(static_cast<std::size_t>(c.rows));
    for (std::int64_t t = 0; t < c.rows; ++t) positions[t] = c.first_position + static_cast<std::int32_t>(3 * t);
    const std::vector<float> x = random_floats(n, ++seed);
    std::vector<float> fwd = x, bwd = x;
    DeviceArray<std::int32_t> gpos(positions);
    DeviceArray<float> gfwd(x), gbwd(x);
    rope_forward({c.rows, c.heads, c.head_dim, 10000.0f, positions.data(), fwd.data()}, kCpu);
    rope_backward({c.rows, c.heads, c.head_dim, 10000.0f, positions.data(), bwd.data()}, kCpu);
    rope_forward({c.rows, c.heads, c.head_dim, 10000.0f, gpos.get(), gfwd.get()}, cuda_context());
    rope_backward({c.rows, c.heads, c.head_dim, 10000.0f, gpos.get(), gbwd.get()}, cuda_context());
    const std::string what = "rope rows " + std::to_string(c.rows) + " d " + std::to_string(c.head_dim) + " from " +
                             std::to_string(c.first_position);
    expect_near(what + " forward", gfwd.download(), to_double(fwd), kTol);
    expect_near(what + " backward", gbwd.download(), to_double(bwd), kTol);
    rope_backward({c.rows, c.heads, c.head_dim, 10000.0f, gpos.get(), gfwd.get()}, cuda_context());
    expect_near(what + " backward(forward(x))", gfwd.download(), to_double(x), kTol);
  }
}

TEST(LayersGpu, SwigluMatchesTheCpuBackend) {
  RINGCAST_SKIP_WITHOUT_CUDA();
  for (const std::int64_t count : {std::int64_t{10007}, std::int64_t{1}}) {
    const std::size_t n = static_cast<std::size_t>(count);
    const std::vector<float> a = random_floats(n, 1, 4.0f), b = random_floats(n, 2), d_h = random_floats(n, 3),
                             d_a0 = random_floats(n, 4), d_b0 = random_floats(n, 5);
    std::vector<float> h(n), d_a = d_a0, d_b = d_b0;
    swiglu_forward({count, a.data(), b.data(), h.data()}, kCpu);
    swiglu_backward({count, a.data(), b.data(), d_h.data(), d_a.data(), d_b.data()}, kCpu);
    DeviceArray<float> ga(a), gb(b), gh(n), gdh(d_h), gda(d_a0), gdb(d_b0);
    swiglu_forward({count, ga.get(), gb.get(), gh.get()}, cuda_context());
    swiglu_backward({count, ga.get(), gb.get(), gdh.get(), gda.get(), gdb.get()}, cuda_context());
    const std::string what = "swiglu count " + std::to_string(count);
    expect_near(what + " h", gh.download(), to_double(h), kTol);
    expect_near(what + " d_a", added(gda.download(), d_a0), added(d_a, d_a0), kTol);
    expect_near(what + " d_b", added(gdb.download(), d_b0), added(d_b, d_b0), kTol);
  }
}

// --- Embedding and pooling ---

TEST(LayersGpu, EmbeddingIsTheCpuBackendBitForBit) {
  RINGCAST_SKIP_WITHOUT_CUDA();
  struct Case {
    std::int64_t rows;
    int dim;
    std::int64_t vocab;
  };
  // Many repeats; runs of one id longer than a block's range of sorted positions; more columns than a block.
  const Case cases[] = {{5000, 37, 997}, {1000, 300, 3}, {1, 8, 1}, {777, 129, 50}};
  std::uint32_t seed = 900;
  for (const Case& c : cases) {
    const std::vector<std::int32_t> ids =
        random_ids(static_cast<std::size_t>(c.rows), static_cast<std::int32_t>(c.vocab), ++seed);
    const std::vector<float> table = random_floats(static_cast<std::size_t>(c.vocab * c.dim), ++seed),
                             d_y = random_floats(static_cast<std::size_t>(c.rows * c.dim), ++seed),
                             d_table0 = random_floats(table.size(), ++seed);
    std::vector<float> y(d_y.size()), d_table = d_table0;
    embedding_forward({c.rows, c.dim, c.vocab, ids.data(), table.data(), y.data()}, kCpu);
    embedding_backward({c.rows, c.dim, c.vocab, ids.data(), d_y.data(), d_table.data()}, kCpu);
    DeviceArray<std::int32_t> gids(ids);
    DeviceArray<float> gtable(table), gy(d_y.size()), gdy(d_y), gdt(d_table0);
    embedding_forward({c.rows, c.dim, c.vocab, gids.get(), gtable.get(), gy.get()}, cuda_context());
    embedding_backward({c.rows, c.dim, c.vocab, gids.get(), gdy.get(), gdt.get()}, cuda_context());
    const std::string what = "embedding rows " + std::to_string(c.rows) + " vocab " + std::to_string(c.vocab);
    expect_bitwise(what + " y", gy.download(), y);
    expect_bitwise(what + " d_table", gdt.download(), d_table);
  }
}

// Device ids cannot raise an Error: a bad id's row is NaN and it adds no gradient (layers.hpp).
TEST(LayersGpu, EmbeddingMarksBadIdsWithNaN) {
  RINGCAST_SKIP_WITHOUT_CUDA();
  const std::int64_t rows = 600, vocab = 40;
  const int dim = 17;
  std::vector<std::int32_t> ids = random_ids(rows, static_cast<std::int32_t>(vocab), 31);
  ids[0] = -1;
  ids[300] = static_cast<std::int32_t>(vocab);
  ids[599] = std::numeric_limits<std::int32_t>::max();
  const std::vector<float> table = random_floats(vocab * dim, 32), d_y = random_floats(rows * dim, 33),
                           d_table0 = random_floats(vocab * dim, 34);
  DeviceArray<std::int32_t> gids(ids);
  DeviceArray<float> gtable(table), gy(rows * dim), gdy(d_y), gdt(d_table0);
  embedding_forward({rows, dim, vocab, gids.get(), gtable.get(), gy.get()}, cuda_context());
  embedding_backward({rows, dim, vocab, gids.get(), gdy.get(), gdt.get()}, cuda_context());
  const std::vector<float> y = gy.download();
  for (const std::int64_t bad : {0, 300, 599}) {
    EXPECT_TRUE(std::all_of(y.begin() + bad * dim, y.begin() + (bad + 1) * dim, [](float v) { return std::isnan(v); }))
        << "row " << bad << " (id " << ids[bad] << ") should be NaN";
  }
  // The CPU backend on the valid tokens alone gives the same table gradient.
  std::vector<std::int32_t> valid_ids;
  std::vector<float> valid_d_y;
  for (std::int64_t t = 0; t < rows; ++t) {
    if (ids[t] < 0 || ids[t] >= vocab) continue;
    valid_ids.push_back(ids[t]);
    valid_d_y.insert(valid_d_y.end(), d_y.begin() + t * dim, d_y.begin() + (t + 1) * dim);
  }
  std::vector<float> d_table = d_table0;
  embedding_backward(
      {static_cast<std::int64_t>(valid_ids.size()), dim, vocab, valid_ids.data(), valid_d_y.data(), d_table.data()},
      kCpu);
  expect_bitwise("embedding with bad ids d_table", gdt.download(), d_table);
}

TEST(LayersGpu, TokenPoolMatchesTheCpuBackend) {
  RINGCAST_SKIP_WITHOUT_CUDA();
  struct Case {
    int batch;
    std::int64_t seq;
    int dim;
  };
  const Case cases[] = {{3, 777, 65}, {1, 4096, 256}, {2, 1, 3}, {2, 0, 5}};
  std::uint32_t seed = 1100;
  for (const Case& c : cases) {
    const std::size_t n = static_cast<std::size_t>(c.batch * c.seq * c.dim),
                      pn = static_cast<std::size_t>(c.batch * c.dim);
    const float scale = 1.0f / static_cast<float>(2 * c.seq + 1);
    const std::vector<float> x = random_floats(n, ++seed), d_pooled = random_floats(pn, ++seed),
                             d_x0 = random_floats(n, ++seed);
    std::vector<float> pooled(pn), d_x = d_x0;
    token_pool_forward({c.batch, c.seq, c.dim, scale, x.data(), pooled.data()}, kCpu);
    token_pool_backward({c.batch, c.seq, c.dim, scale, d_pooled.data(), d_x.data()}, kCpu);
    DeviceArray<float> gx(x), gp(pn), gdp(d_pooled), gdx(d_x0);
    token_pool_forward({c.batch, c.seq, c.dim, scale, gx.get(), gp.get()}, cuda_context());
    token_pool_backward({c.batch, c.seq, c.dim, scale, gdp.get(), gdx.get()}, cuda_context());
    const std::string what =
        "token_pool B" + std::to_string(c.batch) + " seq " + std::to_string(c.seq) + " dim " + std::to_string(c.dim);
    expect_near(what + " pooled", gp.download(), to_double(pooled), kTol);
    expect_near(what + " d_x", added(gdx.download(), d_x0), added(d_x, d_x0), kTol);
  }
}

// --- Linear head + cross-entropy ---

struct CeCase {
  const char* name;
  std::int64_t rows;
  int dim;
  std::int64_t vocab;
  std::int64_t chunk_rows;
  bool bias, train;
  double ignored;  // fraction of rows with target -1
};

const CeCase kCeCases[] = {
    {"LM head", 1000, 72, 1013, 300, false, true, 0.1}, {"classification head", 3, 40, 7, 1024, true, true, 0.0},
    {"wide vocab", 70, 64, 5000, 64, true, true, 0.2},  {"evaluation", 1000, 72, 1013, 300, true, false, 0.1},
    {"all ignored", 50, 16, 33, 16, true, true, 1.0},
};

struct CeInputs {
  std::vector<float> h, w, bias, d_h0, d_w0, d_bias0;
  std::vector<std::int32_t> targets;
  float loss_scale;
};

CeInputs ce_inputs(const CeCase& c, std::uint32_t seed) {
  CeInputs in;
  in.h = random_floats(static_cast<std::size_t>(c.rows * c.dim), seed);
  in.w = random_floats(static_cast<std::size_t>(c.vocab * c.dim), seed + 1, 0.3f);
  if (c.bias) in.bias = random_floats(static_cast<std::size_t>(c.vocab), seed + 2);
  in.d_h0 = random_floats(in.h.size(), seed + 3);
  in.d_w0 = random_floats(in.w.size(), seed + 4);
  in.d_bias0 = random_floats(static_cast<std::size_t>(c.vocab), seed + 5);
  in.targets = random_ids(static_cast<std::size_t>(c.rows), static_cast<std::int32_t>(c.vocab), seed + 6);
  std::mt19937 gen(seed + 7);
  std::bernoulli_distribution ignore(c.ignored);
  std::int64_t counted = 0;
  for (auto& t : in.targets) {
    if (ignore(gen)) t = -1;
    counted += t >= 0;
  }
  in.loss_scale = 1.0f / static_cast<float>(std::max<std::int64_t>(counted, 1));
  return in;
}

struct CeRun {
  CrossEntropyTotals totals;
  std::vector<float> d_h, d_w, d_bias;
};

CeRun run_ce(const ExecContext& ctx, const CeCase& c, const CeInputs& in, DType dtype) {
  LinearCrossEntropyParams p;
  p.rows = c.rows;
  p.dim = c.dim;
  p.vocab = c.vocab;
  p.chunk_rows = c.chunk_rows;
  p.loss_scale = in.loss_scale;
  p.dtype = dtype;
  if (ctx.device.kind == DeviceKind::kCpu) {
    CeRun r{{}, in.d_h0, in.d_w0, in.d_bias0};
    p.h = in.h.data();
    p.w = in.w.data();
    p.bias = c.bias ? in.bias.data() : nullptr;
    p.targets = in.targets.data();
    p.totals = &r.totals;
    if (c.train) {
      p.d_h = r.d_h.data();
      p.d_w = r.d_w.data();
      p.d_bias = c.bias ? r.d_bias.data() : nullptr;
    }
    linear_cross_entropy(p, ctx);
    return r;
  }
  DeviceArray<float> h(in.h), w(in.w), bias(c.bias ? in.bias : std::vector<float>(1)), d_h(in.d_h0), d_w(in.d_w0),
      d_bias(in.d_bias0);
  DeviceArray<std::int32_t> targets(in.targets);
  DeviceArray<CrossEntropyTotals> totals(1);  // poisoned: NaN loss, count -1
  p.h = h.get();
  p.w = w.get();
  p.bias = c.bias ? bias.get() : nullptr;
  p.targets = targets.get();
  p.totals = totals.get();
  if (c.train) {
    p.d_h = d_h.get();
    p.d_w = d_w.get();
    p.d_bias = c.bias ? d_bias.get() : nullptr;
  }
  linear_cross_entropy(p, ctx);
  return {totals.download()[0], d_h.download(), d_w.download(), d_bias.download()};
}

// float64 forward and backward; with `bf16`, h and W are rounded to bf16 first and d logits before
// the products that take them to d_h and d_w (where the CUDA kernel rounds), d_bias from the unrounded
// ones. near_ties counts rows whose two best logits lie within 1e-4: their argmax may differ by rounding.
struct CeReference {
  double loss = 0.0;
  std::int64_t count = 0, correct = 0, near_ties = 0;
  Vec d_h, d_w, d_bias;
};

CeReference ce_reference(const CeCase& c, const CeInputs& in, bool bf16) {
  const Vec h = bf16 ? bf16_rounded(to_double(in.h)) : to_double(in.h);
  const Vec w = bf16 ? bf16_rounded(to_double(in.w)) : to_double(in.w);
  CeReference r;
  r.d_h.assign(h.size(), 0.0);
  r.d_w.assign(w.size(), 0.0);
  r.d_bias.assign(static_cast<std::size_t>(c.vocab), 0.0);
  Vec z(static_cast<std::size_t>(c.vocab)), d(z.size());
  for (std::int64_t row = 0; row < c.rows; ++row) {
    const std::int32_t target = in.targets[row];
    if (target < 0) continue;
    for (std::int64_t j = 0; j < c.vocab; ++j) {
      double s = c.bias ? double(in.bias[j]) : 0.0;
      for (int k = 0; k < c.dim; ++k) s += h[row * c.dim + k] * w[j * c.dim + k];
      z[j] = s;
    }
    const std::int64_t best = std::max_element(z.begin(), z.end()) - z.begin();
    double second = -std::numeric_limits<double>::infinity();
    for (std::int64_t j = 0; j < c.vocab; ++j)
      if (j != best) second = std::max(second, z[j]);
    double sum = 0.0;
    for (const double v : z) sum += std::exp(v - z[best]);
    const double lse = z[best] + std::log(sum);
    r.loss += lse - z[target];
    ++r.count;
    r.correct += best == target;
    r.near_ties += z[best] - second < 1e-4;
    for (std::int64_t j = 0; j < c.vocab; ++j)
      d[j] = in.loss_scale * (std::exp(z[j] - lse) - (j == target ? 1.0 : 0.0));
    for (std::int64_t j = 0; j < c.vocab; ++j) {
      r.d_bias[j] += d[j];
      const double dj = bf16 ? round_bf16(d[j]) : d[j];
      for (int k = 0; k < c.dim; ++k) {
        r.d_h[row * c.dim + k] += dj * w[j * c.dim + k];
        r.d_w[j * c.dim + k] += dj * h[row * c.dim + k];
      }
    }
  }
  return r;
}

void expect_counts(const std::string& what, const CrossEntropyTotals& gpu, const CrossEntropyTotals& cpu,
                   const CeReference& ref) {
  EXPECT_EQ(gpu.count, ref.count) << what << ": counted rows";
  EXPECT_EQ(cpu.count, ref.count) << what << ": counted rows (CPU)";
  EXPECT_LE(std::abs(gpu.correct - ref.correct), ref.near_ties)
      << what << ": correct " << gpu.correct << " (CUDA), " << cpu.correct << " (CPU), " << ref.correct
      << " (float64), " << ref.near_ties << " rows within 1e-4 of a tie";
}

TEST(LayersGpu, CrossEntropyFp32MatchesFloat64LikeTheCpuBackend) {
  RINGCAST_SKIP_WITHOUT_CUDA();
  std::uint32_t seed = 1300;
  for (const CeCase& c : kCeCases) {
    const CeInputs in = ce_inputs(c, seed += 10);
    const CeRun cpu = run_ce(kCpu, c, in, DType::kF32);
    const CeRun gpu = run_ce(cuda_context(), c, in, DType::kF32);
    const CeReference ref = ce_reference(c, in, false);
    const std::string what = std::string(c.name) + " rows " + std::to_string(c.rows) + " vocab " +
                             std::to_string(c.vocab) + " chunk " + std::to_string(c.chunk_rows);
    // Every output depends on products over dim (logits), vocab (d_h) and the chunk's rows (d_w, d_bias).
    const std::int64_t inner = std::max({std::int64_t{c.dim}, c.vocab, std::min(c.rows, c.chunk_rows)});
    expect_counts(what, gpu.totals, cpu.totals, ref);
    expect_like_cpu(what + " loss", std::vector<double>{gpu.totals.loss_sum}, Vec{cpu.totals.loss_sum}, Vec{ref.loss},
                    inner);
    if (!c.train) {
      expect_bitwise(what + " d_w untouched", gpu.d_w, in.d_w0);
      continue;
    }
    expect_like_cpu(what + " d_h", added(gpu.d_h, in.d_h0), added(cpu.d_h, in.d_h0), ref.d_h, inner);
    expect_like_cpu(what + " d_w", added(gpu.d_w, in.d_w0), added(cpu.d_w, in.d_w0), ref.d_w, inner);
    if (c.bias)
      expect_like_cpu(what + " d_bias", added(gpu.d_bias, in.d_bias0), added(cpu.d_bias, in.d_bias0), ref.d_bias,
                      inner);
  }
}

TEST(LayersGpu, CrossEntropyBf16IsWithinTwiceItsEmulation) {
  RINGCAST_SKIP_WITHOUT_CUDA();
  std::uint32_t seed = 1500;
  for (const CeCase& c : {kCeCases[0], kCeCases[2]}) {
    const CeInputs in = ce_inputs(c, seed += 10);
    const CeRun gpu = run_ce(cuda_context(), c, in, DType::kBF16);
    const CeReference ref = ce_reference(c, in, false);
    const CeReference emu = ce_reference(c, in, true);
    const std::string what = std::string("bf16 ") + c.name;
    EXPECT_EQ(gpu.totals.count, ref.count) << what;
    EXPECT_LE(std::abs(gpu.totals.correct - emu.correct), emu.near_ties + ref.near_ties) << what;
    expect_bf16(what + " loss", std::vector<double>{gpu.totals.loss_sum}, Vec{emu.loss}, Vec{ref.loss});
    expect_bf16(what + " d_h", added(gpu.d_h, in.d_h0), emu.d_h, ref.d_h);
    expect_bf16(what + " d_w", added(gpu.d_w, in.d_w0), emu.d_w, ref.d_w);
    if (c.bias) expect_bf16(what + " d_bias", added(gpu.d_bias, in.d_bias0), emu.d_bias, ref.d_bias);
  }
}

TEST(LayersGpu, CrossEntropyWithNoRowsWritesZeroTotals) {
  RINGCAST_SKIP_WITHOUT_CUDA();
  const CeCase c{"no rows", 0, 8, 5, 16, false, false, 0.0};
  const CeRun gpu = run_ce(cuda_context(), c, ce_inputs(c, 1), DType::kF32);
  EXPECT_EQ(gpu.totals.loss_sum, 0.0);
  EXPECT_EQ(gpu.totals.count, 0);
  EXPECT_EQ(gpu.totals.correct, 0);
}

// A target >= vocab cannot raise an Error on the device: the loss and the gradients turn NaN.
TEST(LayersGpu, CrossEntropyMarksBadTargetsWithNaN) {
  RINGCAST_SKIP_WITHOUT_CUDA();
  const CeCase c{"bad target", 20, 8, 11, 16, false, true, 0.0};
  CeInputs in = ce_inputs(c, 77);
  in.targets[13] = static_cast<std::int32_t>(c.vocab);
  const CeRun gpu = run_ce(cuda_context(), c, in, DType::kF32);
  EXPECT_TRUE(std::isnan(gpu.totals.loss_sum)) << "loss " << gpu.totals.loss_sum;
  EXPECT_TRUE(std::any_of(gpu.d_w.begin(), gpu.d_w.end(), [](float v) { return std::isnan(v); }));
}

// --- Optimizer and buffer checks ---

TEST(LayersGpu, AdamWMatchesTheCpuBackend) {
  RINGCAST_SKIP_WITHOUT_CUDA();
  const std::int64_t count = 10007;
  const std::size_t n = count;
  const std::vector<float> param0 = random_floats(n, 1), grad = random_floats(n, 2, 0.1f),
                           m0 = random_floats(n, 3, 0.01f);
  std::vector<float> v0 = random_floats(n, 4, 1e-3f);
  for (float& v : v0) v = std::abs(v);
  for (const float decay : {0.0f, 0.1f}) {
    AdamWParams p;
    p.count = count;
    p.step = 3;
    p.lr = 1e-2f;
    p.weight_decay = decay;
    std::vector<float> param = param0, m = m0, v = v0;
    p.param = param.data();
    p.grad = grad.data();
    p.m = m.data();
    p.v = v.data();
    adamw_step(p, kCpu);
    DeviceArray<float> gparam(param0), ggrad(grad), gm(m0), gv(v0);
    p.param = gparam.get();
    p.grad = ggrad.get();
    p.m = gm.get();
    p.v = gv.get();
    adamw_step(p, cuda_context());
    const std::string what = "adamw decay " + std::to_string(decay);
    expect_near(what + " param step", added(gparam.download(), param0), added(param, param0), kTol);
    expect_near(what + " m", gm.download(), to_double(m), kTol);
    expect_near(what + " v", gv.download(), to_double(v), kTol);
  }
}

TEST(LayersGpu, SumOfSquaresMatchesTheCpuBackendAndRepeats) {
  RINGCAST_SKIP_WITHOUT_CUDA();
  for (const std::int64_t count : {std::int64_t{0}, std::int64_t{1}, std::int64_t{4096}, std::int64_t{5 * 4096 + 17},
                                   (std::int64_t{1} << 20) + 3}) {
    const std::vector<float> x = random_floats(static_cast<std::size_t>(count), 5);
    double cpu = std::numeric_limits<double>::quiet_NaN();
    sum_of_squares(count, x.data(), &cpu, kCpu);
    DeviceArray<float> gx(x);
    DeviceArray<double> first(1), second(1);  // poisoned
    sum_of_squares(count, gx.get(), first.get(), cuda_context());
    sum_of_squares(count, gx.get(), second.get(), cuda_context());
    const std::string what = "sum_of_squares count " + std::to_string(count);
    expect_near(what, first.download(), Vec{cpu}, 1e-12);
    expect_bitwise(what + " twice", second.download(), first.download());
  }
}

TEST(LayersGpu, ScaleInPlaceIsTheCpuBackendBitForBit) {
  RINGCAST_SKIP_WITHOUT_CUDA();
  const std::vector<float> x0 = random_floats(10007, 8);
  std::vector<float> x = x0;
  scale_in_place(static_cast<std::int64_t>(x.size()), 0.37f, x.data(), kCpu);
  DeviceArray<float> gx(x0);
  scale_in_place(static_cast<std::int64_t>(x0.size()), 0.37f, gx.get(), cuda_context());
  expect_bitwise("scale_in_place", gx.download(), x);
}

TEST(LayersGpu, FindNonFiniteFindsNaNAndInf) {
  RINGCAST_SKIP_WITHOUT_CUDA();
  const std::int64_t count = 300001;
  const float inf = std::numeric_limits<float>::infinity();
  struct Case {
    const char* name;
    std::int64_t at;
    float value;
    std::int64_t count;
    std::int32_t expected;
  };
  const Case cases[] = {{"clean", -1, 0.0f, count, 0},
                        {"NaN last", count - 1, std::numeric_limits<float>::quiet_NaN(), count, 1},
                        {"+Inf first", 0, inf, count, 1},
                        {"-Inf middle", count / 2, -inf, count, 1},
                        {"empty", -1, 0.0f, 0, 0}};
  for (const Case& c : cases) {
    std::vector<float> x = random_floats(static_cast<std::size_t>(count), 9);
    if (c.at >= 0) x[c.at] = c.value;
    DeviceArray<float> gx(x);
    DeviceArray<std::int32_t> found(1);  // poisoned: -1
    find_non_finite(c.count, gx.get(), found.get(), cuda_context());
    EXPECT_EQ(found.download()[0], c.expected) << c.name;
  }
}

// --- Determinism, streams, contexts ---

TEST(LayersGpu, RepeatedCallsGiveTheSameBits) {
  RINGCAST_SKIP_WITHOUT_CUDA();
  for (const DType dtype : {DType::kF32, DType::kBF16}) {
    const CeInputs in = ce_inputs(kCeCases[0], 21);
    const CeRun a = run_ce(cuda_context(), kCeCases[0], in, dtype);
    const CeRun b = run_ce(cuda_context(), kCeCases[0], in, dtype);
    const std::string what = std::string("cross-entropy ") + std::string(dtype_name(dtype)) + " twice";
    expect_bitwise(what + " loss", std::vector<double>{a.totals.loss_sum}, std::vector<double>{b.totals.loss_sum});
    expect_bitwise(what + " d_h", a.d_h, b.d_h);
    expect_bitwise(what + " d_w", a.d_w, b.d_w);
  }
  const NormCase c{1000, 200};
  const std::size_t n = static_cast<std::size_t>(c.rows * c.dim);
  DeviceArray<float> x(random_floats(n, 1)), g(random_floats(c.dim, 2)), d_y(random_floats(n, 3)), d_x(n);
  std::vector<std::vector<float>> d_g;
  for (int run = 0; run < 2; ++run) {
    DeviceArray<float> out(std::vector<float>(c.dim, 0.0f));
    rms_norm_backward({c.rows, c.dim, 1e-6f, x.get(), g.get(), d_y.get(), d_x.get(), out.get()}, cuda_context());
    d_g.push_back(out.download());
  }
  expect_bitwise("rms_norm d_g twice", d_g[1], d_g[0]);
}

// Handles and scratch are per stream: the same work on a stream of its own gives the same result.
TEST(LayersGpu, WorksOnTheCallersStream) {
  RINGCAST_SKIP_WITHOUT_CUDA();
  cudaStream_t stream = nullptr;
  // A blocking stream: DeviceArray copies run on the legacy stream, which it waits for.
  cuda_require(cudaStreamCreate(&stream), "cudaStreamCreate");
  const ExecContext on_stream{{DeviceKind::kCuda, 0}, stream};
  const CeCase& c = kCeCases[0];
  const CeInputs in = ce_inputs(c, 41);
  const CeRun default_stream = run_ce(cuda_context(), c, in, DType::kF32);
  const CeRun own_stream = run_ce(on_stream, c, in, DType::kF32);
  const CeReference ref = ce_reference(c, in, false);
  const CeRun cpu = run_ce(kCpu, c, in, DType::kF32);
  expect_like_cpu("own stream d_w", added(own_stream.d_w, in.d_w0), added(cpu.d_w, in.d_w0), ref.d_w, c.vocab);
  expect_like_cpu("default stream d_w", added(default_stream.d_w, in.d_w0), added(cpu.d_w, in.d_w0), ref.d_w, c.vocab);
  EXPECT_EQ(own_stream.totals.count, default_stream.totals.count);
  cuda_require(cudaStreamDestroy(stream), "cudaStreamDestroy");
}

TEST(LayersGpu, RefusesAContextThatIsNotTheCurrentDevice) {
  RINGCAST_SKIP_WITHOUT_CUDA();
  int current = 0;
  cuda_require(cudaGetDevice(&current), "cudaGetDevice");
  const ExecContext other{{DeviceKind::kCuda, current + 1}, nullptr};
  DeviceArray<float> x(random_floats(6, 1)), w(random_floats(6, 2)), y(4);
  expect_error([&] { linear_forward({2, 3, 2, x.get(), w.get(), y.get()}, other); }, "is current");
}

}  // namespace
}  // namespace ringcast::test
