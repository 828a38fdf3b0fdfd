// Training data for ringcast::Model: byte-token (vocab 256) sequences, each a pure function of
// (dataset, sequence index), so every rank builds the same global sequence and keeps only the rows at
// its model positions (local_batch). Building the whole sequence on every rank is O(n) work per
// sequence, negligible next to the model at any n the CPU backend trains. Language-modelling sets
// (decoders) give a target per position, < 0 not scored; classification sets (encoders, classes() > 0)
// give one label per sequence.
#pragma once

#include <cstdint>
#include <memory>
#include <span>
#include <string>
#include <vector>

namespace ringcast {

class Dataset {
 public:
  virtual ~Dataset() = default;
  // Global sequence `index`: tokens [seq_len] and targets: [seq_len] (the token to predict at position
  // i, or -1) for language modelling, or [1] (the label) for classification. Deterministic; throws
  // Error when seq_len does not fit the dataset.
  virtual void sequence(std::uint64_t index, std::span<std::int32_t> tokens, std::span<std::int32_t> targets) const = 0;
  // 0 for language modelling, else the number of class labels.
  virtual int classes() const { return 0; }
};

// Associative recall (multi-query, as in Zoology's MQAR): m = min(64, n / 4) (key, value) pairs with
// distinct keys open the sequence; the last 2m positions (or what is left after the pairs) are
// queries, a key from the pairs followed by its value; the positions in between are filler tokens.
// Only a query key's position is scored (its target is the value), so a query may sit up to n - 2
// positions from the pair it recalls. Keys are tokens [0, 64), values [64, 80), filler [80, 256): a
// model that has only learnt which tokens are values scores ln 16 = 2.77 and 1/16 of the answers.
class RecallDataset final : public Dataset {
 public:
  static constexpr int kKeys = 64;
  static constexpr int kValues = 16;
  explicit RecallDataset(std::uint64_t seed) : seed_(seed) {}
  void sequence(std::uint64_t index, std::span<std::int32_t> tokens, std::span<std::int32_t> targets) const override;

 private:
  std::uint64_t seed_;
};

// Needle retrieval (passkey): filler tokens [80, 256) with one needle -- the marker 1 followed by
// kDigits value tokens [64, 80) -- at a uniform position before the last 2 (kDigits + 1) + 4; the
// sequence ends with the query marker 2 and the same value tokens. Scored: the kDigits value tokens
// after the query marker, each predicted from the position before it, so the first is answerable only
// by retrieving the needle (up to n positions back). Needs n >= 16.
class NeedleDataset final : public Dataset {
 public:
  static constexpr int kDigits = 4;
  static constexpr std::int32_t kNeedleMarker = 1, kQueryMarker = 2;
  explicit NeedleDataset(std::uint64_t seed) : seed_(seed) {}
  void sequence(std::uint64_t index, std::span<std::int32_t> tokens, std::span<std::int32_t> targets) const override;

 private:
  std::uint64_t seed_;
};

// ListOps (Nangia & Bowman; the LRA task): a nested expression over digits with the operators MAX,
// MIN, MED (median, lower middle) and SM (sum mod 10), e.g. "[X3[N74]8]" for [MAX 3 [MIN 7 4] 8] = 8,
// written with one token per symbol ('0'-'9', '[' ']', 'X' 'N' 'D' 'S') and padded with 0 to n. The
// label is the value, 10 classes. Depth at most max_depth, 2 to max_args arguments per operator,
// the whole expression fitting in n (at least 5 tokens).
class ListOpsDataset final : public Dataset {
 public:
  ListOpsDataset(std::uint64_t seed, int max_depth = 2, int max_args = 6);
  void sequence(std::uint64_t index, std::span<std::int32_t> tokens, std::span<std::int32_t> targets) const override;
  int classes() const override { return 10; }

 private:
  std::uint64_t seed_;
  int max_depth_, max_args_;
};

// Prefix retrieval (the VIP-token task of VCC): the first `prefix` positions are the question --
// the marker 3 and a key [0, 64), then padding 0 -- and the rest holds m = min(pairs, (n - prefix) / 4)
// (key, value) pairs with distinct keys (values [64, 80)) scattered among filler [80, 256); one of the
// pairs has the question's key. The label is its value - 64 (16 classes). Needs n >= prefix + 8.
class PrefixRecallDataset final : public Dataset {
 public:
  PrefixRecallDataset(std::uint64_t seed, int prefix, int pairs = 64) : seed_(seed), prefix_(prefix), pairs_(pairs) {}
  void sequence(std::uint64_t index, std::span<std::int32_t> tokens, std::span<std::int32_t> targets) const override;
  int classes() const override { return 16; }

 private:
  std::uint64_t seed_;
  int prefix_, pairs_;
};

// Byte-level language modelling over a slice [begin, end) of a file's bytes: sequence i is the window
// starting at an offset drawn from (seed, i); targets are the next bytes. The bytes are shared, so a
// train and a held-out slice of one file read it once (read_file_bytes).
class ByteDataset final : public Dataset {
 public:
  ByteDataset(std::shared_ptr<const std::vector<std::uint8_t>> bytes, std::size_t begin, std::size_t end,
              std::uint64_t seed);
  void sequence(std::uint64_t index, std::span<std::int32_t> tokens, std::span<std::int32_t> targets) const override;

 private:
  std::shared_ptr<const std::vector<std::uint8_t>> bytes_;
  std::size_t begin_, end_;
  std::uint64_t seed_;
};

// The whole file; throws Error when it cannot be read or is empty.
std::shared_ptr<const std::vector<std::uint8_t>> read_file_bytes(const std::string& path);

// This rank's rows of `batch` global sequences (indices first_index, first_index + 1, ...):
// tokens[b, i] = sequence_b[positions[i]], the [batch, positions.size()] layout Model takes; targets
// likewise, or the [batch] labels of a classification set.
struct LocalBatch {
  std::vector<std::int32_t> tokens;
  std::vector<std::int32_t> targets;
};
void local_batch(const Dataset& data, std::uint64_t first_index, int batch, std::int64_t seq_len,
                 std::span<const std::int32_t> positions, LocalBatch& out);

}  // namespace ringcast
