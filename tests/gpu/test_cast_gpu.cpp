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
// Top-K that keeps 128 tokens (the CUDA limit). The surrogate clusters' operations (cluster_ops.hpp)
// are checked here too.
#include <ringcast/error.hpp>
#include <ringcast/kernels/cast.hpp>
#include <ringcast/kernels/cluster_ops.hpp>

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <numeric>
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

// The surrogate clusters' operations (cluster_ops.hpp) on shapes with empty and partly filled pages,
// clusters and blocks, and a partial last unit: bounds, blocks, their adjoint and unit queries bitwise
// the CPU's; the log-sum-exp merge (expf / logf, contractions) within 1e-5. Slots past a page's count
// hold ±1e30, so reading one shows. Empty clusters have lse -inf, compared apart from the finite ones.
TEST(CastGpu, ClusterOpsMatchCpu) {
  RINGCAST_SKIP_WITHOUT_CUDA();
  const int ps = 33, d = 40, cp = 3;
  const std::int64_t pages = 7, blocks = 5;
  const std::vector<std::int32_t> page_counts = {33, 0, 1, 17, 32, 0, 5};
  std::vector<float> keys = random_floats(std::size_t(pages * ps * d), 500);
  for (std::int64_t pg = 0; pg < pages; ++pg) {
    for (int slot = page_counts[pg]; slot < ps; ++slot) {
      for (int e = 0; e < d; ++e) keys[std::size_t((pg * ps + slot) * d + e)] = (slot + e) % 2 ? 1e30f : -1e30f;
    }
  }
  const std::size_t page_elems = std::size_t(pages * d);
  std::vector<float> mn(page_elems), mx(page_elems);
  page_key_bounds({pages, ps, d, keys.data(), page_counts.data(), mn.data(), mx.data()}, kCpu);
  const DeviceArray<float> g_keys(keys);
  const DeviceArray<std::int32_t> g_page_counts(page_counts);
  DeviceArray<float> g_mn(page_elems), g_mx(page_elems);
  page_key_bounds({pages, ps, d, g_keys.get(), g_page_counts.get(), g_mn.get(), g_mx.get()}, cuda_context());
  expect_bitwise("page key min", g_mn.download(), mn);
  expect_bitwise("page key max", g_mx.download(), mx);

  // Blocks of 3 clusters: block 1 all empty, the others with some empty clusters.
  const std::vector<std::int32_t> counts = {4, 0, 9, 0, 0, 0, 1, 2, 3, 0, 0, 7, 5, 5, 0};
  const std::size_t cl_elems = std::size_t(blocks * cp * d), bl_elems = std::size_t(blocks * d);
  const auto km = random_floats(cl_elems, 501), vm = random_floats(cl_elems, 502), kmin = random_floats(cl_elems, 503),
             kmax = random_floats(cl_elems, 504);
  std::vector<float> bkm(bl_elems), bvm(bl_elems), bmin(bl_elems), bmax(bl_elems);
  cluster_blocks({blocks, cp, d, counts.data(), km.data(), vm.data(), kmin.data(), kmax.data(), bkm.data(), bvm.data(),
                  bmin.data(), bmax.data()},
                 kCpu);
  const DeviceArray<std::int32_t> g_counts(counts);
  const DeviceArray<float> g_km(km), g_vm(vm), g_kmin(kmin), g_kmax(kmax);
  DeviceArray<float> g_bkm(bl_elems), g_bvm(bl_elems), g_bmin(bl_elems), g_bmax(bl_elems);
  cluster_blocks({blocks, cp, d, g_counts.get(), g_km.get(), g_vm.get(), g_kmin.get(), g_kmax.get(), g_bkm.get(),
                  g_bvm.get(), g_bmin.get(), g_bmax.get()},
                 cuda_context());
  expect_bitwise("block key mean", g_bkm.download(), bkm);
  expect_bitwise("block value mean", g_bvm.download(), bvm);
  expect_bitwise("block key min", g_bmin.download(), bmin);
  expect_bitwise("block key max", g_bmax.download(), bmax);

  const auto d_bkm = random_floats(bl_elems, 505), d_bvm = random_floats(bl_elems, 506);
  const auto d_km0 = random_floats(cl_elems, 507), d_vm0 = random_floats(cl_elems, 508);
  std::vector<float> d_km = d_km0, d_vm = d_vm0;
  cluster_blocks_backward({blocks, cp, d, counts.data(), d_bkm.data(), d_bvm.data(), d_km.data(), d_vm.data()}, kCpu);
  const DeviceArray<float> g_d_bkm(d_bkm), g_d_bvm(d_bvm);
  DeviceArray<float> g_d_km(d_km0), g_d_vm(d_vm0);
  cluster_blocks_backward({blocks, cp, d, g_counts.get(), g_d_bkm.get(), g_d_bvm.get(), g_d_km.get(), g_d_vm.get()},
                          cuda_context());
  expect_bitwise("cluster blocks d key mean", g_d_km.download(), d_km);
  expect_bitwise("cluster blocks d value mean", g_d_vm.download(), d_vm);

  // Unit queries over 250 of 300 tokens in a shuffled order: units of 128 and 122 rows; GQA 3.
  const int tokens = 300, heads = 6, kv_heads = 2;
  const auto q = random_floats(std::size_t(tokens * heads * d), 509);
  std::vector<std::int32_t> order(tokens);
  std::iota(order.begin(), order.end(), 0);
  std::shuffle(order.begin(), order.end(), std::mt19937(510));
  order.resize(250);
  const std::size_t unit_elems = std::size_t(2 * d);
  std::vector<float> uq(unit_elems);
  unit_queries({q.data(), heads, kv_heads, d, 1, order.data(), 250, kQueryTile, uq.data()}, kCpu);
  const DeviceArray<float> g_q(q);
  const DeviceArray<std::int32_t> g_order(order);
  DeviceArray<float> g_uq(unit_elems);
  unit_queries({g_q.get(), heads, kv_heads, d, 1, g_order.get(), 250, kQueryTile, g_uq.get()}, cuda_context());
  expect_bitwise("unit queries", g_uq.download(), uq);

  // Member log-sum-exp and its merge's adjoint: B 2, 2 KV heads, 5 clusters of up to 16 of 70 tokens
  // (increasing members; some clusters empty), 3 padding summary rows.
  ClusterMembers m;
  m.batch = 2;
  m.kv_heads = 2;
  m.seq = 70;
  m.clusters = 5;
  m.page_size = 16;
  const int segs = m.batch * m.kv_heads, slots = segs * m.clusters;
  std::vector<std::int32_t> members(static_cast<std::size_t>(slots * m.page_size), -1);
  std::vector<std::int32_t> member_counts(static_cast<std::size_t>(slots));
  std::mt19937 gen(511);
  for (int x = 0; x < slots; ++x) {
    member_counts[x] = x % 4 == 1 ? 0 : std::int32_t(gen() % (m.page_size + 1));
    std::vector<std::int32_t> pick(m.seq);
    std::iota(pick.begin(), pick.end(), 0);
    std::shuffle(pick.begin(), pick.end(), gen);
    std::sort(pick.begin(), pick.begin() + member_counts[x]);
    std::copy_n(pick.begin(), member_counts[x], members.begin() + std::ptrdiff_t(x) * m.page_size);
  }
  const auto a_k = random_floats(std::size_t(segs * m.seq * m.clusters), 512, 3.0f);
  std::vector<float> lse(static_cast<std::size_t>(slots));
  MemberLseParams lp{m, a_k.data(), lse.data()};
  lp.m.members = members.data();
  lp.m.counts = member_counts.data();
  member_lse(lp, kCpu);
  const DeviceArray<std::int32_t> g_members(members), g_member_counts(member_counts);
  const DeviceArray<float> g_a_k(a_k);
  DeviceArray<float> g_lse(static_cast<std::size_t>(slots));
  MemberLseParams glp{m, g_a_k.get(), g_lse.get()};
  glp.m.members = g_members.get();
  glp.m.counts = g_member_counts.get();
  member_lse(glp, cuda_context());
  const std::vector<float> got_lse = g_lse.download();
  std::vector<float> cpu_finite, gpu_finite;
  std::vector<std::int32_t> cpu_empty, gpu_empty;
  for (int x = 0; x < slots; ++x) {
    cpu_empty.push_back(std::isinf(lse[x]) && lse[x] < 0);
    gpu_empty.push_back(std::isinf(got_lse[x]) && got_lse[x] < 0);
    if (!cpu_empty.back()) {
      cpu_finite.push_back(lse[x]);
      gpu_finite.push_back(got_lse[x]);
    }
  }
  expect_bitwise("member lse: empty clusters at -inf", gpu_empty, cpu_empty);
  expect_near_cpu("member lse", gpu_finite, cpu_finite, kTol);

  const std::int64_t summary_rows = std::int64_t{m.batch} * m.clusters + 3;
  const std::size_t rows = std::size_t(m.kv_heads * summary_rows * d);
  std::vector<float> merged_lse = random_floats(static_cast<std::size_t>(slots), 513, 0.5f);
  for (int x = 0; x < slots; ++x) merged_lse[x] = (lse[x] > -INFINITY ? lse[x] : 0.0f) + std::abs(merged_lse[x]);
  const auto local_value = random_floats(rows, 514), merged_value = random_floats(rows, 515),
             d_merged_value = random_floats(rows, 516), d_local0 = random_floats(rows, 517),
             d_a_k0 = random_floats(a_k.size(), 518);
  std::vector<float> d_local = d_local0, d_a_k = d_a_k0;
  MemberLseMergeBackwardParams bp{m, d, summary_rows, a_k.data(), lse.data(), merged_lse.data(), local_value.data(),
                                  merged_value.data(), d_merged_value.data(), d_local.data(), d_a_k.data()};
  bp.m.members = members.data();
  bp.m.counts = member_counts.data();
  member_lse_merge_backward(bp, kCpu);
  const DeviceArray<float> g_lse_in(lse), g_merged_lse(merged_lse), g_local(local_value), g_merged(merged_value),
      g_d_merged(d_merged_value);
  DeviceArray<float> g_d_local(d_local0), g_d_a_k(d_a_k0);
  MemberLseMergeBackwardParams gbp{m, d, summary_rows, g_a_k.get(), g_lse_in.get(), g_merged_lse.get(), g_local.get(),
                                   g_merged.get(), g_d_merged.get(), g_d_local.get(), g_d_a_k.get()};
  gbp.m.members = g_members.get();
  gbp.m.counts = g_member_counts.get();
  member_lse_merge_backward(gbp, cuda_context());
  // Rows of empty clusters and padding keep their start values on both sides.
  expect_near_cpu("merge backward d local value", g_d_local.download(), d_local, kTol);
  expect_near_cpu("merge backward d A_k", added(g_d_a_k.download(), d_a_k0), added(d_a_k, d_a_k0), kTol);
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
