// A float64 naive attention on whole sequences in token layout, with its gradients: the oracle of the
// distributed tests (every rank builds the same global inputs and checks its own shard against it).
// q [B, n, h, d], k and v [B, n, h_kv, d], query head hq uses KV head hq / (h / h_kv); softmax scale
// 1/sqrt(d); causal: row t sees keys s <= t. lse [B, h, n].
#pragma once

#include <gtest/gtest.h>

#include <cstdint>
#include <span>
#include <vector>

namespace ringcast::test {

struct NaiveShape {
  int batch = 1;
  std::int64_t seq = 0;
  int heads = 1;
  int kv_heads = 1;
  int head_dim = 64;
  bool causal = false;
};

struct NaiveResult {
  std::vector<double> o, lse;        // forward
  std::vector<double> d_q, d_k, d_v; // backward (filled when d_o is given)
};

NaiveResult naive_attention(const NaiveShape& s, std::span<const double> q, std::span<const double> k,
                            std::span<const double> v, std::span<const double> d_o = {});

// Rows of a token-layout tensor [B, n, heads, d] at the given positions (a rank's shard).
std::vector<double> take_rows(std::span<const double> x, int batch, std::int64_t seq, int row_elems,
                              std::span<const std::int32_t> positions);
// Rows of an LSE [B, h, n] at the given positions: [B, h, positions.size()].
std::vector<double> take_lse(std::span<const double> lse, int batch, int heads, std::int64_t seq,
                             std::span<const std::int32_t> positions);

// The causal leak check's verdict: the rows of a rank's shard at positions <= t hold bitwise the same
// O, dQ, dK and dV in two runs (any type with those fp32 vectors in token layout).
template <typename Shard>
void expect_same_rows_up_to(const Shard& a, const Shard& b, std::span<const std::int32_t> positions, std::int64_t t,
                            int batch, int heads, int kv_heads, int head_dim) {
  const auto n = static_cast<std::int64_t>(positions.size());
  for (int bb = 0; bb < batch; ++bb)
    for (std::int64_t i = 0; i < n; ++i) {
      if (positions[i] > t) continue;
      for (int c = 0; c < heads * head_dim; ++c) {
        const std::size_t at = (bb * n + i) * heads * head_dim + c;
        ASSERT_EQ(a.o[at], b.o[at]) << "O row " << positions[i];
        ASSERT_EQ(a.d_q[at], b.d_q[at]) << "dQ row " << positions[i];
      }
      for (int c = 0; c < kv_heads * head_dim; ++c) {
        const std::size_t at = (bb * n + i) * kv_heads * head_dim + c;
        ASSERT_EQ(a.d_k[at], b.d_k[at]) << "dK row " << positions[i];
        ASSERT_EQ(a.d_v[at], b.d_v[at]) << "dV row " << positions[i];
      }
    }
}

}  // namespace ringcast::test
