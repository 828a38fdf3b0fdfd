// Float64 naive attention: materialises each row's scores, so keep shapes small.
#include "naive_attention.hpp"

#include <algorithm>
#include <cmath>
#include <limits>

namespace ringcast::test {

NaiveResult naive_attention(const NaiveShape& s, std::span<const double> q, std::span<const double> k,
                            std::span<const double> v, std::span<const double> d_o) {
  const std::int64_t n = s.seq;
  const int h = s.heads, hk = s.kv_heads, d = s.head_dim, group = h / hk;
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  NaiveResult r;
  r.o.assign(static_cast<std::size_t>(s.batch) * n * h * d, 0.0);
  r.lse.assign(static_cast<std::size_t>(s.batch) * h * n, -std::numeric_limits<double>::infinity());
  const bool grads = !d_o.empty();
  if (grads) {
    r.d_q.assign(q.size(), 0.0);
    r.d_k.assign(k.size(), 0.0);
    r.d_v.assign(v.size(), 0.0);
  }
  auto qi = [&](int b, std::int64_t t, int hh) { return ((static_cast<std::int64_t>(b) * n + t) * h + hh) * d; };
  auto ki = [&](int b, std::int64_t t, int g) { return ((static_cast<std::int64_t>(b) * n + t) * hk + g) * d; };
  std::vector<double> p(static_cast<std::size_t>(n));
  for (int b = 0; b < s.batch; ++b) {
    for (int hh = 0; hh < h; ++hh) {
      const int g = hh / group;
      for (std::int64_t t = 0; t < n; ++t) {
        const std::int64_t keys = s.causal ? t + 1 : n;
        double m = -std::numeric_limits<double>::infinity();
        for (std::int64_t j = 0; j < keys; ++j) {
          double dot = 0;
          for (int c = 0; c < d; ++c) dot += q[qi(b, t, hh) + c] * k[ki(b, j, g) + c];
          p[j] = dot * scale;
          m = std::max(m, p[j]);
        }
        double sum = 0;
        for (std::int64_t j = 0; j < keys; ++j) sum += std::exp(p[j] - m);
        const double lse = m + std::log(sum);
        r.lse[(static_cast<std::int64_t>(b) * h + hh) * n + t] = lse;
        for (std::int64_t j = 0; j < keys; ++j) {
          p[j] = std::exp(p[j] - lse);
          for (int c = 0; c < d; ++c) r.o[qi(b, t, hh) + c] += p[j] * v[ki(b, j, g) + c];
        }
        if (!grads) continue;
        double dd = 0;  // D = rowsum(dO * O)
        for (int c = 0; c < d; ++c) dd += d_o[qi(b, t, hh) + c] * r.o[qi(b, t, hh) + c];
        for (std::int64_t j = 0; j < keys; ++j) {
          double dp = 0;
          for (int c = 0; c < d; ++c) {
            dp += d_o[qi(b, t, hh) + c] * v[ki(b, j, g) + c];
            r.d_v[ki(b, j, g) + c] += p[j] * d_o[qi(b, t, hh) + c];
          }
          const double ds = p[j] * (dp - dd) * scale;
          for (int c = 0; c < d; ++c) {
            r.d_q[qi(b, t, hh) + c] += ds * k[ki(b, j, g) + c];
            r.d_k[ki(b, j, g) + c] += ds * q[qi(b, t, hh) + c];
          }
        }
      }
    }
  }
  return r;
}

std::vector<double> take_rows(std::span<const double> x, int batch, std::int64_t seq, int row_elems,
                              std::span<const std::int32_t> positions) {
  std::vector<double> out;
  out.reserve(static_cast<std::size_t>(batch) * positions.size() * row_elems);
  for (int b = 0; b < batch; ++b)
    for (auto t : positions) {
      const auto* row = x.data() + (static_cast<std::int64_t>(b) * seq + t) * row_elems;
      out.insert(out.end(), row, row + row_elems);
    }
  return out;
}

std::vector<double> take_lse(std::span<const double> lse, int batch, int heads, std::int64_t seq,
                             std::span<const std::int32_t> positions) {
  std::vector<double> out;
  out.reserve(static_cast<std::size_t>(batch) * heads * positions.size());
  for (int b = 0; b < batch; ++b)
    for (int hh = 0; hh < heads; ++hh)
      for (auto t : positions) out.push_back(lse[(static_cast<std::int64_t>(b) * heads + hh) * seq + t]);
  return out;
}

}  // namespace ringcast::test
