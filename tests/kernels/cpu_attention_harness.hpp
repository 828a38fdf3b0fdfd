// Test harness for the CPU attention kernels: one problem's fp32 inputs (seeded, never zeros), its
// float64 copy for the oracle, and calls through the public dispatcher (validation and workspace
// queries included), so the tests exercise exactly what a caller gets.
#pragma once

#include "attention_reference.hpp"

#include <ringcast/kernels/attention.hpp>
#include <ringcast/kernels/block_table.hpp>

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <string>
#include <numeric>
#include <vector>

namespace ringcast::test {

struct CpuAttention {
  kernels::AttentionShape shape;
  kernels::HostBlockTable table;
  std::vector<std::int32_t> q_pos;
  float scale = 0.f;
  std::vector<float> q, k, v, d_o;
  std::vector<float> key_bias;  // [kv_heads, num_pages, page_size], read by kEntryKeyBias entries

  // Random q, k, v, d_o and key_bias for `shape`; scale 1 / sqrt(head_dim).
  CpuAttention(const kernels::AttentionShape& s, kernels::HostBlockTable t, std::vector<std::int32_t> positions,
               std::uint64_t seed)
      : shape(s), table(std::move(t)), q_pos(std::move(positions)),
        scale(1.f / std::sqrt(static_cast<float>(s.head_dim))) {
    const std::size_t nq = static_cast<std::size_t>(s.batch * s.seq_q * s.heads * s.head_dim);
    const std::size_t nkv = static_cast<std::size_t>(s.kv_heads * s.num_pages * s.page_size * s.head_dim);
    q = random_normal(nq, seed);
    k = random_normal(nkv, seed + 1);
    v = random_normal(nkv, seed + 2);
    d_o = random_normal(nq, seed + 3);
    key_bias = random_normal(nkv / static_cast<std::size_t>(s.head_dim), seed + 4);
  }

  std::size_t q_size() const { return q.size(); }
  std::size_t kv_size() const { return k.size(); }
  std::size_t lse_size() const { return static_cast<std::size_t>(shape.batch * shape.heads * shape.seq_q); }

  kernels::AttentionForwardParams forward_params(const kernels::HostBlockTable& t, float* o, float* lse) const {
    kernels::AttentionForwardParams p;
    p.shape = shape;
    p.softmax_scale = scale;
    p.q = q.data();
    p.k_pages = k.data();
    p.v_pages = v.data();
    p.q_pos = q_pos.data();
    p.key_bias = key_bias.data();
    p.table = t.view();
    p.o = o;
    p.lse = lse;
    return p;
  }

  struct Outputs {
    std::vector<float> o, lse;
  };
  // Forward over `t` (this problem's table by default: partial tables share the inputs).
  Outputs forward(const kernels::HostBlockTable* t = nullptr) const {
    Outputs out{std::vector<float>(q_size()), std::vector<float>(lse_size())};
    kernels::AttentionForwardParams p = forward_params(t ? *t : table, out.o.data(), out.lse.data());
    const kernels::ExecContext ctx{};
    std::vector<std::byte> ws(kernels::attention_forward_workspace_bytes(shape, ctx));
    p.workspace = ws.data();
    p.workspace_bytes = ws.size();
    kernels::attention_forward(p, ctx);
    return out;
  }

  struct Grads {
    std::vector<float> d_q, d_k, d_v;
  };
  // Backward over `t` given the (possibly merged, global) O and LSE, into `g` (overwritten unless
  // accumulate).
  void backward(const Outputs& fwd, Grads& g, bool accumulate, const kernels::HostBlockTable* t = nullptr) const {
    const kernels::HostBlockTable& tab = t ? *t : table;
    const kernels::HostTransposedTable tt = kernels::transpose(tab, shape);
    g.d_q.resize(q_size());
    g.d_k.resize(kv_size());
    g.d_v.resize(kv_size());
    kernels::AttentionBackwardParams p;
    // The backward only reads o and lse; the forward's parameter struct holds them as outputs.
    p.fwd = forward_params(tab, const_cast<float*>(fwd.o.data()), const_cast<float*>(fwd.lse.data()));
    p.d_o = d_o.data();
    p.transposed = tt.view();
    p.d_q = g.d_q.data();
    p.d_k_pages = g.d_k.data();
    p.d_v_pages = g.d_v.data();
    p.accumulate = accumulate;
    const kernels::ExecContext ctx{};
    std::vector<std::byte> ws(kernels::attention_backward_workspace_bytes(shape, ctx));
    p.workspace = ws.data();
    p.workspace_bytes = ws.size();
    kernels::attention_backward(p, ctx);
  }

  // The same problem in float64 for the oracle (inputs are already fp32-rounded).
  struct F64 {
    std::vector<double> q, k, v, d_o, key_bias;
  };
  F64 f64() const { return {to_f64(q), to_f64(k), to_f64(v), to_f64(d_o), to_f64(key_bias)}; }
  ReferenceProblem reference(const F64& x, const kernels::HostBlockTable* t = nullptr) const {
    return ReferenceProblem{shape, static_cast<double>(scale), t ? t : &table, q_pos, x.q, x.k, x.v, x.key_bias};
  }
};

// Positions 0, 1, ..., n - 1 offset by `first`.
inline std::vector<std::int32_t> iota_positions(std::int64_t n, std::int32_t first = 0) {
  std::vector<std::int32_t> pos(static_cast<std::size_t>(n));
  std::iota(pos.begin(), pos.end(), first);
  return pos;
}

// Tolerance of the kernel tests, ||x - ref|| / ||ref|| <= 1e-5 (DESIGN.md §7; attention_cpu_test.cpp
// derives it).
inline constexpr double kTolerance = 1e-5;

inline std::vector<double> random_like(const std::vector<double>& ref, std::uint64_t seed) {
  double ss = 0.0;
  for (double x : ref) ss += x * x;
  const double rms = ref.empty() ? 1.0 : std::sqrt(ss / static_cast<double>(ref.size()));
  return to_f64(random_normal(ref.size(), seed, rms > 0.0 ? rms : 1.0));
}

// x - base, elementwise in double (exact for fp32 inputs of similar magnitude).
inline std::vector<double> minus(const std::vector<float>& x, const std::vector<double>& base) {
  std::vector<double> d(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) d[i] = double{x[i]} - base[i];
  return d;
}

inline std::vector<float> to_f32(const std::vector<double>& x) { return {x.begin(), x.end()}; }

// Forward (O, LSE) and backward (dQ, dK, dV, overwritten and accumulated) against the oracle.
inline void expect_matches_reference(const CpuAttention& a, const std::string& what) {
  const CpuAttention::F64 x = a.f64();
  const ReferenceProblem problem = a.reference(x);
  const ReferenceOutputs ref = reference_attention_forward(problem);
  const ReferenceGradients ref_g = reference_attention_backward(problem, x.d_o);

  const CpuAttention::Outputs out = a.forward();
  CpuAttention::Grads g;
  a.backward(out, g, /*accumulate=*/false);

  // accumulate = true adds to what is there: start from random gradients of the reference's size.
  const std::vector<double> init_q = random_like(ref_g.d_q, 11), init_k = random_like(ref_g.d_k, 12),
                            init_v = random_like(ref_g.d_v, 13);
  CpuAttention::Grads acc{to_f32(init_q), to_f32(init_k), to_f32(init_v)};
  a.backward(out, acc, /*accumulate=*/true);

  const double e_o = relative_error(out.o, ref.o), e_lse = relative_error(out.lse, ref.lse);
  const double e_q = relative_error(g.d_q, ref_g.d_q), e_k = relative_error(g.d_k, ref_g.d_k),
               e_v = relative_error(g.d_v, ref_g.d_v);
  const double a_q = relative_error(minus(acc.d_q, to_f64(to_f32(init_q))), ref_g.d_q);
  const double a_k = relative_error(minus(acc.d_k, to_f64(to_f32(init_k))), ref_g.d_k);
  const double a_v = relative_error(minus(acc.d_v, to_f64(to_f32(init_v))), ref_g.d_v);
  std::printf("[ %-22s ] relative error O %.1e LSE %.1e dQ %.1e dK %.1e dV %.1e | accumulate dQ %.1e dK %.1e "
              "dV %.1e (tolerance %.0e)\n",
              what.c_str(), e_o, e_lse, e_q, e_k, e_v, a_q, a_k, a_v, kTolerance);
  EXPECT_LE(e_o, kTolerance) << what << ": O";
  EXPECT_LE(e_lse, kTolerance) << what << ": LSE";
  EXPECT_LE(e_q, kTolerance) << what << ": dQ";
  EXPECT_LE(e_k, kTolerance) << what << ": dK";
  EXPECT_LE(e_v, kTolerance) << what << ": dV";
  EXPECT_LE(a_q, kTolerance) << what << ": dQ (accumulate)";
  EXPECT_LE(a_k, kTolerance) << what << ": dK (accumulate)";
  EXPECT_LE(a_v, kTolerance) << what << ": dV (accumulate)";
}

}  // namespace ringcast::test
