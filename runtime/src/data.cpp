// The training datasets (data.hpp). Randomness is splitmix64 keyed by (seed, sequence index) with
// Lemire's multiply-shift range reduction, not <random>'s distributions, whose output the standard
// leaves to the library: a sequence must be the same on every rank, compiler and platform.
#include <ringcast/data.hpp>
#include <ringcast/error.hpp>

#include <algorithm>
#include <array>
#include <fstream>
#include <iterator>
#include <numeric>
#include <utility>
#include <vector>

namespace ringcast {
namespace {

std::uint64_t mix64(std::uint64_t z) {
  z += 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

class Rng {
 public:
  Rng(std::uint64_t seed, std::uint64_t index) : state_(mix64(seed) ^ mix64(~index)) {}
  std::uint64_t next() { return mix64(state_ += 0x9e3779b97f4a7c15ull); }
  // Uniform in [0, n) up to a bias of n / 2^64.
  std::uint64_t below(std::uint64_t n) {
    return static_cast<std::uint64_t>((static_cast<unsigned __int128>(next()) * n) >> 64);
  }

 private:
  std::uint64_t state_;
};

}  // namespace

void RecallDataset::sequence(std::uint64_t index, std::span<std::int32_t> tokens,
                             std::span<std::int32_t> targets) const {
  const std::int64_t n = static_cast<std::int64_t>(tokens.size());
  RINGCAST_CHECK(targets.size() == tokens.size(), "RecallDataset: tokens ({}) and targets ({}) differ in length",
                 tokens.size(), targets.size());
  RINGCAST_CHECK(n >= 4, "RecallDataset: a recall sequence needs at least 4 tokens (one pair, one query), got {}", n);
  constexpr int kFillerBase = kKeys + kValues;
  Rng rng(seed_, index);
  const std::int64_t m = std::min<std::int64_t>(kKeys, n / 4);
  const std::int64_t queries = std::min(m, (n - 2 * m) / 2);
  std::fill(targets.begin(), targets.end(), -1);

  // A partial Fisher-Yates shuffle draws m distinct keys.
  std::array<std::int32_t, kKeys> keys{};
  std::iota(keys.begin(), keys.end(), 0);
  std::array<std::int32_t, kKeys> value_of{};
  for (std::int64_t i = 0; i < m; ++i) {
    std::swap(keys[i], keys[i + rng.below(kKeys - i)]);
    value_of[keys[i]] = kKeys + static_cast<std::int32_t>(rng.below(kValues));
    tokens[2 * i] = keys[i];
    tokens[2 * i + 1] = value_of[keys[i]];
  }
  for (std::int64_t i = 2 * m; i < n - 2 * queries; ++i)
    tokens[i] = kFillerBase + static_cast<std::int32_t>(rng.below(256 - kFillerBase));
  for (std::int64_t i = n - 2 * queries; i < n; i += 2) {
    const std::int32_t key = keys[rng.below(m)];
    tokens[i] = key;
    tokens[i + 1] = value_of[key];
    targets[i] = value_of[key];
  }
}

void NeedleDataset::sequence(std::uint64_t index, std::span<std::int32_t> tokens,
                             std::span<std::int32_t> targets) const {
  const std::int64_t n = static_cast<std::int64_t>(tokens.size());
  RINGCAST_CHECK(targets.size() == tokens.size(), "NeedleDataset: tokens ({}) and targets ({}) differ in length",
                 tokens.size(), targets.size());
  RINGCAST_CHECK(n >= 16, "NeedleDataset: a needle sequence needs at least 16 tokens, got {}", n);
  constexpr int kSpan = kDigits + 1;
  Rng rng(seed_, index);
  std::array<std::int32_t, kDigits> value{};
  for (std::int32_t& v : value) v = 64 + static_cast<std::int32_t>(rng.below(16));
  for (std::int32_t& t : tokens) t = 80 + static_cast<std::int32_t>(rng.below(256 - 80));
  std::fill(targets.begin(), targets.end(), -1);
  const std::int64_t needle = static_cast<std::int64_t>(rng.below(static_cast<std::uint64_t>(n - 2 * kSpan - 4 + 1)));
  const std::int64_t query = n - kSpan;
  tokens[needle] = kNeedleMarker;
  tokens[query] = kQueryMarker;
  for (int i = 0; i < kDigits; ++i) {
    tokens[needle + 1 + i] = value[i];
    tokens[query + 1 + i] = value[i];
    targets[query + i] = value[i];
  }
}

ListOpsDataset::ListOpsDataset(std::uint64_t seed, int max_depth, int max_args)
    : seed_(seed), max_depth_(max_depth), max_args_(max_args) {
  RINGCAST_CHECK(max_depth >= 1 && max_args >= 2, "ListOpsDataset: max_depth ({}) >= 1 and max_args ({}) >= 2 needed",
                 max_depth, max_args);
}

namespace {

// One ListOps expression (or digit) appended to `out`; returns its value.
int listops_expression(Rng& rng, int depth, int max_depth, int max_args, std::vector<std::int32_t>& out) {
  constexpr char kOps[4] = {'X', 'N', 'D', 'S'};  // MAX, MIN, MED, SM
  if (depth == max_depth || (depth > 0 && rng.below(10) < 3)) {
    const int digit = static_cast<int>(rng.below(10));
    out.push_back('0' + digit);
    return digit;
  }
  const int op = static_cast<int>(rng.below(4));
  out.push_back('[');
  out.push_back(kOps[op]);
  std::vector<int> values(2 + rng.below(static_cast<std::uint64_t>(max_args - 1)));
  for (int& v : values) v = listops_expression(rng, depth + 1, max_depth, max_args, out);
  out.push_back(']');
  std::sort(values.begin(), values.end());
  switch (op) {
    case 0: return values.back();
    case 1: return values.front();
    case 2: return values[(values.size() - 1) / 2];
    default: return std::accumulate(values.begin(), values.end(), 0) % 10;
  }
}

}  // namespace

void ListOpsDataset::sequence(std::uint64_t index, std::span<std::int32_t> tokens,
                              std::span<std::int32_t> targets) const {
  const std::int64_t n = static_cast<std::int64_t>(tokens.size());
  RINGCAST_CHECK(targets.size() == 1, "ListOpsDataset: one label per sequence, got room for {}", targets.size());
  RINGCAST_CHECK(n >= 5, "ListOpsDataset: an expression needs at least 5 tokens, got {}", n);
  Rng rng(seed_, index);
  std::vector<std::int32_t> expr;
  int value = 0;
  // Draw until an expression fits; a flat one (as many arguments as fit) ends the search.
  for (int attempt = 0;; ++attempt) {
    expr.clear();
    if (attempt < 64) {
      value = listops_expression(rng, 0, max_depth_, max_args_, expr);
    } else {
      const int args = static_cast<int>(std::min<std::int64_t>(max_args_, n - 3));
      value = listops_expression(rng, 0, 1, args, expr);
    }
    if (static_cast<std::int64_t>(expr.size()) <= n) break;
  }
  std::fill(tokens.begin(), tokens.end(), 0);
  std::copy(expr.begin(), expr.end(), tokens.begin());
  targets[0] = value;
}

void PrefixRecallDataset::sequence(std::uint64_t index, std::span<std::int32_t> tokens,
                                   std::span<std::int32_t> targets) const {
  const std::int64_t n = static_cast<std::int64_t>(tokens.size());
  RINGCAST_CHECK(targets.size() == 1, "PrefixRecallDataset: one label per sequence, got room for {}", targets.size());
  RINGCAST_CHECK(prefix_ >= 2 && n >= prefix_ + 8 && pairs_ >= 1 && pairs_ <= 64,
                 "PrefixRecallDataset: needs a prefix >= 2, n >= prefix + 8 and 1 to 64 pairs (prefix {}, n {}, pairs {})",
                 prefix_, n, pairs_);
  Rng rng(seed_, index);
  const std::int64_t slots = (n - prefix_) / 2, m = std::min<std::int64_t>(pairs_, (n - prefix_) / 4);
  for (std::int64_t i = prefix_; i < n; ++i) tokens[i] = 80 + static_cast<std::int32_t>(rng.below(256 - 80));
  std::fill(tokens.begin(), tokens.begin() + prefix_, 0);
  // m distinct keys and m distinct slots of two positions, by partial Fisher-Yates shuffles.
  std::array<std::int32_t, 64> keys{};
  std::iota(keys.begin(), keys.end(), 0);
  std::vector<std::int64_t> slot(static_cast<std::size_t>(slots));
  std::iota(slot.begin(), slot.end(), 0);
  std::int32_t asked_value = 0;
  const std::int64_t asked = static_cast<std::int64_t>(rng.below(static_cast<std::uint64_t>(m)));
  for (std::int64_t i = 0; i < m; ++i) {
    std::swap(keys[i], keys[i + rng.below(64 - i)]);
    std::swap(slot[i], slot[i + rng.below(static_cast<std::uint64_t>(slots - i))]);
    const std::int32_t value = 64 + static_cast<std::int32_t>(rng.below(16));
    tokens[prefix_ + 2 * slot[i]] = keys[i];
    tokens[prefix_ + 2 * slot[i] + 1] = value;
    if (i == asked) asked_value = value;
  }
  tokens[0] = 3;
  tokens[1] = keys[asked];
  targets[0] = asked_value - 64;
}

ByteDataset::ByteDataset(std::shared_ptr<const std::vector<std::uint8_t>> bytes, std::size_t begin, std::size_t end,
                         std::uint64_t seed)
    : bytes_(std::move(bytes)), begin_(begin), end_(end), seed_(seed) {
  RINGCAST_CHECK(bytes_ && begin_ <= end_ && end_ <= bytes_->size(), "ByteDataset: slice [{}, {}) outside {} bytes",
                 begin_, end_, bytes_ ? bytes_->size() : 0);
}

void ByteDataset::sequence(std::uint64_t index, std::span<std::int32_t> tokens, std::span<std::int32_t> targets) const {
  const std::size_t n = tokens.size();
  RINGCAST_CHECK(targets.size() == n, "ByteDataset: tokens ({}) and targets ({}) differ in length", n, targets.size());
  // A window needs n + 1 bytes: its n tokens and the byte after the last one.
  RINGCAST_CHECK(end_ - begin_ > n, "ByteDataset: {} bytes hold no window of {} tokens and their next bytes",
                 end_ - begin_, n);
  Rng rng(seed_, index);
  const std::uint8_t* window = bytes_->data() + begin_ + rng.below(end_ - begin_ - n);
  std::copy_n(window, n, tokens.begin());
  std::copy_n(window + 1, n, targets.begin());
}

std::shared_ptr<const std::vector<std::uint8_t>> read_file_bytes(const std::string& path) {
  std::ifstream file(path, std::ios::binary);
  RINGCAST_CHECK(file.good(), "cannot read data file '{}'", path);
  auto bytes = std::make_shared<std::vector<std::uint8_t>>(std::istreambuf_iterator<char>(file),
                                                           std::istreambuf_iterator<char>());
  RINGCAST_CHECK(!file.bad(), "error reading data file '{}'", path);
  RINGCAST_CHECK(!bytes->empty(), "data file '{}' is empty", path);
  return bytes;
}

void local_batch(const Dataset& data, std::uint64_t first_index, int batch, std::int64_t seq_len,
                 std::span<const std::int32_t> positions, LocalBatch& out) {
  const std::size_t n_loc = positions.size();
  const bool labelled = data.classes() > 0;
  std::vector<std::int32_t> tokens(static_cast<std::size_t>(seq_len));
  std::vector<std::int32_t> targets(labelled ? 1 : static_cast<std::size_t>(seq_len));
  out.tokens.resize(static_cast<std::size_t>(batch) * n_loc);
  out.targets.resize(labelled ? static_cast<std::size_t>(batch) : out.tokens.size());
  for (int b = 0; b < batch; ++b) {
    data.sequence(first_index + static_cast<std::uint64_t>(b), tokens, targets);
    for (std::size_t i = 0; i < n_loc; ++i) {
      out.tokens[b * n_loc + i] = tokens[static_cast<std::size_t>(positions[i])];
      if (!labelled) out.targets[b * n_loc + i] = targets[static_cast<std::size_t>(positions[i])];
    }
    if (labelled) out.targets[static_cast<std::size_t>(b)] = targets[0];
  }
}

}  // namespace ringcast
