// The decoder-only model on the CPU backend over 1, 2 and 4 ranks: its loss and all-reduced
// gradients against a float64 whole-sequence reference model (same parameters, naive causal
// attention) and its central finite differences; loss trajectories under AdamW equal to a
// single-process run (ring and ulysses); a memorisable sequence being learnt; non-finite values
// stopping the step on every rank. Every rank builds the same global tokens and takes its rows.
#include "naive_attention.hpp"
#include "test_util.hpp"

#include <ringcast/error.hpp>
#include <ringcast/model.hpp>

#include <gtest/gtest.h>
#include <mpi.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <map>
#include <random>
#include <string>

namespace ringcast {
namespace {

using Params = std::map<std::string, test::Vec>;

int world_size() {
  int p = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &p);
  return p;
}

// Global tokens [B, n] and next-token targets, with a few ignored (< 0) targets.
struct Batch {
  std::vector<std::int32_t> tokens, targets;
};

Batch make_batch(int vocab, int batch, std::int64_t n, std::uint32_t seed) {
  Batch b;
  b.tokens = test::random_ids(static_cast<std::size_t>(batch * n), vocab, seed);
  b.targets.resize(b.tokens.size());
  std::mt19937 gen(seed + 1);
  for (int bi = 0; bi < batch; ++bi)
    for (std::int64_t t = 0; t < n; ++t) {
      const std::size_t i = static_cast<std::size_t>(bi * n + t);
      b.targets[i] = t + 1 < n && gen() % 7 != 0 ? b.tokens[i + 1] : -1;
    }
  return b;
}

// This rank's rows [B, n_loc] of a global [B, n] id array, in the model's positions() order.
std::vector<std::int32_t> local_rows(const std::vector<std::int32_t>& global, int batch, std::int64_t n,
                                     std::span<const std::int32_t> pos) {
  std::vector<std::int32_t> out;
  for (int bi = 0; bi < batch; ++bi)
    for (const std::int32_t p : pos) out.push_back(global[static_cast<std::size_t>(bi * n + p)]);
  return out;
}

// --- The float64 reference: the same architecture on whole sequences. ---
void ref_linear(const test::Vec& x, const test::Vec& w, std::int64_t rows, int in, int out, test::Vec& y) {
  y.assign(static_cast<std::size_t>(rows * out), 0.0);
  for (std::int64_t r = 0; r < rows; ++r)
    for (int o = 0; o < out; ++o) {
      double s = 0;
      for (int i = 0; i < in; ++i) s += x[r * in + i] * w[static_cast<std::size_t>(o) * in + i];
      y[r * out + o] = s;
    }
}

test::Vec ref_rms(const test::Vec& x, const test::Vec& g, std::int64_t rows, int dim, double eps) {
  test::Vec y(x.size());
  for (std::int64_t r = 0; r < rows; ++r) {
    double ss = 0;
    for (int i = 0; i < dim; ++i) ss += x[r * dim + i] * x[r * dim + i];
    const double inv = 1.0 / std::sqrt(ss / dim + eps);
    for (int i = 0; i < dim; ++i) y[r * dim + i] = x[r * dim + i] * inv * g[i];
  }
  return y;
}

void ref_rope(test::Vec& x, int batch, std::int64_t n, int heads, int d, double theta) {
  const int half = d / 2;
  for (int bi = 0; bi < batch; ++bi)
    for (std::int64_t t = 0; t < n; ++t)
      for (int h = 0; h < heads; ++h) {
        double* row = &x[static_cast<std::size_t>(((bi * n + t) * heads + h) * d)];
        for (int i = 0; i < half; ++i) {
          const double ang = static_cast<double>(t) * std::pow(theta, -2.0 * i / d);
          const double c = std::cos(ang), s = std::sin(ang), a = row[i], b = row[i + half];
          row[i] = a * c - b * s;
          row[i + half] = b * c + a * s;
        }
      }
}

double reference_loss(const ModelConfig& c, const Params& p, int batch, std::int64_t n, const Batch& data) {
  const std::int64_t R = batch * n;
  const int D = c.dim, F = c.ffn_hidden, qd = c.heads * c.head_dim, kd = c.kv_heads * c.head_dim;
  test::Vec x(static_cast<std::size_t>(R * D));
  const test::Vec& emb = p.at("embedding");
  for (std::int64_t r = 0; r < R; ++r)
    for (int i = 0; i < D; ++i) x[r * D + i] = emb[static_cast<std::size_t>(data.tokens[r]) * D + i];
  test::Vec q, k, v, proj, a, b;
  for (int l = 0; l < c.layers; ++l) {
    const std::string pre = "layers." + std::to_string(l) + ".";
    const test::Vec xn = ref_rms(x, p.at(pre + "attn_norm"), R, D, c.norm_eps);
    ref_linear(xn, p.at(pre + "wq"), R, D, qd, q);
    ref_linear(xn, p.at(pre + "wk"), R, D, kd, k);
    ref_linear(xn, p.at(pre + "wv"), R, D, kd, v);
    ref_rope(q, batch, n, c.heads, c.head_dim, c.rope_theta);
    ref_rope(k, batch, n, c.kv_heads, c.head_dim, c.rope_theta);
    const test::NaiveShape ns{batch, n, c.heads, c.kv_heads, c.head_dim, true};
    const test::NaiveResult att = test::naive_attention(ns, q, k, v);
    ref_linear(att.o, p.at(pre + "wo"), R, qd, D, proj);
    for (std::size_t i = 0; i < x.size(); ++i) x[i] += proj[i];
    const test::Vec xn2 = ref_rms(x, p.at(pre + "ffn_norm"), R, D, c.norm_eps);
    ref_linear(xn2, p.at(pre + "w1"), R, D, F, a);
    ref_linear(xn2, p.at(pre + "w3"), R, D, F, b);
    for (std::size_t i = 0; i < a.size(); ++i) a[i] = a[i] / (1.0 + std::exp(-a[i])) * b[i];
    ref_linear(a, p.at(pre + "w2"), R, F, D, proj);
    for (std::size_t i = 0; i < x.size(); ++i) x[i] += proj[i];
  }
  const test::Vec hn = ref_rms(x, p.at("final_norm"), R, D, c.norm_eps);
  test::Vec logits;
  ref_linear(hn, p.at("lm_head"), R, D, c.vocab, logits);
  double sum = 0;
  std::int64_t count = 0;
  for (std::int64_t r = 0; r < R; ++r) {
    if (data.targets[r] < 0) continue;
    const double* z = &logits[static_cast<std::size_t>(r * c.vocab)];
    double m = z[0];
    for (int j = 1; j < c.vocab; ++j) m = std::max(m, z[j]);
    double se = 0;
    for (int j = 0; j < c.vocab; ++j) se += std::exp(z[j] - m);
    sum += m + std::log(se) - z[data.targets[r]];
    ++count;
  }
  return sum / static_cast<double>(count);
}

Params parameters_of(Model& model) {
  Params p;
  for (const ParameterInfo& t : model.parameter_table()) {
    const auto s = model.parameter(t.name);
    p[t.name] = test::Vec(s.begin(), s.end());
  }
  return p;
}

// A tiny model: D and F not powers of two, GQA, LM head chunks that do not divide the rows.
ModelConfig tiny_config(AttentionMode mode, int heads, int kv_heads) {
  ModelConfig c;
  c.vocab = 11;
  c.dim = 24;
  c.layers = 2;
  c.heads = heads;
  c.kv_heads = kv_heads;
  c.head_dim = 64;
  c.ffn_hidden = 40;
  c.ce_chunk = 100;
  c.seed = 2024;
  c.attention.mode = mode;
  return c;
}

TEST(Model, ParameterTableIsOneFlatBuffer) {
  Session session = Session::from_mpi(MPI_COMM_WORLD, Backend::kCpu);
  const ModelConfig c = tiny_config(AttentionMode::kRing, 2, 1);
  Model model(session, c, {192, 1});
  const std::int64_t D = c.dim, F = c.ffn_hidden, qd = 128, kd = 64;
  const std::int64_t per_layer = 2 * D + qd * D + 2 * kd * D + D * qd + 3 * F * D;
  EXPECT_EQ(model.num_parameters(), 2 * c.vocab * D + D + c.layers * per_layer);
  std::int64_t next = 0;
  bool decayed = true;
  for (const ParameterInfo& t : model.parameter_table()) {
    EXPECT_EQ(t.offset, next) << t.name;  // packed, in order
    EXPECT_TRUE(decayed || !t.decay) << t.name << ": decayed tensors come first";
    decayed = t.decay;
    EXPECT_EQ(t.decay, t.name.find("norm") == std::string::npos) << t.name;
    next += t.numel();
  }
  EXPECT_EQ(next, model.num_parameters());
  EXPECT_EQ(model.parameter("layers.1.wk").size(), static_cast<std::size_t>(kd * D));
  const auto head = std::find_if(model.parameter_table().begin(), model.parameter_table().end(),
                                 [](const ParameterInfo& t) { return t.name == "lm_head"; });
  EXPECT_EQ(model.gradient("lm_head").data(), model.gradients().data() + head->offset);
  test::expect_error([&] { model.parameter("layers.2.wq"); }, "no parameter named 'layers.2.wq'");
}

// Loss and every tensor's gradient (a few elements each) against the float64 reference. The
// finite differences are spread over the ranks and summed, so the test costs the same at any P.
TEST(Model, GradientsMatchFiniteDifferencesOfTheFloat64Reference) {
  Session session = Session::from_mpi(MPI_COMM_WORLD, Backend::kCpu);
  const ModelConfig c = tiny_config(AttentionMode::kRing, 2, 1);
  const int batch = 2;
  const std::int64_t n = 192;
  Model model(session, c, {n, batch});
  const Batch data = make_batch(c.vocab, batch, n, 77);
  const double loss = model.forward_backward(local_rows(data.tokens, batch, n, model.positions()),
                                             local_rows(data.targets, batch, n, model.positions()));
  Params ref = parameters_of(model);
  const double ref_loss = reference_loss(c, ref, batch, n, data);
  const double loss_err = std::abs(loss - ref_loss) / ref_loss;
  std::printf("    loss %.8f, reference %.8f, relative error %.2e\n", loss, ref_loss, loss_err);
  EXPECT_LE(loss_err, 1e-5);

  constexpr int kPerTensor = 6;
  constexpr double kStep = 1e-4;
  const int p = world_size();
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  std::mt19937 gen(5);
  const auto table = model.parameter_table();
  std::vector<std::int64_t> element;
  for (const ParameterInfo& t : table)
    for (int j = 0; j < kPerTensor; ++j) element.push_back(static_cast<std::int64_t>(gen() % t.numel()));
  std::vector<double> fd(element.size(), 0.0);
  for (std::size_t e = 0; e < element.size(); ++e) {
    if (static_cast<int>(e % p) != rank) continue;
    double& x = ref[table[e / kPerTensor].name][static_cast<std::size_t>(element[e])];
    const double x0 = x;
    x = x0 + kStep;
    const double up = reference_loss(c, ref, batch, n, data);
    x = x0 - kStep;
    const double down = reference_loss(c, ref, batch, n, data);
    x = x0;
    fd[e] = (up - down) / (2 * kStep);
  }
  MPI_Allreduce(MPI_IN_PLACE, fd.data(), static_cast<int>(fd.size()), MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
  for (std::size_t ti = 0; ti < table.size(); ++ti) {
    const auto g = model.gradient(table[ti].name);
    std::vector<float> got;
    test::Vec want;
    for (int j = 0; j < kPerTensor; ++j) {
      const std::size_t e = ti * kPerTensor + j;
      got.push_back(g[static_cast<std::size_t>(element[e])]);
      want.push_back(fd[e]);
    }
    test::expect_close("d " + table[ti].name, got, want, 1e-4);  // fp32 analytic: ~1e-6 measured
  }
}

// The loss trajectory under AdamW over P ranks equals a single-process run of the same model.
class Trajectory : public ::testing::TestWithParam<std::tuple<AttentionMode, int, int>> {};

std::vector<double> train(const Session& session, const ModelConfig& c, int batch, std::int64_t n, int steps) {
  Model model(session, c, {n, batch});
  AdamWConfig opt;
  opt.lr = 3e-3f;
  opt.max_norm = 0.5f;  // clipping is active at the start
  std::vector<double> losses;
  for (int s = 0; s < steps; ++s) {
    const Batch data = make_batch(c.vocab, batch, n, 100 + s);
    losses.push_back(model.forward_backward(local_rows(data.tokens, batch, n, model.positions()),
                                            local_rows(data.targets, batch, n, model.positions())));
    model.step(opt);
  }
  EXPECT_EQ(model.steps_taken(), steps);
  return losses;
}

TEST_P(Trajectory, EqualsTheSingleProcessRun) {
  const auto [mode, heads, kv_heads] = GetParam();
  const ModelConfig c = tiny_config(mode, heads, kv_heads);
  const int batch = 2;
  const std::int64_t n = 256;  // divisible by 2P (zigzag) at P = 4
  Session world = Session::from_mpi(MPI_COMM_WORLD, Backend::kCpu);
  Session self = Session::from_mpi(MPI_COMM_SELF, Backend::kCpu);
  const std::vector<double> sharded = train(world, c, batch, n, 5);
  const std::vector<double> single = train(self, c, batch, n, 5);
  for (std::size_t s = 0; s < single.size(); ++s) {
    const double err = std::abs(sharded[s] - single[s]) / single[s];
    std::printf("    step %zu: loss %.8f (P ranks) vs %.8f (1 rank), relative error %.2e\n", s + 1, sharded[s],
                single[s], err);
    EXPECT_LE(err, 1e-5) << "step " << s + 1;
  }
}

INSTANTIATE_TEST_SUITE_P(Modes, Trajectory,
                         ::testing::Values(std::make_tuple(AttentionMode::kRing, 4, 2),
                                           std::make_tuple(AttentionMode::kUlysses, 4, 4)),
                         [](const auto& info) { return std::string(name(std::get<0>(info.param))); });

TEST(Model, LearnsAMemorisableSequence) {
  Session session = Session::from_mpi(MPI_COMM_WORLD, Backend::kCpu);
  ModelConfig c = tiny_config(AttentionMode::kRing, 2, 1);
  const std::int64_t n = 128;
  Model model(session, c, {n, 1});
  const Batch data = make_batch(c.vocab, 1, n, 3);
  const auto tokens = local_rows(data.tokens, 1, n, model.positions());
  const auto targets = local_rows(data.targets, 1, n, model.positions());
  AdamWConfig opt;
  opt.lr = 1e-2f;
  opt.weight_decay = 0.0f;
  double first = 0, last = 0;
  for (int s = 0; s < 100; ++s) {
    last = model.forward_backward(tokens, targets);
    if (s == 0) first = last;
    model.step(opt);
  }
  std::printf("    loss %.4f -> %.4f after 100 steps\n", first, last);
  EXPECT_LT(last, 0.7 * first);
}

TEST(Model, NonFiniteValuesStopTheStepOnEveryRank) {
  Session session = Session::from_mpi(MPI_COMM_WORLD, Backend::kCpu);
  const ModelConfig c = tiny_config(AttentionMode::kRing, 2, 1);
  const std::int64_t n = 128;
  Model model(session, c, {n, 1});
  const Batch data = make_batch(c.vocab, 1, n, 9);
  const auto tokens = local_rows(data.tokens, 1, n, model.positions());
  const auto targets = local_rows(data.targets, 1, n, model.positions());
  AdamWConfig opt;
  model.forward_backward(tokens, targets);
  model.step(opt);
  test::expect_error([&] { model.step(opt); }, "step 2: no gradients");

  // A gradient: named, and the parameters stay as they were.
  model.forward_backward(tokens, targets);
  model.gradient("layers.1.w3")[5] = NAN;
  const std::vector<float> before(model.parameters().begin(), model.parameters().end());
  test::expect_error([&] { model.step(opt); }, "step 2: non-finite gradient in 'layers.1.w3'");
  EXPECT_TRUE(std::equal(before.begin(), before.end(), model.parameters().begin()));
  EXPECT_EQ(model.steps_taken(), 1);

  // A parameter: the loss is not finite.
  model.parameter("lm_head")[3] = INFINITY;
  test::expect_error(
      [&] {
        model.forward_backward(tokens, targets);
        model.step(opt);
      },
      "step 2: the loss is not finite");

  // Ids out of range on one rank only: every rank refuses the batch.
  auto bad = tokens;
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  if (rank == world_size() - 1) bad[0] = c.vocab;
  test::expect_error([&] { model.forward_backward(bad, targets); }, "1 token or target ids outside [0, 11)");
}

}  // namespace
}  // namespace ringcast
