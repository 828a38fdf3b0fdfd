// CAST building blocks (surrogate clusters) on the CPU backend: affinities, both assignment rules
// (capacity, padding, single assignment, deterministic ties), gather and its scatter adjoint, the
// softmax(A_k)-weighted cluster summaries and the output mixing, each against float64 references,
// and every backward against float64 finite differences. GQA throughout (heads = 2 x kv_heads).
#include "selection_test_util.hpp"

#include <ringcast/error.hpp>
#include <ringcast/kernels/cast.hpp>

#include <algorithm>
#include <numeric>
#include <set>

namespace ringcast::kernels {

// Readable test names for parameterized tests (found by argument-dependent lookup).
void PrintTo(CastAssignment rule, std::ostream* os) { *os << (rule == CastAssignment::kTopK ? "TopK" : "SingleTopK"); }

namespace {

using test::expect_close;
using test::random_floats;
using test::to_double;

const ExecContext kCpu{};

std::size_t q_size(const CastShape& s) { return std::size_t(s.batch) * s.seq * s.heads * s.head_dim; }
std::size_t kv_size(const CastShape& s) { return std::size_t(s.batch) * s.seq * s.kv_heads * s.head_dim; }
std::size_t aq_size(const CastShape& s) { return std::size_t(s.batch) * s.heads * s.seq * s.clusters; }
std::size_t ak_size(const CastShape& s) { return std::size_t(s.batch) * s.kv_heads * s.seq * s.clusters; }
std::size_t members_size(const CastShape& s) { return std::size_t(s.batch) * s.kv_heads * s.member_rows(); }
std::size_t counts_size(const CastShape& s) { return std::size_t(s.batch) * s.kv_heads * s.clusters; }
std::size_t summary_size(const CastShape& s) { return std::size_t(s.kv_heads) * s.summary_rows() * s.head_dim; }
std::size_t intra_size(const CastShape& s) { return std::size_t(s.batch) * s.member_rows() * s.heads * s.head_dim; }

// ---- float64 references -------------------------------------------------------------------------

// A = X Sᵀ per head: X [B, n, heads_x, d] -> A [B, heads_x, n, c], head h scoring with S[h / group].
std::vector<double> ref_affinity(const CastShape& s, const std::vector<double>& x, int heads_x,
                                 const std::vector<double>& sur) {
  const int g = heads_x / s.kv_heads, d = s.head_dim, c = s.clusters;
  std::vector<double> a(std::size_t(s.batch) * heads_x * s.seq * c);
  for (int b = 0; b < s.batch; ++b)
    for (int h = 0; h < heads_x; ++h)
      for (std::int64_t j = 0; j < s.seq; ++j)
        for (int cl = 0; cl < c; ++cl) {
          double dot = 0;
          for (int e = 0; e < d; ++e)
            dot += x[((b * s.seq + j) * heads_x + h) * d + e] * sur[(std::int64_t(h / g) * c + cl) * d + e];
          a[((std::int64_t(b) * heads_x + h) * s.seq + j) * c + cl] = dot;
        }
  return a;
}

std::vector<double> softmax(const double* a, int c) {
  const double m = *std::max_element(a, a + c);
  std::vector<double> w(c);
  double sum = 0;
  for (int i = 0; i < c; ++i) sum += (w[i] = std::exp(a[i] - m));
  for (double& x : w) x /= sum;
  return w;
}

// A_g of (b, hk) as [n][c].
std::vector<std::vector<double>> ref_assignment_affinity(const CastShape& s, const std::vector<double>& aq,
                                                         const std::vector<double>& ak, int b, int hk) {
  const int c = s.clusters, g = s.group();
  std::vector<std::vector<double>> ag(s.seq);
  for (std::int64_t j = 0; j < s.seq; ++j) {
    ag[j] = softmax(&ak[((std::int64_t(b) * s.kv_heads + hk) * s.seq + j) * c], c);
    for (int h = hk * g; h < (hk + 1) * g; ++h) {
      const auto w = softmax(&aq[((std::int64_t(b) * s.heads + h) * s.seq + j) * c], c);
      for (int cl = 0; cl < c; ++cl) ag[j][cl] += w[cl] / g;
    }
  }
  return ag;
}

struct Assignment {
  std::vector<std::int32_t> members;
  std::vector<std::int32_t> counts;
};

Assignment ref_assign(const CastShape& s, CastAssignment rule, const std::vector<double>& aq,
                      const std::vector<double>& ak) {
  const int c = s.clusters, ps = s.page_size;
  Assignment r{std::vector<std::int32_t>(members_size(s), -1), std::vector<std::int32_t>(counts_size(s), 0)};
  for (int b = 0; b < s.batch; ++b)
    for (int hk = 0; hk < s.kv_heads; ++hk) {
      const auto ag = ref_assignment_affinity(s, aq, ak, b, hk);
      const std::int64_t base = (std::int64_t(b) * s.kv_heads + hk) * c;
      std::vector<std::vector<std::int32_t>> sets(c);
      if (rule == CastAssignment::kTopK) {
        for (int cl = 0; cl < c; ++cl) {
          std::vector<std::int32_t> order(s.seq);
          std::iota(order.begin(), order.end(), 0);
          std::stable_sort(order.begin(), order.end(), [&](int i, int j) { return ag[i][cl] > ag[j][cl]; });
          order.resize(std::min<std::int64_t>(ps, s.seq));
          sets[cl] = order;
        }
      } else {
        std::vector<std::int32_t> order(s.seq);
        std::iota(order.begin(), order.end(), 0);
        auto best = [&](int j) { return *std::max_element(ag[j].begin(), ag[j].end()); };
        std::stable_sort(order.begin(), order.end(), [&](int i, int j) { return best(i) > best(j); });
        for (const int j : order) {
          std::vector<int> cls(c);
          std::iota(cls.begin(), cls.end(), 0);
          std::stable_sort(cls.begin(), cls.end(), [&](int x, int y) { return ag[j][x] > ag[j][y]; });
          for (const int cl : cls)
            if (static_cast<int>(sets[cl].size()) < ps) {
              sets[cl].push_back(j);
              break;
            }
        }
      }
      for (int cl = 0; cl < c; ++cl) {
        std::sort(sets[cl].begin(), sets[cl].end());
        r.counts[base + cl] = static_cast<std::int32_t>(sets[cl].size());
        std::copy(sets[cl].begin(), sets[cl].end(), r.members.begin() + (base + cl) * ps);
      }
    }
  return r;
}

// Cluster summaries [kv_heads, summary_rows, d]: Σ softmax_members(A_k[:, cl]) X over the members.
std::vector<double> ref_summary(const CastShape& s, const Assignment& a, const std::vector<double>& ak,
                                const std::vector<double>& x) {
  const int c = s.clusters, d = s.head_dim, ps = s.page_size;
  std::vector<double> out(summary_size(s), 0.0);
  for (int b = 0; b < s.batch; ++b)
    for (int hk = 0; hk < s.kv_heads; ++hk)
      for (int cl = 0; cl < c; ++cl) {
        const std::int64_t idx = (std::int64_t(b) * s.kv_heads + hk) * c + cl;
        const int count = a.counts[idx];
        std::vector<double> logits(count);
        for (int t = 0; t < count; ++t)
          logits[t] = ak[((std::int64_t(b) * s.kv_heads + hk) * s.seq + a.members[idx * ps + t]) * c + cl];
        const auto pi = count ? softmax(logits.data(), count) : std::vector<double>{};
        for (int t = 0; t < count; ++t)
          for (int e = 0; e < d; ++e)
            out[(hk * s.summary_rows() + b * c + cl) * d + e] +=
                pi[t] * x[((b * s.seq + a.members[idx * ps + t]) * s.kv_heads + hk) * d + e];
      }
  return out;
}

std::vector<double> ref_mix(const CastShape& s, const Assignment& a, const std::vector<double>& aq,
                            const std::vector<double>& intra, const std::vector<double>& r) {
  const int c = s.clusters, d = s.head_dim, ps = s.page_size, g = s.group();
  std::vector<double> o(q_size(s), 0.0);
  for (int b = 0; b < s.batch; ++b)
    for (int h = 0; h < s.heads; ++h) {
      const int hk = h / g;
      // slot_of[j][cl]: i's slot in cl, or -1.
      std::vector<std::vector<int>> slot_of(s.seq, std::vector<int>(c, -1));
      for (int cl = 0; cl < c; ++cl) {
        const std::int64_t idx = (std::int64_t(b) * s.kv_heads + hk) * c + cl;
        for (int t = 0; t < a.counts[idx]; ++t) slot_of[a.members[idx * ps + t]][cl] = t;
      }
      for (std::int64_t i = 0; i < s.seq; ++i) {
        const auto w = softmax(&aq[((std::int64_t(b) * s.heads + h) * s.seq + i) * c], c);
        for (int cl = 0; cl < c; ++cl)
          for (int e = 0; e < d; ++e) {
            const int t = slot_of[i][cl];
            const double x = t >= 0 ? intra[((b * s.member_rows() + cl * ps + t) * s.heads + h) * d + e]
                                    : r[(hk * s.summary_rows() + b * c + cl) * d + e];
            o[((b * s.seq + i) * s.heads + h) * d + e] += w[cl] * x;
          }
      }
    }
  return o;
}

// ---- fixtures -----------------------------------------------------------------------------------

struct Inputs {
  std::vector<float> q, k, v, sur, a_q, a_k;
  explicit Inputs(const CastShape& s)
      : q(random_floats(q_size(s), 1)), k(random_floats(kv_size(s), 2)), v(random_floats(kv_size(s), 3)),
        sur(random_floats(std::size_t(s.kv_heads) * s.clusters * s.head_dim, 4)), a_q(aq_size(s)), a_k(ak_size(s)) {
    cast_affinities({s, q.data(), k.data(), sur.data(), a_q.data(), a_k.data()}, kCpu);
  }
};

Assignment kernel_assign(const CastShape& s, CastAssignment rule, const std::vector<float>& aq,
                         const std::vector<float>& ak) {
  Assignment a{std::vector<std::int32_t>(members_size(s), 99), std::vector<std::int32_t>(counts_size(s), 99)};
  cast_assign({s, rule, aq.data(), ak.data(), a.members.data(), a.counts.data()}, kCpu);
  return a;
}

// Capacity, padding and ordering invariants of an assignment; returns how often each token occurs
// per (b, kv head).
std::vector<int> check_invariants(const CastShape& s, const Assignment& a) {
  std::vector<int> uses(std::size_t(s.batch) * s.kv_heads * s.seq, 0);
  for (std::size_t idx = 0; idx < a.counts.size(); ++idx) {
    const int count = a.counts[idx];
    EXPECT_GE(count, 0);
    EXPECT_LE(count, s.page_size) << "cluster over capacity";
    const std::int32_t* m = &a.members[idx * s.page_size];
    for (int t = 0; t < s.page_size; ++t) {
      if (t >= count) {
        EXPECT_EQ(m[t], -1) << "padding slot not marked";
        continue;
      }
      EXPECT_TRUE(m[t] >= 0 && m[t] < s.seq);
      if (t > 0) {
        EXPECT_LT(m[t - 1], m[t]) << "members not increasing";
      }
      ++uses[idx / s.clusters * s.seq + m[t]];
    }
  }
  return uses;
}

// (batch, seq, heads, kv_heads, head_dim, clusters, page_size)
const CastShape kShape{2, 37, 4, 2, 6, 5, 8};
const CastShape kTiny{2, 9, 4, 2, 3, 3, 4};  // finite differences

// ---- tests --------------------------------------------------------------------------------------

TEST(CastCpu, AffinitiesMatchFloat64) {
  const Inputs in(kShape);
  const auto sur = to_double(in.sur);
  expect_close("A_q", in.a_q, ref_affinity(kShape, to_double(in.q), kShape.heads, sur), test::kForwardTol);
  expect_close("A_k", in.a_k, ref_affinity(kShape, to_double(in.k), kShape.kv_heads, sur), test::kForwardTol);
}

TEST(CastCpu, AffinitiesBackwardMatchesFiniteDifferences) {
  const CastShape s = kTiny;
  const Inputs in(s);
  const auto gq = random_floats(aq_size(s), 5), gk = random_floats(ak_size(s), 6);
  std::vector<float> dq(q_size(s), 0.0f), dk(kv_size(s), 0.0f), ds(in.sur.size(), 0.0f);
  cast_affinities_backward({s, in.q.data(), in.k.data(), in.sur.data(), gq.data(), gk.data(), dq.data(), dk.data(),
                            ds.data()},
                           kCpu);
  const std::size_t nq = in.q.size(), nk = in.k.size();
  auto loss = [&](const std::vector<double>& x) {
    const std::vector<double> q(x.begin(), x.begin() + nq), k(x.begin() + nq, x.begin() + nq + nk),
        sur(x.begin() + nq + nk, x.end());
    return test::weighted_sum(ref_affinity(s, q, s.heads, sur), gq) +
           test::weighted_sum(ref_affinity(s, k, s.kv_heads, sur), gk);
  };
  std::vector<double> x = to_double(in.q);
  x.insert(x.end(), in.k.begin(), in.k.end());
  x.insert(x.end(), in.sur.begin(), in.sur.end());
  const auto g = test::numeric_gradient(loss, x);
  expect_close("d Q", dq, {g.begin(), g.begin() + nq}, test::kGradTol);
  expect_close("d K", dk, {g.begin() + nq, g.begin() + nq + nk}, test::kGradTol);
  expect_close("d S", ds, {g.begin() + nq + nk, g.end()}, test::kGradTol);
}

class CastAssignCpu : public ::testing::TestWithParam<std::tuple<CastAssignment, std::int64_t>> {};

TEST_P(CastAssignCpu, CapacityPaddingAndFloat64Choice) {
  const auto [rule, seq] = GetParam();
  CastShape s = kShape;
  s.seq = seq;
  const Inputs in(s);
  const Assignment a = kernel_assign(s, rule, in.a_q, in.a_k);
  const auto uses = check_invariants(s, a);
  if (rule == CastAssignment::kTopK) {
    for (const int count : a.counts) EXPECT_EQ(count, std::min<std::int64_t>(s.page_size, s.seq));
  } else {
    for (const int u : uses) EXPECT_LE(u, 1) << "token in more than one cluster";
    const std::int64_t assigned = std::accumulate(uses.begin(), uses.end(), std::int64_t{0});
    EXPECT_EQ(assigned, s.batch * s.kv_heads * std::min<std::int64_t>(s.seq, s.member_rows()));
  }
  // The same choice as float64 on the same affinities (random inputs leave no near-ties).
  const Assignment ref = ref_assign(s, rule, to_double(in.a_q), to_double(in.a_k));
  EXPECT_EQ(a.counts, ref.counts);
  EXPECT_EQ(a.members, ref.members);
}

// seq below one page, between capacity and c * page_size, above c * page_size (tokens left over).
INSTANTIATE_TEST_SUITE_P(Rules, CastAssignCpu,
                         ::testing::Combine(::testing::Values(CastAssignment::kTopK, CastAssignment::kSingleTopK),
                                            ::testing::Values(std::int64_t{5}, std::int64_t{37}, std::int64_t{101})));

TEST(CastCpu, AssignmentTiesGoToLowerIndices) {
  CastShape s = kShape;
  s.seq = 30;
  // Equal affinities everywhere: every token ties with every other in every cluster.
  const std::vector<float> aq(aq_size(s), 0.25f), ak(ak_size(s), -0.5f);
  const Assignment top = kernel_assign(s, CastAssignment::kTopK, aq, ak);
  const Assignment single = kernel_assign(s, CastAssignment::kSingleTopK, aq, ak);
  for (std::size_t idx = 0; idx < top.counts.size(); ++idx) {
    const int cl = static_cast<int>(idx % s.clusters);
    for (int t = 0; t < s.page_size; ++t) {
      EXPECT_EQ(top.members[idx * s.page_size + t], t);  // every cluster takes tokens 0..7
      // Tokens in index order fill cluster 0, then 1, ...; 30 tokens leave cluster 3 with 6, cluster 4 empty.
      const int token = cl * s.page_size + t;
      EXPECT_EQ(single.members[idx * s.page_size + t], token < s.seq ? token : -1);
    }
  }
}

TEST(CastCpu, GatherCopiesMembersAndScatterIsItsAdjoint) {
  for (const CastAssignment rule : {CastAssignment::kTopK, CastAssignment::kSingleTopK}) {
    const CastShape s = kShape;
    const Inputs in(s);
    const Assignment a = kernel_assign(s, rule, in.a_q, in.a_k);
    const std::size_t pages = std::size_t(s.kv_heads) * s.batch * s.member_rows() * s.head_dim;
    std::vector<float> qg(intra_size(s), 5.0f), kp(pages, 5.0f), vp(pages, 5.0f);
    cast_gather({s, a.members.data(), a.counts.data(), in.q.data(), in.k.data(), in.v.data(), qg.data(), kp.data(),
                 vp.data()},
                kCpu);
    const int d = s.head_dim, ps = s.page_size;
    for (int b = 0; b < s.batch; ++b)
      for (int hk = 0; hk < s.kv_heads; ++hk)
        for (int cl = 0; cl < s.clusters; ++cl)
          for (int t = 0; t < ps; ++t) {
            const std::int64_t idx = (std::int64_t(b) * s.kv_heads + hk) * s.clusters + cl;
            const std::int64_t j = a.members[idx * ps + t];
            const std::int64_t page = ((std::int64_t(hk) * s.batch + b) * s.clusters + cl) * ps + t;
            for (int e = 0; e < d; ++e) {
              const float want_k = j < 0 ? 0.0f : in.k[((b * s.seq + j) * s.kv_heads + hk) * d + e];
              ASSERT_EQ(kp[page * d + e], want_k);
              for (int h = hk * s.group(); h < (hk + 1) * s.group(); ++h) {
                const float want_q = j < 0 ? 0.0f : in.q[((b * s.seq + j) * s.heads + h) * d + e];
                ASSERT_EQ(qg[((b * s.member_rows() + cl * ps + t) * s.heads + h) * d + e], want_q);
              }
            }
          }
    // <gather(x), y> = <x, scatter(y)> for the linear map and its adjoint, in float64.
    const auto yq = random_floats(qg.size(), 7), yk = random_floats(kp.size(), 8), yv = random_floats(vp.size(), 9);
    std::vector<float> dq(in.q.size(), 0.0f), dk(in.k.size(), 0.0f), dv(in.v.size(), 0.0f);
    cast_gather_backward({s, a.members.data(), a.counts.data(), yq.data(), yk.data(), yv.data(), dq.data(), dk.data(),
                          dv.data()},
                         kCpu);
    const double lhs = test::weighted_sum(to_double(qg), yq) + test::weighted_sum(to_double(kp), yk) +
                       test::weighted_sum(to_double(vp), yv);
    const double rhs = test::weighted_sum(to_double(in.q), dq) + test::weighted_sum(to_double(in.k), dk) +
                       test::weighted_sum(to_double(in.v), dv);
    EXPECT_NEAR(lhs, rhs, 1e-5 * std::abs(lhs)) << "scatter is not the adjoint of gather";
  }
}

class CastRuleCpu : public ::testing::TestWithParam<CastAssignment> {};

TEST_P(CastRuleCpu, SummariesMatchFloat64AndFiniteDifferences) {
  for (const CastShape& s : {kShape, kTiny}) {
    const Inputs in(s);
    const Assignment a = kernel_assign(s, GetParam(), in.a_q, in.a_k);
    std::vector<float> ks(summary_size(s), 5.0f), vs(summary_size(s), 5.0f);
    cast_summaries({s, a.members.data(), a.counts.data(), in.a_k.data(), in.k.data(), in.v.data(), ks.data(),
                    vs.data()},
                   kCpu);
    const auto ak = to_double(in.a_k);
    expect_close("key summary", ks, ref_summary(s, a, ak, to_double(in.k)), test::kForwardTol);
    expect_close("value summary", vs, ref_summary(s, a, ak, to_double(in.v)), test::kForwardTol);
    if (s.seq != kTiny.seq) continue;

    const auto gk = random_floats(ks.size(), 10), gv = random_floats(vs.size(), 11);
    std::vector<float> dak(in.a_k.size(), 0.0f), dk(in.k.size(), 0.0f), dv(in.v.size(), 0.0f);
    cast_summaries_backward({s, a.members.data(), a.counts.data(), in.a_k.data(), in.k.data(), in.v.data(),
                             gk.data(), gv.data(), dak.data(), dk.data(), dv.data()},
                            kCpu);
    const std::size_t na = in.a_k.size(), nk = in.k.size();
    auto loss = [&](const std::vector<double>& x) {
      const std::vector<double> a_k(x.begin(), x.begin() + na), k(x.begin() + na, x.begin() + na + nk),
          v(x.begin() + na + nk, x.end());
      return test::weighted_sum(ref_summary(s, a, a_k, k), gk) + test::weighted_sum(ref_summary(s, a, a_k, v), gv);
    };
    std::vector<double> x = ak;
    x.insert(x.end(), in.k.begin(), in.k.end());
    x.insert(x.end(), in.v.begin(), in.v.end());
    const auto g = test::numeric_gradient(loss, x);
    expect_close("d A_k", dak, {g.begin(), g.begin() + na}, test::kGradTol);
    expect_close("d K", dk, {g.begin() + na, g.begin() + na + nk}, test::kGradTol);
    expect_close("d V", dv, {g.begin() + na + nk, g.end()}, test::kGradTol);
  }
}

TEST_P(CastRuleCpu, MixMatchesFloat64AndFiniteDifferences) {
  for (const CastShape& s : {kShape, kTiny}) {
    const Inputs in(s);
    const Assignment a = kernel_assign(s, GetParam(), in.a_q, in.a_k);
    const auto intra = random_floats(intra_size(s), 12), r = random_floats(summary_size(s), 13);
    std::vector<float> o(q_size(s), 5.0f);
    cast_mix({s, a.members.data(), a.counts.data(), in.a_q.data(), intra.data(), r.data(), o.data()}, kCpu);
    expect_close("O", o, ref_mix(s, a, to_double(in.a_q), to_double(intra), to_double(r)), test::kForwardTol);
    if (s.seq != kTiny.seq) continue;

    const auto go = random_floats(o.size(), 14);
    std::vector<float> daq(in.a_q.size(), 0.0f), dx(intra.size(), 0.0f), dr(r.size(), 0.0f);
    cast_mix_backward({s, a.members.data(), a.counts.data(), in.a_q.data(), intra.data(), r.data(), go.data(),
                       daq.data(), dx.data(), dr.data()},
                      kCpu);
    const std::size_t na = in.a_q.size(), nx = intra.size();
    auto loss = [&](const std::vector<double>& x) {
      return test::weighted_sum(ref_mix(s, a, {x.begin(), x.begin() + na}, {x.begin() + na, x.begin() + na + nx},
                                        {x.begin() + na + nx, x.end()}),
                                go);
    };
    std::vector<double> x = to_double(in.a_q);
    x.insert(x.end(), intra.begin(), intra.end());
    x.insert(x.end(), r.begin(), r.end());
    const auto g = test::numeric_gradient(loss, x);
    expect_close("d A_q", daq, {g.begin(), g.begin() + na}, test::kGradTol);
    expect_close("d intra", dx, {g.begin() + na, g.begin() + na + nx}, test::kGradTol);
    expect_close("d R_inter", dr, {g.begin() + na + nx, g.end()}, test::kGradTol);
  }
}

INSTANTIATE_TEST_SUITE_P(Rules, CastRuleCpu, ::testing::Values(CastAssignment::kTopK, CastAssignment::kSingleTopK));

TEST(CastCpu, RejectsBadGroupingAndCuda) {
  CastShape s = kShape;
  s.heads = 3;  // not a multiple of kv_heads = 2
  std::vector<float> buf(4096, 1.0f);
  const CastAffinityParams p{s, buf.data(), buf.data(), buf.data(), buf.data(), buf.data()};
  EXPECT_THROW(cast_affinities(p, kCpu), Error);
#if !RINGCAST_WITH_CUDA  // with the CUDA backend this is a launch (tests/gpu/test_cast_gpu.cpp)
  s.heads = 4;
  EXPECT_THROW(cast_affinities({s, buf.data(), buf.data(), buf.data(), buf.data(), buf.data()},
                               ExecContext{Device{DeviceKind::kCuda, 0}}),
               Error);
#endif
}

}  // namespace
}  // namespace ringcast::kernels
