// The exact distributed attention modes (ring, zigzag ring, ulysses, allgather) on the CPU backend:
// every rank builds the same seeded global Q, K, V, runs its shard, and checks O, LSE and dQ, dK, dV
// of its own rows against a float64 whole-sequence oracle; the causal leak check; the communicator's
// byte counters against plan_layer(); ulysses pipelined over head groups bit for bit against one group;
// and shapes that must fail on every rank before communicating.
#include "attention_reference.hpp"
#include "naive_attention.hpp"

#include <ringcast/attention.hpp>
#include <ringcast/error.hpp>
#include <ringcast/plan.hpp>

#include <gtest/gtest.h>
#include <mpi.h>

#include <cmath>
#include <cstring>

namespace ringcast {
namespace {

// Seeded N(0, 1) values representable in the f32 storage.
std::vector<double> random_values(std::size_t n, std::uint64_t seed) { return test::to_f64(test::random_normal(n, seed)); }

double rel_error(const std::vector<float>& x, const std::vector<double>& ref) {
  double num = 0, den = 0;
  for (std::size_t i = 0; i < ref.size(); ++i) {
    const double diff = static_cast<double>(x[i]) - ref[i];
    if (!std::isfinite(x[i])) return INFINITY;
    num += diff * diff;
    den += ref[i] * ref[i];
  }
  return den > 0 ? std::sqrt(num / den) : std::sqrt(num);
}

std::vector<float> to_f32(const std::vector<double>& x) { return {x.begin(), x.end()}; }

struct Problem {
  LayerShape shape;
  AttentionOptions options;
  std::vector<double> q, k, v, d_o;  // global, token layout
};

Problem make_problem(AttentionMode mode, bool causal, std::uint64_t seed) {
  int p = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &p);
  Problem pr;
  auto& s = pr.shape;
  s.seq_len = 384;  // n_loc = 384/P: partial pages and a partial query tile; zigzag chunks of 384/2P
  s.ranks = p;
  s.batch = 2;
  s.heads = 8;
  s.kv_heads = 4;  // GQA 2
  s.head_dim = 64;
  s.dtype = DType::kF32;
  s.causal = causal;
  pr.options.mode = mode;
  const std::size_t qn = static_cast<std::size_t>(s.batch) * s.seq_len * s.heads * s.head_dim;
  const std::size_t kn = static_cast<std::size_t>(s.batch) * s.seq_len * s.kv_heads * s.head_dim;
  pr.q = random_values(qn, seed);
  pr.k = random_values(kn, seed + 1);
  pr.v = random_values(kn, seed + 2);
  pr.d_o = random_values(qn, seed + 3);
  return pr;
}

struct Shard {
  std::vector<float> q, k, v, o, lse, d_o, d_q, d_k, d_v;
};

// Runs forward and backward of the distributed layer on this rank's shard.
Shard run_layer(const Session& session, const Problem& pr, DistributedAttention& layer) {
  const auto& s = pr.shape;
  const auto pos = layer.positions();
  const std::int64_t n = s.local_len();
  Shard sh;
  sh.q = to_f32(test::take_rows(pr.q, s.batch, s.seq_len, s.heads * s.head_dim, pos));
  sh.k = to_f32(test::take_rows(pr.k, s.batch, s.seq_len, s.kv_heads * s.head_dim, pos));
  sh.v = to_f32(test::take_rows(pr.v, s.batch, s.seq_len, s.kv_heads * s.head_dim, pos));
  sh.d_o = to_f32(test::take_rows(pr.d_o, s.batch, s.seq_len, s.heads * s.head_dim, pos));
  sh.o.assign(sh.q.size(), NAN);
  sh.lse.assign(static_cast<std::size_t>(s.batch) * s.heads * n, NAN);
  sh.d_q.assign(sh.q.size(), NAN);
  sh.d_k.assign(sh.k.size(), NAN);
  sh.d_v.assign(sh.v.size(), NAN);
  const Device cpu = session.device();
  auto view = [&](std::vector<float>& x, int heads) {
    return TensorView::contiguous(x.data(), DType::kF32, {s.batch, n, heads, s.head_dim}, cpu);
  };
  const TensorView lse = TensorView::contiguous(sh.lse.data(), DType::kF32, {s.batch, s.heads, n}, cpu);
  layer.forward({view(sh.q, s.heads), view(sh.k, s.kv_heads), view(sh.v, s.kv_heads), view(sh.o, s.heads), lse});
  layer.backward({view(sh.q, s.heads), view(sh.k, s.kv_heads), view(sh.v, s.kv_heads), view(sh.o, s.heads), lse,
                  view(sh.d_o, s.heads), view(sh.d_q, s.heads), view(sh.d_k, s.kv_heads), view(sh.d_v, s.kv_heads)});
  return sh;
}

class ExactModes : public ::testing::TestWithParam<std::tuple<AttentionMode, bool>> {};

TEST_P(ExactModes, MatchTheFloat64OracleOnEveryShard) {
  const auto [mode, causal] = GetParam();
  const Problem pr = make_problem(mode, causal, 1234);
  const auto& s = pr.shape;
  Session session = Session::from_mpi(MPI_COMM_WORLD, Backend::kCpu);
  DistributedAttention layer(session, s, pr.options);
  const Shard sh = run_layer(session, pr, layer);

  const test::NaiveShape ns{s.batch, s.seq_len, s.heads, s.kv_heads, s.head_dim, causal};
  const test::NaiveResult ref = test::naive_attention(ns, pr.q, pr.k, pr.v, pr.d_o);
  const auto pos = layer.positions();
  const double tol = 1e-5;
  const int qrow = s.heads * s.head_dim, krow = s.kv_heads * s.head_dim;
  EXPECT_LT(rel_error(sh.o, test::take_rows(ref.o, s.batch, s.seq_len, qrow, pos)), tol) << "O";
  EXPECT_LT(rel_error(sh.lse, test::take_lse(ref.lse, s.batch, s.heads, s.seq_len, pos)), tol) << "LSE";
  EXPECT_LT(rel_error(sh.d_q, test::take_rows(ref.d_q, s.batch, s.seq_len, qrow, pos)), tol) << "dQ";
  EXPECT_LT(rel_error(sh.d_k, test::take_rows(ref.d_k, s.batch, s.seq_len, krow, pos)), tol) << "dK";
  EXPECT_LT(rel_error(sh.d_v, test::take_rows(ref.d_v, s.batch, s.seq_len, krow, pos)), tol) << "dV";
}

TEST_P(ExactModes, BytesSentMatchThePlan) {
  const auto [mode, causal] = GetParam();
  const Problem pr = make_problem(mode, causal, 99);
  Session session = Session::from_mpi(MPI_COMM_WORLD, Backend::kCpu);
  DistributedAttention layer(session, pr.shape, pr.options);
  session.comm().reset_counters();
  const Shard sh = run_layer(session, pr, layer);
  const LayerPlan plan = plan_layer(pr.shape, pr.options);
  const auto total = session.comm().counters().total();
  EXPECT_EQ(total.bytes_sent, static_cast<std::uint64_t>(plan.bytes_sent_fwd + plan.bytes_sent_bwd));
  EXPECT_EQ(total.bytes_received, static_cast<std::uint64_t>(plan.bytes_recv_fwd + plan.bytes_recv_bwd));
}

// Changing every token after position t changes neither row t's output nor, with the loss on rows
// <= t only, any gradient reaching positions <= t.
TEST_P(ExactModes, CausalLeakCheck) {
  const auto [mode, causal] = GetParam();
  if (!causal) return;  // the property is causal attention's
  Problem a = make_problem(mode, true, 7);
  const auto& s = a.shape;
  const std::int64_t t = s.seq_len / 2 + 5;
  auto zero_after = [&](std::vector<double>& x, int row) {
    for (int b = 0; b < s.batch; ++b)
      for (std::int64_t r = t + 1; r < s.seq_len; ++r)
        for (int c = 0; c < row; ++c) x[(b * s.seq_len + r) * row + c] = 0.0;
  };
  zero_after(a.d_o, s.heads * s.head_dim);
  Problem b = a;
  const auto other = make_problem(mode, true, 8);
  auto replace_after = [&](std::vector<double>& x, const std::vector<double>& y, int row) {
    for (int bb = 0; bb < s.batch; ++bb)
      for (std::int64_t r = t + 1; r < s.seq_len; ++r)
        for (int c = 0; c < row; ++c) x[(bb * s.seq_len + r) * row + c] = y[(bb * s.seq_len + r) * row + c];
  };
  replace_after(b.q, other.q, s.heads * s.head_dim);
  replace_after(b.k, other.k, s.kv_heads * s.head_dim);
  replace_after(b.v, other.v, s.kv_heads * s.head_dim);
  Session session = Session::from_mpi(MPI_COMM_WORLD, Backend::kCpu);
  DistributedAttention layer(session, s, a.options);
  const Shard ra = run_layer(session, a, layer);
  const Shard rb = run_layer(session, b, layer);
  const auto pos = layer.positions();
  test::expect_same_rows_up_to(ra, rb, pos, t, s.batch, s.heads, s.kv_heads, s.head_dim);
}

INSTANTIATE_TEST_SUITE_P(Attention, ExactModes,
                         ::testing::Combine(::testing::Values(AttentionMode::kRing, AttentionMode::kUlysses,
                                                              AttentionMode::kAllGather),
                                            ::testing::Bool()),
                         [](const auto& info) {
                           return std::string(name(std::get<0>(info.param))) +
                                  (std::get<1>(info.param) ? "_causal" : "_bidirectional");
                         });

// Bitwise equality: the same bits, with the index and relative error of the first difference.
void expect_same_bits(const std::vector<float>& x, const std::vector<float>& y, const char* what, int groups) {
  ASSERT_EQ(x.size(), y.size()) << what;
  for (std::size_t i = 0; i < x.size(); ++i)
    if (std::memcmp(&x[i], &y[i], sizeof(float)) != 0) {
      const std::vector<double> ref(y.begin(), y.end());
      ADD_FAILURE() << what << " with " << groups << " pipeline groups differs from 1 group first at " << i << ": "
                    << x[i] << " vs " << y[i] << " (relative error " << rel_error(x, ref) << ")";
      return;
    }
}

// Ulysses pipelined over head groups gives the bits of the unpipelined run for every G dividing
// h_kv / P (3 at P = 4: not a power of two), moves the same bytes, and issues G times the all-to-alls.
TEST(UlyssesPipeline, EveryGroupCountGivesTheBitsOfOneGroup) {
  for (const bool causal : {true, false}) {
    Problem pr = make_problem(AttentionMode::kUlysses, causal, 4321);
    auto& s = pr.shape;
    s.heads = 24;
    s.kv_heads = 12;  // GQA 2; h_kv / P = 12, 6, 3 for P = 1, 2, 4
    const std::size_t qn = static_cast<std::size_t>(s.batch) * s.seq_len * s.heads * s.head_dim;
    const std::size_t kn = static_cast<std::size_t>(s.batch) * s.seq_len * s.kv_heads * s.head_dim;
    pr.q = random_values(qn, 11);
    pr.k = random_values(kn, 12);
    pr.v = random_values(kn, 13);
    pr.d_o = random_values(qn, 14);
    Session session = Session::from_mpi(MPI_COMM_WORLD, Backend::kCpu);
    const LayerPlan plan = plan_layer(s, pr.options);
    const int per_rank = s.kv_heads / s.ranks;
    pr.options.pipeline_groups = 1;
    DistributedAttention one(session, s, pr.options);
    const Shard ref = run_layer(session, pr, one);
    for (int g = 0; g <= per_rank; ++g) {  // 0: auto
      if (g == 1 || (g > 0 && per_rank % g != 0)) continue;
      pr.options.pipeline_groups = g;
      const int groups = pr.options.resolved_pipeline_groups(s);
      SCOPED_TRACE(::testing::Message() << (causal ? "causal" : "bidirectional") << ", pipeline_groups " << g);
      DistributedAttention layer(session, s, pr.options);
      session.comm().reset_counters();
      const Shard sh = run_layer(session, pr, layer);
      const auto& c = session.comm().counters();
      // Per group: Q|K|V, O and LSE forward; dO and dQ|dK|dV backward.
      EXPECT_EQ(c[comm::OpKind::kAllToAll].calls, static_cast<std::uint64_t>(5 * groups));
      EXPECT_EQ(c.total().bytes_sent, static_cast<std::uint64_t>(plan.bytes_sent_fwd + plan.bytes_sent_bwd));
      EXPECT_EQ(c.total().bytes_received, static_cast<std::uint64_t>(plan.bytes_recv_fwd + plan.bytes_recv_bwd));
      expect_same_bits(sh.o, ref.o, "O", groups);
      expect_same_bits(sh.lse, ref.lse, "LSE", groups);
      expect_same_bits(sh.d_q, ref.d_q, "dQ", groups);
      expect_same_bits(sh.d_k, ref.d_k, "dK", groups);
      expect_same_bits(sh.d_v, ref.d_v, "dV", groups);
    }
  }
}

TEST(UlyssesPipeline, GroupsThatDoNotDivideTheKvHeadsPerRankFail) {
  Problem pr = make_problem(AttentionMode::kUlysses, true, 3);
  pr.options.pipeline_groups = pr.shape.kv_heads / pr.shape.ranks + 1;  // 5, 3, 2 for P = 1, 2, 4
  Session session = Session::from_mpi(MPI_COMM_WORLD, Backend::kCpu);
  try {
    DistributedAttention layer(session, pr.shape, pr.options);
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(e.message().find("pipeline groups"), std::string::npos) << e.message();
  }
}

TEST(AttentionShapes, UnevenSequenceFailsOnEveryRankBeforeCommunicating) {
  int p = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &p);
  Session session = Session::from_mpi(MPI_COMM_WORLD, Backend::kCpu);
  LayerShape s;
  s.seq_len = 2 * p * 64 + 1;  // divides by neither P > 1 nor 2P
  s.ranks = p;
  s.heads = s.kv_heads = 4;
  s.head_dim = 64;
  s.dtype = DType::kF32;
  s.causal = true;
  try {
    DistributedAttention layer(session, s, AttentionOptions{});
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(e.message().find("divide"), std::string::npos) << e.message();
  }
  s.seq_len = 2 * p * 64;
  s.head_dim = 96;
  EXPECT_THROW(DistributedAttention(session, s, AttentionOptions{}), Error);
}

// A rank given other options than its peers fails, on every rank, before any data moves.
TEST(AttentionShapes, RanksThatDisagreeFailTogether) {
  int p = 1, r = 0;
  MPI_Comm_size(MPI_COMM_WORLD, &p);
  MPI_Comm_rank(MPI_COMM_WORLD, &r);
  Session session = Session::from_mpi(MPI_COMM_WORLD, Backend::kCpu);
  Problem pr = make_problem(AttentionMode::kRing, true, 5);
  if (r == p - 1) pr.options.top_k = 8;  // differs on the last rank (everywhere when P = 1: no error then)
  if (p == 1) {
    EXPECT_NO_THROW(DistributedAttention(session, pr.shape, pr.options));
    return;
  }
  try {
    DistributedAttention layer(session, pr.shape, pr.options);
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(e.message().find("top_k is 16 on rank 0 but 8 on rank " + std::to_string(p - 1)), std::string::npos)
        << e.message();
  }
}

// A NaN on one rank is reported, with that rank, by every rank.
TEST(AttentionShapes, NonFiniteInputsFailOnEveryRank) {
  int p = 1, r = 0;
  MPI_Comm_size(MPI_COMM_WORLD, &p);
  MPI_Comm_rank(MPI_COMM_WORLD, &r);
  Session session = Session::from_mpi(MPI_COMM_WORLD, Backend::kCpu);
  Problem pr = make_problem(AttentionMode::kUlysses, false, 6);
  const int bad_rank = p - 1;
  DistributedAttention layer(session, pr.shape, pr.options);
  const auto pos = layer.positions();
  if (r == bad_rank) pr.k[(static_cast<std::size_t>(pos[3]) * pr.shape.kv_heads + 1) * pr.shape.head_dim + 2] = NAN;
  try {
    run_layer(session, pr, layer);
    FAIL() << "no error";
  } catch (const Error& e) {
    EXPECT_NE(e.message().find("1 non-finite in k on rank " + std::to_string(bad_rank)), std::string::npos)
        << e.message();
  }
}

}  // namespace
}  // namespace ringcast
