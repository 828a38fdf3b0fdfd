// The float64 whole-sequence reference model (reference_model.hpp).
#include "reference_model.hpp"

#include "naive_attention.hpp"

#include <algorithm>
#include <cmath>

namespace ringcast::test {

void ref_linear(const Vec& x, const Vec& w, std::int64_t rows, int in, int out, Vec& y) {
  y.assign(static_cast<std::size_t>(rows * out), 0.0);
  for (std::int64_t r = 0; r < rows; ++r)
    for (int o = 0; o < out; ++o) {
      double s = 0;
      for (int i = 0; i < in; ++i) s += x[r * in + i] * w[static_cast<std::size_t>(o) * in + i];
      y[r * out + o] = s;
    }
}

Vec ref_rms(const Vec& x, const Vec& g, std::int64_t rows, int dim, double eps) {
  Vec y(x.size());
  for (std::int64_t r = 0; r < rows; ++r) {
    double ss = 0;
    for (int i = 0; i < dim; ++i) ss += x[r * dim + i] * x[r * dim + i];
    const double inv = 1.0 / std::sqrt(ss / dim + eps);
    for (int i = 0; i < dim; ++i) y[r * dim + i] = x[r * dim + i] * inv * g[i];
  }
  return y;
}

void ref_rope(Vec& x, int batch, std::int64_t n, int heads, int d, double theta,
              const std::vector<std::int32_t>& positions) {
  const int half = d / 2;
  for (int bi = 0; bi < batch; ++bi)
    for (std::int64_t t = 0; t < n; ++t) {
      const double pos = positions.empty() ? static_cast<double>(t) : positions[static_cast<std::size_t>(t)];
      for (int h = 0; h < heads; ++h) {
        double* row = &x[static_cast<std::size_t>(((bi * n + t) * heads + h) * d)];
        for (int i = 0; i < half; ++i) {
          const double ang = pos * std::pow(theta, -2.0 * i / d);
          const double c = std::cos(ang), s = std::sin(ang), a = row[i], b = row[i + half];
          row[i] = a * c - b * s;
          row[i + half] = b * c + a * s;
        }
      }
    }
}

namespace {

// Mean cross-entropy of logits [rows, classes] over rows with label >= 0.
double mean_cross_entropy(const Vec& logits, std::int64_t rows, int classes, const std::vector<std::int32_t>& labels) {
  double sum = 0;
  std::int64_t count = 0;
  for (std::int64_t r = 0; r < rows; ++r) {
    if (labels[static_cast<std::size_t>(r)] < 0) continue;
    const double* z = &logits[static_cast<std::size_t>(r * classes)];
    const double m = *std::max_element(z, z + classes);
    double se = 0;
    for (int j = 0; j < classes; ++j) se += std::exp(z[j] - m);
    sum += m + std::log(se) - z[labels[static_cast<std::size_t>(r)]];
    ++count;
  }
  return sum / static_cast<double>(count);
}

}  // namespace

double reference_loss(const ModelConfig& c, const Params& p, int batch, std::int64_t n,
                      const std::vector<std::int32_t>& tokens, const std::vector<std::int32_t>& targets) {
  const bool encoder = c.kind == ModelKind::kEncoder;
  const std::int64_t R = batch * n;
  const int D = c.dim, F = c.ffn_hidden, qd = c.heads * c.head_dim, kd = c.kv_heads * c.head_dim;
  Vec x(static_cast<std::size_t>(R * D));
  const Vec& emb = p.at("embedding");
  for (std::int64_t r = 0; r < R; ++r)
    for (int i = 0; i < D; ++i) x[r * D + i] = emb[static_cast<std::size_t>(tokens[r]) * D + i];
  Vec q, k, v, proj, a, b;
  for (int l = 0; l < c.layers; ++l) {
    const std::string pre = "layers." + std::to_string(l) + ".";
    const Vec xn = ref_rms(x, p.at(pre + "attn_norm"), R, D, c.norm_eps);
    ref_linear(xn, p.at(pre + "wq"), R, D, qd, q);
    ref_linear(xn, p.at(pre + "wk"), R, D, kd, k);
    ref_linear(xn, p.at(pre + "wv"), R, D, kd, v);
    ref_rope(q, batch, n, c.heads, c.head_dim, c.rope_theta);
    ref_rope(k, batch, n, c.kv_heads, c.head_dim, c.rope_theta);
    const NaiveShape ns{batch, n, c.heads, c.kv_heads, c.head_dim, !encoder};
    const NaiveResult att = naive_attention(ns, q, k, v);
    ref_linear(att.o, p.at(pre + "wo"), R, qd, D, proj);
    for (std::size_t i = 0; i < x.size(); ++i) x[i] += proj[i];
    const Vec xn2 = ref_rms(x, p.at(pre + "ffn_norm"), R, D, c.norm_eps);
    ref_linear(xn2, p.at(pre + "w1"), R, D, F, a);
    ref_linear(xn2, p.at(pre + "w3"), R, D, F, b);
    for (std::size_t i = 0; i < a.size(); ++i) a[i] = a[i] / (1.0 + std::exp(-a[i])) * b[i];
    ref_linear(a, p.at(pre + "w2"), R, F, D, proj);
    for (std::size_t i = 0; i < x.size(); ++i) x[i] += proj[i];
  }
  const Vec hn = ref_rms(x, p.at("final_norm"), R, D, c.norm_eps);
  Vec logits;
  if (!encoder) {
    ref_linear(hn, p.at("lm_head"), R, D, c.vocab, logits);
    return mean_cross_entropy(logits, R, c.vocab, targets);
  }
  Vec pooled(static_cast<std::size_t>(batch * D), 0.0);
  for (int bi = 0; bi < batch; ++bi)
    for (std::int64_t t = 0; t < n; ++t)
      for (int i = 0; i < D; ++i) pooled[bi * D + i] += hn[(bi * n + t) * D + i] / static_cast<double>(n);
  ref_linear(pooled, p.at("classifier"), batch, D, c.num_classes, logits);
  const Vec& bias = p.at("classifier_bias");
  for (int bi = 0; bi < batch; ++bi)
    for (int j = 0; j < c.num_classes; ++j) logits[bi * c.num_classes + j] += bias[j];
  return mean_cross_entropy(logits, batch, c.num_classes, targets);
}

Params parameters_of(Model& model) {
  Params p;
  for (const ParameterInfo& t : model.parameter_table()) {
    const auto s = model.parameter(t.name);
    p[t.name] = Vec(s.begin(), s.end());
  }
  return p;
}

}  // namespace ringcast::test
