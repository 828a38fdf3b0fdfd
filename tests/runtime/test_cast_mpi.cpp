// The clustered mode with surrogate (CAST) clusters on the CPU backend under 1, 2 and 4 ranks. Every
// rank builds the same seeded global Q, K, V, dO and surrogates S, runs its shard, and checks it
// against a float64 reference of the same algorithm simulating the P ranks, written out plainly below
// (docs/clustered-design.md "Surrogate clusters"): the clusters, what every row attends in global
// terms, O and LSE, for the joint and the cast combine; with budgets that cover every cluster, exact
// attention (the float64 oracle); gradients of Q, K, V and S against central differences of the
// reference; bytes sent against the reference's fetch lists and the plan; what it refuses.
// Inputs are planted so that every token has a clear best surrogate (keys and queries near the
// direction of a target surrogate, plus noise): the reference checks that no discrete choice
// (assignment, top-R, top-k) is closer to a tie than fp32 rounding could flip.
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
#include <limits>
#include <map>
#include <numeric>
#include <random>
#include <set>

namespace ringcast {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();
constexpr std::int64_t kTile = 128;
// Discrete choices must win by this much (relative, on values of order 1 to 10): a hundred times the
// fp32 rounding of a 64-term dot product.
constexpr double kMargin = 1e-5;

int world_size() {
  int p = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &p);
  return p;
}

// How many tokens of a rank plant themselves near each surrogate (page_size = ps):
enum class Planting {
  kBalanced,  // ps per cluster: single assignment fills every cluster, without contention
  kUneven,    // ps + 4 and ps - 4 in turn: Top-K puts tokens in several clusters or in none
  kPartial,   // twice the clusters (c = 2 n_loc / ps), per 4 of them ps, ps, 0, 0 | ps - 8, 0, 8, ps |
              // ps - 12, 12, ps - 20, 20: padding, empty clusters and empty coarse blocks
};

struct Config {
  SurrogateAssignment assignment;
  ClusterCombine combine;
  SelectionUnit unit;
  ScoreKind score;
  Planting planting;
  std::string name;
};
void PrintTo(const Config& c, std::ostream* os) { *os << c.name; }

struct Problem {
  LayerShape shape;
  AttentionOptions options;
  std::vector<double> q, k, v, d_o;  // global, token layout [B, n, heads, d]
  std::vector<double> s;             // surrogates [h_kv, c, d]
  int c() const { return options.resolved_surrogate_clusters(shape); }
};

// n = 768 over P ranks, clusters of 32 (c = 24 / P clusters per rank), coarse blocks of 2 clusters.
Problem make_problem(const Config& cfg, std::uint64_t seed, std::int64_t n = 768, int batch = 2, int heads = 4,
                     int kv_heads = 2) {
  Problem pr;
  auto& s = pr.shape;
  s.seq_len = n;
  s.ranks = world_size();
  s.batch = batch;
  s.heads = heads;
  s.kv_heads = kv_heads;
  s.head_dim = 64;
  s.dtype = DType::kF32;
  s.causal = false;
  auto& o = pr.options;
  o.mode = AttentionMode::kClustered;
  o.clusters = ClusterKind::kSurrogate;
  o.assignment = cfg.assignment;
  o.combine = cfg.combine;
  o.selection = cfg.unit;
  o.score = cfg.score;
  o.page_size = 32;
  o.coarse_pages = 2;
  o.top_k = 3;
  o.coarse_k = 2;
  o.remote_blocks = 2;
  const std::int64_t n_loc = s.local_len();
  if (cfg.planting == Planting::kPartial) o.surrogate_clusters = static_cast<int>(2 * n_loc / o.page_size);
  const int d = s.head_dim, c = pr.c(), ps = o.page_size, group = heads / kv_heads;
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal(0.0, 1.0);
  auto f32 = [](double x) { return static_cast<double>(static_cast<float>(x)); };
  // Unit directions u[g][cl]; S = 2 u; keys and queries 3 u[target] + 0.5 N(0, I).
  std::vector<double> u(static_cast<std::size_t>(kv_heads) * c * d);
  for (std::size_t i = 0; i < u.size(); i += d) {
    double norm = 0;
    for (int e = 0; e < d; ++e) norm += (u[i + e] = normal(rng)) * u[i + e];
    for (int e = 0; e < d; ++e) u[i + e] /= std::sqrt(norm);
  }
  pr.s.resize(u.size());
  for (std::size_t i = 0; i < u.size(); ++i) pr.s[i] = f32(2.0 * u[i]);
  pr.q.resize(std::size_t(batch) * n * heads * d);
  pr.k.resize(std::size_t(batch) * n * kv_heads * d);
  pr.v.resize(pr.k.size());
  pr.d_o.resize(pr.q.size());
  for (int b = 0; b < batch; ++b)
    for (int r = 0; r < s.ranks; ++r)
      for (int g = 0; g < kv_heads; ++g) {
        // Targets of rank r's tokens (Planting).
        std::vector<int> target;
        for (int cl = 0; cl < c; ++cl) {
          int count = ps;
          if (cfg.planting == Planting::kUneven && !(c % 2 == 1 && cl == c - 1)) count += cl % 2 == 0 ? 4 : -4;
          if (cfg.planting == Planting::kPartial) {
            // Tokens missing from each cluster of a group of 4 (page_size 32): a group holds 2 ps.
            constexpr std::array<std::array<int, 4>, 3> kGroups{{{0, 0, 32, 32}, {8, 32, 24, 0}, {12, 20, 20, 12}}};
            count = ps - kGroups[(cl / 4) % 3][cl % 4];
          }
          target.insert(target.end(), std::size_t(count), cl);
        }
        EXPECT_EQ(std::int64_t(target.size()), n_loc) << "planting";
        std::shuffle(target.begin(), target.end(), rng);
        for (std::int64_t j = 0; j < n_loc; ++j) {
          const std::int64_t t = r * n_loc + j;
          const double* dir = u.data() + (std::size_t(g) * c + target[std::size_t(j)]) * d;
          for (int e = 0; e < d; ++e) pr.k[((b * n + t) * kv_heads + g) * d + e] = f32(3.0 * dir[e] + 0.5 * normal(rng));
          for (int hh = g * group; hh < (g + 1) * group; ++hh)
            for (int e = 0; e < d; ++e) pr.q[((b * n + t) * heads + hh) * d + e] = f32(3.0 * dir[e] + 0.5 * normal(rng));
        }
      }
  for (double& x : pr.v) x = f32(normal(rng));
  for (double& x : pr.d_o) x = f32(normal(rng));
  return pr;
}

// ---------------------------------------------------------------------------------------------------
// The float64 reference. Per (element b, KV head g) everything of every simulated rank r.

struct Scored {
  double score;
  std::int64_t id;
};
bool better(const Scored& a, const Scored& b) { return a.score > b.score || (a.score == b.score && a.id < b.id); }

// The best k of `items` (best first); the margin to the first one left out goes into `margin`.
std::vector<Scored> best_k(std::vector<Scored> items, int k, double& margin) {
  std::sort(items.begin(), items.end(), better);
  if (static_cast<int>(items.size()) > k && k > 0)
    margin = std::min(margin, (items[k - 1].score - items[k].score) / (1.0 + std::abs(items[k].score)));
  items.resize(std::min<std::size_t>(items.size(), static_cast<std::size_t>(std::max(k, 0))));
  return items;
}

// What the reference decides; equal choices mean equal discrete structure.
struct HeadChoices {
  std::vector<std::vector<std::vector<std::int32_t>>> members;  // [rank][cluster]: local tokens, ascending
  std::vector<std::vector<std::int64_t>> fetched;               // [rank]: global blocks, best first
  std::vector<std::vector<std::vector<std::int64_t>>> selected;  // [rank][unit]: global clusters, ascending
  bool operator==(const HeadChoices&) const = default;
};

// What a row attends in global terms: (kind, id) as in AttendedEntry.
using Seen = std::vector<std::pair<int, std::int64_t>>;

struct Reference {
  std::vector<HeadChoices> choices;  // [b * h_kv + g]
  std::vector<double> o, lse;        // global [B, n, h, d], [B, h, n]
  std::vector<Seen> seen;            // [(b * h_kv + g) * n + t] (joint; cast: own clusters)
  double margin = kInf;              // the closest discrete call
  double loss = 0;                   // sum(O * dO)
};

class ReferenceRun {
 public:
  ReferenceRun(const Problem& pr, const std::vector<HeadChoices>* fixed) : pr_(pr), fixed_(fixed) {
    const auto& s = pr.shape;
    n_ = s.seq_len;
    p_ = s.ranks;
    n_loc_ = s.local_len();
    c_ = pr.c();
    ps_ = pr.options.page_size;
    cp_ = pr.options.coarse_pages;
    d_ = s.head_dim;
    h_ = s.heads;
    hk_ = s.kv_heads;
    group_ = h_ / hk_;
    out_.o.assign(std::size_t(s.batch) * n_ * h_ * d_, 0.0);
    out_.lse.assign(std::size_t(s.batch) * h_ * n_, -kInf);
    out_.seen.resize(std::size_t(s.batch) * hk_ * n_);
    for (int b = 0; b < s.batch; ++b)
      for (int g = 0; g < hk_; ++g) run_head(b, g);
    for (std::size_t i = 0; i < out_.o.size(); ++i) out_.loss += out_.o[i] * pr.d_o[i];
  }
  Reference take() { return std::move(out_); }

 private:
  const double* q(int b, std::int64_t t, int hh) const { return pr_.q.data() + ((b * n_ + t) * h_ + hh) * d_; }
  const double* k(int b, std::int64_t t, int g) const { return pr_.k.data() + ((b * n_ + t) * hk_ + g) * d_; }
  const double* v(int b, std::int64_t t, int g) const { return pr_.v.data() + ((b * n_ + t) * hk_ + g) * d_; }
  const double* s(int g, int cl) const { return pr_.s.data() + (std::size_t(g) * c_ + cl) * d_; }
  double dot(const double* a, const double* b) const {
    double x = 0;
    for (int e = 0; e < d_; ++e) x += a[e] * b[e];
    return x;
  }
  static std::vector<double> softmax(std::vector<double> a) {
    const double m = *std::max_element(a.begin(), a.end());
    double sum = 0;
    for (double& x : a) sum += (x = std::exp(x - m));
    for (double& x : a) x /= sum;
    return a;
  }

  // Cluster (global id r * c + cl) and block (global id r * c / cp + l) data of one (b, g).
  struct Cluster {
    std::vector<std::int64_t> members;  // global positions
    std::vector<double> key, value, lo, hi;
    double lse = -kInf;  // log sum exp A_k over the members
    int count() const { return static_cast<int>(members.size()); }
  };
  struct Block {
    std::vector<double> key, value, lo, hi;
    int count = 0;
  };

  // Affinities of rank r's tokens, the assignment rule of kernels/cast.hpp, the members.
  std::vector<std::vector<std::int32_t>> assign(int b, int g, int r, std::vector<std::vector<double>>& a_k) {
    const auto& o = pr_.options;
    std::vector<std::vector<double>> ag(static_cast<std::size_t>(n_loc_), std::vector<double>(std::size_t(c_), 0.0));
    a_k.assign(std::size_t(n_loc_), std::vector<double>(std::size_t(c_)));
    for (std::int64_t j = 0; j < n_loc_; ++j) {
      const std::int64_t t = r * n_loc_ + j;
      for (int cl = 0; cl < c_; ++cl) a_k[j][cl] = dot(k(b, t, g), s(g, cl));
      const std::vector<double> wk = softmax(a_k[j]);
      for (int cl = 0; cl < c_; ++cl) ag[j][cl] += wk[cl];
      for (int hh = g * group_; hh < (g + 1) * group_; ++hh) {
        std::vector<double> aq(static_cast<std::size_t>(c_));
        for (int cl = 0; cl < c_; ++cl) aq[cl] = dot(q(b, t, hh), s(g, cl));
        const std::vector<double> wq = softmax(aq);
        for (int cl = 0; cl < c_; ++cl) ag[j][cl] += wq[cl] / group_;
      }
    }
    std::vector<std::vector<std::int32_t>> members(static_cast<std::size_t>(c_));
    if (o.assignment == SurrogateAssignment::kTopK) {
      for (int cl = 0; cl < c_; ++cl) {
        std::vector<Scored> tokens;
        for (std::int64_t j = 0; j < n_loc_; ++j) tokens.push_back({ag[j][cl], j});
        for (const Scored& x : best_k(tokens, ps_, out_.margin)) members[cl].push_back(static_cast<std::int32_t>(x.id));
      }
    } else {
      // Greedy: tokens by their best affinity, each into its best cluster with room. The inputs are
      // planted without contention: every token must land in its best cluster, by a margin.
      std::vector<Scored> order;
      for (std::int64_t j = 0; j < n_loc_; ++j) order.push_back({*std::max_element(ag[j].begin(), ag[j].end()), j});
      std::stable_sort(order.begin(), order.end(), [](const Scored& a, const Scored& b) { return a.score > b.score; });
      for (const Scored& x : order) {
        std::vector<Scored> clusters;
        for (int cl = 0; cl < c_; ++cl) clusters.push_back({ag[x.id][cl], cl});
        std::sort(clusters.begin(), clusters.end(), better);
        out_.margin = std::min(out_.margin, clusters[0].score - clusters[1].score);
        for (const Scored& cl : clusters)
          if (static_cast<int>(members[cl.id].size()) < ps_) {
            EXPECT_EQ(cl.id, clusters[0].id) << "the planted inputs contend for a cluster (token " << x.id << ")";
            members[cl.id].push_back(static_cast<std::int32_t>(x.id));
            break;
          }
      }
    }
    for (auto& m : members) std::sort(m.begin(), m.end());
    return members;
  }

  void run_head(int b, int g) {
    HeadChoices made;
    const HeadChoices* fixed = fixed_ ? &(*fixed_)[std::size_t(b) * hk_ + g] : nullptr;
    const double scale = 1.0 / std::sqrt(double(d_));
    std::vector<Cluster> clusters(static_cast<std::size_t>(p_) * c_);
    std::vector<std::vector<std::vector<double>>> a_k(static_cast<std::size_t>(p_));
    for (int r = 0; r < p_; ++r) {
      made.members.push_back(assign(b, g, r, a_k[r]));
      if (fixed) made.members[r] = fixed->members[r];
      for (int cl = 0; cl < c_; ++cl) {
        Cluster& x = clusters[std::size_t(r) * c_ + cl];
        const auto& mem = made.members[r][cl];
        x.key.assign(d_, 0.0);
        x.value.assign(d_, 0.0);
        x.lo.assign(d_, kInf);
        x.hi.assign(d_, -kInf);
        if (mem.empty()) continue;
        double m = -kInf, sum = 0;
        for (const auto j : mem) m = std::max(m, a_k[r][j][cl]);
        for (const auto j : mem) sum += std::exp(a_k[r][j][cl] - m);
        x.lse = m + std::log(sum);
        for (const auto j : mem) {
          const std::int64_t t = r * n_loc_ + j;
          const double w = std::exp(a_k[r][j][cl] - x.lse);
          x.members.push_back(t);
          for (int e = 0; e < d_; ++e) {
            x.key[e] += w * k(b, t, g)[e];
            x.value[e] += w * v(b, t, g)[e];
            x.lo[e] = std::min(x.lo[e], k(b, t, g)[e]);
            x.hi[e] = std::max(x.hi[e], k(b, t, g)[e]);
          }
        }
      }
    }
    if (pr_.options.combine == ClusterCombine::kCast) {
      cast_outputs(b, g, made, clusters, a_k);
    } else {
      joint_outputs(b, g, made, fixed, clusters, scale);
    }
    out_.choices.push_back(std::move(made));
  }

  void joint_outputs(int b, int g, HeadChoices& made, const HeadChoices* fixed, const std::vector<Cluster>& clusters,
                     double scale) {
    const auto& o = pr_.options;
    const std::int64_t lb = c_ / cp_, nb = std::int64_t{p_} * lb;
    std::vector<Block> blocks(static_cast<std::size_t>(nb));
    for (std::int64_t bl = 0; bl < nb; ++bl) {
      Block& x = blocks[bl];
      x.key.assign(d_, 0.0);
      x.value.assign(d_, 0.0);
      x.lo.assign(d_, kInf);
      x.hi.assign(d_, -kInf);
      for (std::int64_t gc = bl * cp_; gc < (bl + 1) * cp_; ++gc) {
        const Cluster& cl = clusters[gc];
        x.count += cl.count();
        for (int e = 0; e < d_; ++e) {
          x.key[e] += cl.count() * cl.key[e];
          x.value[e] += cl.count() * cl.value[e];
          x.lo[e] = std::min(x.lo[e], cl.lo[e]);
          x.hi[e] = std::max(x.hi[e], cl.hi[e]);
        }
      }
      for (int e = 0; e < d_; ++e) {
        x.key[e] /= std::max(x.count, 1);
        x.value[e] /= std::max(x.count, 1);
      }
    }
    const auto score = [&](const std::vector<double>& qq, const std::vector<double>& mean, const std::vector<double>& lo,
                           const std::vector<double>& hi) {
      double x = 0;
      for (int e = 0; e < d_; ++e)
        x += o.score == ScoreKind::kMean ? qq[e] * mean[e] : std::max(qq[e] * hi[e], qq[e] * lo[e]);
      return x;
    };
    const bool row_units = o.resolved_selection(pr_.shape) == SelectionUnit::kRow;
    for (int r = 0; r < p_; ++r) {
      // Rows: tokens by their first cluster, then the tokens in none; each row's own clusters.
      std::vector<std::vector<std::int64_t>> own_of_token(static_cast<std::size_t>(n_loc_));
      for (int cl = 0; cl < c_; ++cl)
        for (const auto j : made.members[r][cl]) own_of_token[j].push_back(std::int64_t{r} * c_ + cl);
      std::vector<std::int64_t> order;
      for (int cl = 0; cl < c_; ++cl)
        for (const auto j : made.members[r][cl])
          if (own_of_token[j].front() == std::int64_t{r} * c_ + cl) order.push_back(j);
      for (std::int64_t j = 0; j < n_loc_; ++j)
        if (own_of_token[j].empty()) order.push_back(j);
      const auto query = [&](std::int64_t r0, std::int64_t r1) {
        std::vector<double> qq(static_cast<std::size_t>(d_), 0.0);
        for (std::int64_t i = r0; i < r1; ++i)
          for (int hh = g * group_; hh < (g + 1) * group_; ++hh)
            for (int e = 0; e < d_; ++e) qq[e] += q(b, r * n_loc_ + order[i], hh)[e] / double(r1 - r0);
        return qq;
      };
      const std::int64_t tiles = (n_loc_ + kTile - 1) / kTile;
      // Top-R of the remote blocks, by their best score over the rank's tiles.
      std::vector<Scored> remote;
      for (std::int64_t bl = 0; bl < nb; ++bl)
        if (bl / lb != r && blocks[bl].count > 0) remote.push_back({-kInf, bl});
      for (std::int64_t t = 0; t < tiles; ++t) {
        const auto qq = query(t * kTile, std::min(n_loc_, (t + 1) * kTile));
        for (Scored& x : remote) x.score = std::max(x.score, score(qq, blocks[x.id].key, blocks[x.id].lo, blocks[x.id].hi));
      }
      made.fetched.emplace_back();
      for (const Scored& x : best_k(remote, o.remote_blocks, out_.margin)) made.fetched.back().push_back(x.id);
      if (fixed) made.fetched[r] = fixed->fetched[r];
      std::vector<std::int64_t> usable;
      for (std::int64_t bl = std::int64_t{r} * lb; bl < (r + 1) * lb; ++bl) usable.push_back(bl);
      usable.insert(usable.end(), made.fetched[r].begin(), made.fetched[r].end());
      // Top-k per unit.
      const std::int64_t units = row_units ? n_loc_ : tiles;
      made.selected.emplace_back();
      for (std::int64_t u = 0; u < units; ++u) {
        const std::int64_t r0 = row_units ? u : u * kTile, r1 = row_units ? u + 1 : std::min(n_loc_, r0 + kTile);
        std::set<std::int64_t> any, every(own_of_token[order[r0]].begin(), own_of_token[order[r0]].end());
        for (std::int64_t i = r0; i < r1; ++i) {
          const auto& own = own_of_token[order[i]];
          any.insert(own.begin(), own.end());
          std::set<std::int64_t> both;
          for (const auto x : own)
            if (every.contains(x)) both.insert(x);
          every = both;
        }
        std::set<std::int64_t> window_blocks;
        for (const auto x : any) window_blocks.insert(x / cp_);
        const auto qq = query(r0, r1);
        std::vector<Scored> coarse;
        for (const auto bl : usable)
          if (!window_blocks.contains(bl) && blocks[bl].count > 0)
            coarse.push_back({score(qq, blocks[bl].key, blocks[bl].lo, blocks[bl].hi), bl});
        std::vector<std::int64_t> candidates(window_blocks.begin(), window_blocks.end());
        for (const Scored& x : best_k(coarse, o.coarse_k, out_.margin)) candidates.push_back(x.id);
        std::vector<Scored> fine;
        for (const auto bl : candidates)
          for (std::int64_t gc = bl * cp_; gc < (bl + 1) * cp_; ++gc)
            if (clusters[gc].count() > 0 && !every.contains(gc))
              fine.push_back({score(qq, clusters[gc].key, clusters[gc].lo, clusters[gc].hi), gc});
        std::vector<std::int64_t> chosen;
        for (const Scored& x : best_k(fine, o.top_k, out_.margin)) chosen.push_back(x.id);
        std::sort(chosen.begin(), chosen.end());
        made.selected.back().push_back(chosen);
      }
      if (fixed) made.selected[r] = fixed->selected[r];
      // One softmax per row over its exact clusters, page summaries and coarse summaries.
      for (std::int64_t i = 0; i < n_loc_; ++i) {
        const std::int64_t t = r * n_loc_ + order[i];
        const auto& own = own_of_token[order[i]];
        const auto& chosen = made.selected[r][row_units ? i : i / kTile];
        Seen& seen = out_.seen[(std::size_t(b) * hk_ + g) * n_ + t];
        std::set<std::int64_t> exact(own.begin(), own.end());
        for (const auto x : own) seen.push_back({int(AttendedKind::kWindow), x});
        for (const auto x : chosen)
          if (!exact.contains(x)) {
            exact.insert(x);
            seen.push_back({int(AttendedKind::kSelected), x});
          }
        std::set<std::int64_t> touched;
        for (const auto x : exact) touched.insert(x / cp_);
        std::vector<std::pair<double, const double*>> keys;  // (bias, key), values alongside
        std::vector<const double*> values;
        for (const auto x : exact)
          for (const auto m : clusters[x].members) {
            keys.push_back({0.0, k(b, m, g)});
            values.push_back(v(b, m, g));
          }
        for (std::int64_t bl = 0; bl < nb; ++bl) {
          if (blocks[bl].count == 0) continue;
          if (!touched.contains(bl)) {
            keys.push_back({std::log(double(blocks[bl].count)), blocks[bl].key.data()});
            values.push_back(blocks[bl].value.data());
            seen.push_back({int(AttendedKind::kCoarseSummary), bl});
            continue;
          }
          for (std::int64_t gc = bl * cp_; gc < (bl + 1) * cp_; ++gc)
            if (clusters[gc].count() > 0 && !exact.contains(gc)) {
              keys.push_back({std::log(double(clusters[gc].count())), clusters[gc].key.data()});
              values.push_back(clusters[gc].value.data());
              seen.push_back({int(AttendedKind::kPageSummary), gc});
            }
        }
        std::sort(seen.begin(), seen.end());
        for (int hh = g * group_; hh < (g + 1) * group_; ++hh) {
          std::vector<double> logits;
          for (const auto& [bias, key] : keys) logits.push_back(dot(q(b, t, hh), key) * scale + bias);
          const double m = *std::max_element(logits.begin(), logits.end());
          double sum = 0;
          for (double& x : logits) sum += (x = std::exp(x - m));
          double* out = out_.o.data() + ((b * n_ + t) * h_ + hh) * d_;
          for (std::size_t x = 0; x < logits.size(); ++x)
            for (int e = 0; e < d_; ++e) out[e] += logits[x] / sum * values[x][e];
          out_.lse[(std::size_t(b) * h_ + hh) * n_ + t] = m + std::log(sum);
        }
      }
    }
  }

  // CAST's mix: intra-cluster attention, each surrogate's summary over all ranks' members, weights
  // softmax_c(A_q) of the query head; LSE the intra attention's in the token's first cluster.
  void cast_outputs(int b, int g, const HeadChoices& made, const std::vector<Cluster>& clusters,
                    const std::vector<std::vector<std::vector<double>>>& a_k) {
    const double scale = 1.0 / std::sqrt(double(d_));
    std::vector<std::vector<double>> global(static_cast<std::size_t>(c_), std::vector<double>(std::size_t(d_), 0.0));
    for (int cl = 0; cl < c_; ++cl) {
      double m = -kInf, sum = 0;
      for (int r = 0; r < p_; ++r)
        for (const auto j : made.members[r][cl]) m = std::max(m, a_k[r][j][cl]);
      for (int r = 0; r < p_; ++r)
        for (const auto j : made.members[r][cl]) sum += std::exp(a_k[r][j][cl] - m);
      for (int r = 0; r < p_; ++r)
        for (const auto j : made.members[r][cl])
          for (int e = 0; e < d_; ++e) global[cl][e] += std::exp(a_k[r][j][cl] - m) / sum * v(b, r * n_loc_ + j, g)[e];
    }
    for (int r = 0; r < p_; ++r)
      for (std::int64_t j = 0; j < n_loc_; ++j) {
        const std::int64_t t = r * n_loc_ + j;
        Seen& seen = out_.seen[(std::size_t(b) * hk_ + g) * n_ + t];
        for (int cl = 0; cl < c_; ++cl) {
          const auto& mem = made.members[r][cl];
          if (std::binary_search(mem.begin(), mem.end(), std::int32_t(j)))
            seen.push_back({int(AttendedKind::kWindow), std::int64_t{r} * c_ + cl});
        }
        for (int hh = g * group_; hh < (g + 1) * group_; ++hh) {
          std::vector<double> aq(static_cast<std::size_t>(c_));
          for (int cl = 0; cl < c_; ++cl) aq[cl] = dot(q(b, t, hh), s(g, cl));
          const std::vector<double> w = softmax(aq);
          double* out = out_.o.data() + ((b * n_ + t) * h_ + hh) * d_;
          bool first = true;
          for (int cl = 0; cl < c_; ++cl) {
            const auto& mem = made.members[r][cl];
            if (!std::binary_search(mem.begin(), mem.end(), std::int32_t(j))) {
              for (int e = 0; e < d_; ++e) out[e] += w[cl] * global[cl][e];
              continue;
            }
            std::vector<double> logits;
            for (const auto m : clusters[std::size_t(r) * c_ + cl].members) logits.push_back(dot(q(b, t, hh), k(b, m, g)) * scale);
            const double mx = *std::max_element(logits.begin(), logits.end());
            double sum = 0;
            for (double& x : logits) sum += (x = std::exp(x - mx));
            for (std::size_t x = 0; x < logits.size(); ++x)
              for (int e = 0; e < d_; ++e)
                out[e] += w[cl] * logits[x] / sum * v(b, clusters[std::size_t(r) * c_ + cl].members[x], g)[e];
            if (first) out_.lse[(std::size_t(b) * h_ + hh) * n_ + t] = mx + std::log(sum);
            first = false;
          }
        }
      }
  }

  const Problem& pr_;
  const std::vector<HeadChoices>* fixed_;
  std::int64_t n_ = 0, n_loc_ = 0;
  int p_ = 1, c_ = 1, ps_ = 32, cp_ = 1, d_ = 64, h_ = 1, hk_ = 1, group_ = 1;
  Reference out_;
};

Reference reference(const Problem& pr, const std::vector<HeadChoices>* fixed = nullptr) {
  return ReferenceRun(pr, fixed).take();
}

// ---------------------------------------------------------------------------------------------------
// The operator on this rank.

struct Shard {
  std::vector<float> o, lse, d_q, d_k, d_v, d_s;
  std::vector<std::int32_t> members;  // cluster_members()
  std::vector<AttendedEntry> entries;
  TableEntries table;  // table_entries()
  comm::OpCounters fwd, bwd;
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
  std::vector<float> d_o = rows(pr.d_o, s.heads), sur(pr.s.begin(), pr.s.end());
  Shard sh;
  sh.o.assign(q.size(), NAN);
  sh.lse.assign(std::size_t(s.batch) * s.heads * n, NAN);
  sh.d_q.assign(q.size(), NAN);
  sh.d_k.assign(k.size(), NAN);
  sh.d_v.assign(v.size(), NAN);
  sh.d_s.assign(sur.size(), 0.f);
  const Device cpu = session.device();
  auto view = [&](std::vector<float>& x, int heads) {
    return TensorView::contiguous(x.data(), DType::kF32, {s.batch, n, heads, s.head_dim}, cpu);
  };
  const auto [hk, c, d] = surrogate_shape(s, pr.options);
  const TensorView lse = TensorView::contiguous(sh.lse.data(), DType::kF32, {s.batch, s.heads, n}, cpu);
  const TensorView sv = TensorView::contiguous(sur.data(), DType::kF32, {hk, c, d}, cpu);
  const TensorView dsv = TensorView::contiguous(sh.d_s.data(), DType::kF32, {hk, c, d}, cpu);
  session.comm().reset_counters();
  layer.forward({view(q, s.heads), view(k, s.kv_heads), view(v, s.kv_heads), view(sh.o, s.heads), lse, sv});
  sh.fwd = session.comm().counters().total();
  sh.members = layer.cluster_members();
  sh.entries = layer.attended_entries();
  sh.table = layer.table_entries();
  session.comm().reset_counters();
  layer.backward({view(q, s.heads), view(k, s.kv_heads), view(v, s.kv_heads), view(sh.o, s.heads), lse,
                  view(d_o, s.heads), view(sh.d_q, s.heads), view(sh.d_k, s.kv_heads), view(sh.d_v, s.kv_heads), sv,
                  dsv});
  sh.bwd = session.comm().counters().total();
  return sh;
}

double rel_error(std::span<const float> x, std::span<const double> ref) { return test::relative_error(x, ref); }

class Cast : public ::testing::TestWithParam<Config> {
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

// This rank's clusters as the reference made them: [B, h_kv, c, page_size] global positions, -1 padding.
std::vector<std::int32_t> reference_members(const Problem& pr, const Reference& ref, int rank) {
  const int c = pr.c(), ps = pr.options.page_size;
  std::vector<std::int32_t> out;
  for (const HeadChoices& h : ref.choices)
    for (int cl = 0; cl < c; ++cl) {
      const auto& mem = h.members[rank][cl];
      for (int s = 0; s < ps; ++s)
        out.push_back(s < int(mem.size()) ? std::int32_t(rank * pr.shape.local_len() + mem[s]) : -1);
    }
  return out;
}

// The operator's attended entries per (b, g, global position) as sorted (kind, id) lists.
std::map<std::int64_t, Seen> seen_by_row(const Problem& pr, const std::vector<AttendedEntry>& entries) {
  const auto& s = pr.shape;
  std::map<std::int64_t, Seen> out;
  for (const AttendedEntry& e : entries)
    for (int r = 0; r < kTile; ++r)
      if ((e.row_mask[r / 64] >> (r % 64)) & 1u)
        out[(std::int64_t{e.batch} * s.kv_heads + e.kv_head) * s.seq_len + e.first_row_pos + r].push_back(
            {int(e.kind), e.global_id});
  for (auto& [row, seen] : out) std::sort(seen.begin(), seen.end());
  return out;
}

TEST_P(Cast, MatchesTheFloat64ReferenceOfTheSameAlgorithm) {
  const Problem pr = make_problem(GetParam(), 11);
  const auto& s = pr.shape;
  const Reference ref = reference(pr);
  ASSERT_GT(ref.margin, kMargin) << "a discrete choice of the reference is too close to a tie for fp32";
  const Shard sh = run_layer(session, pr);
  if (pr.options.combine == ClusterCombine::kJoint) {  // the collective before any rank-local verdict
    int summaries = 0, anywhere = 0;
    for (const AttendedEntry& e : sh.entries) summaries |= e.kind >= AttendedKind::kPageSummary;
    MPI_Allreduce(&summaries, &anywhere, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
    EXPECT_TRUE(anywhere) << "no row attends a summary: the budgets are not sparse";
  }
  ASSERT_EQ(sh.members, reference_members(pr, ref, session.rank())) << "clusters";
  // The table's size: a list per (element, tile, KV head), each with a cluster page at least.
  EXPECT_GT(sh.table.units, 0);
  EXPECT_GE(sh.table.total, sh.table.units);
  // What every row of this rank attended, in global terms.
  const std::map<std::int64_t, Seen> seen = seen_by_row(pr, sh.entries);
  for (int b = 0; b < s.batch; ++b)
    for (int g = 0; g < s.kv_heads; ++g)
      for (const std::int32_t t : positions(pr)) {
        const std::int64_t row = (std::int64_t{b} * s.kv_heads + g) * s.seq_len + t;
        const auto it = seen.find(row);
        ASSERT_EQ(it == seen.end() ? Seen{} : it->second, ref.seen[std::size_t(row)])
            << "element " << b << " KV head " << g << " row " << t;
      }
  EXPECT_LT(rel_error(sh.o, rows(pr, ref.o, s.heads)), 1e-5) << "O";
  EXPECT_LT(rel_error(sh.lse, lse_rows(pr, ref.lse)), 1e-5) << "LSE";
}

// Joint combine, single assignment: every key of the sequence counts exactly once for every row,
// through its cluster (window, selected, page summary) or its cluster's block (coarse summary).
void expect_every_key_once(const Session& session, const Config& cfg) {
  const Problem pr = make_problem(cfg, 71);
  const auto& s = pr.shape;
  const Shard sh = run_layer(session, pr);
  std::vector<std::int32_t> all(sh.members.size() * s.ranks);  // [rank][B][h_kv][c][ps]
  MPI_Allgather(sh.members.data(), int(sh.members.size()), MPI_INT32_T, all.data(), int(sh.members.size()),
                MPI_INT32_T, MPI_COMM_WORLD);
  const int c = pr.c(), ps = pr.options.page_size, cp = pr.options.coarse_pages;
  const auto keys_of = [&](int b, int g, std::int64_t cluster) {
    const std::int64_t r = cluster / c, cl = cluster % c;
    const std::int32_t* m = all.data() + r * sh.members.size() + ((std::size_t(b) * s.kv_heads + g) * c + cl) * ps;
    return std::vector<std::int32_t>(m, m + ps);
  };
  std::map<std::int64_t, std::vector<int>> cover;  // (b, g, row) -> count per key
  for (const AttendedEntry& e : sh.entries) {
    std::vector<std::int64_t> clusters{e.global_id};
    if (e.kind == AttendedKind::kCoarseSummary) {
      clusters.clear();
      for (int i = 0; i < cp; ++i) clusters.push_back(e.global_id * cp + i);
    }
    for (int r = 0; r < kTile; ++r) {
      if (!((e.row_mask[r / 64] >> (r % 64)) & 1u)) continue;
      auto& row = cover[(std::int64_t{e.batch} * s.kv_heads + e.kv_head) * s.seq_len + e.first_row_pos + r];
      row.resize(std::size_t(s.seq_len), 0);
      for (const auto cluster : clusters)
        for (const std::int32_t key : keys_of(e.batch, e.kv_head, cluster))
          if (key >= 0) ++row[std::size_t(key)];
    }
  }
  for (int b = 0; b < s.batch; ++b)
    for (int g = 0; g < s.kv_heads; ++g)
      for (const std::int32_t t : shard_positions(s, pr.options, session.rank())) {
        const auto& row = cover[(std::int64_t{b} * s.kv_heads + g) * s.seq_len + t];
        ASSERT_EQ(row, std::vector<int>(std::size_t(s.seq_len), 1))
            << cfg.name << ": element " << b << " KV head " << g << " row " << t;
      }
}

TEST(CastEntries, CoverEveryKeyOnceWithSingleAssignment) {
  Session session = Session::from_mpi(MPI_COMM_WORLD, Backend::kCpu);
  for (const SelectionUnit unit : {SelectionUnit::kTile, SelectionUnit::kRow})
    for (const Planting planting : {Planting::kBalanced, Planting::kPartial})
      expect_every_key_once(session, {SurrogateAssignment::kSingle, ClusterCombine::kJoint, unit, ScoreKind::kBound,
                                      planting, std::string(name(unit))});
}

// Bytes per message kind, from the reference's fetch lists; on the mean over ranks within the plan.
TEST_P(Cast, BytesFollowTheFetchListsAndThePlan) {
  const Problem pr = make_problem(GetParam(), 31);
  const auto& s = pr.shape;
  const Reference ref = reference(pr);
  const Shard sh = run_layer(session, pr);
  const std::int64_t p = s.ranks, r = session.rank(), d = s.head_dim, c = pr.c(), cp = pr.options.coarse_pages;
  const std::int64_t ps = pr.options.page_size, units = std::int64_t{s.batch} * s.kv_heads, lb = c / cp;
  const std::int64_t checks = (p - 1) * 8;
  if (pr.options.combine == ClusterCombine::kCast) {
    EXPECT_EQ(std::int64_t(sh.fwd.bytes_sent), 3 * checks + (p - 1) * units * c * (d + 1) * 4);
    EXPECT_EQ(std::int64_t(sh.bwd.bytes_sent), checks + (p - 1) * units * c * d * 4);
  } else {
    std::int64_t fetched = 0, served = 0;
    for (const HeadChoices& h : ref.choices)
      for (int q = 0; q < p; ++q)
        for (const std::int64_t id : h.fetched[q]) {
          if (q == r) ++fetched;
          if (q != r && id / lb == r) ++served;
        }
    const std::int64_t block = 2 * cp * ps * d * 4 + 2 * cp * d * 4 + cp * 4, grad = 2 * cp * ps * d * 4 + 2 * cp * d * 4;
    const std::int64_t summaries = (p - 1) * units * lb * (4 * d * 4 + 4), counts = (p - 1) * units * 4;
    const std::int64_t scatter = (p - 1) * units * lb * 2 * d * 4;
    EXPECT_EQ(std::int64_t(sh.fwd.bytes_sent), 3 * checks + summaries + counts + 4 * fetched + served * block);
    EXPECT_EQ(std::int64_t(sh.fwd.bytes_received), 3 * checks + summaries + counts + 4 * served + fetched * block);
    EXPECT_EQ(std::int64_t(sh.bwd.bytes_sent), checks + fetched * grad + scatter);
    EXPECT_EQ(std::int64_t(sh.bwd.bytes_received), checks + served * grad + scatter);
    std::int64_t all_fetched = fetched;
    MPI_Allreduce(MPI_IN_PLACE, &all_fetched, 1, MPI_INT64_T, MPI_SUM, MPI_COMM_WORLD);
    if (p > 1) {
      EXPECT_GT(all_fetched, 0) << "no rank fetched a block: the test would not exercise the fetch";
    }
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

INSTANTIATE_TEST_SUITE_P(
    Attention, Cast,
    ::testing::Values(Config{SurrogateAssignment::kSingle, ClusterCombine::kJoint, SelectionUnit::kTile,
                             ScoreKind::kBound, Planting::kBalanced, "single_joint_tile_bound"},
                      Config{SurrogateAssignment::kSingle, ClusterCombine::kJoint, SelectionUnit::kRow, ScoreKind::kMean,
                             Planting::kBalanced, "single_joint_row_mean"},
                      Config{SurrogateAssignment::kSingle, ClusterCombine::kJoint, SelectionUnit::kTile,
                             ScoreKind::kBound, Planting::kPartial, "partial_joint_tile_bound"},
                      Config{SurrogateAssignment::kTopK, ClusterCombine::kJoint, SelectionUnit::kTile,
                             ScoreKind::kBound, Planting::kUneven, "topk_joint_tile_bound"},
                      Config{SurrogateAssignment::kSingle, ClusterCombine::kCast, SelectionUnit::kAuto,
                             ScoreKind::kBound, Planting::kPartial, "partial_cast"},
                      Config{SurrogateAssignment::kTopK, ClusterCombine::kCast, SelectionUnit::kAuto, ScoreKind::kBound,
                             Planting::kUneven, "topk_cast"}),
    [](const auto& info) { return info.param.name; });

// Single assignment places every token once; budgets that select every cluster and fetch every block
// then leave no summary, and the joint combine is exact attention (whatever the clusters are: random
// inputs here), gradients included; S then only decides the (hard) assignment, so dS = 0.
TEST(CastExact, BudgetsThatCoverEveryClusterGiveExactAttention) {
  Session session = Session::from_mpi(MPI_COMM_WORLD, Backend::kCpu);
  for (const SelectionUnit unit : {SelectionUnit::kTile, SelectionUnit::kRow}) {
    Problem pr = make_problem(
        {SurrogateAssignment::kSingle, ClusterCombine::kJoint, unit, ScoreKind::kBound, Planting::kBalanced, ""}, 21);
    const auto& s = pr.shape;
    for (auto* x : {&pr.q, &pr.k}) {
      const std::vector<float> noise = test::random_normal(x->size(), 22 + (x == &pr.k));
      x->assign(noise.begin(), noise.end());
    }
    const int clusters = s.ranks * pr.c();
    pr.options.top_k = clusters;
    pr.options.coarse_k = pr.options.remote_blocks = clusters / pr.options.coarse_pages;
    const Shard sh = run_layer(session, pr);
    const test::NaiveShape ns{s.batch, s.seq_len, s.heads, s.kv_heads, s.head_dim, false};
    const test::NaiveResult ref = test::naive_attention(ns, pr.q, pr.k, pr.v, pr.d_o);
    const auto pos = shard_positions(s, pr.options, session.rank());
    auto rows = [&](const std::vector<double>& x, int heads) {
      return test::take_rows(x, s.batch, s.seq_len, heads * s.head_dim, pos);
    };
    const double tol = 1e-5;
    EXPECT_LT(rel_error(sh.o, rows(ref.o, s.heads)), tol) << "O, " << name(unit);
    EXPECT_LT(rel_error(sh.lse, test::take_lse(ref.lse, s.batch, s.heads, s.seq_len, pos)), tol) << "LSE";
    EXPECT_LT(rel_error(sh.d_q, rows(ref.d_q, s.heads)), tol) << "dQ";
    EXPECT_LT(rel_error(sh.d_k, rows(ref.d_k, s.kv_heads)), tol) << "dK";
    EXPECT_LT(rel_error(sh.d_v, rows(ref.d_v, s.kv_heads)), tol) << "dV";
    for (const float x : sh.d_s) ASSERT_EQ(x, 0.f) << "dS with every cluster seen exactly";
  }
}

// Central differences of the reference loss sum(O * dO) (choices fixed, after checking that
// perturbations well above the step change none) at a few elements of this rank's q, k, v and of S
// (whose gradient is the sum of the ranks' parts).
void check_gradients(const Config& cfg, std::uint64_t seed) {
  Session session = Session::from_mpi(MPI_COMM_WORLD, Backend::kCpu);
  Problem pr = make_problem(cfg, seed, /*n=*/256, /*batch=*/1, /*heads=*/4, /*kv_heads=*/2);
  pr.options.top_k = pr.options.coarse_k = pr.options.remote_blocks = 1;
  const auto& s = pr.shape;
  const Reference base = reference(pr);
  ASSERT_GT(base.margin, kMargin);
  const Shard sh = run_layer(session, pr);
  std::vector<float> d_s = sh.d_s;
  MPI_Allreduce(MPI_IN_PLACE, d_s.data(), int(d_s.size()), MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
  const std::int64_t n_loc = s.local_len(), first = session.rank() * n_loc;
  std::mt19937_64 rng(7 + session.rank());
  struct Probe {
    std::vector<double> Problem::*input;
    const std::vector<float>* grad;
    std::int64_t row;  // elements per local row, 0: S (all of it)
    const char* name;
  };
  const Probe probes[] = {{&Problem::q, &sh.d_q, std::int64_t{s.heads} * s.head_dim, "q"},
                          {&Problem::k, &sh.d_k, std::int64_t{s.kv_heads} * s.head_dim, "k"},
                          {&Problem::v, &sh.d_v, std::int64_t{s.kv_heads} * s.head_dim, "v"},
                          {&Problem::s, &d_s, 0, "s"}};
  for (const Probe& probe : probes)
    for (int trial = 0; trial < 4; ++trial) {
      const std::int64_t count = probe.row ? n_loc * probe.row : std::int64_t((pr.*probe.input).size());
      const std::int64_t local = std::uniform_int_distribution<std::int64_t>(0, count - 1)(rng);
      const std::size_t at = static_cast<std::size_t>(probe.row ? first * probe.row + local : local);
      auto perturbed = [&](double by) {
        Problem x = pr;
        (x.*probe.input)[at] += by;
        return x;
      };
      for (const double by : {-1.0 / 1024, 1.0 / 1024})  // fp32-representable, ten times the step
        ASSERT_EQ(reference(perturbed(by)).choices, base.choices) << probe.name << " moved a discrete choice";
      const double step = 1e-4;
      const double fd =
          (reference(perturbed(step), &base.choices).loss - reference(perturbed(-step), &base.choices).loss) / (2 * step);
      const double got = (*probe.grad)[static_cast<std::size_t>(local)];
      EXPECT_NEAR(got, fd, 2e-4 * (1 + std::abs(fd))) << "d" << probe.name << " at element " << local << ", " << cfg.name;
    }
}

TEST(CastGradients, JointCombineMatchesFiniteDifferences) {
  check_gradients({SurrogateAssignment::kSingle, ClusterCombine::kJoint, SelectionUnit::kTile, ScoreKind::kBound,
                   Planting::kPartial, "joint"},
                  51);
}

TEST(CastGradients, CastCombineMatchesFiniteDifferences) {
  check_gradients({SurrogateAssignment::kTopK, ClusterCombine::kCast, SelectionUnit::kAuto, ScoreKind::kBound,
                   Planting::kUneven, "cast"},
                  52);
}

TEST(CastOptions, WhatItCannotRunFailsOnEveryRankWithAClearMessage) {
  Session session = Session::from_mpi(MPI_COMM_WORLD, Backend::kCpu);
  const Config joint{SurrogateAssignment::kSingle, ClusterCombine::kJoint, SelectionUnit::kTile, ScoreKind::kBound,
                     Planting::kBalanced, ""};
  Problem pr = make_problem(joint, 61);
  pr.shape.causal = true;
  try {
    DistributedAttention layer(session, pr.shape, pr.options);
    ADD_FAILURE() << "causal surrogate clusters accepted";
  } catch (const Error& e) {
    EXPECT_NE(e.message().find("bidirectional only"), std::string::npos) << e.message();
  }
  pr = make_problem(joint, 61);
  pr.options.surrogate_clusters = 3;  // not whole coarse blocks of 2 clusters
  EXPECT_THROW({ DistributedAttention refused(session, pr.shape, pr.options); }, Error);
  EXPECT_THROW(surrogate_shape(pr.shape, AttentionOptions{}), Error);

  // The surrogates are required exactly when the options take them, in their shape.
  pr = make_problem(joint, 61);
  const auto& s = pr.shape;
  DistributedAttention layer(session, s, pr.options);
  const std::int64_t n = s.local_len();
  std::vector<float> q(std::size_t(s.batch) * n * s.heads * s.head_dim, 1.f), kv(std::size_t(s.batch) * n * s.kv_heads * s.head_dim, 1.f);
  std::vector<float> o(q.size()), lse(std::size_t(s.batch) * s.heads * n), sur(pr.s.size(), 1.f);
  const Device cpu = session.device();
  const TensorView qv = TensorView::contiguous(q.data(), DType::kF32, {s.batch, n, s.heads, s.head_dim}, cpu);
  const TensorView kvv = TensorView::contiguous(kv.data(), DType::kF32, {s.batch, n, s.kv_heads, s.head_dim}, cpu);
  const TensorView ov = TensorView::contiguous(o.data(), DType::kF32, {s.batch, n, s.heads, s.head_dim}, cpu);
  const TensorView lv = TensorView::contiguous(lse.data(), DType::kF32, {s.batch, s.heads, n}, cpu);
  const auto [hk, c, d] = surrogate_shape(s, pr.options);
  try {
    layer.forward({qv, kvv, kvv, ov, lv});
    ADD_FAILURE() << "forward without surrogates accepted";
  } catch (const Error& e) {
    EXPECT_NE(e.message().find("needs surrogates"), std::string::npos) << e.message();
  }
  const TensorView wrong = TensorView::contiguous(sur.data(), DType::kF32, {hk, c - 1, d}, cpu);
  EXPECT_THROW(layer.forward({qv, kvv, kvv, ov, lv, wrong}), Error);
  EXPECT_THROW(layer.attended_entries(), Error);  // no forward yet
  EXPECT_THROW(layer.table_entries(), Error);
  Problem blocks = make_problem(joint, 61);
  blocks.options.clusters = ClusterKind::kBlocks;
  blocks.options.window_bidir = 32;  // within a coarse block of 64 keys
  DistributedAttention plain(session, blocks.shape, blocks.options);
  const TensorView sv = TensorView::contiguous(sur.data(), DType::kF32, {hk, c, d}, cpu);
  try {
    plain.forward({qv, kvv, kvv, ov, lv, sv});
    ADD_FAILURE() << "surrogates accepted by blocks clusters";
  } catch (const Error& e) {
    EXPECT_NE(e.message().find("takes none"), std::string::npos) << e.message();
  }
  EXPECT_THROW(plain.cluster_members(), Error);
}

}  // namespace
}  // namespace ringcast
