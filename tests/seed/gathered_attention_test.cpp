// GatheredAttention (runtime/src/gathered_attention.hpp) on 1, 2 or 4 ranks against a float64
// reference: every rank draws the same seeded queries and keys of all ranks for every sequence of a
// call (counts uneven per rank and sequence, some zero), attends its own queries, and checks its O
// and LSE, its dQ, and the dK, dV and d_bias of its own keys summed over every rank's queries. Two
// calls are in flight at once (two kept regions, one workspace), as two layers of a stack. Edge
// cases: a sequence without keys, no keys anywhere, nothing at all, all keys on one rank; bad
// arguments on one rank throw the same Error on every rank.
#include "../../runtime/src/gathered_attention.hpp"

#include "test_util.hpp"

#include <ringcast/memory.hpp>
#include <ringcast/session.hpp>

#include <gtest/gtest.h>
#include <mpi.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <span>
#include <string>
#include <vector>

namespace ringcast {
namespace {

using model::GatheredAttention;
using model::GatheredAttentionShape;
using test::Vec;

struct World {
  Session session = Session::from_mpi(MPI_COMM_WORLD, Backend::kCpu);
  int rank = session.rank();
  int ranks = session.size();
};

// Counts [rank][sequence] are given for 4 ranks; a run on P ranks uses the first P.
struct Case {
  int heads, kv_heads, head_dim;
  std::vector<std::vector<std::int64_t>> n_q, n_k;
  bool bias;
  std::uint32_t seed;
  int sequences() const { return static_cast<int>(n_q[0].size()); }
};

struct Reference {
  Vec o, lse, d_q, d_k, d_v, d_bias;
};

// One sequence: queries [Q, h, d] over keys [K, h_kv, d] (all ranks', in rank order), logits
// scale q.k + bias_j.
Reference reference(const Case& c, std::int64_t nq, std::int64_t nk, const Vec& q, const Vec& k, const Vec& v,
                    const Vec& bias, const Vec& d_o) {
  const int h = c.heads, hkv = c.kv_heads, d = c.head_dim, group = h / hkv;
  const double scale = 1.0 / std::sqrt(static_cast<double>(d));
  Reference r;
  r.o.assign(static_cast<std::size_t>(nq * h * d), 0.0);
  r.lse.assign(static_cast<std::size_t>(h * nq), -std::numeric_limits<double>::infinity());
  r.d_q.assign(r.o.size(), 0.0);
  r.d_k.assign(static_cast<std::size_t>(nk * hkv * d), 0.0);
  r.d_v.assign(r.d_k.size(), 0.0);
  r.d_bias.assign(static_cast<std::size_t>(nk), 0.0);
  if (nk == 0) return r;
  Vec s(static_cast<std::size_t>(nk)), p(s.size());
  for (std::int64_t i = 0; i < nq; ++i)
    for (int hh = 0; hh < h; ++hh) {
      const int g = hh / group;
      const double* qi = &q[(i * h + hh) * d];
      const double* doi = &d_o[(i * h + hh) * d];
      double m = -std::numeric_limits<double>::infinity();
      for (std::int64_t j = 0; j < nk; ++j) {
        double dot = 0.0;
        for (int c2 = 0; c2 < d; ++c2) dot += qi[c2] * k[(j * hkv + g) * d + c2];
        s[j] = scale * dot + (bias.empty() ? 0.0 : bias[j]);
        m = std::max(m, s[j]);
      }
      double sum = 0.0;
      for (std::int64_t j = 0; j < nk; ++j) sum += std::exp(s[j] - m);
      const double lse = m + std::log(sum);
      r.lse[hh * nq + i] = lse;
      double* oi = &r.o[(i * h + hh) * d];
      for (std::int64_t j = 0; j < nk; ++j) {
        p[j] = std::exp(s[j] - lse);
        for (int c2 = 0; c2 < d; ++c2) oi[c2] += p[j] * v[(j * hkv + g) * d + c2];
      }
      double delta = 0.0;
      for (int c2 = 0; c2 < d; ++c2) delta += doi[c2] * oi[c2];
      for (std::int64_t j = 0; j < nk; ++j) {
        double dp = 0.0;
        for (int c2 = 0; c2 < d; ++c2) dp += doi[c2] * v[(j * hkv + g) * d + c2];
        const double ds = p[j] * (dp - delta);
        r.d_bias[j] += ds;
        for (int c2 = 0; c2 < d; ++c2) {
          r.d_q[(i * h + hh) * d + c2] += scale * ds * k[(j * hkv + g) * d + c2];
          r.d_k[(j * hkv + g) * d + c2] += scale * ds * qi[c2];
          r.d_v[(j * hkv + g) * d + c2] += p[j] * doi[c2];
        }
      }
    }
  return r;
}

// One call: for each sequence the global inputs and the reference; this rank's slices of all
// sequences, concatenated as the call takes them; outputs and pre-filled gradients (the backward adds).
struct Call {
  std::vector<std::int64_t> n_q, n_k;  // this rank's, per sequence
  std::vector<float> q, k, v, bias, d_o;
  std::vector<float> o, lse;
  std::vector<float> d_q, d_k, d_v, d_bias;
  std::vector<float> d_q0, d_k0, d_v0, d_bias0;
  Vec o_ref, lse_ref, d_q_ref, d_k_ref, d_v_ref, d_bias_ref;  // this rank's share of the references
};

template <typename T>
void append(std::vector<T>& out, const std::vector<T>& x, std::int64_t first, std::int64_t count, std::int64_t width) {
  out.insert(out.end(), x.begin() + first * width, x.begin() + (first + count) * width);
}

Call make_call(const Case& c, const World& w, std::uint32_t seed) {
  Call call;
  const std::int64_t qw = std::int64_t{c.heads} * c.head_dim, kw = std::int64_t{c.kv_heads} * c.head_dim;
  std::vector<Vec> lse_by_head;  // [h][this rank's queries, sequence after sequence]
  for (int s = 0; s < c.sequences(); ++s) {
    std::int64_t q0 = 0, k0 = 0, total_q = 0, total_k = 0;
    for (int r = 0; r < w.ranks; ++r) {
      if (r < w.rank) {
        q0 += c.n_q[r][s];
        k0 += c.n_k[r][s];
      }
      total_q += c.n_q[r][s];
      total_k += c.n_k[r][s];
    }
    const std::int64_t nq = c.n_q[w.rank][s], nk = c.n_k[w.rank][s];
    call.n_q.push_back(nq);
    call.n_k.push_back(nk);
    const std::uint32_t sd = seed + 10 * static_cast<std::uint32_t>(s);
    const auto q = test::random_floats(static_cast<std::size_t>(total_q * qw), sd);
    const auto k = test::random_floats(static_cast<std::size_t>(total_k * kw), sd + 1);
    const auto v = test::random_floats(static_cast<std::size_t>(total_k * kw), sd + 2);
    const auto bias = test::random_floats(static_cast<std::size_t>(total_k), sd + 3, 2.0f);
    const auto d_o = test::random_floats(static_cast<std::size_t>(total_q * qw), sd + 4);
    const Reference ref = reference(c, total_q, total_k, test::to_double(q), test::to_double(k), test::to_double(v),
                                    c.bias ? test::to_double(bias) : Vec{}, test::to_double(d_o));
    append(call.q, q, q0, nq, qw);
    append(call.k, k, k0, nk, kw);
    append(call.v, v, k0, nk, kw);
    if (c.bias) append(call.bias, bias, k0, nk, 1);
    append(call.d_o, d_o, q0, nq, qw);
    append(call.o_ref, ref.o, q0, nq, qw);
    lse_by_head.resize(static_cast<std::size_t>(c.heads));
    for (int h = 0; h < c.heads; ++h)
      append(lse_by_head[static_cast<std::size_t>(h)], ref.lse, h * total_q + q0, nq, 1);
    append(call.d_q_ref, ref.d_q, q0, nq, qw);
    append(call.d_k_ref, ref.d_k, k0, nk, kw);
    append(call.d_v_ref, ref.d_v, k0, nk, kw);
    append(call.d_bias_ref, ref.d_bias, k0, nk, 1);
  }
  for (const Vec& row : lse_by_head) call.lse_ref.insert(call.lse_ref.end(), row.begin(), row.end());
  call.o.assign(call.q.size(), 0.0f);
  call.lse.assign(call.lse_ref.size(), 0.0f);
  call.d_q = call.d_q0 = test::random_floats(call.q.size(), seed + 5);
  call.d_k = call.d_k0 = test::random_floats(call.k.size(), seed + 6);
  call.d_v = call.d_v0 = test::random_floats(call.v.size(), seed + 7);
  call.d_bias = call.d_bias0 = test::random_floats(call.d_bias_ref.size(), seed + 8);
  return call;
}

void check(const Case& c, const Call& call, const std::string& name) {
  test::expect_close(name + " O", call.o, call.o_ref, 2e-6);
  // Queries of a sequence without keys have LSE = -inf: compare those exactly, the rest by error.
  std::vector<float> lse;
  Vec lse_ref;
  for (std::size_t i = 0; i < call.lse.size(); ++i) {
    if (std::isinf(call.lse_ref[i])) {
      EXPECT_EQ(call.lse[i], -std::numeric_limits<float>::infinity()) << name << ": LSE of a query with no key";
    } else {
      lse.push_back(call.lse[i]);
      lse_ref.push_back(call.lse_ref[i]);
    }
  }
  test::expect_close(name + " LSE", lse, lse_ref, 2e-6);
  test::expect_close(name + " dQ", test::added(call.d_q, call.d_q0), call.d_q_ref, 2e-5);
  test::expect_close(name + " dK (own keys, all queries)", test::added(call.d_k, call.d_k0), call.d_k_ref, 2e-5);
  test::expect_close(name + " dV (own keys, all queries)", test::added(call.d_v, call.d_v0), call.d_v_ref, 2e-5);
  if (c.bias) {
    test::expect_close(name + " d bias (own keys, all queries)", test::added(call.d_bias, call.d_bias0),
                       call.d_bias_ref, 2e-5);
  }
}

std::int64_t total(const std::vector<std::int64_t>& x) { return std::accumulate(x.begin(), x.end(), std::int64_t{0}); }

void run_case(const Case& c) {
  World w;
  GatheredAttentionShape shape;
  shape.heads = c.heads;
  shape.kv_heads = c.kv_heads;
  shape.head_dim = c.head_dim;
  shape.sequences = c.sequences();
  shape.max_queries = total(c.n_q[w.rank]) + 3;  // room to spare is fine
  shape.max_keys = total(c.n_k[w.rank]);
  for (int r = 0; r < w.ranks; ++r) shape.max_total_keys += total(c.n_k[r]);
  GatheredAttention attention(w.session, shape);
  ASSERT_EQ(attention.kept_bytes() % 64, 0u);
  // Two calls in flight, as two layers of a stack use it: two kept regions, one workspace.
  DeviceBuffer kept(2 * attention.kept_bytes(), w.session.device());
  DeviceBuffer workspace(attention.workspace_bytes(), w.session.device());
  Call calls[2] = {make_call(c, w, c.seed), make_call(c, w, c.seed + 100)};
  auto forward_args = [&](int i) {
    Call& s = calls[i];
    model::GatheredForwardArgs a;
    a.n_q = total(s.n_q);
    a.n_k = total(s.n_k);
    a.q_counts = s.n_q;
    a.k_counts = s.n_k;
    a.q = s.q.data();
    a.k = s.k.data();
    a.v = s.v.data();
    a.key_bias = c.bias ? s.bias.data() : nullptr;
    a.o = s.o.data();
    a.lse = s.lse.data();
    a.kept = static_cast<std::byte*>(kept.data()) + i * attention.kept_bytes();
    a.workspace = workspace.data();
    return a;
  };
  for (int i = 0; i < 2; ++i) attention.forward(forward_args(i));
  for (int i = 1; i >= 0; --i) {
    Call& s = calls[i];
    attention.backward({.fwd = forward_args(i),
                        .d_o = s.d_o.data(),
                        .d_q = s.d_q.data(),
                        .d_k = s.d_k.data(),
                        .d_v = s.d_v.data(),
                        .d_key_bias = c.bias ? s.d_bias.data() : nullptr});
  }
  check(c, calls[0], "call 0");
  check(c, calls[1], "call 1");
}

// Counts per rank (rows) and sequence (columns). Multi-page keys, query runs over one tile whose
// tiles straddle sequences, empty ranks and sequences, GQA, a per-key bias.
TEST(GatheredAttention, UnevenCountsWithBiasGqa) {
  run_case({4, 2, 16, {{37, 5}, {0, 60}, {150, 1}, {5, 0}}, {{70, 3}, {0, 0}, {9, 66}, {130, 2}}, true, 11});
}
TEST(GatheredAttention, UnevenCountsNoBias) {
  run_case({3,
            3,
            8,
            {{130, 0, 7}, {20, 3, 0}, {1, 1, 1}, {0, 40, 2}},
            {{5, 0, 64}, {64, 1, 0}, {0, 0, 3}, {11, 2, 0}},
            false,
            23});
}
TEST(GatheredAttention, OneSequenceAllKeysOnRankZero) {
  run_case({4, 1, 12, {{9}, {10}, {11}, {12}}, {{200}, {0}, {0}, {0}}, true, 31});
}
TEST(GatheredAttention, ASequenceWithoutKeys) {
  run_case({2, 1, 8, {{6, 4}, {3, 0}, {0, 2}, {9, 9}}, {{0, 5}, {0, 0}, {0, 7}, {0, 1}}, true, 41});
}
TEST(GatheredAttention, NoKeysAnywhere) {
  run_case({2, 1, 8, {{6, 1}, {3, 0}, {0, 2}, {9, 9}}, {{0, 0}, {0, 0}, {0, 0}, {0, 0}}, true, 43});
}
TEST(GatheredAttention, NothingAtAll) {
  run_case({2, 2, 8, {{0, 0}, {0, 0}, {0, 0}, {0, 0}}, {{0, 0}, {0, 0}, {0, 0}, {0, 0}}, false, 47});
}

TEST(GatheredAttention, BadArgumentsThrowOnEveryRank) {
  World w;
  const int last = w.ranks - 1;
  GatheredAttentionShape shape{2, 1, 8, 1, 4, 4, 4 * static_cast<std::int64_t>(w.ranks)};
  GatheredAttention attention(w.session, shape);
  DeviceBuffer kept(attention.kept_bytes(), w.session.device()),
      workspace(attention.workspace_bytes(), w.session.device());
  std::vector<float> q(5 * 2 * 8, 0.5f), kv(4 * 8, 0.25f), bias(4, 0.0f), o(q.size()), lse(5 * 2);
  auto forward = [&](std::int64_t n_q, bool with_bias) {
    model::GatheredForwardArgs a;
    a.n_q = n_q;
    a.n_k = 4;
    a.q = q.data();
    a.k = a.v = kv.data();
    a.key_bias = with_bias ? bias.data() : nullptr;
    a.o = o.data();
    a.lse = lse.data();
    a.kept = kept.data();
    a.workspace = workspace.data();
    attention.forward(a);
  };
  test::expect_error([&] { forward(w.rank == last ? 5 : 4, false); },
                     "rank " + std::to_string(last) + " passes n_q = [5]");
  const std::vector<std::int64_t> split{1, 2};  // two counts for a one-sequence call
  test::expect_error(
      [&] {
        model::GatheredForwardArgs a;
        a.n_q = 3;
        a.q_counts = split;
        a.kept = kept.data();
        a.workspace = workspace.data();
        attention.forward(a);
      },
      "not 1 counts summing to n_q and n_k");
  if (w.ranks > 1) test::expect_error([&] { forward(4, w.rank == 0); }, "key bias");

  forward(4, false);
  std::vector<float> grads(q.size());
  model::GatheredBackwardArgs b;
  b.fwd.n_q = w.rank == last ? 3 : 4;  // not the forward's
  b.fwd.n_k = 4;
  b.fwd.q = b.d_o = q.data();
  b.fwd.o = o.data();
  b.fwd.k = b.fwd.v = kv.data();
  b.fwd.lse = lse.data();
  b.d_q = b.d_k = b.d_v = grads.data();
  b.fwd.kept = kept.data();
  b.fwd.workspace = workspace.data();
  test::expect_error([&] { attention.backward(b); }, "unlike the forward");

  if (w.ranks > 1) {
    GatheredAttentionShape other = shape;
    other.head_dim = w.rank == last ? 16 : 8;
    test::expect_error([&] { GatheredAttention bad(w.session, other); }, "ranks disagree on the shape");
  }
}

}  // namespace
}  // namespace ringcast
