// The float64 attention oracle and the helpers that tests use around it: seeded random inputs,
// relative errors, random block tables. The oracle is naive on purpose: for every query row it lists
// the keys the block table lets it see (entry and KeyMeta row masks, key_mask, causal positions,
// key_count), with their biases (entry, KeyMeta, the pool's key_bias), and applies the textbook
// softmax formulas; no tiling, no online softmax.
// Layouts are those of attention.hpp: Q, O [B, n_q, heads, d]; K, V pools [kv_heads, pages, ps, d];
// LSE [B, heads, n_q].
#pragma once

#include <ringcast/kernels/attention.hpp>
#include <ringcast/kernels/block_table.hpp>

#include <cstddef>
#include <cstdint>
#include <span>
#include <vector>

namespace ringcast::test {

// One attention problem in float64. The spans must outlive the calls; inputs that the kernel reads
// in a storage dtype should be rounded to it first (see random_normal and to_f64).
struct ReferenceProblem {
  kernels::AttentionShape shape;
  double softmax_scale = 0.0;
  const kernels::HostBlockTable* table = nullptr;
  std::span<const std::int32_t> q_pos;  // [n_q]
  std::span<const double> q;
  std::span<const double> k;
  std::span<const double> v;
  std::span<const double> key_bias = {};  // [kv_heads, num_pages, page_size]; for kEntryKeyBias entries
};

struct ReferenceOutputs {
  std::vector<double> o;    // rows that see no key: 0
  std::vector<double> lse;  // rows that see no key: -inf
};

struct ReferenceGradients {
  std::vector<double> d_q;
  std::vector<double> d_k;  // pages or slots that no row sees: 0
  std::vector<double> d_v;
};

ReferenceOutputs reference_attention_forward(const ReferenceProblem& problem);

// Gradients of sum(O * d_o), with O and LSE recomputed in float64 (the kernel's D = rowsum(dO * O)
// and P from LSE are exact here).
ReferenceGradients reference_attention_backward(const ReferenceProblem& problem, std::span<const double> d_o);

// n draws of N(0, stddev^2) from std::mt19937_64 seeded with `seed`, rounded to fp32.
std::vector<float> random_normal(std::size_t n, std::uint64_t seed, double stddev = 1.0);

std::vector<double> to_f64(std::span<const float> x);

// ||x - ref|| / ||ref|| (2-norms). Elements equal in both (including matching infinities, e.g.
// LSE = -inf of an empty row) contribute nothing; any other non-finite element or difference, and a
// non-zero x where ref is all zero, gives +infinity, so NaN never passes a tolerance.
double relative_error(std::span<const double> x, std::span<const double> ref);
double relative_error(std::span<const float> x, std::span<const double> ref);

// A random sparse table for `shape` (every batch element, tile and KV head drawn independently).
struct RandomTableOptions {
  int min_entries = 0;          // entries per unit, uniform in [min_entries, max_entries]
  int max_entries = 4;          // pages are drawn with replacement: a unit may name a page twice
  double row_mask_keep = 1.0;   // each row of an entry is kept with this probability (1: all rows)
  double causal_fraction = 0.0; // entries flagged kEntryCausal, key_pos0 near the tile's positions
  double partial_fraction = 0.0;  // entries with key_count < page_size
  double bias_stddev = 0.0;     // entry bias ~ N(0, bias_stddev^2)
  double key_meta_fraction = 0.0;  // entries with per-key row masks (keep 1/2) and biases
  double key_mask_fraction = 0.0;  // entries with a random key_mask (keep 1/2; page_size <= 64)
  double key_bias_fraction = 0.0;  // entries flagged kEntryKeyBias (the problem then needs key_bias)
};
kernels::HostBlockTable random_block_table(const kernels::AttentionShape& shape, std::span<const std::int32_t> q_pos,
                                           const RandomTableOptions& options, std::uint64_t seed);

}  // namespace ringcast::test
