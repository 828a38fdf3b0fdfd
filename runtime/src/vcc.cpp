// VccBlock (vcc.hpp). One example at a time, since every example selects its own blocks and
// GatheredAttention takes one example per call. The straight-through score σ_j = 1 + π_j − sg(π_j)
// (fine) or 1 + (1 − π_j) − sg(1 − π_j) (coarse) is exactly 1 in the forward, so it appears only in
// the backward: dσ_row = <dU_row, U_row> + d(key bias)_row, and dπ_j = ±Σ dσ over block j's Z rows.
// Collectives per example: broadcast of the VIP queries, two all-reduces of [heads, vip] softmax
// statistics and one of the [blocks] log scores, then GatheredAttention; the backward adds a scalar
// and a [heads, vip] all-reduce and the all-reduce of the VIP query gradient. All on session.stream(),
// on buffers in the session device's memory.
// Host traffic per example (the only synchronizations): select() downloads the all-reduced [blocks]
// log scores, ranks them and picks the fine blocks on the host (identical on every rank); compress()
// builds that example's index lists (Z rows, the token <-> Z row maps, π of this rank's blocks) and
// uploads them in one copy, plus the Z rows' RoPE positions in another, while the stream is idle.
// Every other step, on activations or per-block data, is a kernels:: call on either backend.
#include "vcc.hpp"

#include "agreement.hpp"

#include <ringcast/error.hpp>
#include <ringcast/kernels/layers.hpp>
#include <ringcast/kernels/layout.hpp>
#include <ringcast/kernels/seed_scores.hpp>
#include <ringcast/kernels/row_gather.hpp>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>
#include <numeric>
#include <span>
#include <utility>

namespace ringcast::model {
namespace {

constexpr float kProbFloor = 1e-5f;  // l_j = log(p_j + 1e-5), as in the reference implementation

// Scratch keys, shared by every VCC layer. Z-side buffers hold at most Placement::max_rows rows.
constexpr const char* kZ = "vcc.z";
constexpr const char* kZn = "vcc.zn";
constexpr const char* kY = "vcc.y";    // z + A, the FFN branch's input
constexpr const char* kYn = "vcc.yn";
constexpr const char* kU = "vcc.u";    // A + F: the update σ scales
constexpr const char* kDZ = "vcc.d_z";
constexpr const char* kDZn = "vcc.d_zn";
constexpr const char* kDY = "vcc.d_y";
constexpr const char* kDYn = "vcc.d_yn";
constexpr const char* kDU = "vcc.d_u";
constexpr const char* kQ = "vcc.q";
constexpr const char* kK = "vcc.k";
constexpr const char* kV = "vcc.v";
constexpr const char* kO = "vcc.o";
constexpr const char* kDQ = "vcc.d_q";
constexpr const char* kDK = "vcc.d_k";
constexpr const char* kDV = "vcc.d_v";
constexpr const char* kDO = "vcc.d_o";
constexpr const char* kLse = "vcc.lse";
constexpr const char* kDBias = "vcc.d_bias";
constexpr const char* kDSigma = "vcc.d_sigma";
constexpr const char* kAttnKept = "vcc.attn_kept";  // GatheredAttention's keys, forward to backward
constexpr const char* kAttnWork = "vcc.attn_work";
// Selection: block means and their keys, VIP states and queries, the VIP softmax over blocks.
constexpr const char* kC = "vcc.c";
constexpr const char* kCn = "vcc.cn";
constexpr const char* kKc = "vcc.kc";
constexpr const char* kDC = "vcc.d_c";
constexpr const char* kDCn = "vcc.d_cn";
constexpr const char* kDKc = "vcc.d_kc";
constexpr const char* kXv = "vcc.xv";
constexpr const char* kXvn = "vcc.xvn";
constexpr const char* kQv = "vcc.qv";
constexpr const char* kDXv = "vcc.d_xv";
constexpr const char* kDXvn = "vcc.d_xvn";
constexpr const char* kDQv = "vcc.d_qv";
constexpr const char* kProbs = "vcc.probs";  // [heads, vip, local blocks]
constexpr const char* kStats = "vcc.stats";  // [2, heads, vip]
constexpr const char* kDPi = "vcc.d_pi";     // [local blocks]
constexpr const char* kP = "vcc.p";          // [local blocks] p_j, the mean VIP attention
constexpr const char* kLogP = "vcc.log_p";   // [all blocks] l_j
constexpr const char* kPiDot = "vcc.pi_dot"; // one float64
constexpr const char* kMeta = "vcc.meta";    // the example's index lists (VccBlock::ExampleIndex)

void zero(float* x, std::int64_t count, const RunContext& rc) {
  kernels::fill_zero(x, static_cast<std::size_t>(count) * sizeof(float), rc.exec);
}

// dst (+)= src, n floats.
void copy(const float* src, float* dst, std::int64_t n, const RunContext& rc, bool accumulate = false) {
  kernels::StridedCopy c = kernels::StridedCopy::flat(src, DType::kF32, dst, DType::kF32, n);
  c.accumulate = accumulate;
  kernels::copy_strided(c, rc.exec);
}

constexpr std::size_t kStagingAlign = alignof(std::int64_t);

std::size_t aligned(std::size_t bytes) { return (bytes + kStagingAlign - 1) / kStagingAlign * kStagingAlign; }

// Appends `values` to `staging` at an aligned offset and returns that offset.
template <typename T>
std::size_t stage(std::vector<std::byte>& staging, std::span<const T> values) {
  const std::size_t at = aligned(staging.size());
  staging.resize(at + values.size_bytes());
  if (!values.empty()) std::memcpy(staging.data() + at, values.data(), values.size_bytes());
  return at;
}

template <typename T>
std::size_t stage(std::vector<std::byte>& staging, const std::vector<T>& values) {
  return stage(staging, std::span<const T>(values));
}

std::uint64_t splitmix64(std::uint64_t& state) {
  std::uint64_t z = (state += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

std::uint64_t fnv1a(std::string_view s) {
  std::uint64_t h = 0xCBF29CE484222325ull;
  for (const char ch : s) h = (h ^ static_cast<unsigned char>(ch)) * 0x100000001B3ull;
  return h;
}

// What is wrong with one rank's rows, gathered so that every rank throws the same Error.
enum PlacementProblem : std::int64_t { kPlacementOk, kBadPosition, kVipOffRoot, kVipMissing, kBlockSplit };

}  // namespace

std::vector<std::int32_t> vcc_exploration(std::uint64_t seed, std::uint64_t step, std::string_view layer, int example,
                                          std::int64_t blocks, float explore_prob) {
  std::uint64_t state = seed;
  for (const std::uint64_t word : {step, fnv1a(layer), static_cast<std::uint64_t>(example)})
    state = splitmix64(state) ^ word;
  const double u = static_cast<double>(splitmix64(state) >> 11) * 0x1.0p-53;  // [0, 1)
  if (u >= explore_prob) return {};
  std::vector<std::int32_t> order(static_cast<std::size_t>(blocks));
  std::iota(order.begin(), order.end(), 0);
  for (std::int64_t i = blocks - 1; i > 0; --i)  // Fisher-Yates
    std::swap(order[static_cast<std::size_t>(i)], order[splitmix64(state) % static_cast<std::uint64_t>(i + 1)]);
  return order;
}

// Checks c.vcc against the geometry and finds this rank's VIP rows and blocks. Collective: every rank's
// verdict is gathered, so a placement that does not fit throws the same Error everywhere.
VccBlock::Placement VccBlock::place(const Session& session, const std::string& prefix, const ModelConfig& c,
                                    const Geometry& g) {
  const std::int64_t n = g.seq_len, n_loc = g.local_len;
  const int vip = c.vcc.vip_tokens, block = c.vcc.block;
  RINGCAST_CHECK(!g.causal, "VCC {}: the layer needs a bidirectional (encoder) geometry", prefix);
  RINGCAST_CHECK(g.batch >= 1 && n_loc >= 1 && std::ssize(g.positions) == n_loc,
                 "VCC {}: the geometry needs batch >= 1 and local_len = positions.size() >= 1 (got {}, {}, {})",
                 prefix, g.batch, n_loc, g.positions.size());
  RINGCAST_CHECK(vip >= 1 && block >= 1, "VCC {}: vip_tokens ({}) and block ({}) must be positive", prefix, vip, block);
  RINGCAST_CHECK(n > vip && (n - vip) % block == 0,
                 "VCC {}: seq_len - vip_tokens ({} - {}) must be a positive multiple of block ({})", prefix, n, vip,
                 block);
  Placement pl;
  pl.num_blocks = (n - vip) / block;
  const std::int64_t fine = c.vcc.fine_blocks;
  RINGCAST_CHECK(fine >= 0 && fine <= pl.num_blocks, "VCC {}: fine_blocks ({}) must be in [0, {}]", prefix, fine,
                 pl.num_blocks);
  RINGCAST_CHECK(c.vcc.explore_prob >= 0.0f && c.vcc.explore_prob <= 1.0f,
                 "VCC {}: explore_prob ({}) must be in [0, 1]", prefix, c.vcc.explore_prob);

  const int rank = session.rank();
  std::vector<std::pair<std::int32_t, std::int64_t>> by_position(static_cast<std::size_t>(n_loc));
  for (std::int64_t i = 0; i < n_loc; ++i) by_position[i] = {g.positions[i], i};
  std::sort(by_position.begin(), by_position.end());
  std::int64_t problem[3] = {kPlacementOk, 0, 0};  // what, where, and this rank's block count
  auto report = [&](PlacementProblem what, std::int64_t where) {
    if (problem[0] != kPlacementOk) return;
    problem[0] = what;
    problem[1] = where;
  };
  std::map<std::int64_t, std::vector<std::pair<std::int32_t, std::int64_t>>> block_members;
  for (std::size_t i = 0; i < by_position.size(); ++i) {
    const auto [pos, row] = by_position[i];
    if (pos < 0 || pos >= n || (i > 0 && by_position[i - 1].first == pos)) {
      report(kBadPosition, pos);
    } else if (pos < vip) {
      if (rank != 0) report(kVipOffRoot, pos);
      pl.vip_rows.push_back(row);
      pl.vip_positions.push_back(pos);
    } else {
      block_members[(pos - vip) / block].emplace_back(pos, row);
    }
  }
  if (rank == 0 && std::ssize(pl.vip_rows) != vip) report(kVipMissing, std::ssize(pl.vip_rows));
  for (const auto& [j, members] : block_members) {
    if (std::ssize(members) != block) report(kBlockSplit, j);
    pl.blocks.push_back(j);
    pl.coarse_positions.push_back(static_cast<std::int32_t>(vip + j * block + (block - 1) / 2));
    for (const auto& [pos, row] : members) {
      pl.block_positions.push_back(pos);
      pl.block_rows.push_back(row);
    }
  }
  problem[2] = std::ssize(pl.blocks);
  const std::vector<std::int64_t> all = gather_from_all_ranks(session, problem);
  std::int64_t blocks_held = 0;
  for (int p = 0; p < session.size(); ++p) {
    const std::int64_t what = all[3 * p], where = all[3 * p + 1];
    blocks_held += all[3 * p + 2];
    switch (what) {
      case kBadPosition:
        RINGCAST_THROW("VCC {}: rank {} holds position {} twice or outside [0, {})", prefix, p, where, n);
      case kVipOffRoot:
        RINGCAST_THROW("VCC {}: VIP position {} is on rank {}; the VIP tokens [0, {}) must all be on rank 0", prefix,
                       where, p, vip);
      case kVipMissing:
        RINGCAST_THROW("VCC {}: rank 0 holds {} of the {} VIP positions", prefix, where, vip);
      case kBlockSplit:
        RINGCAST_THROW("VCC {}: block {} (positions [{}, {})) is split between ranks; shard boundaries must fall on "
                       "block boundaries",
                       prefix, where, vip + where * block, vip + (where + 1) * block);
      default: break;
    }
  }
  RINGCAST_CHECK(blocks_held == pl.num_blocks, "VCC {}: the ranks hold {} blocks, the sequence has {}", prefix,
                 blocks_held, pl.num_blocks);
  // Most Z rows this rank can hold: its VIP tokens, and as many of its blocks fine as may be.
  const std::int64_t nb = std::ssize(pl.blocks), nb_fine = std::min(nb, fine);
  pl.max_rows = std::ssize(pl.vip_rows) + nb_fine * block + (nb - nb_fine);
  return pl;
}

VccBlock::VccBlock(const Session& session, ParameterTable& table, Scratch& scratch, const std::string& prefix,
                   const ModelConfig& c, const Geometry& geometry)
    : prefix_(prefix),
      dim_(c.dim),
      eps_(c.norm_eps),
      vip_(c.vcc.vip_tokens),
      block_(c.vcc.block),
      fine_blocks_(c.vcc.fine_blocks),
      explore_prob_(c.vcc.explore_prob),
      seed_(c.seed),
      geom_(geometry),
      place_(place(session, prefix, c, geometry)),
      proj_(table, prefix, c),
      ffn_(table, scratch, prefix, "vcc.ffn", c.dim, c.ffn_hidden, place_.max_rows, c.row_chunk) {
  attn_norm_ = table.add(prefix + "attn_norm", 1, c.dim, false, Init::kOnes);
  ffn_norm_ = table.add(prefix + "ffn_norm", 1, c.dim, false, Init::kOnes);
  const std::int64_t n_loc = geom_.local_len, rows = place_.max_rows;

  GatheredAttentionShape shape;
  shape.heads = c.heads;
  shape.kv_heads = c.kv_heads;
  shape.head_dim = c.head_dim;
  shape.max_queries = rows;
  shape.max_keys = rows;
  shape.max_total_keys = compressed_len();
  attention_ = std::make_unique<GatheredAttention>(session, shape);
  // One example is in flight at a time (the backward recomputes it), so one kept region serves all.
  scratch.reserve(kAttnKept, static_cast<std::int64_t>(attention_->kept_bytes() / sizeof(float)));
  scratch.reserve(kAttnWork, static_cast<std::int64_t>(attention_->workspace_bytes() / sizeof(float)));

  z_geom_.batch = 1;
  z_geom_.seq_len = compressed_len();
  z_geom_.causal = false;
  z_positions_ = std::make_shared<DeviceBuffer>(static_cast<std::size_t>(std::max<std::int64_t>(rows, 1)) *
                                                    sizeof(std::int32_t),
                                                session.device());
  z_geom_.device_positions = z_positions_;
  upload_index(session);

  const std::int64_t D = c.dim, qd = proj_.q_width(), kd = proj_.kv_width(), nb = std::ssize(place_.blocks);
  for (const char* key : {kZ, kZn, kY, kYn, kU, kDZ, kDZn, kDY, kDYn, kDU}) scratch.reserve(key, rows * D);
  for (const char* key : {kQ, kO, kDQ, kDO}) scratch.reserve(key, rows * qd);
  for (const char* key : {kK, kV, kDK, kDV}) scratch.reserve(key, rows * kd);
  scratch.reserve(kLse, rows * c.heads);
  for (const char* key : {kDBias, kDSigma}) scratch.reserve(key, rows);
  for (const char* key : {kC, kCn, kDC, kDCn}) scratch.reserve(key, nb * D);
  for (const char* key : {kKc, kDKc}) scratch.reserve(key, nb * kd);
  for (const char* key : {kXv, kXvn, kDXv, kDXvn}) scratch.reserve(key, std::int64_t{vip_} * D);
  for (const char* key : {kQv, kDQv}) scratch.reserve(key, std::int64_t{vip_} * qd);
  scratch.reserve(kProbs, std::int64_t{c.heads} * vip_ * nb);
  scratch.reserve(kStats, 2 * std::int64_t{c.heads} * vip_);
  for (const char* key : {kDPi, kP}) scratch.reserve(key, nb);
  scratch.reserve(kLogP, place_.num_blocks);
  scratch.reserve(kPiDot, sizeof(double) / sizeof(float));
  scratch.reserve(kMeta, static_cast<std::int64_t>((example_index_bytes(n_loc, rows, nb) + sizeof(float) - 1) /
                                                   sizeof(float)));
}

VccBlock::~VccBlock() = default;

void VccBlock::upload_index(const Session& session) {
  const std::int64_t nb = std::ssize(place_.blocks);
  std::vector<std::int64_t> words;
  for (std::int64_t lb = 0; lb <= nb; ++lb) words.push_back(lb * block_);
  words.insert(words.end(), place_.block_rows.begin(), place_.block_rows.end());
  for (std::int64_t lb = 0; lb < nb; ++lb) words.insert(words.end(), static_cast<std::size_t>(block_), lb);
  words.insert(words.end(), place_.vip_rows.begin(), place_.vip_rows.end());
  words.insert(words.end(), place_.blocks.begin(), place_.blocks.end());
  std::vector<std::int32_t> positions(place_.coarse_positions);
  positions.insert(positions.end(), place_.vip_positions.begin(), place_.vip_positions.end());

  const Device& device = session.device();
  index_.words = DeviceBuffer(std::max<std::size_t>(words.size(), 1) * sizeof(std::int64_t), device);
  index_.words.upload(std::span<const std::int64_t>(words), session.stream());
  index_.positions = DeviceBuffer(std::max<std::size_t>(positions.size(), 1) * sizeof(std::int32_t), device);
  index_.positions.upload(std::span<const std::int32_t>(positions), session.stream());
  const std::int64_t* w = index_.words.as<const std::int64_t>();
  index_.block_offsets = w;
  index_.block_rows = w + nb + 1;
  index_.block_of_row = index_.block_rows + nb * block_;
  index_.vip_rows = index_.block_of_row + nb * block_;
  index_.block_ids = index_.vip_rows + place_.vip_rows.size();
  index_.coarse_positions = index_.positions.as<const std::int32_t>();
  index_.vip_positions = index_.coarse_positions + nb;
}

// The most bytes compress() stages: every list at its largest, each padded to the alignment.
std::size_t VccBlock::example_index_bytes(std::int64_t local_len, std::int64_t max_rows, std::int64_t blocks) {
  const auto words = [](std::int64_t n) { return aligned(static_cast<std::size_t>(n) * sizeof(std::int64_t)); };
  const auto floats = [](std::int64_t n) { return aligned(static_cast<std::size_t>(n) * sizeof(float)); };
  return 2 * words(local_len) + words(max_rows + 1) + 2 * words(max_rows) + 2 * words(blocks) + words(blocks + 1) +
         floats(max_rows) + floats(local_len) + 2 * floats(blocks);
}

template <typename T>
const T* VccBlock::example(const RunContext& rc, std::size_t offset) const {
  return reinterpret_cast<const T*>(reinterpret_cast<const std::byte*>(rc.scratch.get(kMeta)) + offset);
}

std::int64_t VccBlock::compressed_len() const {
  return vip_ + fine_blocks_ * block_ + (place_.num_blocks - fine_blocks_);
}

// Coarsens this rank's blocks, scores them with the VIP queries (one softmax over every rank's
// blocks), and picks the fine blocks: the top fine_blocks of l (ties to the lower block), or the
// exploration permutation's first ones.
void VccBlock::select(const RunContext& rc, int example, const float* x) {
  const Scratch& s = rc.scratch;
  auto& comm = rc.session.comm();
  const int D = dim_, H = proj_.heads, KV = proj_.kv_heads, hd = proj_.head_dim;
  const std::int64_t nb = std::ssize(place_.blocks), V = vip_, HV = std::int64_t{H} * V, qd = proj_.q_width(),
                     kd = proj_.kv_width();
  float *c = s.get(kC), *cn = s.get(kCn), *kc = s.get(kKc), *qv = s.get(kQv), *probs = s.get(kProbs);
  float *row_max = s.get(kStats), *row_sum = row_max + HV, *log_p = s.get(kLogP);

  if (nb > 0) {
    kernels::gather_rows({.rows = nb,
                          .width = D,
                          .offsets = index_.block_offsets,
                          .index = index_.block_rows,
                          .scale = 1.0f / static_cast<float>(block_),
                          .src = x,
                          .dst = c},
                         rc.exec);
    kernels::rms_norm_forward({nb, D, eps_, c, rc.p(attn_norm_), cn}, rc.exec);
    kernels::linear_forward({nb, D, static_cast<int>(kd), cn, rc.p(proj_.wk), kc, false, rc.compute}, rc.exec);
    kernels::rope_forward({nb, KV, hd, proj_.rope_theta, index_.coarse_positions, kc}, rc.exec);
  }
  if (!place_.vip_rows.empty()) {
    float *xv = s.get(kXv), *xvn = s.get(kXvn);
    kernels::gather_rows({.rows = V, .width = D, .index = index_.vip_rows, .src = x, .dst = xv}, rc.exec);
    kernels::rms_norm_forward({V, D, eps_, xv, rc.p(attn_norm_), xvn}, rc.exec);
    kernels::linear_forward({V, D, static_cast<int>(qd), xvn, rc.p(proj_.wq), qv, false, rc.compute}, rc.exec);
    kernels::rope_forward({V, H, hd, proj_.rope_theta, index_.vip_positions, qv}, rc.exec);
  }
  comm.broadcast({qv, static_cast<std::size_t>(V * qd), DType::kF32}, 0, rc.session.stream());

  // a[h, v, j] = softmax_j(q_vh · k_j / sqrt(d)) over all ranks' blocks: max and sum all-reduced.
  const kernels::VipScoreShape shape{H, KV, hd, V, nb, 1.0f / std::sqrt(static_cast<float>(hd))};
  kernels::vip_block_logits({shape, qv, kc, probs, row_max}, rc.exec);
  comm.all_reduce({row_max, static_cast<std::size_t>(HV), DType::kF32}, {row_max, static_cast<std::size_t>(HV), DType::kF32},
                  comm::ReduceOp::kMax, rc.session.stream());
  kernels::vip_block_softmax({shape, row_max, probs, row_sum}, rc.exec);
  comm.all_reduce({row_sum, static_cast<std::size_t>(HV), DType::kF32}, {row_sum, static_cast<std::size_t>(HV), DType::kF32},
                  comm::ReduceOp::kSum, rc.session.stream());
  // Every block's l_j comes from its owner and zeros elsewhere, so the all-reduced sum is exact and
  // every rank ranks the same values.
  const std::int64_t all_blocks = place_.num_blocks;
  zero(log_p, all_blocks, rc);
  kernels::vip_block_mean({shape, row_sum, index_.block_ids, kProbFloor, probs, s.get(kP), log_p}, rc.exec);
  comm.all_reduce({log_p, static_cast<std::size_t>(all_blocks), DType::kF32},
                  {log_p, static_cast<std::size_t>(all_blocks), DType::kF32}, comm::ReduceOp::kSum, rc.session.stream());
  log_p_.resize(static_cast<std::size_t>(all_blocks));
  copy_to_host(log_p_.data(), log_p, log_p_.size() * sizeof(float), rc.session.device(), rc.session.stream());

  const float l_max = *std::max_element(log_p_.begin(), log_p_.end());
  double total = 0.0;
  for (const float l : log_p_) total += std::exp(static_cast<double>(l - l_max));
  pi_.resize(log_p_.size());
  for (std::size_t j = 0; j < log_p_.size(); ++j)
    pi_[j] = static_cast<float>(std::exp(static_cast<double>(log_p_[j] - l_max)) / total);

  std::vector<std::int32_t> order;
  if (rc.training) order = vcc_exploration(seed_, rc.step, prefix_, example, place_.num_blocks, explore_prob_);
  if (order.empty()) {
    order.resize(static_cast<std::size_t>(place_.num_blocks));
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](std::int32_t i, std::int32_t j) { return log_p_[i] > log_p_[j]; });
  }
  std::vector<char> selected(static_cast<std::size_t>(place_.num_blocks), 0);
  for (std::int64_t k = 0; k < fine_blocks_; ++k) selected[order[k]] = 1;
  fine_.resize(static_cast<std::size_t>(nb));
  for (std::int64_t lb = 0; lb < nb; ++lb) fine_[lb] = selected[place_.blocks[lb]];
}

// Z on this rank: the VIP tokens (rank 0), then per block its fine tokens or its coarse token. The
// lists are planned on the host and uploaded; the rows move on the device.
void VccBlock::compress(const RunContext& rc, const float* x) {
  const std::int64_t n_loc = geom_.local_len, nb = std::ssize(place_.blocks);
  const float log_block = std::log(static_cast<float>(block_)), inv_block = 1.0f / static_cast<float>(block_);
  std::vector<std::int32_t>& pos = z_geom_.positions;
  pos.clear();
  std::vector<std::int64_t> z_of_row(static_cast<std::size_t>(n_loc)), x_dst, x_src, c_dst, c_src, pi_offsets;
  std::vector<float> bias, dx_weights(static_cast<std::size_t>(n_loc), 1.0f), pi_signs, pi;
  auto add_row = [&](std::int32_t position, float key_bias) {
    pos.push_back(position);
    bias.push_back(key_bias);
    return std::ssize(pos) - 1;
  };
  for (std::size_t v = 0; v < place_.vip_rows.size(); ++v) {
    const std::int64_t row = place_.vip_rows[v], r = add_row(place_.vip_positions[v], 0.0f);
    z_of_row[row] = r;
    x_dst.push_back(r);
    x_src.push_back(row);
  }
  for (std::int64_t lb = 0; lb < nb; ++lb) {
    const std::int64_t* rows = place_.block_rows.data() + lb * block_;
    pi_offsets.push_back(std::ssize(pos));
    pi_signs.push_back(fine_[lb] ? 1.0f : -1.0f);
    pi.push_back(pi_[place_.blocks[lb]]);
    if (fine_[lb]) {
      for (int t = 0; t < block_; ++t) {
        const std::int64_t r = add_row(place_.block_positions[lb * block_ + t], 0.0f);
        z_of_row[rows[t]] = r;
        x_dst.push_back(r);
        x_src.push_back(rows[t]);
      }
    } else {
      const std::int64_t r = add_row(place_.coarse_positions[lb], log_block);
      c_dst.push_back(r);
      c_src.push_back(lb);
      for (int t = 0; t < block_; ++t) {
        z_of_row[rows[t]] = r;
        dx_weights[rows[t]] = inv_block;  // a coarse z is its block's mean
      }
    }
  }
  const std::int64_t r_count = std::ssize(pos);
  pi_offsets.push_back(r_count);
  z_geom_.local_len = r_count;
  // The tokens of each Z row, ascending (a counting sort), for the backward's sum of their gradients.
  std::vector<std::int64_t> du_offsets(static_cast<std::size_t>(r_count + 1), 0), du_tokens(static_cast<std::size_t>(n_loc));
  for (const std::int64_t r : z_of_row) ++du_offsets[r + 1];
  std::partial_sum(du_offsets.begin(), du_offsets.end(), du_offsets.begin());
  std::vector<std::int64_t> fill(du_offsets.begin(), du_offsets.end() - 1);
  for (std::int64_t t = 0; t < n_loc; ++t) du_tokens[fill[z_of_row[t]]++] = t;

  staging_.clear();
  ExampleIndex& e = example_;
  e.x_rows = std::ssize(x_dst);
  e.c_rows = std::ssize(c_dst);
  e.z_of_row = stage(staging_, z_of_row);
  e.du_offsets = stage(staging_, du_offsets);
  e.du_tokens = stage(staging_, du_tokens);
  e.x_dst = stage(staging_, x_dst);
  e.x_src = stage(staging_, x_src);
  e.c_dst = stage(staging_, c_dst);
  e.c_src = stage(staging_, c_src);
  e.pi_offsets = stage(staging_, pi_offsets);
  e.bias = stage(staging_, bias);
  e.dx_weights = stage(staging_, dx_weights);
  e.pi_signs = stage(staging_, pi_signs);
  e.pi = stage(staging_, pi);
  const Device& device = rc.session.device();
  copy_from_host(rc.scratch.get(kMeta), staging_.data(), staging_.size(), device, rc.session.stream());
  z_positions_->copy_from_host(pos.data(), pos.size() * sizeof(std::int32_t), 0, rc.session.stream());

  const int D = dim_;
  float* z = rc.scratch.get(kZ);
  kernels::gather_rows({.rows = e.x_rows,
                        .width = D,
                        .index = example<std::int64_t>(rc, e.x_src),
                        .dst_rows = example<std::int64_t>(rc, e.x_dst),
                        .src = x,
                        .dst = z},
                       rc.exec);
  kernels::gather_rows({.rows = e.c_rows,
                        .width = D,
                        .index = example<std::int64_t>(rc, e.c_src),
                        .dst_rows = example<std::int64_t>(rc, e.c_dst),
                        .src = rc.scratch.get(kC),
                        .dst = z},
                       rc.exec);
}

// Every rank's Z rows are keys, this rank's its queries; the key bias is +log(block size). The forward
// and the backward of an example pass the same.
GatheredForwardArgs VccBlock::attention_args(const RunContext& rc) const {
  const Scratch& s = rc.scratch;
  GatheredForwardArgs args;
  args.n_q = args.n_k = z_geom_.local_len;
  args.q = s.get(kQ);
  args.k = s.get(kK);
  args.v = s.get(kV);
  args.key_bias = example<float>(rc, example_.bias);
  args.o = s.get(kO);
  args.lse = s.get(kLse);
  args.kept = s.get(kAttnKept);
  args.workspace = s.get(kAttnWork);
  return args;
}

// U = A + F on Z, A = Attn(rms z) over every rank's Z, F = FFN(rms(z + A)); z_new = z + σ⊙U, σ = 1.
void VccBlock::block_forward(const RunContext& rc) {
  const Scratch& s = rc.scratch;
  const std::int64_t r = z_geom_.local_len;
  const int D = dim_, qd = static_cast<int>(proj_.q_width());
  float *z = s.get(kZ), *zn = s.get(kZn), *y = s.get(kY), *yn = s.get(kYn), *u = s.get(kU);
  float *q = s.get(kQ), *k = s.get(kK), *v = s.get(kV), *o = s.get(kO);
  kernels::rms_norm_forward({r, D, eps_, z, rc.p(attn_norm_), zn}, rc.exec);
  proj_.project(rc, z_geom_, zn, q, k, v);
  attention_->forward(attention_args(rc));
  kernels::linear_forward({r, qd, D, o, rc.p(proj_.wo), u, false, rc.compute}, rc.exec);
  copy(z, y, r * D, rc);
  copy(u, y, r * D, rc, true);
  kernels::rms_norm_forward({r, D, eps_, y, rc.p(ffn_norm_), yn}, rc.exec);
  ffn_.forward_rows(rc, r, yn, u);
}

// From d_u (= dL/dU, σ being 1) to d_z; adds the key-bias gradient (d log σ = dσ at σ = 1) to d_sigma.
void VccBlock::block_backward(const RunContext& rc) {
  const Scratch& s = rc.scratch;
  const std::int64_t r = z_geom_.local_len;
  const int D = dim_, qd = static_cast<int>(proj_.q_width());
  float *z = s.get(kZ), *zn = s.get(kZn), *y = s.get(kY), *yn = s.get(kYn), *d_u = s.get(kDU);
  float *d_z = s.get(kDZ), *d_zn = s.get(kDZn), *d_y = s.get(kDY), *d_yn = s.get(kDYn), *o = s.get(kO);
  float *d_q = s.get(kDQ), *d_k = s.get(kDK), *d_v = s.get(kDV), *d_o = s.get(kDO);
  float *d_bias = s.get(kDBias), *d_sigma = s.get(kDSigma);

  zero(d_yn, r * D, rc);
  ffn_.backward_rows(rc, r, yn, d_u, d_yn);
  zero(d_y, r * D, rc);
  kernels::rms_norm_backward({r, D, eps_, y, rc.p(ffn_norm_), d_yn, d_y, rc.g(ffn_norm_)}, rc.exec);
  copy(d_y, d_z, r * D, rc);        // y = z + A
  copy(d_u, d_y, r * D, rc, true);  // d_y becomes dL/dA
  zero(d_o, r * qd, rc);
  kernels::linear_backward({r, qd, D, o, rc.p(proj_.wo), d_y, d_o, rc.g(proj_.wo), rc.compute}, rc.exec);
  zero(d_q, r * qd, rc);
  zero(d_k, r * proj_.kv_width(), rc);
  zero(d_v, r * proj_.kv_width(), rc);
  zero(d_bias, r, rc);
  attention_->backward(
      {.fwd = attention_args(rc), .d_o = d_o, .d_q = d_q, .d_k = d_k, .d_v = d_v, .d_key_bias = d_bias});
  copy(d_bias, d_sigma, r, rc, true);
  zero(d_zn, r * D, rc);
  proj_.project_backward(rc, z_geom_, zn, d_q, d_k, d_v, d_zn);
  kernels::rms_norm_backward({r, D, eps_, z, rc.p(attn_norm_), d_zn, d_z, rc.g(attn_norm_)}, rc.exec);
}

// dπ_j from d_sigma, then back through π = softmax(l), l = log(p + 1e-5), p = mean of the VIP softmax,
// into the VIP queries (reduced to rank 0) and the block means' keys; adds into d_x.
void VccBlock::select_backward(const RunContext& rc, float* d_x) {
  const Scratch& s = rc.scratch;
  auto& comm = rc.session.comm();
  const int D = dim_, H = proj_.heads, KV = proj_.kv_heads, hd = proj_.head_dim;
  const std::int64_t nb = std::ssize(place_.blocks), V = vip_, HV = std::int64_t{H} * V, qd = proj_.q_width(),
                     kd = proj_.kv_width();
  const float *probs = s.get(kProbs), *qv = s.get(kQv), *kc = s.get(kKc), *pi = example<float>(rc, example_.pi);
  float *d_pi = s.get(kDPi), *row_dot = s.get(kStats), *d_qv = s.get(kDQv), *d_kc = s.get(kDKc);
  auto* pi_dot = reinterpret_cast<double*>(s.get(kPiDot));

  // σ_fine = 1 + π − sg(π), σ_coarse = 1 + (1 − π) − sg(1 − π): dπ_j = ±Σ dσ over block j's Z rows.
  kernels::gather_rows({.rows = nb,
                        .width = 1,
                        .offsets = example<std::int64_t>(rc, example_.pi_offsets),
                        .weights = example<float>(rc, example_.pi_signs),
                        .src = s.get(kDSigma),
                        .dst = d_pi},
                       rc.exec);
  kernels::vip_pi_dot({nb, pi, d_pi, pi_dot}, rc.exec);  // Σ_j π_j dπ_j, then over every rank's blocks
  comm.all_reduce({pi_dot, 1, DType::kF64}, {pi_dot, 1, DType::kF64}, comm::ReduceOp::kSum, rc.session.stream());
  // dl = π (dπ − Σ π dπ), dp = dl / (p + 1e-5) in place over d_pi; p_j = mean_hv a[h, v, j] gives
  // d logit = a (dp − Σ_j a dp) / (H V), with the sum over every rank.
  const kernels::VipScoreShape shape{H, KV, hd, V, nb, 1.0f / std::sqrt(static_cast<float>(hd))};
  kernels::vip_scores_backward_rows({shape, pi, s.get(kP), pi_dot, kProbFloor, probs, d_pi, row_dot}, rc.exec);
  comm.all_reduce({row_dot, static_cast<std::size_t>(HV), DType::kF32}, {row_dot, static_cast<std::size_t>(HV), DType::kF32},
                  comm::ReduceOp::kSum, rc.session.stream());
  zero(d_qv, V * qd, rc);
  zero(d_kc, nb * kd, rc);
  kernels::vip_scores_backward_inputs({shape, qv, kc, probs, d_pi, row_dot, d_qv, d_kc}, rc.exec);
  comm.all_reduce({d_qv, static_cast<std::size_t>(V * qd), DType::kF32}, {d_qv, static_cast<std::size_t>(V * qd), DType::kF32},
                  comm::ReduceOp::kSum, rc.session.stream());

  if (!place_.vip_rows.empty()) {
    float *xv = s.get(kXv), *xvn = s.get(kXvn), *d_xv = s.get(kDXv), *d_xvn = s.get(kDXvn);
    kernels::rope_backward({V, H, hd, proj_.rope_theta, index_.vip_positions, d_qv}, rc.exec);
    zero(d_xvn, V * D, rc);
    kernels::linear_backward(
        {V, D, static_cast<int>(qd), xvn, rc.p(proj_.wq), d_qv, d_xvn, rc.g(proj_.wq), rc.compute}, rc.exec);
    zero(d_xv, V * D, rc);
    kernels::rms_norm_backward({V, D, eps_, xv, rc.p(attn_norm_), d_xvn, d_xv, rc.g(attn_norm_)}, rc.exec);
    kernels::gather_rows(
        {.rows = V, .width = D, .dst_rows = index_.vip_rows, .accumulate = true, .src = d_xv, .dst = d_x}, rc.exec);
  }
  if (nb > 0) {
    float *c = s.get(kC), *cn = s.get(kCn), *d_c = s.get(kDC), *d_cn = s.get(kDCn);
    kernels::rope_backward({nb, KV, hd, proj_.rope_theta, index_.coarse_positions, d_kc}, rc.exec);
    zero(d_cn, nb * D, rc);
    kernels::linear_backward(
        {nb, D, static_cast<int>(kd), cn, rc.p(proj_.wk), d_kc, d_cn, rc.g(proj_.wk), rc.compute}, rc.exec);
    zero(d_c, nb * D, rc);
    kernels::rms_norm_backward({nb, D, eps_, c, rc.p(attn_norm_), d_cn, d_c, rc.g(attn_norm_)}, rc.exec);
    // c_j is the mean of block j's rows: each row takes d_c_j / block.
    kernels::gather_rows({.rows = nb * block_,
                          .width = D,
                          .index = index_.block_of_row,
                          .dst_rows = index_.block_rows,
                          .scale = 1.0f / static_cast<float>(block_),
                          .accumulate = true,
                          .src = d_c,
                          .dst = d_x},
                         rc.exec);
  }
}

void VccBlock::forward(const RunContext& rc, const float* in, float* out) {
  const std::int64_t n_loc = geom_.local_len, D = dim_;
  const float* u = rc.scratch.get(kU);
  for (int e = 0; e < geom_.batch; ++e) {
    const float* x = in + e * n_loc * D;
    float* y = out + e * n_loc * D;
    select(rc, e, x);
    compress(rc, x);
    block_forward(rc);
    // Decompress: a fine or VIP token's z is its x, and a coarse block's tokens take c_new − c_old =
    // its coarse token's update, so every token is x + U of its Z row.
    copy(x, y, n_loc * D, rc);
    kernels::gather_rows({.rows = n_loc,
                          .width = dim_,
                          .index = example<std::int64_t>(rc, example_.z_of_row),
                          .accumulate = true,
                          .src = u,
                          .dst = y},
                         rc.exec);
  }
}

void VccBlock::backward(const RunContext& rc, const float* in, const float* d_out, float* d_in) {
  const std::int64_t n_loc = geom_.local_len, D = dim_;
  const Scratch& s = rc.scratch;
  const float *u = s.get(kU), *d_z = s.get(kDZ);
  float *d_u = s.get(kDU), *d_sigma = s.get(kDSigma);
  for (int e = 0; e < geom_.batch; ++e) {
    const float* x = in + e * n_loc * D;
    const float* dy = d_out + e * n_loc * D;
    float* dx = d_in + e * n_loc * D;
    select(rc, e, x);
    compress(rc, x);
    block_forward(rc);
    const std::int64_t r = z_geom_.local_len;
    // Every Z row has at least one token, so the segment sums write all of d_u.
    kernels::gather_rows({.rows = r,
                          .width = dim_,
                          .offsets = example<std::int64_t>(rc, example_.du_offsets),
                          .index = example<std::int64_t>(rc, example_.du_tokens),
                          .src = dy,
                          .dst = d_u},
                         rc.exec);
    copy(dy, dx, n_loc * D, rc);  // out = x + U
    kernels::rowwise_dot({r, dim_, d_u, u, d_sigma}, rc.exec);
    block_backward(rc);
    kernels::gather_rows({.rows = n_loc,
                          .width = dim_,
                          .index = example<std::int64_t>(rc, example_.z_of_row),
                          .weights = example<float>(rc, example_.dx_weights),
                          .accumulate = true,
                          .src = d_z,
                          .dst = dx},
                         rc.exec);
    select_backward(rc, dx);
  }
}

}  // namespace ringcast::model
