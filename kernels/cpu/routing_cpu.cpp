// CPU CoLT5 routing (routing.hpp). The soft top-k runs all sequences in lockstep so that each
// iteration makes one call of the cross-rank reduction with one float per sequence. Sums of exp
// terms accumulate in double; everything else is fp32.
#include "cpu/selection_cpu.hpp"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <vector>

namespace ringcast::kernels::cpu {
namespace {

void all_reduce(const SliceAllReduce& r, std::vector<float>& values, ReduceOp op) {
  if (r.fn) r.fn(values.data(), static_cast<int>(values.size()), op, r.user);
}

float relu(float x) { return x > 0.0f ? x : 0.0f; }

}  // namespace

void router_scores(const RouterScoreParams& p) {
  const std::int64_t rows = p.batch * p.seq;
#pragma omp parallel for schedule(static)
  for (std::int64_t i = 0; i < rows; ++i) {
    const float* x = p.x + i * p.dim;
    float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
    for (int c = 0; c < p.dim; ++c) dot += x[c] * p.u[c];
    p.s[i] = dot;
  }
}

void router_scores_backward(const RouterScoreBackwardParams& p) {
  const std::int64_t rows = p.batch * p.seq;
#pragma omp parallel for schedule(static)
  for (std::int64_t i = 0; i < rows; ++i) {
    float* dx = p.d_x + i * p.dim;
#pragma omp simd
    for (int c = 0; c < p.dim; ++c) dx[c] += p.d_s[i] * p.u[c];
  }
  // d u = Xᵀ d s: a reduction over every row, which BLAS does well.
  cblas_sgemv(CblasRowMajor, CblasTrans, static_cast<int>(rows), p.dim, 1.0f, p.x, p.dim, p.d_s, 1, 1.0f, p.d_u, 1);
}

void soft_topk(const SoftTopkParams& p) {
  const std::int64_t n = p.seq;
  const int T = p.iterations;
  const float eps = p.epsilon;
  const float log_k = std::log(static_cast<float>(p.k));
  std::vector<float> b_state(p.batch * n);
  std::vector<float> s_max(p.batch);
  std::vector<float> sums(p.batch);
  std::vector<float> a(p.batch, 0.0f);
  for (int b = 0; b < p.batch; ++b) {
    const float* s = p.s + b * n;
    s_max[b] = *std::max_element(s, s + n);
    std::transform(s, s + n, &b_state[b * n], [](float x) { return -x; });
  }
  all_reduce(p.reduce, s_max, ReduceOp::kMax);

  for (int t = 0; t < T; ++t) {
    // max_j (s_j + b_j)/ε is known without a pass: 0 first, then min(max s, -a_{t-1})/ε.
    for (int b = 0; b < p.batch; ++b) {
      const float* s = p.s + b * n;
      const float* bs = &b_state[b * n];
      const float shift = t == 0 ? 0.0f : std::min(s_max[b], -a[b]) / eps;
      double sum = 0.0;
#pragma omp parallel for reduction(+ : sum) schedule(static)
      for (std::int64_t j = 0; j < n; ++j) sum += std::exp((s[j] + bs[j]) / eps - shift);
      sums[b] = static_cast<float>(sum);
    }
    all_reduce(p.reduce, sums, ReduceOp::kSum);
    for (int b = 0; b < p.batch; ++b) {
      const float shift = t == 0 ? 0.0f : std::min(s_max[b], -a[b]) / eps;
      a[b] = eps * (log_k - (shift + std::log(sums[b])));
      p.a_history[b * T + t] = a[b];
      const float* s = p.s + b * n;
      float* bs = &b_state[b * n];
      const float ab = a[b];
#pragma omp parallel for schedule(static)
      for (std::int64_t j = 0; j < n; ++j) bs[j] = -relu(s[j] + ab);
    }
  }
  for (int b = 0; b < p.batch; ++b) {
    const float* s = p.s + b * n;
    const float* bs = &b_state[b * n];
    float* st = p.s_tilde + b * n;
    const float ab = a[b];
#pragma omp parallel for schedule(static)
    for (std::int64_t j = 0; j < n; ++j) st[j] = std::exp((s[j] + ab + bs[j]) / eps);
  }
  if (!p.top_indices) return;
  std::vector<std::int32_t> order(n);
  for (int b = 0; b < p.batch; ++b) {
    const float* s = p.s + b * n;
    std::iota(order.begin(), order.end(), 0);
    std::partial_sort(order.begin(), order.begin() + p.k, order.end(),
                      [s](std::int32_t i, std::int32_t j) { return s[i] > s[j] || (s[i] == s[j] && i < j); });
    std::sort(order.begin(), order.begin() + p.k);
    std::copy(order.begin(), order.begin() + p.k, p.top_indices + std::int64_t{b} * p.k);
  }
}

// Reverse mode through the unrolled iterations. With b^t = -relu(s + a^t) and
// a^t = ε(log k - LSE((s + b^{t-1})/ε)): the adjoint of b^t reaches s and a^t through the relu; the
// adjoint of a^t (a sum over the sequence) reaches s and b^{t-1} through the softmax
// p^t = exp((s + b^{t-1})/ε - LSE^t), LSE^t = log k - a^t/ε. Iteration 1 sees b^0 = -s, so its LSE
// argument is 0 whatever s is: a^1 is constant and the recursion stops at b^1.
void soft_topk_backward(const SoftTopkBackwardParams& p) {
  const std::int64_t n = p.seq;
  const int T = p.iterations;
  const float eps = p.epsilon;
  const float log_k = std::log(static_cast<float>(p.k));
  std::vector<float> db(p.batch * n);
  std::vector<float> ds(p.batch * n);
  std::vector<float> sums(p.batch);
  auto a_at = [&](int b, int t) { return p.a_history[b * T + t - 1]; };  // a^t, t = 1..T

  for (int b = 0; b < p.batch; ++b) {
    const float* s = p.s + b * n;
    const float* dst = p.d_s_tilde + b * n;
    const float aT = a_at(b, T);
    double sum = 0.0;
#pragma omp parallel for reduction(+ : sum) schedule(static)
    for (std::int64_t j = 0; j < n; ++j) {
      const float st = std::exp((s[j] + aT - relu(s[j] + aT)) / eps);
      const float du = dst[j] * st / eps;  // adjoint of s_j + a^T + b^T_j
      ds[b * n + j] = du;
      db[b * n + j] = du;
      sum += du;
    }
    sums[b] = static_cast<float>(sum);  // the output's share of the adjoint of a^T
  }
  for (int t = T; t >= 1; --t) {
    for (int b = 0; b < p.batch; ++b) {
      const float* s = p.s + b * n;
      const float at = a_at(b, t);
      double sum = 0.0;
#pragma omp parallel for reduction(+ : sum) schedule(static)
      for (std::int64_t j = 0; j < n; ++j) {
        if (s[j] + at > 0.0f) {
          ds[b * n + j] -= db[b * n + j];
          sum -= db[b * n + j];
        }
      }
      sums[b] = (t == T ? sums[b] : 0.0f) + static_cast<float>(sum);
    }
    if (t == 1) break;
    all_reduce(p.reduce, sums, ReduceOp::kSum);
    for (int b = 0; b < p.batch; ++b) {
      const float* s = p.s + b * n;
      const float da = sums[b];
      const float prev = a_at(b, t - 1);
      const float lse = log_k - a_at(b, t) / eps;
#pragma omp parallel for schedule(static)
      for (std::int64_t j = 0; j < n; ++j) {
        const float pj = std::exp((s[j] - relu(s[j] + prev)) / eps - lse);
        ds[b * n + j] -= da * pj;
        db[b * n + j] = -da * pj;
      }
    }
  }
  std::transform(ds.begin(), ds.end(), p.d_s, p.d_s, [](float g, float acc) { return acc + g; });
}

}  // namespace ringcast::kernels::cpu
