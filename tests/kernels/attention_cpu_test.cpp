// The CPU attention kernel, forward and backward, against the float64 oracle on every kind of table
// the runtime builds (dense, causal, zigzag, windows, random sparse with row masks, KeyMeta summary
// pages, key masks and per-key pool biases, partial pages, empty rows), GQA ratios 1..8 and head
// dims 40, 64, 128; plus the oracle's own backward by finite differences, thread-count determinism
// and the validation errors.
//
// Tolerance: ||x - ref|| / ||ref|| <= 1e-5 (DESIGN.md §7). fp32 rounds at u = 2^-24 = 6e-8; the
// kernel's sums run over at most a few hundred keys and 128 channels with random signs, so its error
// is a small multiple of sqrt(K) u ~ 1e-6 (fast_exp adds 1e-7); 1e-5 leaves a margin of ~10 while
// a wrong mask, bias or scale shows up at 1e-2 or more. Every check prints its errors.
#include "cpu_attention_harness.hpp"

#include <ringcast/error.hpp>

#include <gtest/gtest.h>
#include <omp.h>

#include <cmath>
#include <cstdio>
#include <limits>
#include <string>

namespace ringcast::test {
namespace {

using kernels::AttentionShape;
using kernels::BlockEntry;
using kernels::HostBlockTable;
using kernels::KeyRange;

// Shapes are written AttentionShape{batch, seq_q, heads, kv_heads, head_dim, page_size, num_pages}.

TEST(AttentionCpu, DenseBidirectional) {
  // GQA 2, d 64, 300 keys: 5 pages of 64, the last holding 44.
  const AttentionShape s{2, 200, 4, 2, 64, 64, 5};
  const std::vector<KeyRange> keys{{0, 300, 0}};
  const auto q_pos = iota_positions(s.seq_q);
  expect_matches_reference(CpuAttention(s, kernels::dense_table(s, keys, q_pos, false), q_pos, 101), "dense");
}

TEST(AttentionCpu, DenseCausal) {
  // GQA 8, d 128, pages of 32: the diagonal crosses pages inside every tile.
  const AttentionShape s{1, 300, 8, 1, 128, 32, 10};
  const std::vector<KeyRange> keys{{0, 300, 0}};
  const auto q_pos = iota_positions(s.seq_q);
  expect_matches_reference(CpuAttention(s, kernels::dense_table(s, keys, q_pos, true), q_pos, 102), "dense causal");
}

TEST(AttentionCpu, ZigzagCausal) {
  // A zigzag shard: query and key chunks [0, 96) and [416, 512); GQA 4, odd head dim 40.
  const AttentionShape s{1, 192, 4, 1, 40, 32, 6};
  const std::vector<KeyRange> keys{{0, 96, 0}, {3, 96, 416}};
  auto q_pos = iota_positions(96);
  const auto second = iota_positions(96, 416);
  q_pos.insert(q_pos.end(), second.begin(), second.end());
  expect_matches_reference(CpuAttention(s, kernels::dense_table(s, keys, q_pos, true), q_pos, 103), "zigzag causal");
}

TEST(AttentionCpu, SlidingWindowCausal) {
  const AttentionShape s{1, 700, 3, 3, 64, 64, 11};
  const std::vector<KeyRange> keys{{0, 700, 0}};
  const auto q_pos = iota_positions(s.seq_q);
  const HostBlockTable t = kernels::sliding_window_table(s, keys, q_pos, true, 256, 0);
  expect_matches_reference(CpuAttention(s, t, q_pos, 104), "window causal");
}

TEST(AttentionCpu, SlidingWindowBidirectional) {
  const AttentionShape s{2, 333, 2, 1, 128, 128, 3};
  const std::vector<KeyRange> keys{{0, 333, 0}};
  const auto q_pos = iota_positions(s.seq_q);
  const HostBlockTable t = kernels::sliding_window_table(s, keys, q_pos, false, 128, 128);
  expect_matches_reference(CpuAttention(s, t, q_pos, 105), "window bidirectional");
}

TEST(AttentionCpu, RandomSparse) {
  // Row masks, causal entries, partial pages, biases, repeated pages, units with no entry.
  const AttentionShape s{2, 260, 8, 2, 128, 128, 7};
  const auto q_pos = iota_positions(s.seq_q, 500);
  RandomTableOptions opt;
  opt.min_entries = 0;
  opt.max_entries = 5;
  opt.row_mask_keep = 0.6;
  opt.causal_fraction = 0.3;
  opt.partial_fraction = 0.3;
  opt.bias_stddev = 1.0;
  expect_matches_reference(CpuAttention(s, random_block_table(s, q_pos, opt, 7), q_pos, 106), "random sparse");
}

TEST(AttentionCpu, SummaryPagesWithKeyMeta) {
  const AttentionShape s{1, 150, 8, 1, 64, 64, 4};
  const auto q_pos = iota_positions(s.seq_q);
  RandomTableOptions opt;
  opt.min_entries = 1;
  opt.max_entries = 4;
  opt.row_mask_keep = 0.7;
  opt.causal_fraction = 0.2;
  opt.partial_fraction = 0.5;
  opt.bias_stddev = 0.5;
  opt.key_meta_fraction = 0.6;
  expect_matches_reference(CpuAttention(s, random_block_table(s, q_pos, opt, 8), q_pos, 107), "key meta");
}

TEST(AttentionCpu, KeyMasksAndKeyBiases) {
  // Summary-page entries as the clustered mode builds them: key subsets, per-key pool biases, on top
  // of KeyMeta, row masks, causal cuts and partial pages; pages of 64 and 32 keys.
  RandomTableOptions opt;
  opt.min_entries = 1;
  opt.max_entries = 5;
  opt.row_mask_keep = 0.7;
  opt.causal_fraction = 0.2;
  opt.partial_fraction = 0.3;
  opt.bias_stddev = 0.5;
  opt.key_meta_fraction = 0.3;
  opt.key_mask_fraction = 0.7;
  opt.key_bias_fraction = 0.7;
  const AttentionShape s64{2, 190, 4, 2, 64, 64, 5};
  const auto q_pos = iota_positions(s64.seq_q, 100);
  expect_matches_reference(CpuAttention(s64, random_block_table(s64, q_pos, opt, 12), q_pos, 111), "key mask/bias 64");
  const AttentionShape s32{1, 140, 3, 1, 40, 32, 6};
  const auto q_pos32 = iota_positions(s32.seq_q);
  expect_matches_reference(CpuAttention(s32, random_block_table(s32, q_pos32, opt, 13), q_pos32, 112),
                           "key mask/bias 32");
}

TEST(AttentionCpu, EntryWithEmptyKeyMaskContributesNothing) {
  const AttentionShape s{1, 200, 4, 2, 64, 64, 3};
  const auto q_pos = iota_positions(s.seq_q);
  RandomTableOptions opt;
  opt.min_entries = 1;
  opt.max_entries = 3;
  opt.row_mask_keep = 0.8;
  opt.key_bias_fraction = 0.5;
  HostBlockTable base = random_block_table(AttentionShape{1, 200, 4, 2, 64, 64, 2}, q_pos, opt, 14);
  // The same table with one more entry per unit: page 2 (no other entry names it), every row, no key.
  HostBlockTable with_empty;
  for (std::size_t u = 0; u + 1 < base.offsets.size(); ++u) {
    with_empty.entries.insert(with_empty.entries.end(), base.entries.begin() + base.offsets[u],
                              base.entries.begin() + base.offsets[u + 1]);
    BlockEntry e{};
    e.row_mask[0] = e.row_mask[1] = ~std::uint64_t{0};
    e.page = 2;
    e.key_count = 64;
    e.key_meta = -1;
    e.flags = kernels::kEntryKeyBias;
    e.key_mask = 0;
    with_empty.entries.push_back(e);
    with_empty.offsets.push_back(static_cast<std::int64_t>(with_empty.entries.size()));
  }
  // Rows past the last tile's end must have no bit: trim the masks of the partial tile.
  const int last_rows = kernels::tile_rows(s, s.num_tiles() - 1);
  const auto last_mask = kernels::full_row_mask(last_rows);
  for (std::int64_t u = (s.num_tiles() - 1) * s.kv_heads; u < s.num_units(); ++u) {
    BlockEntry& e = with_empty.entries[with_empty.offsets[u + 1] - 1];
    e.row_mask[0] = last_mask[0];
    e.row_mask[1] = last_mask[1];
  }
  const CpuAttention a(s, with_empty, q_pos, 113);
  expect_matches_reference(a, "empty key mask");
  const CpuAttention::Outputs with = a.forward();
  const CpuAttention::Outputs without = a.forward(&base);
  CpuAttention::Grads g_with, g_without;
  a.backward(with, g_with, false);
  a.backward(without, g_without, false, &base);
  EXPECT_EQ(with.o, without.o);
  EXPECT_EQ(with.lse, without.lse);
  EXPECT_EQ(g_with.d_q, g_without.d_q);
  EXPECT_EQ(g_with.d_k, g_without.d_k);
  EXPECT_EQ(g_with.d_v, g_without.d_v);
  const std::int64_t page_elems = std::int64_t{s.page_size} * s.head_dim;
  for (int kvh = 0; kvh < s.kv_heads; ++kvh) {
    const std::int64_t page2 = (kvh * s.num_pages + 2) * page_elems;
    for (std::int64_t j = 0; j < page_elems; ++j) {
      ASSERT_EQ(g_with.d_k[page2 + j], 0.f);
      ASSERT_EQ(g_with.d_v[page2 + j], 0.f);
    }
  }
}

TEST(AttentionCpu, OneRowOnePartialPage) {
  const AttentionShape s{1, 1, 2, 1, 40, 32, 1};
  const auto q_pos = iota_positions(1);
  HostBlockTable t;
  BlockEntry e{};
  e.row_mask[0] = 1;
  e.page = 0;
  e.key_count = 7;
  e.key_meta = -1;
  e.bias = 0.25f;
  t.entries.push_back(e);
  t.offsets.push_back(1);
  expect_matches_reference(CpuAttention(s, t, q_pos, 108), "one row, one page");
}

TEST(AttentionCpu, EmptyRowsGiveZeroAndMinusInfinity) {
  // Tile 0 sees a page through rows [0, 64) only; tile 1 (30 rows) has no entry at all.
  const AttentionShape s{1, 158, 2, 1, 64, 64, 2};
  const auto q_pos = iota_positions(s.seq_q);
  HostBlockTable t;
  BlockEntry e{};
  e.row_mask[0] = ~std::uint64_t{0};
  e.page = 1;
  e.key_count = 64;
  e.key_meta = -1;
  t.entries.push_back(e);
  t.offsets = {0, 1, 1};
  const CpuAttention a(s, t, q_pos, 109);
  expect_matches_reference(a, "empty rows");

  const CpuAttention::Outputs out = a.forward();
  CpuAttention::Grads g;
  a.backward(out, g, false);
  const int d = s.head_dim;
  for (std::int64_t i = 64; i < s.seq_q; ++i) {
    for (int h = 0; h < s.heads; ++h) {
      EXPECT_EQ(out.lse[h * s.seq_q + i], kernels::kNegInf) << "row " << i << " head " << h;
      for (int c = 0; c < d; ++c) {
        ASSERT_EQ(out.o[(i * s.heads + h) * d + c], 0.f) << "row " << i;
        ASSERT_EQ(g.d_q[(i * s.heads + h) * d + c], 0.f) << "row " << i;
      }
    }
  }
  for (std::int64_t j = 0; j < s.page_size * d; ++j) {  // page 0 is referenced by no entry
    ASSERT_EQ(g.d_k[j], 0.f);
    ASSERT_EQ(g.d_v[j], 0.f);
  }
}

TEST(AttentionCpu, BitwiseIdenticalForAnyThreadCount) {
  const AttentionShape s{1, 300, 4, 2, 64, 64, 6};
  const auto q_pos = iota_positions(s.seq_q);
  RandomTableOptions opt;
  opt.max_entries = 6;
  opt.row_mask_keep = 0.8;
  opt.causal_fraction = 0.3;
  const CpuAttention a(s, random_block_table(s, q_pos, opt, 9), q_pos, 110);
  const int saved = omp_get_max_threads();
  const auto run = [&](int threads) {
    omp_set_num_threads(threads);
    const CpuAttention::Outputs out = a.forward();
    CpuAttention::Grads g;
    a.backward(out, g, false);
    return std::make_pair(out, g);
  };
  const auto [out1, g1] = run(1);
  const auto [out3, g3] = run(3);
  omp_set_num_threads(saved);
  EXPECT_EQ(out1.o, out3.o);
  EXPECT_EQ(out1.lse, out3.lse);
  EXPECT_EQ(g1.d_q, g3.d_q);
  EXPECT_EQ(g1.d_k, g3.d_k);
  EXPECT_EQ(g1.d_v, g3.d_v);
}

// The oracle's backward is itself checked: central differences of L = sum(O * dO) in float64, on a
// tiny problem with every table feature (causal cut, row masks, KeyMeta, biases, a repeated page).
TEST(AttentionReference, BackwardMatchesFiniteDifferences) {
  const AttentionShape s{1, 5, 2, 1, 3, 32, 2};
  const std::vector<std::int32_t> q_pos{3, 4, 5, 6, 7};
  HostBlockTable t;
  BlockEntry causal{};
  causal.row_mask[0] = 0x1f;
  causal.page = 0;
  causal.key_pos0 = 2;
  causal.key_count = 7;
  causal.key_meta = -1;
  causal.flags = kernels::kEntryCausal;
  BlockEntry summary{};
  summary.row_mask[0] = 0x1b;
  summary.page = 1;
  summary.key_count = 5;
  summary.bias = 0.3f;
  summary.key_meta = 0;
  BlockEntry repeated{};
  repeated.row_mask[0] = 0x0a;
  repeated.page = 0;
  repeated.key_count = 3;
  repeated.bias = -0.5f;
  repeated.key_meta = -1;
  t.entries = {causal, summary, repeated};
  t.offsets = {0, 3};
  const std::vector<float> meta_bias = random_normal(32, 5);
  for (int j = 0; j < 32; ++j) {
    kernels::KeyMeta m{};
    m.row_mask[0] = (j % 3 == 0) ? 0x1f : 0x05 << (j % 2);
    m.bias = meta_bias[j];
    t.key_meta.push_back(m);
  }

  const std::size_t nq = 5 * 2 * 3;
  const std::size_t nkv = 2 * 32 * 3;
  std::vector<double> q = to_f64(random_normal(nq, 21)), k = to_f64(random_normal(nkv, 22)),
                      v = to_f64(random_normal(nkv, 23));
  const std::vector<double> d_o = to_f64(random_normal(nq, 24));
  const auto loss = [&] {
    const ReferenceOutputs o = reference_attention_forward({s, 0.7, &t, q_pos, q, k, v});
    double sum = 0.0;
    for (std::size_t i = 0; i < nq; ++i) sum += o.o[i] * d_o[i];
    return sum;
  };
  const auto numeric = [&](std::vector<double>& x) {
    constexpr double kStep = 1e-6;
    std::vector<double> grad(x.size());
    for (std::size_t i = 0; i < x.size(); ++i) {
      const double saved = x[i];
      x[i] = saved + kStep;
      const double up = loss();
      x[i] = saved - kStep;
      const double down = loss();
      x[i] = saved;
      grad[i] = (up - down) / (2 * kStep);
    }
    return grad;
  };
  const ReferenceGradients g = reference_attention_backward({s, 0.7, &t, q_pos, q, k, v}, d_o);
  const double e_q = relative_error(g.d_q, numeric(q));
  const double e_k = relative_error(g.d_k, numeric(k));
  const double e_v = relative_error(g.d_v, numeric(v));
  std::printf("[ finite differences ] relative error dQ %.1e dK %.1e dV %.1e (tolerance 1e-7)\n", e_q, e_k, e_v);
  EXPECT_LE(e_q, 1e-7);
  EXPECT_LE(e_k, 1e-7);
  EXPECT_LE(e_v, 1e-7);
}

// --- validation -------------------------------------------------------------------------------

class AttentionValidate : public ::testing::Test {
 protected:
  AttentionValidate()
      : a_(AttentionShape{1, 130, 4, 2, 64, 64, 2},
           kernels::dense_table(AttentionShape{1, 130, 4, 2, 64, 64, 2}, std::vector<KeyRange>{{0, 128, 0}},
                                iota_positions(130), true),
           iota_positions(130), 31),
        o_(a_.q_size()), lse_(a_.lse_size()) {}

  kernels::AttentionForwardParams good() { return a_.forward_params(a_.table, o_.data(), lse_.data()); }

  static void expect_error(const kernels::AttentionForwardParams& p, DeviceKind device, const std::string& needle) {
    try {
      kernels::validate(p, device);
      ADD_FAILURE() << "no error; expected one containing \"" << needle << "\"";
    } catch (const Error& e) {
      EXPECT_NE(e.message().find(needle), std::string::npos) << "message: " << e.message();
    }
  }

  CpuAttention a_;
  std::vector<float> o_, lse_;
};

TEST_F(AttentionValidate, AcceptsAValidCall) { EXPECT_NO_THROW(kernels::validate(good(), DeviceKind::kCpu)); }

TEST_F(AttentionValidate, RejectsBadShapesAndOptions) {
  auto p = good();
  p.shape.head_dim = 300;
  expect_error(p, DeviceKind::kCpu, "head_dim 300 is not supported on the CPU");
  p = good();
  p.shape.head_dim = 96;
  expect_error(p, DeviceKind::kCuda, "head_dim 96 is not supported on CUDA");
  p = good();
  p.shape.heads = 3;
  expect_error(p, DeviceKind::kCpu, "heads (3) must be a multiple of kv_heads (2)");
  p = good();
  p.shape.page_size = 48;
  expect_error(p, DeviceKind::kCpu, "page_size 48 is not supported");
  p = good();
  p.shape.seq_q = 0;
  expect_error(p, DeviceKind::kCpu, "seq_q must be >= 1");
  p = good();
  p.dtype = DType::kBF16;
  p.o_dtype = DType::kBF16;
  expect_error(p, DeviceKind::kCpu, "dtype bf16 is not supported on the CPU");
  p = good();
  expect_error(p, DeviceKind::kCuda, "dtype f32 is not supported on CUDA");
  p = good();
  p.o_dtype = DType::kF16;
  expect_error(p, DeviceKind::kCpu, "o_dtype f16 must be the storage dtype (f32) or f32");
  p = good();
  p.softmax_scale = std::numeric_limits<float>::quiet_NaN();
  expect_error(p, DeviceKind::kCpu, "softmax_scale must be finite and > 0");
  p = good();
  p.softmax_scale = 0.f;
  expect_error(p, DeviceKind::kCpu, "softmax_scale must be finite and > 0");
}

TEST_F(AttentionValidate, RejectsNullPointersAndBrokenTables) {
  auto p = good();
  p.q_pos = nullptr;
  expect_error(p, DeviceKind::kCpu, "must not be null");
  p = good();
  p.table.offsets = nullptr;
  expect_error(p, DeviceKind::kCpu, "offsets must not be null");

  HostBlockTable t = a_.table;
  t.entries[0].page = 2;
  p = a_.forward_params(t, o_.data(), lse_.data());
  expect_error(p, DeviceKind::kCpu, "names page 2, the pool has 2");
  t = a_.table;
  t.entries[0].key_count = 0;
  p.table = t.view();
  expect_error(p, DeviceKind::kCpu, "key_count 0");
  t = a_.table;
  t.entries[0].key_meta = 0;
  p.table = t.view();
  expect_error(p, DeviceKind::kCpu, "uses key_meta but the table has none");
  t = a_.table;
  t.entries[0].flags |= kernels::kEntryKeyBias;
  p.table = t.view();
  p.key_bias = nullptr;
  expect_error(p, DeviceKind::kCpu, "reads key_bias (kEntryKeyBias) but key_bias is null");
  p.key_bias = a_.key_bias.data();
  t.entries[0].flags = 1u << 5;
  expect_error(p, DeviceKind::kCpu, "unknown flags");
  t = a_.table;
  t.entries[0].key_mask = 0xff;
  p.table = t.view();
  p.shape.page_size = 128;
  expect_error(p, DeviceKind::kCpu, "key_mask, which covers 64 keys, but page_size is 128");
  p.shape.page_size = 64;
  t = a_.table;
  t.offsets.back() += 1;
  p.table = t.view();
  expect_error(p, DeviceKind::kCpu, "offsets must run from 0 to num_entries");
}

TEST_F(AttentionValidate, DispatcherRejectsSmallWorkspaceAndStaleTransposedTable) {
  auto p = good();
  p.workspace_bytes = 16;
  std::vector<std::byte> ws(16);
  p.workspace = ws.data();
  try {
    kernels::attention_forward(p, kernels::ExecContext{});
    ADD_FAILURE() << "no error for a 16-byte workspace";
  } catch (const Error& e) {
    EXPECT_NE(e.message().find("workspace of 16 bytes is smaller"), std::string::npos) << e.message();
  }

  // A transposed table of another table must not silently give wrong dK / dV.
  const CpuAttention::Outputs out = a_.forward();
  HostBlockTable other = a_.table;
  other.entries[0].page = 1 - other.entries[0].page;
  const kernels::HostTransposedTable stale = kernels::transpose(other, a_.shape);
  CpuAttention::Grads g{std::vector<float>(a_.q_size()), std::vector<float>(a_.kv_size()),
                        std::vector<float>(a_.kv_size())};
  kernels::AttentionBackwardParams b;
  b.fwd = a_.forward_params(a_.table, const_cast<float*>(out.o.data()), const_cast<float*>(out.lse.data()));
  b.d_o = a_.d_o.data();
  b.transposed = stale.view();
  b.d_q = g.d_q.data();
  b.d_k_pages = g.d_k.data();
  b.d_v_pages = g.d_v.data();
  std::vector<std::byte> bws(kernels::attention_backward_workspace_bytes(a_.shape, {}));
  b.workspace = bws.data();
  b.workspace_bytes = bws.size();
  try {
    kernels::attention_backward(b, kernels::ExecContext{});
    ADD_FAILURE() << "no error for a stale transposed table";
  } catch (const Error& e) {
    EXPECT_NE(e.message().find("does not match the table"), std::string::npos) << e.message();
  }
}

}  // namespace
}  // namespace ringcast::test
