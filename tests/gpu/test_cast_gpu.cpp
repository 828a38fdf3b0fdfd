// CUDA CAST building blocks (cast.hpp) against the CPU backend on the same seeded inputs (the CPU
// backend is checked against float64 references and finite differences in tests/selection).
//  - Assignments (members, counts): equal to the CPU's. Ties are planted with affinities whose
//    softmaxes both backends compute exactly (constant rows; entries 0 or -200, whose exps are 1 and 0),
//    so nearly every comparison ties and must go to the lower token, then the lower cluster.
//  - Gather and its scatter adjoint: bitwise (copies; sums over a token's clusters in the CPU's order).
//  - Affinities, summaries, mixing and their backward: relative L2 difference from the CPU <= 1e-5.
//    Both sides are fp32; they differ in the summation order of the products (cuBLAS vs OpenBLAS, warp
//    trees vs loops) and in the last bit of expf, each of the order of 1e-7 at these sizes.
// Written outputs start poisoned (NaN; member slots 0x5A5A5A5A), padding rows and slots included;
// outputs that are added into start random, and what was added is compared. Shapes: GQA groups of 1,
// 2 and 3, head dims and token counts that are not powers of two, more clusters than a warp has lanes,
// one token, clusters that do not fill (c page_size > n), tokens left over (c page_size < n), and a
// Top-K that keeps 128 tokens (the CUDA limit).
#include <ringcast/error.hpp>
#include <ringcast/kernels/cast.hpp>

#include <gtest/gtest.h>

#include <cstdint>
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

// (batch, seq, heads, kv_heads, head_dim, clusters, page_size)
const CastShape kCases[] = {
    {2, 200, 4, 2, 40, 7, 16},   // GQA 2, tokens left over, d not a power of two
    {1, 333, 3, 1, 24, 5, 64},   // GQA 3, five clusters of 64 for 333 tokens
    {1, 97, 4, 4, 33, 40, 33},   // 40 clusters (two rounds of 32 in the membership search), pages of 33
    {2, 130, 2, 1, 72, 3, 128},  // Top-K keeps 128 of 130
    {1, 50, 2, 2, 16, 9, 8},     // clusters that do not fill
    {1, 1, 1, 1, 8, 3, 4},       // one token
};

const CastAssignment kRules[] = {CastAssignment::kTopK, CastAssignment::kSingleTopK};

std::string name(const CastShape& s) {
  std::ostringstream os;
  os << 'B' << s.batch << " n" << s.seq << " h" << s.heads << "/" << s.kv_heads << " d" << s.head_dim << " c"
     << s.clusters << " page " << s.page_size;
  return os.str();
}

std::string name(const CastShape& s, CastAssignment rule) {
  return name(s) + (rule == CastAssignment::kTopK ? " top-k" : " single");
}

std::size_t q_size(const CastShape& s) { return std::size_t(s.batch) * s.seq * s.heads * s.head_dim; }
std::size_t kv_size(const CastShape& s) { return std::size_t(s.batch) * s.seq * s.kv_heads * s.head_dim; }
std::size_t sur_size(const CastShape& s) { return std::size_t(s.kv_heads) * s.clusters * s.head_dim; }
std::size_t aq_size(const CastShape& s) { return std::size_t(s.batch) * s.heads * s.seq * s.clusters; }
std::size_t ak_size(const CastShape& s) { return std::size_t(s.batch) * s.kv_heads * s.seq * s.clusters; }
std::size_t members_size(const CastShape& s) { return std::size_t(s.batch) * s.kv_heads * s.member_rows(); }
std::size_t counts_size(const CastShape& s) { return std::size_t(s.batch) * s.kv_heads * s.clusters; }
std::size_t summary_size(const CastShape& s) { return std::size_t(s.kv_heads) * s.summary_rows() * s.head_dim; }
std::size_t intra_size(const CastShape& s) { return std::size_t(s.batch) * s.member_rows() * s.heads * s.head_dim; }
std::size_t pages_size(const CastShape& s) { return std::size_t(s.kv_heads) * s.batch * s.member_rows() * s.head_dim; }

// Seeded tokens and surrogates, and their affinities from the CPU backend.
struct Inputs {
  std::vector<float> q, k, v, sur, a_q, a_k;
  Inputs(const CastShape& s, std::uint32_t seed)
      : q(random_floats(q_size(s), seed)), k(random_floats(kv_size(s), seed + 1)),
        v(random_floats(kv_size(s), seed + 2)), sur(random_floats(sur_size(s), seed + 3, 0.5f)), a_q(aq_size(s)),
        a_k(ak_size(s)) {
    cast_affinities({s, q.data(), k.data(), sur.data(), a_q.data(), a_k.data()}, kCpu);
  }
};

struct Assignment {
  std::vector<std::int32_t> members, counts;
};

Assignment cpu_assign(const CastShape& s, CastAssignment rule, const std::vector<float>& a_q,
                      const std::vector<float>& a_k) {
  Assignment a{std::vector<std::int32_t>(members_size(s)), std::vector<std::int32_t>(counts_size(s))};
  cast_assign({s, rule, a_q.data(), a_k.data(), a.members.data(), a.counts.data()}, kCpu);
  return a;
}

// The CUDA assignment of the same affinities must be the CPU's.
void expect_cpu_assignment(const std::string& what, const CastShape& s, CastAssignment rule,
                           const std::vector<float>& a_q, const std::vector<float>& a_k) {
  const Assignment cpu = cpu_assign(s, rule, a_q, a_k);
  const DeviceArray<float> g_aq(a_q), g_ak(a_k);
  DeviceArray<std::int32_t> members(members_size(s)), counts(counts_size(s));
  poison_bytes(members);
  poison_bytes(counts);
  cast_assign({s, rule, g_aq.get(), g_ak.get(), members.get(), counts.get()}, cuda_context());
  expect_bitwise(what + " counts", counts.download(), cpu.counts);
  expect_bitwise(what + " members", members.download(), cpu.members);
}

// Uploaded members and counts of a CPU assignment.
struct DeviceAssignment {
  DeviceArray<std::int32_t> members, counts;
  explicit DeviceAssignment(const Assignment& a) : members(a.members), counts(a.counts) {}
};

TEST(CastGpu, AffinitiesAndBackwardMatchCpu) {
  RINGCAST_SKIP_WITHOUT_CUDA();
  std::uint32_t seed = 1;
  for (const CastShape& s : kCases) {
    const Inputs in(s, seed);
    seed += 10;
    const DeviceArray<float> q(in.q), k(in.k), sur(in.sur);
    DeviceArray<float> a_q(aq_size(s)), a_k(ak_size(s));
    cast_affinities({s, q.get(), k.get(), sur.get(), a_q.get(), a_k.get()}, cuda_context());
    expect_near_cpu(name(s) + " A_q", a_q.download(), in.a_q, kTol);
    expect_near_cpu(name(s) + " A_k", a_k.download(), in.a_k, kTol);

    const auto d_aq = random_floats(aq_size(s), seed++), d_ak = random_floats(ak_size(s), seed++);
    const auto dq0 = random_floats(q_size(s), seed++), dk0 = random_floats(kv_size(s), seed++),
               ds0 = random_floats(sur_size(s), seed++);
    std::vector<float> dq = dq0, dk = dk0, ds = ds0;
    cast_affinities_backward({s, in.q.data(), in.k.data(), in.sur.data(), d_aq.data(), d_ak.data(), dq.data(),
                              dk.data(), ds.data()},
                             kCpu);
    const DeviceArray<float> g_daq(d_aq), g_dak(d_ak);
    DeviceArray<float> g_dq(dq0), g_dk(dk0), g_ds(ds0);
    cast_affinities_backward({s, q.get(), k.get(), sur.get(), g_daq.get(), g_dak.get(), g_dq.get(), g_dk.get(),
                              g_ds.get()},
                             cuda_context());
    expect_near_cpu(name(s) + " d Q", added(g_dq.download(), dq0), added(dq, dq0), kTol);
    expect_near_cpu(name(s) + " d K", added(g_dk.download(), dk0), added(dk, dk0), kTol);
    expect_near_cpu(name(s) + " d S", added(g_ds.download(), ds0), added(ds, ds0), kTol);
  }
}

TEST(CastGpu, AssignmentIsTheCpus) {
  RINGCAST_SKIP_WITHOUT_CUDA();
  std::uint32_t seed = 100;
  for (const CastShape& s : kCases) {
    const Inputs in(s, seed);
    seed += 10;
    for (const CastAssignment rule : kRules) expect_cpu_assignment(name(s, rule), s, rule, in.a_q, in.a_k);
  }
}

TEST(CastGpu, AssignmentTiesGoToLowerIndices) {
  RINGCAST_SKIP_WITHOUT_CUDA();
  std::mt19937 gen(7);
  std::bernoulli_distribution zero(0.3);
  for (const CastShape& s : {CastShape{2, 37, 4, 2, 6, 5, 8}, CastShape{1, 97, 4, 4, 33, 40, 33},
                             CastShape{2, 200, 4, 2, 40, 7, 16}}) {
    // Every token ties with every other in every cluster.
    const std::vector<float> flat_q(aq_size(s), 0.25f), flat_k(ak_size(s), -0.5f);
    // Affinities 0 or -200: softmax weights 1/m or 0, so assignment affinities take few values.
    std::vector<float> two_q(aq_size(s)), two_k(ak_size(s));
    for (float& x : two_q) x = zero(gen) ? 0.0f : -200.0f;
    for (float& x : two_k) x = zero(gen) ? 0.0f : -200.0f;
    for (const CastAssignment rule : kRules) {
      expect_cpu_assignment(name(s, rule) + " constant", s, rule, flat_q, flat_k);
      expect_cpu_assignment(name(s, rule) + " two-valued", s, rule, two_q, two_k);
    }
  }
}

TEST(CastGpu, GatherAndScatterAreBitwiseTheCpus) {
  RINGCAST_SKIP_WITHOUT_CUDA();
  std::uint32_t seed = 200;
  for (const CastShape& s : kCases) {
    const Inputs in(s, seed);
    seed += 10;
    for (const CastAssignment rule : kRules) {
      const std::string what = name(s, rule);
      const Assignment a = cpu_assign(s, rule, in.a_q, in.a_k);
      const DeviceAssignment ga(a);
      std::vector<float> qg(intra_size(s)), kp(pages_size(s)), vp(pages_size(s));
      cast_gather({s, a.members.data(), a.counts.data(), in.q.data(), in.k.data(), in.v.data(), qg.data(), kp.data(),
                   vp.data()},
                  kCpu);
      const DeviceArray<float> q(in.q), k(in.k), v(in.v);
      DeviceArray<float> g_qg(intra_size(s)), g_kp(pages_size(s)), g_vp(pages_size(s));
      cast_gather({s, ga.members.get(), ga.counts.get(), q.get(), k.get(), v.get(), g_qg.get(), g_kp.get(),
                   g_vp.get()},
                  cuda_context());
      expect_bitwise(what + " gathered Q", g_qg.download(), qg);
      expect_bitwise(what + " K pages", g_kp.download(), kp);
      expect_bitwise(what + " V pages", g_vp.download(), vp);

      const auto yq = random_floats(intra_size(s), seed++), yk = random_floats(pages_size(s), seed++),
                 yv = random_floats(pages_size(s), seed++);
      const auto dq0 = random_floats(q_size(s), seed++), dk0 = random_floats(kv_size(s), seed++),
                 dv0 = random_floats(kv_size(s), seed++);
      std::vector<float> dq = dq0, dk = dk0, dv = dv0;
      cast_gather_backward({s, a.members.data(), a.counts.data(), yq.data(), yk.data(), yv.data(), dq.data(),
                            dk.data(), dv.data()},
                           kCpu);
      const DeviceArray<float> g_yq(yq), g_yk(yk), g_yv(yv);
      DeviceArray<float> g_dq(dq0), g_dk(dk0), g_dv(dv0);
      cast_gather_backward({s, ga.members.get(), ga.counts.get(), g_yq.get(), g_yk.get(), g_yv.get(), g_dq.get(),
                            g_dk.get(), g_dv.get()},
                           cuda_context());
      expect_bitwise(what + " scatter d Q", g_dq.download(), dq);
      expect_bitwise(what + " scatter d K", g_dk.download(), dk);
      expect_bitwise(what + " scatter d V", g_dv.download(), dv);
    }
  }
}

TEST(CastGpu, SummariesAndBackwardMatchCpu) {
  RINGCAST_SKIP_WITHOUT_CUDA();
  std::uint32_t seed = 300;
  for (const CastShape& s : kCases) {
    const Inputs in(s, seed);
    seed += 10;
    for (const CastAssignment rule : kRules) {
      const std::string what = name(s, rule);
      const Assignment a = cpu_assign(s, rule, in.a_q, in.a_k);
      const DeviceAssignment ga(a);
      std::vector<float> ks(summary_size(s)), vs(summary_size(s));
      cast_summaries({s, a.members.data(), a.counts.data(), in.a_k.data(), in.k.data(), in.v.data(), ks.data(),
                      vs.data()},
                     kCpu);
      const DeviceArray<float> a_k(in.a_k), k(in.k), v(in.v);
      DeviceArray<float> g_ks(summary_size(s)), g_vs(summary_size(s));
      cast_summaries({s, ga.members.get(), ga.counts.get(), a_k.get(), k.get(), v.get(), g_ks.get(), g_vs.get()},
                     cuda_context());
      expect_near_cpu(what + " key summaries", g_ks.download(), ks, kTol);
      expect_near_cpu(what + " value summaries", g_vs.download(), vs, kTol);

      const auto dks = random_floats(summary_size(s), seed++), dvs = random_floats(summary_size(s), seed++);
      const auto dak0 = random_floats(ak_size(s), seed++), dk0 = random_floats(kv_size(s), seed++),
                 dv0 = random_floats(kv_size(s), seed++);
      std::vector<float> dak = dak0, dk = dk0, dv = dv0;
      cast_summaries_backward({s, a.members.data(), a.counts.data(), in.a_k.data(), in.k.data(), in.v.data(),
                               dks.data(), dvs.data(), dak.data(), dk.data(), dv.data()},
                              kCpu);
      const DeviceArray<float> g_dks(dks), g_dvs(dvs);
      DeviceArray<float> g_dak(dak0), g_dk(dk0), g_dv(dv0);
      cast_summaries_backward({s, ga.members.get(), ga.counts.get(), a_k.get(), k.get(), v.get(), g_dks.get(),
                               g_dvs.get(), g_dak.get(), g_dk.get(), g_dv.get()},
                              cuda_context());
      expect_near_cpu(what + " summaries d A_k", added(g_dak.download(), dak0), added(dak, dak0), kTol);
      expect_near_cpu(what + " summaries d K", added(g_dk.download(), dk0), added(dk, dk0), kTol);
      expect_near_cpu(what + " summaries d V", added(g_dv.download(), dv0), added(dv, dv0), kTol);
    }
  }
}

TEST(CastGpu, MixAndBackwardMatchCpu) {
  RINGCAST_SKIP_WITHOUT_CUDA();
  std::uint32_t seed = 400;
  for (const CastShape& s : kCases) {
    const Inputs in(s, seed);
    seed += 10;
    for (const CastAssignment rule : kRules) {
      const std::string what = name(s, rule);
      const Assignment a = cpu_assign(s, rule, in.a_q, in.a_k);
      const DeviceAssignment ga(a);
      const auto intra = random_floats(intra_size(s), seed++), r = random_floats(summary_size(s), seed++);
      std::vector<float> o(q_size(s));
      cast_mix({s, a.members.data(), a.counts.data(), in.a_q.data(), intra.data(), r.data(), o.data()}, kCpu);
      const DeviceArray<float> a_q(in.a_q), g_intra(intra), g_r(r);
      DeviceArray<float> g_o(q_size(s));
      cast_mix({s, ga.members.get(), ga.counts.get(), a_q.get(), g_intra.get(), g_r.get(), g_o.get()}, cuda_context());
      expect_near_cpu(what + " O", g_o.download(), o, kTol);

      const auto d_o = random_floats(q_size(s), seed++);
      const auto daq0 = random_floats(aq_size(s), seed++), dx0 = random_floats(intra_size(s), seed++),
                 dr0 = random_floats(summary_size(s), seed++);
      std::vector<float> daq = daq0, dx = dx0, dr = dr0;
      cast_mix_backward({s, a.members.data(), a.counts.data(), in.a_q.data(), intra.data(), r.data(), d_o.data(),
                         daq.data(), dx.data(), dr.data()},
                        kCpu);
      const DeviceArray<float> g_do(d_o);
      DeviceArray<float> g_daq(daq0), g_dx(dx0), g_dr(dr0);
      cast_mix_backward({s, ga.members.get(), ga.counts.get(), a_q.get(), g_intra.get(), g_r.get(), g_do.get(),
                         g_daq.get(), g_dx.get(), g_dr.get()},
                        cuda_context());
      expect_near_cpu(what + " mix d A_q", added(g_daq.download(), daq0), added(daq, daq0), kTol);
      expect_near_cpu(what + " mix d intra", added(g_dx.download(), dx0), added(dx, dx0), kTol);
      expect_near_cpu(what + " mix d R_inter", added(g_dr.download(), dr0), added(dr, dr0), kTol);
    }
  }
}

// Shapes past the CUDA kernels' limits are refused before any device work (so this runs anywhere).
TEST(CastGpu, RefusesShapesPastItsLimits) {
  std::vector<float> buf(16);
  std::vector<std::int32_t> ids(16);
  const CastShape wide{1, 300, 1, 1, 8, 2, 200};
  expect_error([&] {
    cast_assign({wide, CastAssignment::kTopK, buf.data(), buf.data(), ids.data(), ids.data()}, cuda_context());
  }, "Top-K keeps at most 128 tokens per cluster");
  const CastShape big_pages{1, 300, 1, 1, 8, 2, 600};
  expect_error([&] {
    cast_summaries({big_pages, ids.data(), ids.data(), buf.data(), buf.data(), buf.data(), buf.data(), buf.data()},
                   cuda_context());
  }, "page_size 600 is not supported");
}

}  // namespace
}  // namespace ringcast::test
