// The clustered attention mode on the CPU backend under 1, 2 and 4 ranks. Every rank builds the same
// seeded global Q, K, V, dO, runs its shard, and checks its rows against (a) the single-process
// simulation of the same P (tests/selection/clustered_pipeline.hpp): its fp32 output, and a float64
// evaluation of the same layer (its pools rebuilt in float64 from the inputs, its block tables fixed)
// with the summaries' chain rule written out in float64; (b) exact attention when the budgets cover
// every page; (c) finite differences of that float64 layer; (d) the causal leak check; (e) bytes sent
// and received, exactly as the simulation's fetch lists say, and within plan_layer() on the mean.
#include "clustered_budgets.hpp"
#include "../selection/clustered_pipeline.hpp"
#include "attention_reference.hpp"
#include "naive_attention.hpp"

#include <ringcast/attention.hpp>
#include <ringcast/error.hpp>
#include <ringcast/plan.hpp>

#include <gtest/gtest.h>
#include <mpi.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <random>

namespace ringcast {
namespace {

int world_size() {
  int p = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &p);
  return p;
}

// Seeded N(0, 1) values representable in the f32 storage.
std::vector<double> random_values(std::size_t n, std::uint64_t seed) { return test::to_f64(test::random_normal(n, seed)); }

struct Config {
  bool causal;
  SelectionUnit unit;
  ScoreKind score;
  std::string name;
  int heads = 4;
  int kv_heads = 2;  // GQA 2; with row selection the operator's attention tiles hold 128 / G tokens
};

struct Problem {
  LayerShape shape;
  AttentionOptions options;
  std::vector<double> q, k, v, d_o;  // global, token layout [B, n, heads, d]
};

// n = 768: 12 coarse blocks of 2 pages of 32 keys; 192 rows per rank at P = 4 (a partial query tile).
Problem make_problem(const Config& c, std::uint64_t seed, std::int64_t n = 768, int batch = 2) {
  Problem pr;
  auto& s = pr.shape;
  s.seq_len = n;
  s.ranks = world_size();
  s.batch = batch;
  s.heads = c.heads;
  s.kv_heads = c.kv_heads;
  s.head_dim = 64;
  s.dtype = DType::kF32;
  s.causal = c.causal;
  auto& o = pr.options;
  o.mode = AttentionMode::kClustered;
  o.selection = c.unit;
  o.score = c.score;
  test::use_small_clustered_budgets(o);
  const std::size_t qn = std::size_t(s.batch) * s.seq_len * s.heads * s.head_dim;
  const std::size_t kn = std::size_t(s.batch) * s.seq_len * s.kv_heads * s.head_dim;
  pr.q = random_values(qn, seed);
  pr.k = random_values(kn, seed + 1);
  pr.v = random_values(kn, seed + 2);
  pr.d_o = random_values(qn, seed + 3);
  return pr;
}

// Budgets that cover every page: every unit selects every eligible page, every rank fetches everything.
void cover_everything(Problem& pr) {
  const auto blocks = static_cast<int>(pr.shape.seq_len / pr.options.coarse_block());
  pr.options.top_k = static_cast<int>(pr.shape.seq_len / pr.options.page_size);
  pr.options.coarse_k = pr.options.remote_blocks = pr.options.remote_cap = blocks;
}

// The operator's reading of the options (attention_clustered.cpp), for the simulation.
kernels::SelectionOptions selection_options(const Problem& pr) {
  const auto& o = pr.options;
  kernels::SelectionOptions sel;
  sel.causal = pr.shape.causal;
  sel.unit =
      o.resolved_selection(pr.shape) == SelectionUnit::kRow ? kernels::SelectUnit::kRow : kernels::SelectUnit::kTile;
  sel.score = o.score == ScoreKind::kBound ? kernels::SelectScore::kBound : kernels::SelectScore::kMean;
  sel.top_k = o.top_k;
  sel.coarse_k = o.coarse_k;
  sel.window = pr.shape.causal ? o.window_before : 2 * o.window_bidir;
  sel.remote_blocks = o.remote_blocks;
  sel.remote_cap = o.resolved_remote_cap();
  return sel;
}

void PrintTo(const Config& c, std::ostream* os) { *os << c.name; }

double rel_error(std::span<const float> x, std::span<const double> ref) { return test::relative_error(x, ref); }

struct Shard {
  std::vector<float> o, lse, d_q, d_k, d_v;
  comm::OpCounters fwd, bwd;  // this rank's bytes of the forward and of the backward
};

Shard run_layer(const Session& session, const Problem& pr) {
  const auto& s = pr.shape;
  DistributedAttention layer(session, s, pr.options);
  const auto pos = layer.positions();
  const std::int64_t n = s.local_len();
  auto rows = [&](const std::vector<double>& x, int heads) {
    const auto r = test::take_rows(x, s.batch, s.seq_len, heads * s.head_dim, pos);
    return std::vector<float>(r.begin(), r.end());
  };
  std::vector<float> q = rows(pr.q, s.heads), k = rows(pr.k, s.kv_heads), v = rows(pr.v, s.kv_heads);
  std::vector<float> d_o = rows(pr.d_o, s.heads);
  Shard sh;
  sh.o.assign(q.size(), NAN);
  sh.lse.assign(std::size_t(s.batch) * s.heads * n, NAN);
  sh.d_q.assign(q.size(), NAN);
  sh.d_k.assign(k.size(), NAN);
  sh.d_v.assign(v.size(), NAN);
  const Device cpu = session.device();
  auto view = [&](std::vector<float>& x, int heads) {
    return TensorView::contiguous(x.data(), DType::kF32, {s.batch, n, heads, s.head_dim}, cpu);
  };
  const TensorView lse = TensorView::contiguous(sh.lse.data(), DType::kF32, {s.batch, s.heads, n}, cpu);
  session.comm().reset_counters();
  layer.forward({view(q, s.heads), view(k, s.kv_heads), view(v, s.kv_heads), view(sh.o, s.heads), lse});
  sh.fwd = session.comm().counters().total();
  session.comm().reset_counters();
  layer.backward({view(q, s.heads), view(k, s.kv_heads), view(v, s.kv_heads), view(sh.o, s.heads), lse,
                  view(d_o, s.heads), view(sh.d_q, s.heads), view(sh.d_k, s.kv_heads), view(sh.d_v, s.kv_heads)});
  sh.bwd = session.comm().counters().total();
  return sh;
}

// Batch element b of the global inputs as the simulation's problem.
test::ClusteredProblem element(const Problem& pr, int b) {
  const auto& s = pr.shape;
  test::ClusteredProblem cp;
  cp.n = s.seq_len;
  cp.heads = s.heads;
  cp.kv_heads = s.kv_heads;
  cp.head_dim = s.head_dim;
  cp.page_size = pr.options.page_size;
  cp.coarse_pages = pr.options.coarse_pages;
  auto take = [&](const std::vector<double>& x, int heads) {
    const std::size_t len = std::size_t(s.seq_len) * heads * s.head_dim;
    return std::vector<float>(x.begin() + b * len, x.begin() + (b + 1) * len);
  };
  cp.q = take(pr.q, s.heads);
  cp.k = take(pr.k, s.kv_heads);
  cp.v = take(pr.v, s.kv_heads);
  return cp;
}

// The fp32 single-process simulation of every rank: runs[b][rank].
using Simulation = std::vector<std::vector<test::RankRun>>;
Simulation simulate(const Problem& pr) {
  Simulation sim;
  for (int b = 0; b < pr.shape.batch; ++b) {
    const test::ClusteredProblem cp = element(pr, b);
    const test::GlobalSummaries gs(cp);
    sim.emplace_back();
    for (int r = 0; r < pr.shape.ranks; ++r)
      sim.back().push_back(test::run_rank(cp, gs, pr.shape.ranks, r, selection_options(pr)));
  }
  return sim;
}

// Whether some rank's rows see summaries in place of keys (the budgets are sparse).
bool attends_to_summaries(const Simulation& sim) {
  for (const test::RankRun& run : sim[0])
    for (const kernels::BlockEntry& e : run.table.entries)
      if (e.flags & kernels::kEntryKeyBias) return true;
  return false;
}

// The layer in float64 with the simulation's layouts and tables fixed: pools rebuilt from pr's inputs
// (summaries as float64 means), attention by the float64 oracle, and the chain rule of the pool back to
// the global keys (a summary key's gradient reaches each key it stands for divided by their count).
// Global token layouts; lse [B, h, n]; loss = sum(O * dO).
struct Float64Layer {
  std::vector<double> o, lse, d_q, d_k, d_v;
  double loss = 0;
};

Float64Layer float64_layer(const Problem& pr, const Simulation& sim, bool gradients) {
  const auto& s = pr.shape;
  const int d = s.head_dim, ps = pr.options.page_size, hk = s.kv_heads;
  const std::int64_t n = s.seq_len, n_loc = s.local_len(), bk = pr.options.coarse_block();
  const std::size_t qrow = std::size_t(s.heads) * d, krow = std::size_t(hk) * d;
  Float64Layer out;
  out.o.assign(std::size_t(s.batch) * n * qrow, 0.0);
  out.lse.assign(std::size_t(s.batch) * s.heads * n, 0.0);
  out.d_q = out.o;
  out.d_k.assign(std::size_t(s.batch) * n * krow, 0.0);
  out.d_v = out.d_k;
  for (int b = 0; b < s.batch; ++b) {
    const double* K = pr.k.data() + b * n * krow;
    const double* V = pr.v.data() + b * n * krow;
    // Mean of `count` keys from position pos0, head g, channel c.
    auto mean = [&](const double* x, std::int64_t pos0, std::int64_t count, int g, int c) {
      double sum = 0;
      for (std::int64_t i = pos0; i < pos0 + count; ++i) sum += x[i * krow + g * d + c];
      return sum / static_cast<double>(count);
    };
    for (int r = 0; r < s.ranks; ++r) {
      const test::RankRun& run = sim[b][r];
      const std::int64_t pages = run.shape.num_pages;
      // What key slot (g, pool page, j) stands for: [first position, count), or count 0.
      auto stands_for = [&](const kernels::ClusteredLayout& L, std::int64_t pp,
                            int j) -> std::pair<std::int64_t, std::int64_t> {
        if (pp < L.resident_pages()) {
          const std::int64_t gp = L.pool_page_global(pp);
          return gp < 0 ? std::pair<std::int64_t, std::int64_t>{0, 0} : std::pair{gp * ps + j, std::int64_t{1}};
        }
        if (pp < L.coarse_summary_first_page()) {
          const std::int64_t res = (pp - L.page_summary_first_page()) * ps + j;
          const std::int64_t gp = res < L.resident_pages() ? L.pool_page_global(res) : -1;
          return gp < 0 ? std::pair<std::int64_t, std::int64_t>{0, 0} : std::pair{gp * ps, std::int64_t{ps}};
        }
        const std::int64_t blk = (pp - L.coarse_summary_first_page()) * ps + j;
        return blk < L.num_blocks() ? std::pair{blk * bk, bk} : std::pair<std::int64_t, std::int64_t>{0, 0};
      };
      std::vector<double> kp(std::size_t(hk * pages * ps * d), 0.0), vp(kp.size(), 0.0);
      for (int g = 0; g < hk; ++g)
        for (std::int64_t pp = 0; pp < pages; ++pp)
          for (int j = 0; j < ps; ++j) {
            const auto [pos0, count] = stands_for(run.layouts[g], pp, j);
            if (count == 0) continue;
            for (int c = 0; c < d; ++c) {
              const std::size_t at = ((g * pages + pp) * ps + j) * d + c;
              kp[at] = mean(K, pos0, count, g, c);
              vp[at] = mean(V, pos0, count, g, c);
            }
          }
      const std::vector<double> bias(run.key_bias.begin(), run.key_bias.end());
      const std::vector<double> q(pr.q.begin() + (b * n + r * n_loc) * qrow,
                                  pr.q.begin() + (b * n + (r + 1) * n_loc) * qrow);
      const std::vector<double> d_o(pr.d_o.begin() + (b * n + r * n_loc) * qrow,
                                    pr.d_o.begin() + (b * n + (r + 1) * n_loc) * qrow);
      const test::ReferenceProblem rp{run.shape, 1.0 / std::sqrt(double(d)), &run.table, run.q_pos, q, kp, vp, bias};
      const test::ReferenceOutputs fwd = test::reference_attention_forward(rp);
      for (std::size_t i = 0; i < fwd.o.size(); ++i) {
        out.o[(b * n + r * n_loc) * qrow + i] = fwd.o[i];
        out.loss += fwd.o[i] * d_o[i];
      }
      for (int h = 0; h < s.heads; ++h)
        for (std::int64_t i = 0; i < n_loc; ++i)
          out.lse[(b * s.heads + h) * n + r * n_loc + i] = fwd.lse[h * n_loc + i];
      if (!gradients) continue;
      const test::ReferenceGradients grad = test::reference_attention_backward(rp, d_o);
      std::copy(grad.d_q.begin(), grad.d_q.end(), out.d_q.begin() + (b * n + r * n_loc) * qrow);
      for (int g = 0; g < hk; ++g)
        for (std::int64_t pp = 0; pp < pages; ++pp)
          for (int j = 0; j < ps; ++j) {
            const auto [pos0, count] = stands_for(run.layouts[g], pp, j);
            for (std::int64_t i = pos0; i < pos0 + count; ++i)
              for (int c = 0; c < d; ++c) {
                const std::size_t from = ((g * pages + pp) * ps + j) * d + c, to = (b * n + i) * krow + g * d + c;
                out.d_k[to] += grad.d_k[from] / static_cast<double>(count);
                out.d_v[to] += grad.d_v[from] / static_cast<double>(count);
              }
          }
    }
  }
  return out;
}

class Clustered : public ::testing::TestWithParam<Config> {
 protected:
  Session session = Session::from_mpi(MPI_COMM_WORLD, Backend::kCpu);
  std::vector<std::int32_t> positions(const Problem& pr) const {
    return shard_positions(pr.shape, pr.options, session.rank());
  }
  std::vector<double> rows(const Problem& pr, const std::vector<double>& x, int heads) const {
    return test::take_rows(x, pr.shape.batch, pr.shape.seq_len, heads * pr.shape.head_dim, positions(pr));
  }
  std::vector<double> lse_rows(const Problem& pr, const std::vector<double>& lse) const {
    return test::take_lse(lse, pr.shape.batch, pr.shape.heads, pr.shape.seq_len, positions(pr));
  }
};

TEST_P(Clustered, MatchesTheSingleProcessSimulation) {
  const Problem pr = make_problem(GetParam(), 11);
  const auto& s = pr.shape;
  const Shard sh = run_layer(session, pr);
  const Simulation sim = simulate(pr);
  // The simulation's fp32 output of this rank.
  std::vector<double> sim_o, sim_lse;
  for (int b = 0; b < s.batch; ++b) {
    const test::RankRun& run = sim[b][session.rank()];
    sim_o.insert(sim_o.end(), run.o.begin(), run.o.end());
    sim_lse.insert(sim_lse.end(), run.lse.begin(), run.lse.end());
  }
  // The budgets are sparse: some rank's rows see summaries in place of keys.
  EXPECT_TRUE(attends_to_summaries(sim)) << "no rank attends to a summary: the budgets are not sparse";
  EXPECT_LT(rel_error(sh.o, sim_o), 1e-6) << "O vs the fp32 simulation";
  EXPECT_LT(rel_error(sh.lse, sim_lse), 1e-6) << "LSE vs the fp32 simulation";
  const Float64Layer ref = float64_layer(pr, sim, true);
  const double tol = 1e-5;
  EXPECT_LT(rel_error(sh.o, rows(pr, ref.o, s.heads)), tol) << "O";
  EXPECT_LT(rel_error(sh.lse, lse_rows(pr, ref.lse)), tol) << "LSE";
  EXPECT_LT(rel_error(sh.d_q, rows(pr, ref.d_q, s.heads)), tol) << "dQ";
  EXPECT_LT(rel_error(sh.d_k, rows(pr, ref.d_k, s.kv_heads)), tol) << "dK";
  EXPECT_LT(rel_error(sh.d_v, rows(pr, ref.d_v, s.kv_heads)), tol) << "dV";
}

TEST_P(Clustered, BudgetsThatCoverEveryPageGiveExactAttention) {
  Problem pr = make_problem(GetParam(), 21);
  cover_everything(pr);
  const auto& s = pr.shape;
  const Shard sh = run_layer(session, pr);
  const test::NaiveShape ns{s.batch, s.seq_len, s.heads, s.kv_heads, s.head_dim, s.causal};
  const test::NaiveResult ref = test::naive_attention(ns, pr.q, pr.k, pr.v, pr.d_o);
  const double tol = 1e-5;
  EXPECT_LT(rel_error(sh.o, rows(pr, ref.o, s.heads)), tol) << "O";
  EXPECT_LT(rel_error(sh.lse, lse_rows(pr, ref.lse)), tol) << "LSE";
  EXPECT_LT(rel_error(sh.d_q, rows(pr, ref.d_q, s.heads)), tol) << "dQ";
  EXPECT_LT(rel_error(sh.d_k, rows(pr, ref.d_k, s.kv_heads)), tol) << "dK";
  EXPECT_LT(rel_error(sh.d_v, rows(pr, ref.d_v, s.kv_heads)), tol) << "dV";
}

// Per rank: the bytes each message kind carries, with the fetched blocks counted from the
// simulation's fetch lists; on the mean over ranks, within plan_layer().
TEST_P(Clustered, BytesFollowTheSelectionsAndThePlan) {
  const Problem pr = make_problem(GetParam(), 31);
  const auto& s = pr.shape;
  const Shard sh = run_layer(session, pr);
  const Simulation sim = simulate(pr);
  const std::int64_t p = s.ranks, r = session.rank(), d = s.head_dim;
  const std::int64_t units = std::int64_t{s.batch} * s.kv_heads,
                     local_blocks = s.local_len() / pr.options.coarse_block();
  std::int64_t fetched = 0, served = 0;  // blocks this rank fetched, blocks others fetched from it
  for (int b = 0; b < s.batch; ++b)
    for (int q = 0; q < p; ++q)
      for (const auto& L : sim[b][q].layouts)
        for (const std::int64_t id : L.fetched) {
          if (q == r) ++fetched;
          if (q != r && id / local_blocks == r) ++served;
        }
  const std::int64_t halo_out = (r + 1 < p) + (!s.causal && r > 0), halo_in = (r > 0) + (!s.causal && r + 1 < p);
  const std::int64_t block = pr.options.coarse_block() * d * 4 * 2;  // K and V, f32
  const std::int64_t checks = (p - 1) * 8, summaries = (p - 1) * units * local_blocks * 4 * d * 4;
  const std::int64_t counts = (p - 1) * units * 4, scatter = (p - 1) * units * local_blocks * 2 * d * 4;
  EXPECT_EQ(std::int64_t(sh.fwd.bytes_sent),
            3 * checks + summaries + units * halo_out * block + counts + 4 * fetched + served * block);
  EXPECT_EQ(std::int64_t(sh.fwd.bytes_received),
            3 * checks + summaries + units * halo_in * block + counts + 4 * served + fetched * block);
  EXPECT_EQ(std::int64_t(sh.bwd.bytes_sent), checks + units * halo_in * block + fetched * block + scatter);
  EXPECT_EQ(std::int64_t(sh.bwd.bytes_received), checks + units * halo_out * block + served * block + scatter);
  std::int64_t all_fetched = fetched;
  MPI_Allreduce(MPI_IN_PLACE, &all_fetched, 1, MPI_INT64_T, MPI_SUM, MPI_COMM_WORLD);
  if (p > 1) {
    EXPECT_GT(all_fetched, 0) << "no rank fetched a block: the test would not exercise the fetch";
  }
  std::array<double, 4> mean{double(sh.fwd.bytes_sent), double(sh.fwd.bytes_received), double(sh.bwd.bytes_sent),
                             double(sh.bwd.bytes_received)};
  MPI_Allreduce(MPI_IN_PLACE, mean.data(), 4, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
  const LayerPlan plan = plan_layer(s, pr.options);
  EXPECT_LE(mean[0] / p, plan.bytes_sent_fwd);
  EXPECT_LE(mean[1] / p, plan.bytes_recv_fwd);
  EXPECT_LE(mean[2] / p, plan.bytes_sent_bwd);
  EXPECT_LE(mean[3] / p, plan.bytes_recv_bwd);
}

// Changing every token after position t changes neither row t's output nor, with the loss on rows
// <= t only, any gradient reaching positions <= t.
class ClusteredCausal : public Clustered {};

TEST_P(ClusteredCausal, LeakCheck) {
  Problem a = make_problem(GetParam(), 41);
  const auto& s = a.shape;
  const std::int64_t t = s.seq_len / 2 + 37;
  const Problem other = make_problem(GetParam(), 42);
  Problem b = a;
  auto after_t = [&](int heads, auto&& fn) {
    const std::int64_t row = std::int64_t{heads} * s.head_dim;
    for (int bb = 0; bb < s.batch; ++bb)
      for (std::int64_t i = (bb * s.seq_len + t + 1) * row; i < (bb + 1) * s.seq_len * row; ++i) fn(i);
  };
  after_t(s.heads, [&](std::int64_t i) {
    a.d_o[i] = b.d_o[i] = 0.0;
    b.q[i] = other.q[i];
  });
  after_t(s.kv_heads, [&](std::int64_t i) {
    b.k[i] = other.k[i];
    b.v[i] = other.v[i];
  });
  const Shard ra = run_layer(session, a), rb = run_layer(session, b);
  const auto pos = positions(a);
  test::expect_same_rows_up_to(ra, rb, pos, t, s.batch, s.heads, s.kv_heads, s.head_dim);
}

INSTANTIATE_TEST_SUITE_P(Attention, Clustered,
                         ::testing::Values(Config{true, SelectionUnit::kRow, ScoreKind::kBound, "causal_row"},
                                           Config{true, SelectionUnit::kTile, ScoreKind::kBound, "causal_tile"},
                                           Config{false, SelectionUnit::kTile, ScoreKind::kBound, "bidirectional_tile"},
                                           Config{false, SelectionUnit::kRow, ScoreKind::kMean,
                                                  "bidirectional_row_mean"},
                                           Config{true, SelectionUnit::kRow, ScoreKind::kBound, "causal_row_gqa4", 4,
                                                  1},
                                           Config{false, SelectionUnit::kRow, ScoreKind::kBound,
                                                  "bidirectional_row_gqa8", 8, 1}),
                         [](const auto& info) { return info.param.name; });
INSTANTIATE_TEST_SUITE_P(Attention, ClusteredCausal,
                         ::testing::Values(Config{true, SelectionUnit::kRow, ScoreKind::kBound, "causal_row"},
                                           Config{true, SelectionUnit::kTile, ScoreKind::kBound, "causal_tile"},
                                           Config{true, SelectionUnit::kRow, ScoreKind::kBound, "causal_row_gqa4", 4,
                                                  1}),
                         [](const auto& info) { return info.param.name; });

// The gradients are the derivatives of the layer: central differences of the float64 layer (tables
// fixed) at a few elements of this rank's q, k and v, after checking that perturbing them by more than
// the step leaves every selection as it was.
TEST(ClusteredGradients, MatchFiniteDifferences) {
  Session session = Session::from_mpi(MPI_COMM_WORLD, Backend::kCpu);
  const Config causal_row{true, SelectionUnit::kRow, ScoreKind::kBound, "causal_row"};
  Problem pr = make_problem(causal_row, 51, /*n=*/512, /*batch=*/1);
  pr.options.top_k = pr.options.coarse_k = pr.options.remote_blocks = 1;  // page and coarse summaries at every P
  const auto& s = pr.shape;
  const Shard sh = run_layer(session, pr);
  const Simulation sim = simulate(pr);
  ASSERT_TRUE(attends_to_summaries(sim));
  const std::int64_t n_loc = s.local_len(), first = session.rank() * n_loc;
  std::mt19937_64 rng(7 + session.rank());
  struct Probe {
    std::vector<double> Problem::*input;
    const std::vector<float>* grad;
    int heads;
    const char* name;
  };
  const Probe probes[] = {{&Problem::k, &sh.d_k, s.kv_heads, "k"},
                          {&Problem::v, &sh.d_v, s.kv_heads, "v"},
                          {&Problem::q, &sh.d_q, s.heads, "q"}};
  for (const Probe& probe : probes)
    for (int trial = 0; trial < 3; ++trial) {
      const std::int64_t row = std::int64_t{probe.heads} * s.head_dim;
      const std::int64_t local = std::uniform_int_distribution<std::int64_t>(0, n_loc * row - 1)(rng);
      const std::size_t at = static_cast<std::size_t>(first * row + local);
      auto perturbed = [&](double by) {
        Problem x = pr;
        (x.*probe.input)[at] += by;
        return x;
      };
      for (const double by : {-1.0 / 64, 1.0 / 64}) {  // fp32-representable and far above the step
        const Simulation other = simulate(perturbed(by));
        for (int r = 0; r < s.ranks; ++r)
          for (int g = 0; g < s.kv_heads; ++g) {
            ASSERT_EQ(other[0][r].layouts[g].fetched, sim[0][r].layouts[g].fetched) << probe.name << " moved a fetch";
            ASSERT_EQ(other[0][r].selections[g].pages, sim[0][r].selections[g].pages) << probe.name << " moved a page";
            ASSERT_EQ(other[0][r].selections[g].blocks, sim[0][r].selections[g].blocks)
                << probe.name << " moved a block";
          }
      }
      const double step = 1e-4;
      const double fd =
          (float64_layer(perturbed(step), sim, false).loss - float64_layer(perturbed(-step), sim, false).loss) /
          (2 * step);
      const double got = (*probe.grad)[static_cast<std::size_t>(local)];
      EXPECT_NEAR(got, fd, 1e-4 * (1 + std::abs(fd))) << "d" << probe.name << " at local element " << local;
    }
}

// The attended entries (what `check --dump` writes), read in global terms at sparse budgets: every
// key a row may see is covered exactly once (window or selected page, page summary, coarse summary)
// and no other key is; summaries of both kinds are in use on some rank.
TEST_P(Clustered, AttendedEntriesCoverEveryVisibleKeyOnce) {
  const Problem pr = make_problem(GetParam(), 71);
  const auto& s = pr.shape;
  Session session = Session::from_mpi(MPI_COMM_WORLD, Backend::kCpu);
  DistributedAttention layer(session, s, pr.options);
  const auto pos = layer.positions();
  const std::int64_t n_loc = s.local_len(), ps = pr.options.page_size, bk = pr.options.coarse_block();
  auto rows = [&](const std::vector<double>& x, int heads) {
    const auto r = test::take_rows(x, s.batch, s.seq_len, heads * s.head_dim, pos);
    return std::vector<float>(r.begin(), r.end());
  };
  std::vector<float> q = rows(pr.q, s.heads), k = rows(pr.k, s.kv_heads), v = rows(pr.v, s.kv_heads);
  std::vector<float> o(q.size()), lse(std::size_t(s.batch) * s.heads * n_loc);
  auto view = [&](std::vector<float>& x, int heads) {
    return TensorView::contiguous(x.data(), DType::kF32, {s.batch, n_loc, heads, s.head_dim}, session.device());
  };
  EXPECT_THROW(layer.table_entries(), Error);  // no forward yet
  layer.forward({view(q, s.heads), view(k, s.kv_heads), view(v, s.kv_heads), view(o, s.heads),
                 TensorView::contiguous(lse.data(), DType::kF32, {s.batch, s.heads, n_loc}, session.device())});
  const auto entries = layer.attended_entries();
  // The table's size: one list per (element, attention tile, KV head), each holding at least one page;
  // every window or selected page attended is one entry of its tile's list. With row selection under
  // GQA an attention tile is 128 / G tokens, each token's G heads (kernels/grouped_rows.hpp).
  const TableEntries table = layer.table_entries();
  const std::int64_t exact_pages = std::count_if(entries.begin(), entries.end(), [](const AttendedEntry& e) {
    return e.kind == AttendedKind::kWindow || e.kind == AttendedKind::kSelected;
  });
  const std::int64_t group = pr.options.resolved_selection(s) == SelectionUnit::kRow ? s.heads / s.kv_heads : 1;
  EXPECT_EQ(table.units, s.batch * ((n_loc * group + kernels::kQueryTile - 1) / kernels::kQueryTile) * s.kv_heads);
  EXPECT_GE(table.total, exact_pages);
  EXPECT_GE(table.total, table.units);
  // coverage[(b, tile, kv_head)][row][key position]
  const std::int64_t tiles = (n_loc + kernels::kQueryTile - 1) / kernels::kQueryTile;
  std::vector<std::uint8_t> cover(std::size_t(s.batch) * tiles * s.kv_heads * kernels::kQueryTile * s.seq_len, 0);
  bool page_summaries = false, coarse_summaries = false;
  for (const auto& e : entries) {
    std::int64_t first = e.global_id * ps, count = ps;
    if (e.kind == AttendedKind::kCoarseSummary) first = e.global_id * bk, count = bk;
    page_summaries |= e.kind == AttendedKind::kPageSummary;
    coarse_summaries |= e.kind == AttendedKind::kCoarseSummary;
    for (int r = 0; r < kernels::kQueryTile; ++r) {
      if (!((e.row_mask[r / 64] >> (r % 64)) & 1)) continue;
      const std::int64_t row_pos = e.first_row_pos + r;
      for (std::int64_t key = first; key < first + count; ++key) {
        if (e.causal && key > row_pos) continue;  // the per-row position mask of window pages
        ++cover[((std::size_t(e.batch) * tiles + e.tile) * s.kv_heads + e.kv_head) * kernels::kQueryTile * s.seq_len +
                std::size_t(r) * s.seq_len + key];
      }
    }
  }
  for (int b = 0; b < s.batch; ++b)
    for (std::int64_t t = 0; t < tiles; ++t)
      for (int g = 0; g < s.kv_heads; ++g)
        for (int r = 0; r < kernels::kQueryTile && t * kernels::kQueryTile + r < n_loc; ++r) {
          const std::int64_t row_pos = pos[t * kernels::kQueryTile + r];
          for (std::int64_t key = 0; key < s.seq_len; ++key) {
            const int want = !s.causal || key <= row_pos ? 1 : 0;
            const int got = cover[((std::size_t(b) * tiles + t) * s.kv_heads + g) * kernels::kQueryTile * s.seq_len +
                                  std::size_t(r) * s.seq_len + key];
            ASSERT_EQ(got, want) << "batch " << b << " tile " << t << " kv head " << g << " row " << row_pos << " key "
                                 << key;
          }
        }
  int used[2] = {page_summaries, coarse_summaries}, anywhere[2] = {0, 0};  // some rank, not every rank
  MPI_Allreduce(used, anywhere, 2, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  EXPECT_TRUE(anywhere[0]) << "no page summary attended: budgets not sparse enough";
  EXPECT_TRUE(anywhere[1]) << "no coarse summary attended: budgets not sparse enough";
}

TEST(ClusteredShapes, WhatItCannotRunFailsOnEveryRankWithAClearMessage) {
  Session session = Session::from_mpi(MPI_COMM_WORLD, Backend::kCpu);
  const Config bidir{false, SelectionUnit::kTile, ScoreKind::kBound, "bidirectional_tile"};
  auto expect_error = [&](const Problem& pr, const std::string& words) {
    try {
      DistributedAttention layer(session, pr.shape, pr.options);
      FAIL() << "no error, expected: " << words;
    } catch (const Error& e) {
      EXPECT_NE(e.message().find(words), std::string::npos) << e.message();
    }
  };
  Problem pr = make_problem(bidir, 61);
  pr.options.placement = Placement::kZigzag;
  expect_error(pr, "placement must be contiguous");
  pr = make_problem(bidir, 61);
  pr.options.window_bidir = 65;  // a coarse block is 64 keys
  expect_error(pr, "window");
}

}  // namespace
}  // namespace ringcast
