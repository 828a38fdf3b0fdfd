// CPU successive-halving pooling (pooling.hpp). A round is planned (sorted and paired) serially per
// sequence and merged with OpenMP threads over its output slots; every input token belongs to exactly
// one slot, so the backward scatters without races. The backward re-plans the rounds from the inputs.
#include "cpu/selection_cpu.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
#include <vector>

namespace ringcast::kernels::cpu {
namespace {

// Output slot o of a round merges round inputs first[o] and second[o] (second = -1: passes through).
struct RoundPlan {
  std::vector<std::int32_t> first;
  std::vector<std::int32_t> second;
  std::int64_t size() const { return static_cast<std::int64_t>(first.size()); }
};

RoundPlan plan_round(const float* s, std::int64_t m, bool sort_back) {
  std::vector<std::int32_t> order(m);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [s](std::int32_t i, std::int32_t j) { return s[i] > s[j]; });
  const std::int64_t half = m / 2;
  std::vector<std::pair<std::int32_t, std::int32_t>> slots;
  slots.reserve(half + 1);
  for (std::int64_t i = 0; i < half; ++i) slots.emplace_back(order[i], order[m - 1 - i]);
  if (m % 2) slots.emplace_back(order[half], -1);
  if (sort_back) std::sort(slots.begin(), slots.end());  // by the top member's position (all distinct)
  RoundPlan plan;
  for (const auto& [a, b] : slots) {
    plan.first.push_back(a);
    plan.second.push_back(b);
  }
  return plan;
}

// softmax(s_a ln β, s_b ln β) as two sigmoids, each accurate when the other is close to 1.
struct PairWeights {
  float a;
  float b;
};
PairWeights pair_weights(float s_a, float s_b, float log_beta) {
  const float x = (s_a - s_b) * log_beta;
  return {1.0f / (1.0f + std::exp(-x)), 1.0f / (1.0f + std::exp(x))};
}

void merge_round(const RoundPlan& plan, const float* e, const float* s, int dim, float log_beta, float* e_out,
                 float* s_out) {
#pragma omp parallel for schedule(static)
  for (std::int64_t o = 0; o < plan.size(); ++o) {
    const float* ea = e + std::int64_t{plan.first[o]} * dim;
    float* eo = e_out + o * dim;
    if (plan.second[o] < 0) {
      std::copy(ea, ea + dim, eo);
      s_out[o] = s[plan.first[o]];
      continue;
    }
    const float* eb = e + std::int64_t{plan.second[o]} * dim;
    const float sa = s[plan.first[o]];
    const float sb = s[plan.second[o]];
    const PairWeights w = pair_weights(sa, sb, log_beta);
#pragma omp simd
    for (int c = 0; c < dim; ++c) eo[c] = w.a * ea[c] + w.b * eb[c];
    s_out[o] = w.a * sa + w.b * sb;
  }
}

// Adds the gradients of a round's inputs (d_e, d_s) given those of its outputs.
void merge_round_backward(const RoundPlan& plan, const float* e, const float* s, int dim, float log_beta,
                          const float* d_e_out, const float* d_s_out, float* d_e, float* d_s) {
#pragma omp parallel for schedule(static)
  for (std::int64_t o = 0; o < plan.size(); ++o) {
    const std::int32_t ia = plan.first[o];
    const std::int32_t ib = plan.second[o];
    const float* deo = d_e_out + o * dim;
    float* dea = d_e + std::int64_t{ia} * dim;
    if (ib < 0) {
      for (int c = 0; c < dim; ++c) dea[c] += deo[c];
      d_s[ia] += d_s_out[o];
      continue;
    }
    const float* ea = e + std::int64_t{ia} * dim;
    const float* eb = e + std::int64_t{ib} * dim;
    float* deb = d_e + std::int64_t{ib} * dim;
    const PairWeights w = pair_weights(s[ia], s[ib], log_beta);
    float dwa = d_s_out[o] * s[ia];
    float dwb = d_s_out[o] * s[ib];
#pragma omp simd reduction(+ : dwa, dwb)
    for (int c = 0; c < dim; ++c) {
      dwa += deo[c] * ea[c];
      dwb += deo[c] * eb[c];
      dea[c] += w.a * deo[c];
      deb[c] += w.b * deo[c];
    }
    // w_a = σ(x), w_b = σ(-x), x = (s_a - s_b) ln β.
    const float dx = (dwa - dwb) * w.a * w.b;
    d_s[ia] += w.a * d_s_out[o] + dx * log_beta;
    d_s[ib] += w.b * d_s_out[o] - dx * log_beta;
  }
}

}  // namespace

void halving_pool(const HalvingParams& p) {
  const HalvingShape& sh = p.shape;
  const int dim = sh.dim;
  const float log_beta = std::log(sh.beta);
  const std::int64_t n_out = sh.output_len();
  std::vector<float> e_cur, s_cur, e_next, s_next;
  for (int b = 0; b < sh.batch; ++b) {
    const float* e = p.e + b * sh.seq * dim;
    const float* s = p.s + b * sh.seq;
    std::int64_t m = sh.seq;
    for (int r = 0; r < sh.rounds; ++r) {
      const RoundPlan plan = plan_round(s, m, sh.sort_back);
      const bool last = r + 1 == sh.rounds;
      if (!last) {
        e_next.resize(plan.size() * dim);
        s_next.resize(plan.size());
      }
      float* e_out = last ? p.e_out + b * n_out * dim : e_next.data();
      float* s_out = last ? p.s_out + b * n_out : s_next.data();
      merge_round(plan, e, s, dim, log_beta, e_out, s_out);
      if (!last) {
        std::swap(e_cur, e_next);
        std::swap(s_cur, s_next);
        e = e_cur.data();
        s = s_cur.data();
      }
      m = plan.size();
    }
  }
}

void halving_pool_backward(const HalvingBackwardParams& p) {
  const HalvingShape& sh = p.shape;
  const int dim = sh.dim;
  const float log_beta = std::log(sh.beta);
  const std::int64_t n_out = sh.output_len();
  // Per round: its plan, and its inputs for rounds after the first.
  std::vector<RoundPlan> plans(sh.rounds);
  std::vector<std::vector<float>> e_in(sh.rounds), s_in(sh.rounds);
  std::vector<float> d_e_cur, d_s_cur, d_e_next, d_s_next;
  for (int b = 0; b < sh.batch; ++b) {
    const float* e0 = p.e + b * sh.seq * dim;
    const float* s0 = p.s + b * sh.seq;
    auto round_e = [&](int r) { return r == 0 ? e0 : e_in[r].data(); };
    auto round_s = [&](int r) { return r == 0 ? s0 : s_in[r].data(); };
    std::int64_t m = sh.seq;
    for (int r = 0; r < sh.rounds; ++r) {
      plans[r] = plan_round(round_s(r), m, sh.sort_back);
      m = plans[r].size();
      if (r + 1 < sh.rounds) {
        e_in[r + 1].resize(m * dim);
        s_in[r + 1].resize(m);
        merge_round(plans[r], round_e(r), round_s(r), dim, log_beta, e_in[r + 1].data(), s_in[r + 1].data());
      }
    }
    const float* d_e_out = p.d_e_out + b * n_out * dim;
    const float* d_s_out = p.d_s_out + b * n_out;
    for (int r = sh.rounds - 1; r >= 0; --r) {
      float* d_e = p.d_e + b * sh.seq * dim;
      float* d_s = p.d_s + b * sh.seq;
      if (r > 0) {
        d_e_next.assign(e_in[r].size(), 0.0f);
        d_s_next.assign(s_in[r].size(), 0.0f);
        d_e = d_e_next.data();
        d_s = d_s_next.data();
      }
      merge_round_backward(plans[r], round_e(r), round_s(r), dim, log_beta, d_e_out, d_s_out, d_e, d_s);
      std::swap(d_e_cur, d_e_next);
      std::swap(d_s_cur, d_s_next);
      d_e_out = d_e_cur.data();
      d_s_out = d_s_cur.data();
    }
  }
}

}  // namespace ringcast::kernels::cpu
