// merge_by_lse: the formula itself (overflow-safe, -inf on either side), and what the distributed
// modes build on it: attention over a table split in two, merged by LSE, equals attention over the
// whole table, and the backward of each part given the merged O and LSE adds up to the whole's
// gradients. Reference: the float64 oracle on the whole table; tolerance 1e-5 as in attention_cpu.
#include "cpu_attention_harness.hpp"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdio>
#include <limits>
#include <string>

namespace ringcast::test {
namespace {

using kernels::AttentionShape;
using kernels::HostBlockTable;
using kernels::kNegInf;

// Shapes are written AttentionShape{batch, seq_q, heads, kv_heads, head_dim, page_size, num_pages}.

void merge(int batch, std::int64_t seq, int heads, int head_dim, std::vector<float>& o_acc,
           std::vector<float>& lse_acc, const std::vector<float>& o_part, const std::vector<float>& lse_part) {
  kernels::MergeParams p;
  p.batch = batch;
  p.seq = seq;
  p.heads = heads;
  p.head_dim = head_dim;
  p.o_acc = o_acc.data();
  p.lse_acc = lse_acc.data();
  p.o_part = o_part.data();
  p.lse_part = lse_part.data();
  kernels::merge_by_lse(p, kernels::ExecContext{});
}

TEST(MergeByLse, MatchesTheFormulaWithoutOverflow) {
  // 2 batches, 3 heads, 5 positions, d 7; LSE pairs far beyond exp's fp32 range, and -inf sides.
  const int batch = 2, heads = 3, d = 7;
  const std::int64_t seq = 5;
  const std::size_t rows = static_cast<std::size_t>(batch * heads * seq);
  std::vector<float> o_acc = random_normal(rows * d, 1), o_part = random_normal(rows * d, 2);
  std::vector<float> lse_acc = random_normal(rows, 3, 50.0), lse_part = random_normal(rows, 4, 50.0);
  lse_acc[0] = 500.f, lse_part[0] = 499.f;
  lse_acc[1] = -300.f, lse_part[1] = -310.f;
  lse_acc[2] = kNegInf;                          // only the part
  lse_part[3] = kNegInf;                         // only the accumulator
  lse_acc[4] = kNegInf, lse_part[4] = kNegInf;   // neither: O = 0
  // LSE rows 0..4 are (b 0, head 0, position i); their O rows start at i * heads * d.
  const auto o_row = [&](std::int64_t i) { return static_cast<std::size_t>(i * heads * d); };
  const float nan = std::numeric_limits<float>::quiet_NaN();
  for (int c = 0; c < d; ++c) o_part[o_row(3) + c] = nan;  // an empty side is never read
  for (int c = 0; c < d; ++c) o_part[o_row(4) + c] = nan;

  std::vector<double> want_o(rows * d), want_lse(rows);
  for (std::int64_t b = 0; b < batch; ++b) {
    for (int h = 0; h < heads; ++h) {
      for (std::int64_t i = 0; i < seq; ++i) {
        const std::size_t row = static_cast<std::size_t>((b * heads + h) * seq + i);
        const std::size_t o_off = static_cast<std::size_t>(((b * seq + i) * heads + h) * d);
        const double la = lse_acc[row], lp = lse_part[row];
        const double m = std::max(la, lp);
        if (m == -std::numeric_limits<double>::infinity()) {
          want_lse[row] = m;
          continue;  // want_o stays 0
        }
        const double lse = m + std::log(std::exp(la - m) + std::exp(lp - m));
        want_lse[row] = lse;
        for (int c = 0; c < d; ++c) {  // an empty side (-inf) contributes nothing, NaN O or not
          const double from_acc = std::isinf(la) ? 0.0 : std::exp(la - lse) * o_acc[o_off + c];
          const double from_part = std::isinf(lp) ? 0.0 : std::exp(lp - lse) * o_part[o_off + c];
          want_o[o_off + c] = from_acc + from_part;
        }
      }
    }
  }
  merge(batch, seq, heads, d, o_acc, lse_acc, o_part, lse_part);
  const double e_o = relative_error(o_acc, want_o), e_lse = relative_error(lse_acc, want_lse);
  std::printf("[ merge formula ] relative error O %.1e LSE %.1e (tolerance 1e-6)\n", e_o, e_lse);
  EXPECT_LE(e_o, 1e-6);
  EXPECT_LE(e_lse, 1e-6);
  EXPECT_EQ(lse_acc[4], kNegInf);
  for (int c = 0; c < d; ++c) EXPECT_EQ(o_acc[o_row(4) + c], 0.f);
}

// Forward of each half merged by LSE, and backward of each half with the merged O and LSE
// (accumulated), against the oracle on the whole table.
void expect_halves_merge_to_whole(const CpuAttention& a, const HostBlockTable& first, const HostBlockTable& second,
                                  const std::string& what) {
  const AttentionShape& s = a.shape;
  const CpuAttention::F64 x = a.f64();
  const ReferenceProblem problem = a.reference(x);
  const ReferenceOutputs ref = reference_attention_forward(problem);
  const ReferenceGradients ref_g = reference_attention_backward(problem, x.d_o);

  CpuAttention::Outputs merged = a.forward(&first);
  const CpuAttention::Outputs part = a.forward(&second);
  merge(s.batch, s.seq_q, s.heads, s.head_dim, merged.o, merged.lse, part.o, part.lse);
  CpuAttention::Grads g;
  a.backward(merged, g, /*accumulate=*/false, &first);
  a.backward(merged, g, /*accumulate=*/true, &second);

  const double e_o = relative_error(merged.o, ref.o), e_lse = relative_error(merged.lse, ref.lse);
  const double e_q = relative_error(g.d_q, ref_g.d_q), e_k = relative_error(g.d_k, ref_g.d_k),
               e_v = relative_error(g.d_v, ref_g.d_v);
  std::printf("[ %-16s ] relative error O %.1e LSE %.1e dQ %.1e dK %.1e dV %.1e (tolerance %.0e)\n", what.c_str(),
              e_o, e_lse, e_q, e_k, e_v, kTolerance);
  EXPECT_LE(e_o, kTolerance) << what;
  EXPECT_LE(e_lse, kTolerance) << what;
  EXPECT_LE(e_q, kTolerance) << what;
  EXPECT_LE(e_k, kTolerance) << what;
  EXPECT_LE(e_v, kTolerance) << what;
}

TEST(MergeByLse, SplitRandomTableMergesToWhole) {
  // Entries of every unit dealt alternately to two tables; with 0..4 entries per unit and sparse
  // row masks, many rows are empty in one half, some in both.
  const AttentionShape s{2, 230, 4, 2, 64, 64, 6};
  const auto q_pos = iota_positions(s.seq_q);
  RandomTableOptions opt;
  opt.max_entries = 4;
  opt.row_mask_keep = 0.5;
  opt.causal_fraction = 0.3;
  opt.partial_fraction = 0.3;
  opt.bias_stddev = 1.0;
  opt.key_meta_fraction = 0.3;
  const CpuAttention a(s, random_block_table(s, q_pos, opt, 41), q_pos, 201);
  HostBlockTable halves[2];
  for (HostBlockTable& h : halves) h.key_meta = a.table.key_meta;
  for (std::size_t u = 0; u + 1 < a.table.offsets.size(); ++u) {
    for (std::int64_t i = a.table.offsets[u]; i < a.table.offsets[u + 1]; ++i) {
      halves[(i - a.table.offsets[u]) % 2].entries.push_back(a.table.entries[i]);
    }
    for (HostBlockTable& h : halves) h.offsets.push_back(static_cast<std::int64_t>(h.entries.size()));
  }
  expect_halves_merge_to_whole(a, halves[0], halves[1], "random halves");
}

TEST(MergeByLse, RingStepsMergeToCausalAttention) {
  // Causal attention of 300 queries over 300 keys as two ring steps: the keys of [0, 160) and of
  // [160, 300), each in its own pages, as a rank sees them one block at a time.
  const AttentionShape s{2, 300, 4, 1, 128, 32, 10};
  const auto q_pos = iota_positions(s.seq_q);
  const std::vector<kernels::KeyRange> early{{0, 160, 0}}, late{{5, 140, 160}}, all{{0, 160, 0}, {5, 140, 160}};
  const CpuAttention a(s, kernels::dense_table(s, all, q_pos, true), q_pos, 202);
  expect_halves_merge_to_whole(a, kernels::dense_table(s, early, q_pos, true), kernels::dense_table(s, late, q_pos, true),
                               "ring steps");
}

}  // namespace
}  // namespace ringcast::test
