// Training data for ringcast::Model: byte-token (vocab 256) sequences, each a pure function of
// (dataset, sequence index), so every rank builds the same global sequence and keeps only the rows at
// its model positions (local_batch). Building the whole sequence on every rank is O(n) work per
// sequence, negligible next to the model at any n the CPU backend trains. Targets < 0 are not scored.
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
  // Global sequence `index`: tokens[i] and its target (the token to predict at position i, or -1),
  // both of length seq_len. Deterministic; throws Error when seq_len does not fit the dataset.
  virtual void sequence(std::uint64_t index, std::span<std::int32_t> tokens, std::span<std::int32_t> targets) const = 0;
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
// tokens[b, i] = sequence_b[positions[i]], the [batch, positions.size()] layout Model takes.
struct LocalBatch {
  std::vector<std::int32_t> tokens;
  std::vector<std::int32_t> targets;
};
void local_batch(const Dataset& data, std::uint64_t first_index, int batch, std::int64_t seq_len,
                 std::span<const std::int32_t> positions, LocalBatch& out);

}  // namespace ringcast
