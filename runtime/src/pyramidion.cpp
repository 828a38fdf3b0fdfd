// PyramidionPool (pyramidion.hpp). A round: all-gather the m scores of every sequence, let every rank
// plan the same global sort and pairing, move each input state (with its score) to the rank that owns
// its pair's output with one all_to_all_v, and merge the pairs with the single-process kernel
// (kernels::halving_pool on sequences of two, so the merge weights exist once). Every input token sits
// in exactly one pair, so the backward's transposed exchange assigns each input gradient exactly once.
// A row's score is a function of that row alone and ties break by sequence position, so given the
// same rows every P pairs alike and pools to bitwise the states of one process.
// Nothing is kept between passes: the backward re-runs the rounds to rebuild plans and pairs.
// Host traffic per round (the only synchronizations): the all-gathered scores come down for planning
// (every rank plans alike), and the plan's row lists go up in one copy while the stream is idle. States,
// scores and the exchange buffers stay in the session device's memory; collectives run on
// session.stream(), and rows move by kernels::gather_rows.
#include "pyramidion.hpp"

#include "agreement.hpp"

#include <ringcast/error.hpp>
#include <ringcast/kernels/layers.hpp>
#include <ringcast/kernels/layout.hpp>
#include <ringcast/kernels/pooling.hpp>
#include <ringcast/kernels/seed_scores.hpp>
#include <ringcast/kernels/row_gather.hpp>

#include <algorithm>
#include <bit>
#include <numeric>
#include <utility>

namespace ringcast::model {
namespace {

constexpr float kScoreFloor = 1e-5f;  // s = sigmoid(·) + 1e-5, as in the reference implementation

// Scratch keys, shared by every pooling stage (each reserves what it needs).
constexpr const char* kLogits = "pool.logits";          // [B, n_loc] scorer pre-activations
constexpr const char* kScores = "pool.scores";          // [B, n_loc] round-0 scores
constexpr const char* kGathered = "pool.gathered";      // [P, B, len] one round's scores, every rank
constexpr const char* kSend = "pool.send";              // [rows, D + 1] packed exchange
constexpr const char* kRecv = "pool.recv";
constexpr const char* kPairE = "pool.pair_e";           // every round's pairs, [rows, D]
constexpr const char* kPairS = "pool.pair_s";           // and their scores
constexpr const char* kStateE = "pool.state_e";         // a round's merged states (next round's input)
constexpr const char* kStateS = "pool.state_s";
constexpr const char* kDPairE = "pool.d_pair_e";        // backward: one round's pair gradients
constexpr const char* kDPairS = "pool.d_pair_s";
constexpr const char* kDStateE = "pool.d_state_e";      // backward: gradients of a round's inputs
constexpr const char* kDStateS = "pool.d_state_s";
constexpr const char* kDScores = "pool.d_scores";       // backward: round-0 score gradients

void zero(float* x, std::int64_t count, const RunContext& rc) {
  kernels::fill_zero(x, static_cast<std::size_t>(count) * sizeof(float), rc.exec);
}

kernels::HalvingShape pair_shape(std::int64_t pairs, int dim, float beta) {
  kernels::HalvingShape s;
  s.batch = static_cast<int>(pairs);
  s.seq = 2;
  s.dim = dim;
  s.rounds = 1;
  s.beta = beta;
  return s;
}

}  // namespace

PyramidionPool::PyramidionPool(const Session& session, ParameterTable& table, Scratch& scratch,
                               const std::string& prefix, const ModelConfig& c, const Geometry& in,
                               std::int64_t pool_to)
    : ranks_(session.size()), rank_(session.rank()), dim_(c.dim), beta_(c.pyramidion.beta), in_(in) {
  const std::int64_t n = in.seq_len;
  RINGCAST_CHECK(!in.causal, "PyramidionPool {}: pooling needs a bidirectional (encoder) geometry", prefix);
  RINGCAST_CHECK(beta_ > 0.0f, "PyramidionPool {}: beta must be positive (got {})", prefix, beta_);
  RINGCAST_CHECK(pool_to >= 1 && pool_to < n && n % pool_to == 0 && std::has_single_bit(static_cast<std::uint64_t>(n / pool_to)),
                 "PyramidionPool {}: pooling {} tokens to {} is not a whole number of halvings (seq_len / pool_to "
                 "must be a power of two >= 2)",
                 prefix, n, pool_to);
  RINGCAST_CHECK(pool_to % ranks_ == 0, "PyramidionPool {}: pool_to ({}) must be a multiple of the ranks ({})", prefix,
                 pool_to, ranks_);
  rounds_ = std::countr_zero(static_cast<std::uint64_t>(n / pool_to));

  // Every rank must hold n / P rows, and together the rows must be the positions [0, n) once each.
  const std::int64_t shape[2] = {in.local_len, static_cast<std::int64_t>(in.positions.size())};
  const std::vector<std::int64_t> shapes = gather_from_all_ranks(session, shape);
  for (int p = 0; p < ranks_; ++p)
    RINGCAST_CHECK(shapes[2 * p] * ranks_ == n && shapes[2 * p + 1] == shapes[2 * p],
                   "PyramidionPool {}: rank {} holds {} rows with {} positions; every rank must hold seq_len / P = {}",
                   prefix, p, shapes[2 * p], shapes[2 * p + 1], n / ranks_);
  const std::vector<std::int64_t> mine(in.positions.begin(), in.positions.end());
  const std::vector<std::int64_t> all = gather_from_all_ranks(session, mine);
  position_of_.assign(all.begin(), all.end());
  location_of_.assign(static_cast<std::size_t>(n), -1);
  for (std::int64_t loc = 0; loc < n; ++loc) {
    const std::int64_t pos = all[static_cast<std::size_t>(loc)];
    RINGCAST_CHECK(pos >= 0 && pos < n && location_of_[static_cast<std::size_t>(pos)] < 0,
                   "PyramidionPool {}: the ranks' positions are not a permutation of [0, {}) (position {})", prefix, n,
                   pos);
    location_of_[static_cast<std::size_t>(pos)] = static_cast<std::int32_t>(loc);
  }

  out_.batch = in.batch;
  out_.seq_len = pool_to;
  out_.local_len = pool_to / ranks_;
  out_.causal = false;
  out_.positions.resize(static_cast<std::size_t>(out_.local_len));
  std::iota(out_.positions.begin(), out_.positions.end(), static_cast<std::int32_t>(rank_ * out_.local_len));

  w_ = table.add(prefix + "pool_w", 1, c.dim, true, Init::kFanIn);
  b_ = table.add(prefix + "pool_b", 1, 1, false, Init::kZeros);

  const std::int64_t B = in.batch, D = c.dim, n_loc = in.local_len;
  std::int64_t pair_rows = 0;
  for (int r = 0; r < rounds_; ++r) pair_rows += B * round_len(r);
  scratch.reserve(kLogits, B * n_loc);
  scratch.reserve(kScores, B * n_loc);
  scratch.reserve(kGathered, B * n);
  scratch.reserve(kSend, B * n_loc * (D + 1));
  scratch.reserve(kRecv, B * n_loc * (D + 1));
  scratch.reserve(kPairE, pair_rows * D);
  scratch.reserve(kPairS, pair_rows);
  scratch.reserve(kStateE, B * round_len(1) * D);
  scratch.reserve(kStateS, B * round_len(1));
  scratch.reserve(kDPairE, B * n_loc * D);
  scratch.reserve(kDPairS, B * n_loc);
  scratch.reserve(kDStateE, B * round_len(1) * D);
  scratch.reserve(kDStateS, B * round_len(1));
  scratch.reserve(kDScores, B * n_loc);
  plans_.resize(static_cast<std::size_t>(rounds_));
  gathered_.resize(static_cast<std::size_t>(B * n));
  route_rows_ = DeviceBuffer(static_cast<std::size_t>(std::max<std::int64_t>(2 * pair_rows, 1)) * sizeof(std::int64_t),
                             session.device());
}

std::int64_t PyramidionPool::round_len(int round) const { return in_.local_len >> round; }

std::int64_t PyramidionPool::pairs_offset(int round) const {
  std::int64_t rows = 0;
  for (int r = 0; r < round; ++r) rows += in_.batch * round_len(r);
  return rows;
}

void PyramidionPool::plan_round(int round, const float* gathered, RoundPlan& plan) const {
  const int B = in_.batch, P = ranks_;
  const std::int64_t len = round_len(round), m = len * P, out_len = len / 2;
  // Round 0 reads the input placement; later rounds are laid out contiguously by the previous one.
  auto position = [&](std::int64_t loc) { return round == 0 ? std::int64_t{position_of_[loc]} : loc; };
  auto location = [&](std::int64_t pos) { return round == 0 ? std::int64_t{location_of_[pos]} : pos; };

  // members[b][2o], members[b][2o + 1]: the locations (rank · len + row) merged into output o.
  std::vector<std::vector<std::int64_t>> members(static_cast<std::size_t>(B));
  std::vector<float> s(static_cast<std::size_t>(m));
  std::vector<std::int64_t> order(static_cast<std::size_t>(m));
  std::vector<std::pair<std::int64_t, std::int64_t>> slots(static_cast<std::size_t>(m / 2));
  for (int b = 0; b < B; ++b) {
    for (int p = 0; p < P; ++p)
      for (std::int64_t j = 0; j < len; ++j) s[position(p * len + j)] = gathered[(std::int64_t{p} * B + b) * len + j];
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](std::int64_t i, std::int64_t j) { return s[i] > s[j]; });
    for (std::int64_t k = 0; k < m / 2; ++k) slots[k] = {order[k], order[m - 1 - k]};
    std::sort(slots.begin(), slots.end());  // sort_back: by the better member's position (distinct)
    auto& mem = members[static_cast<std::size_t>(b)];
    mem.resize(static_cast<std::size_t>(m));
    for (std::int64_t o = 0; o < m / 2; ++o) {
      mem[2 * o] = location(slots[o].first);
      mem[2 * o + 1] = location(slots[o].second);
    }
  }

  // Both sides list rows in one canonical order (peer rank, batch, output, member), so what rank p
  // sends to rank q arrives in the order q expects it.
  plan.in_len = len;
  plan.out_len = out_len;
  plan.inputs = {{}, std::vector<std::size_t>(static_cast<std::size_t>(P), 0)};
  plan.pairs = {{}, std::vector<std::size_t>(static_cast<std::size_t>(P), 0)};
  plan.inputs.rows.reserve(static_cast<std::size_t>(B * len));
  plan.pairs.rows.reserve(static_cast<std::size_t>(B * len));
  for (int q = 0; q < P; ++q)
    for (int b = 0; b < B; ++b)
      for (std::int64_t k = 2 * q * out_len; k < 2 * (q + 1) * out_len; ++k) {
        const std::int64_t loc = members[static_cast<std::size_t>(b)][static_cast<std::size_t>(k)];
        if (loc / len != rank_) continue;
        plan.inputs.rows.push_back(b * len + loc % len);
        ++plan.inputs.counts[static_cast<std::size_t>(q)];
      }
  const std::int64_t first = 2 * rank_ * out_len;
  for (int p = 0; p < P; ++p)
    for (int b = 0; b < B; ++b)
      for (std::int64_t k = first; k < first + 2 * out_len; ++k) {
        const std::int64_t loc = members[static_cast<std::size_t>(b)][static_cast<std::size_t>(k)];
        if (loc / len != p) continue;
        plan.pairs.rows.push_back(2 * b * out_len + (k - first));
        ++plan.pairs.counts[static_cast<std::size_t>(p)];
      }
}

void PyramidionPool::upload_routes(const RunContext& rc, int round, RoundPlan& plan) {
  std::vector<std::int64_t> rows(plan.inputs.rows);
  rows.insert(rows.end(), plan.pairs.rows.begin(), plan.pairs.rows.end());
  const std::size_t at = static_cast<std::size_t>(2 * pairs_offset(round));
  route_rows_.copy_from_host(rows.data(), rows.size() * sizeof(std::int64_t), at * sizeof(std::int64_t),
                             rc.session.stream());
  const std::int64_t* base = route_rows_.as<const std::int64_t>() + at;
  plan.inputs.device_rows = base;
  plan.pairs.device_rows = base + plan.inputs.rows.size();
}

void PyramidionPool::exchange(const RunContext& rc, const Routes& src_routes, const float* src_e, const float* src_s,
                              const Routes& dst_routes, float* dst_e, float* dst_s) const {
  const std::int64_t D = dim_, width = D + 1;
  float* send = rc.scratch.get(kSend);
  float* recv = rc.scratch.get(kRecv);
  const std::int64_t n_send = static_cast<std::int64_t>(src_routes.rows.size());
  const std::int64_t n_recv = static_cast<std::int64_t>(dst_routes.rows.size());
  // Packed rows are [state | score]: send row k takes source row rows[k], recv row k goes to rows[k].
  const int dim = dim_;
  kernels::gather_rows({.rows = n_send, .width = dim, .index = src_routes.device_rows, .src = src_e, .dst = send,
                        .dst_row_stride = width},
                       rc.exec);
  kernels::gather_rows({.rows = n_send, .width = 1, .index = src_routes.device_rows, .src = src_s, .dst = send + D,
                        .dst_row_stride = width},
                       rc.exec);
  std::vector<std::size_t> send_counts(src_routes.counts), recv_counts(dst_routes.counts);
  for (auto& v : send_counts) v *= static_cast<std::size_t>(width);
  for (auto& v : recv_counts) v *= static_cast<std::size_t>(width);
  rc.session.comm().all_to_all_v({send, static_cast<std::size_t>(n_send * width), DType::kF32}, send_counts,
                                 {recv, static_cast<std::size_t>(n_recv * width), DType::kF32}, recv_counts,
                                 rc.session.stream());
  kernels::gather_rows({.rows = n_recv, .width = dim, .dst_rows = dst_routes.device_rows, .src = recv,
                        .src_row_stride = width, .dst = dst_e},
                       rc.exec);
  kernels::gather_rows({.rows = n_recv, .width = 1, .dst_rows = dst_routes.device_rows, .src = recv + D,
                        .src_row_stride = width, .dst = dst_s},
                       rc.exec);
}

void PyramidionPool::run_rounds(const RunContext& rc, const float* x, float* out) {
  const int B = in_.batch;
  const std::int64_t rows = in_.rows(), D = dim_;
  float* logits = rc.scratch.get(kLogits);
  float* scores = rc.scratch.get(kScores);
  // The pairing is a hard decision on the scores, so a row's score must depend on that row alone,
  // however many rows a rank holds. A GEMM promises no such thing (a BLAS picks its kernel and
  // blocking by the matrix shape); one fixed-order dot product per row (pool_scores) does.
  kernels::pool_scores({rows, dim_, kScoreFloor, x, rc.p(w_), rc.p(b_), logits, scores}, rc.exec);

  float* gathered = rc.scratch.get(kGathered);
  float* pair_e = rc.scratch.get(kPairE);
  float* pair_s = rc.scratch.get(kPairS);
  float* state_e = rc.scratch.get(kStateE);
  float* state_s = rc.scratch.get(kStateS);
  for (int r = 0; r < rounds_; ++r) {
    const std::int64_t len = round_len(r), count = B * len;
    const float* cur_e = r == 0 ? x : state_e;
    const float* cur_s = r == 0 ? scores : state_s;
    rc.session.comm().all_gather({cur_s, static_cast<std::size_t>(count), DType::kF32},
                                 {gathered, static_cast<std::size_t>(count * ranks_), DType::kF32}, rc.session.stream());
    RoundPlan& plan = plans_[static_cast<std::size_t>(r)];
    copy_to_host(gathered_.data(), gathered, static_cast<std::size_t>(count * ranks_) * sizeof(float),
                 rc.session.device(), rc.session.stream());
    plan_round(r, gathered_.data(), plan);
    upload_routes(rc, r, plan);
    float* pe = pair_e + pairs_offset(r) * D;
    float* ps = pair_s + pairs_offset(r);
    exchange(rc, plan.inputs, cur_e, cur_s, plan.pairs, pe, ps);  // the round's inputs are free from here on
    const bool last = r + 1 == rounds_;
    if (last && out == nullptr) break;
    kernels::HalvingParams merge;
    merge.shape = pair_shape(count / 2, dim_, beta_);
    merge.e = pe;
    merge.s = ps;
    merge.e_out = last ? out : state_e;
    merge.s_out = state_s;  // the last round's scores are not part of the output
    kernels::halving_pool(merge, rc.exec);
  }
}

void PyramidionPool::forward(const RunContext& rc, const float* in, float* out) { run_rounds(rc, in, out); }

void PyramidionPool::backward(const RunContext& rc, const float* in, const float* d_out, float* d_in) {
  run_rounds(rc, in, nullptr);
  const int B = in_.batch;
  const std::int64_t rows = in_.rows(), D = dim_;
  const float* pair_e = rc.scratch.get(kPairE);
  const float* pair_s = rc.scratch.get(kPairS);
  float* d_pair_e = rc.scratch.get(kDPairE);
  float* d_pair_s = rc.scratch.get(kDPairS);
  float* d_state_e = rc.scratch.get(kDStateE);
  float* d_state_s = rc.scratch.get(kDStateS);
  float* d_scores = rc.scratch.get(kDScores);

  // The pooled scores leave the layer unused: the last round starts from a zero score gradient.
  const float* d_e_out = d_out;
  zero(d_state_s, B * round_len(rounds_), rc);
  const float* d_s_out = d_state_s;
  for (int r = rounds_ - 1; r >= 0; --r) {
    const std::int64_t count = B * round_len(r);
    zero(d_pair_e, count * D, rc);
    zero(d_pair_s, count, rc);
    kernels::HalvingBackwardParams merge;
    merge.shape = pair_shape(count / 2, dim_, beta_);
    merge.e = pair_e + pairs_offset(r) * D;
    merge.s = pair_s + pairs_offset(r);
    merge.d_e_out = d_e_out;
    merge.d_s_out = d_s_out;
    merge.d_e = d_pair_e;
    merge.d_s = d_pair_s;
    kernels::halving_pool_backward(merge, rc.exec);
    // Every input of the round sits in exactly one pair: the transposed exchange writes each once.
    const RoundPlan& plan = plans_[static_cast<std::size_t>(r)];
    float* dst_e = r == 0 ? d_in : d_state_e;
    float* dst_s = r == 0 ? d_scores : d_state_s;
    exchange(rc, plan.pairs, d_pair_e, d_pair_s, plan.inputs, dst_e, dst_s);
    d_e_out = d_state_e;
    d_s_out = d_state_s;
  }

  // Scorer: s = sigmoid(z + b) + 1e-5, z = x·w.
  kernels::pool_scores_backward({rows, rc.scratch.get(kLogits), rc.p(b_), d_scores, rc.g(b_)}, rc.exec);
  kernels::LinearBackwardParams lin;
  lin.rows = rows;
  lin.in_dim = dim_;
  lin.out_dim = 1;
  lin.x = in;
  lin.w = rc.p(w_);
  lin.d_y = d_scores;
  lin.d_x = d_in;
  lin.d_w = rc.g(w_);
  kernels::linear_backward(lin, rc.exec);
}

}  // namespace ringcast::model
