// Colt5Attention and Colt5Ffn (runtime/src/colt5.hpp) on 1, 2 or 4 ranks against a float64
// single-process reference written from ALGORITHMS.md §3 over whole sequences: router scores, the
// iterative soft top-k, the hard top-k (ties toward the lower position), light window attention and
// heavy routed attention with RoPE at global positions, light + routed heavy SwiGLU FFNs. Every rank
// draws the same seeded inputs and parameters and checks its own rows; parameter gradients are
// summed over ranks. Gradients are compared with central differences of the reference with the
// routed sets held fixed (routing is a hard choice); the seeds keep every router's k-th and
// (k+1)-th scores well apart, so float32 and float64 route alike and no difference flips a set.
#include "../../runtime/src/colt5.hpp"

#include "test_util.hpp"

#include <ringcast/session.hpp>

#include <gtest/gtest.h>
#include <mpi.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <map>
#include <memory>
#include <numeric>
#include <string>
#include <vector>

namespace ringcast {
namespace {

using model::Colt5Attention;
using model::Colt5Ffn;
using model::Geometry;
using model::ParameterTable;
using model::RunContext;
using model::Scratch;
using test::Vec;
using Params = std::map<std::string, Vec>;
using Routes = std::vector<std::vector<std::int64_t>>;  // [b]: one router's routed positions, increasing

constexpr double kRopeTheta = 100.0;  // angles that turn noticeably over a short sequence

struct World {
  Session session = Session::from_mpi(MPI_COMM_WORLD, Backend::kCpu);
  int rank = session.rank();
  int ranks = session.size();
};

struct Setup {
  int batch;
  std::int64_t seq;
  int dim, heads, kv_heads, head_dim, light_heads, radius, ffn_hidden;
  double ffn_fraction, query_fraction, kv_fraction;
  float epsilon;
  int iterations;
  std::uint32_t seed;
};

ModelConfig config(const Setup& k) {
  ModelConfig c;
  c.kind = ModelKind::kEncoder;
  c.num_classes = 2;
  c.dim = k.dim;
  c.heads = k.heads;
  c.kv_heads = k.kv_heads;
  c.head_dim = k.head_dim;
  c.ffn_hidden = k.ffn_hidden;
  c.rope_theta = static_cast<float>(kRopeTheta);
  c.colt5.enabled = true;
  c.colt5.ffn_fraction = k.ffn_fraction;
  c.colt5.query_fraction = k.query_fraction;
  c.colt5.kv_fraction = k.kv_fraction;
  c.colt5.light_heads = k.light_heads;
  c.colt5.window_radius = k.radius;
  c.colt5.epsilon = k.epsilon;
  c.colt5.iterations = k.iterations;
  return c;
}

Geometry geometry(const Setup& k, const World& w) {
  Geometry g;
  g.batch = k.batch;
  g.seq_len = k.seq;
  g.local_len = k.seq / w.ranks;
  g.causal = false;
  for (std::int64_t i = 0; i < g.local_len; ++i)
    g.positions.push_back(static_cast<std::int32_t>(w.rank * g.local_len + i));
  return g;
}

// --- The float64 reference over whole sequences: x [B, n, D] -> f(x) [B, n, D]. ---

Vec linear(const Vec& x, const Vec& w, std::int64_t rows, int in, int out) {
  Vec y(static_cast<std::size_t>(rows * out), 0.0);
  for (std::int64_t r = 0; r < rows; ++r)
    for (int o = 0; o < out; ++o) {
      double s = 0.0;
      for (int i = 0; i < in; ++i) s += x[r * in + i] * w[o * in + i];
      y[r * out + o] = s;
    }
  return y;
}

Vec swiglu_ffn(const Params& p, const std::string& prefix, const Vec& x, std::int64_t rows, int dim, int hidden) {
  const Vec a = linear(x, p.at(prefix + "w1"), rows, dim, hidden),
            b = linear(x, p.at(prefix + "w3"), rows, dim, hidden);
  Vec h(a.size());
  for (std::size_t i = 0; i < h.size(); ++i) h[i] = a[i] / (1.0 + std::exp(-a[i])) * b[i];
  return linear(h, p.at(prefix + "w2"), rows, hidden, dim);
}

// a = 0, b = -s; T times: a = ε(log k - LSE((s + b)/ε)), b = -relu(s + a); s̃ = exp((s + a + b)/ε).
Vec soft_topk(const Vec& s, std::int64_t k, double eps, int iterations) {
  const std::size_t n = s.size();
  Vec b(n);
  for (std::size_t j = 0; j < n; ++j) b[j] = -s[j];
  double a = 0.0;
  for (int t = 0; t < iterations; ++t) {
    double m = -std::numeric_limits<double>::infinity(), sum = 0.0;
    for (std::size_t j = 0; j < n; ++j) m = std::max(m, (s[j] + b[j]) / eps);
    for (std::size_t j = 0; j < n; ++j) sum += std::exp((s[j] + b[j]) / eps - m);
    a = eps * (std::log(static_cast<double>(k)) - (m + std::log(sum)));
    for (std::size_t j = 0; j < n; ++j) b[j] = -std::max(0.0, s[j] + a);
  }
  Vec out(n);
  for (std::size_t j = 0; j < n; ++j) out[j] = std::exp((s[j] + a + b[j]) / eps);
  return out;
}

// The routing of one evaluation; the finite differences hold its sets fixed.
struct Routing {
  std::vector<Routes> sets;                                  // [router], in the order the reference evaluates them
  double min_gap = std::numeric_limits<double>::infinity();  // least |s_routed - s_unrouted| at the k-th score
};

// Router `index`: s = x·u per sequence, the soft top-k weights s̃ [B, n], and the top `count` set of
// each sequence (ties toward the lower position), or the fixed one.
Vec route(const Setup& k, const Vec& x, const Vec& u, std::int64_t count, std::size_t index, const Routing* fixed,
          Routing& out, Routes& chosen) {
  const std::int64_t n = k.seq;
  Vec weights(static_cast<std::size_t>(k.batch * n));
  chosen.assign(static_cast<std::size_t>(k.batch), {});
  for (int b = 0; b < k.batch; ++b) {
    Vec s(static_cast<std::size_t>(n));
    for (std::int64_t i = 0; i < n; ++i)
      for (int c = 0; c < k.dim; ++c) s[i] += x[(b * n + i) * k.dim + c] * u[c];
    const Vec st = soft_topk(s, count, k.epsilon, k.iterations);
    std::copy(st.begin(), st.end(), weights.begin() + b * n);
    std::vector<std::int64_t> order(static_cast<std::size_t>(n));
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](std::int64_t i, std::int64_t j) { return s[i] > s[j]; });
    if (count < n) out.min_gap = std::min(out.min_gap, s[order[count - 1]] - s[order[count]]);
    std::vector<std::int64_t>& set = chosen[static_cast<std::size_t>(b)];
    set.assign(order.begin(), order.begin() + count);
    std::sort(set.begin(), set.end());
  }
  if (fixed) chosen = fixed->sets[index];
  out.sets.push_back(chosen);
  return weights;
}

struct Counts {
  std::int64_t m, q, v;
  int light_hidden, heavy_hidden;
};

Counts counts(const Setup& k) {
  auto tokens = [&](double f) { return static_cast<std::int64_t>(std::llround(f * static_cast<double>(k.seq))); };
  return {tokens(k.ffn_fraction), tokens(k.query_fraction), tokens(k.kv_fraction), k.ffn_hidden / 2, k.ffn_hidden * 4};
}

Vec reference_ffn(const Setup& k, const Params& p, const Vec& x, const Routing* fixed, Routing* record) {
  const Counts n = counts(k);
  const std::int64_t rows = k.batch * k.seq;
  Routing local;
  Routing& out = record ? *record : local;
  Routes chosen;
  const Vec w = route(k, x, p.at("layers.0.router_ffn"), n.m, 0, fixed, out, chosen);
  Vec y = swiglu_ffn(p, "layers.0.ffn_light.", x, rows, k.dim, n.light_hidden);
  const Vec heavy = swiglu_ffn(p, "layers.0.ffn_heavy.", x, rows, k.dim, n.heavy_hidden);
  for (int b = 0; b < k.batch; ++b)
    for (const std::int64_t i : chosen[static_cast<std::size_t>(b)]) {
      const std::int64_t row = b * k.seq + i;
      for (int c = 0; c < k.dim; ++c) y[row * k.dim + c] += w[row] * heavy[row * k.dim + c];
    }
  return y;
}

void rope(Vec& x, std::int64_t n, int heads, int d, double theta) {
  for (std::int64_t i = 0; i < n; ++i)
    for (int h = 0; h < heads; ++h)
      for (int c = 0; c < d / 2; ++c) {
        const double angle = static_cast<double>(i) * std::pow(theta, -2.0 * c / d);
        double& lo = x[(i * heads + h) * d + c];
        double& hi = x[(i * heads + h) * d + c + d / 2];
        const double a = lo, b = hi;
        lo = a * std::cos(angle) - b * std::sin(angle);
        hi = b * std::cos(angle) + a * std::sin(angle);
      }
}

Vec reference_attention(const Setup& k, const Params& p, const Vec& x, const Routing* fixed, Routing* record) {
  const Counts cnt = counts(k);
  const std::int64_t n = k.seq, rows = k.batch * n;
  const int h = k.heads, hkv = k.kv_heads, d = k.head_dim, group = h / hkv, light = k.light_heads;
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  Routing local;
  Routing& out = record ? *record : local;
  Routes rq, rkv;
  const Vec wq = route(k, x, p.at("layers.0.router_q"), cnt.q, 0, fixed, out, rq);
  const Vec wkv = route(k, x, p.at("layers.0.router_kv"), cnt.v, 1, fixed, out, rkv);
  const Vec q_all = linear(x, p.at("layers.0.wq"), rows, k.dim, h * d);
  const Vec k_all = linear(x, p.at("layers.0.wk"), rows, k.dim, hkv * d);
  const Vec v_all = linear(x, p.at("layers.0.wv"), rows, k.dim, hkv * d);
  Vec o(static_cast<std::size_t>(rows * h * d), 0.0);
  for (int b = 0; b < k.batch; ++b) {
    Vec q(q_all.begin() + b * n * h * d, q_all.begin() + (b + 1) * n * h * d);
    Vec kk(k_all.begin() + b * n * hkv * d, k_all.begin() + (b + 1) * n * hkv * d);
    const Vec v(v_all.begin() + b * n * hkv * d, v_all.begin() + (b + 1) * n * hkv * d);
    rope(q, n, h, d, kRopeTheta);
    rope(kk, n, hkv, d, kRopeTheta);
    // attend(i, head, keys, key weight): softmax over the keys of scale q.k, values scaled.
    auto attend = [&](std::int64_t i, int head, const std::vector<std::int64_t>& keys, const Vec* kv_weight,
                      double out_scale) {
      const int g = head / group;
      Vec s(keys.size());
      double m = -std::numeric_limits<double>::infinity();
      for (std::size_t t = 0; t < keys.size(); ++t) {
        for (int c = 0; c < d; ++c) s[t] += q[(i * h + head) * d + c] * kk[(keys[t] * hkv + g) * d + c];
        s[t] *= scale;
        m = std::max(m, s[t]);
      }
      double sum = 0.0;
      for (double& e : s) sum += (e = std::exp(e - m));
      for (std::size_t t = 0; t < keys.size(); ++t) {
        const double vw = kv_weight ? (*kv_weight)[b * n + keys[t]] : 1.0;
        for (int c = 0; c < d; ++c)
          o[((b * n + i) * h + head) * d + c] += out_scale * s[t] / sum * vw * v[(keys[t] * hkv + g) * d + c];
      }
    };
    for (std::int64_t i = 0; i < n; ++i) {
      std::vector<std::int64_t> window;
      for (std::int64_t j = std::max<std::int64_t>(0, i - k.radius); j <= std::min(n - 1, i + k.radius); ++j)
        window.push_back(j);
      for (int head = 0; head < light; ++head) attend(i, head, window, nullptr, 1.0);
    }
    for (const std::int64_t i : rq[static_cast<std::size_t>(b)])
      for (int head = light; head < h; ++head) attend(i, head, rkv[static_cast<std::size_t>(b)], &wkv, wq[b * n + i]);
  }
  return linear(o, p.at("layers.0.wo"), rows, h * d, k.dim);
}

// --- The mixer under test, its inputs, and the checks. ---

enum class Kind { kAttention, kFfn };

Vec reference(Kind kind, const Setup& k, const Params& p, const Vec& x, const Routing* fixed, Routing* record) {
  return kind == Kind::kAttention ? reference_attention(k, p, x, fixed, record) : reference_ffn(k, p, x, fixed, record);
}

// This rank's rows [B, n_loc, D] of a global [B, n, D] tensor.
template <typename T>
std::vector<T> local_rows(const std::vector<T>& global, const Setup& k, const Geometry& g) {
  std::vector<T> out;
  for (int b = 0; b < k.batch; ++b)
    out.insert(out.end(), global.begin() + (b * k.seq + g.positions[0]) * k.dim,
               global.begin() + (b * k.seq + g.positions[0] + g.local_len) * k.dim);
  return out;
}

double allreduce_sum(double x) {
  MPI_Allreduce(MPI_IN_PLACE, &x, 1, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
  return x;
}

// full_fd: central differences for every element of x and of every parameter; otherwise one random
// direction per tensor (the derivative along it against the gradient's projection on it).
void run_case(Kind kind, const Setup& k, bool full_fd) {
  World w;
  const ModelConfig c = config(k);
  const Geometry g = geometry(k, w);
  ParameterTable table;
  Scratch scratch;
  std::unique_ptr<model::Mixer> mixer;
  if (kind == Kind::kAttention)
    mixer = std::make_unique<Colt5Attention>(w.session, table, scratch, "layers.0.", c, g);
  else
    mixer = std::make_unique<Colt5Ffn>(w.session, table, scratch, "layers.0.", c, g);
  table.finalize();
  scratch.bind(w.session.device());

  std::vector<float> params(static_cast<std::size_t>(table.total())), grads(params.size(), 0.0f);
  Params named;
  for (std::size_t t = 0; t < table.infos().size(); ++t) {
    const ParameterInfo& info = table.infos()[t];
    const bool router = info.name.find("router_") != std::string::npos;
    EXPECT_EQ(info.decay, !router) << info.name;
    const float bound = router ? 0.6f : 1.0f / std::sqrt(static_cast<float>(info.cols));
    const auto values = test::random_floats(static_cast<std::size_t>(info.numel()),
                                            k.seed * 131 + static_cast<std::uint32_t>(t), bound);
    std::copy(values.begin(), values.end(), params.begin() + info.offset);
    named[info.name] = test::to_double(values);
  }
  const RunContext rc{
      w.session, {w.session.device(), w.session.stream()}, table, params.data(), grads.data(), scratch, 0, true};

  const std::size_t global = static_cast<std::size_t>(k.batch * k.seq * k.dim);
  const auto x = test::random_floats(global, k.seed + 1);
  const auto loss_w = test::random_floats(global, k.seed + 2);
  const Vec x_ref = test::to_double(x);
  Routing routing;
  const Vec ref = reference(kind, k, named, x_ref, nullptr, &routing);
  ASSERT_GT(routing.min_gap, 2e-3) << "the seeded router scores nearly tie at the routing boundary";

  const auto x_loc = local_rows(x, k, g), w_loc = local_rows(loss_w, k, g);
  const auto y0 = test::random_floats(x_loc.size(), k.seed + 3);
  std::vector<float> y = y0;
  mixer->forward(rc, x_loc.data(), y.data());
  test::expect_close("f(x), this rank's rows", test::added(y, y0), local_rows(ref, k, g), 2e-5);

  const auto dx0 = test::random_floats(x_loc.size(), k.seed + 4);
  std::vector<float> dx = dx0;
  mixer->backward(rc, x_loc.data(), w_loc.data(), dx.data());
  MPI_Allreduce(MPI_IN_PLACE, grads.data(), static_cast<int>(grads.size()), MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
  const Vec d_x = test::added(dx, dx0);

  auto loss = [&](const Params& p, const Vec& xx) {
    return test::weighted_sum(reference(kind, k, p, xx, &routing, nullptr), loss_w);
  };
  constexpr double kTol = 2e-4;  // float32 gradients against float64 differences: ~1e-6 seen, 3e-5 at most
  if (full_fd) {
    const Vec num = test::numeric_gradient([&](const Vec& xx) { return loss(named, xx); }, x_ref);
    test::expect_close("d x, this rank's rows", d_x, local_rows(num, k, g), kTol);
  } else {
    const auto dir = test::random_floats(global, k.seed + 5);
    const Vec dir_ref = test::to_double(dir);
    const auto dir_loc = local_rows(dir, k, g);
    double proj = 0.0;
    for (std::size_t i = 0; i < d_x.size(); ++i) proj += d_x[i] * dir_loc[i];
    const Vec num = test::numeric_gradient(
        [&](const Vec& t) {
          Vec xx = x_ref;
          for (std::size_t i = 0; i < xx.size(); ++i) xx[i] += t[0] * dir_ref[i];
          return loss(named, xx);
        },
        {0.0});
    test::expect_close("d x along a random direction", std::vector<double>{allreduce_sum(proj)}, num, kTol);
  }
  for (const ParameterInfo& info : table.infos()) {
    const std::vector<float> got(grads.begin() + info.offset, grads.begin() + info.offset + info.numel());
    const Vec p0 = named.at(info.name);
    auto loss_at = [&](const Vec& values) {
      Params p = named;
      p[info.name] = values;
      return loss(p, x_ref);
    };
    if (full_fd) {
      test::expect_close("d " + info.name, got, test::numeric_gradient(loss_at, p0), kTol);
    } else {
      const auto dir = test::random_floats(p0.size(), k.seed + 7);
      double proj = 0.0;
      for (std::size_t i = 0; i < got.size(); ++i) proj += got[i] * dir[i];
      const Vec num = test::numeric_gradient(
          [&](const Vec& t) {
            Vec values = p0;
            for (std::size_t i = 0; i < values.size(); ++i) values[i] += t[0] * dir[i];
            return loss_at(values);
          },
          {0.0});
      test::expect_close("d " + info.name + " along a random direction", std::vector<double>{proj}, num, kTol);
    }
  }
}

// n = 24 over 1, 2, 4 ranks (6 rows each on 4): the radius 7 window reaches two ranks away; GQA
// with one light KV head; m = q = 6, v = 8 routed tokens per sequence.
const Setup kTiny{2, 24, 12, 4, 2, 6, 2, 7, 8, 0.25, 0.25, 1.0 / 3, 0.5f, 20, 7};
// Several query tiles and window pages (n_loc up to 300), the paper's default fractions and
// iterations, one light head of four, no GQA.
const Setup kLong{1, 300, 16, 4, 4, 8, 1, 70, 16, 1.0 / 16, 1.0 / 16, 1.0 / 8, 1.0f, 50, 3};

TEST(Colt5Attention, TinyAgainstReferenceAndFiniteDifferences) { run_case(Kind::kAttention, kTiny, true); }
TEST(Colt5Attention, LongSequenceAgainstReference) { run_case(Kind::kAttention, kLong, false); }
TEST(Colt5Ffn, TinyAgainstReferenceAndFiniteDifferences) { run_case(Kind::kFfn, kTiny, true); }
TEST(Colt5Ffn, LongSequenceAgainstReference) { run_case(Kind::kFfn, kLong, false); }

TEST(Colt5, RejectsConfigurationsThatDoNotFit) {
  World w;
  const Geometry g = geometry(kTiny, w);
  auto expect = [&](ModelConfig c, const Geometry& geom, const std::string& needle) {
    ParameterTable table;
    Scratch scratch;
    test::expect_error([&] { Colt5Attention(w.session, table, scratch, "a.", c, geom); }, needle);
    test::expect_error([&] { Colt5Ffn(w.session, table, scratch, "f.", c, geom); }, needle);
  };
  const ModelConfig base = config(kTiny);
  Geometry causal = g;
  causal.causal = true;
  expect(base, causal, "bidirectional");
  ModelConfig c = base;
  c.colt5.light_heads = 1;  // heads / kv_heads = 2
  expect(c, g, "multiple of heads / kv_heads");
  c.colt5.light_heads = 4;
  expect(c, g, "outside [1, heads = 4)");
  c = base;
  c.heads = c.kv_heads = 2;
  c.colt5.light_heads = 0;  // heads / 4 = 0
  expect(c, g, "resolves to 0");
  c = base;
  c.colt5.kv_fraction = 0.01;
  expect(c, g, "routes no token");
  c = base;
  c.colt5.ffn_fraction = 1.5;
  expect(c, g, "(0, 1]");
  c = base;
  c.colt5.window_radius = -1;
  expect(c, g, "window_radius");
  if (w.ranks > 1) {
    Geometry strided = g;
    for (std::int64_t i = 0; i < g.local_len; ++i)
      strided.positions[i] = static_cast<std::int32_t>(w.rank + i * w.ranks);
    expect(base, strided, "contiguous placement");
  }
}

}  // namespace
}  // namespace ringcast
