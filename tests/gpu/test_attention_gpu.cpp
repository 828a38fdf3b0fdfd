// CUDA attention kernels against the float64 oracle (tests/support/attention_reference.hpp), through
// the public dispatcher. Inputs are fresh random draws each run (seed printed on failure), rounded to
// the storage dtype before the oracle sees them; every output buffer is poisoned with NaN bytes first,
// so an unwritten element fails. Forward O must be within 1e-2 relative of float64 and within 2x the
// error of a same-dtype emulation (float64 softmax, P rounded to the storage dtype before P.V, O
// rounded to o_dtype). Key masks and per-key biases (kEntryKeyBias) are drawn by random_block_table;
// dense tables exercise the kernels' mask-free path for whole pages. Skips when no CUDA device exists.
#include "attention_reference.hpp"
#include "device_array.hpp"

#include <ringcast/kernels/attention.hpp>
#include <ringcast/kernels/block_table.hpp>
#include <ringcast/storage_bits.hpp>

#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

namespace ringcast::test {
namespace {

using kernels::AttentionShape;
using kernels::BlockEntry;
using kernels::HostBlockTable;
using kernels::KeyMeta;

// Round to the nearest value of the storage dtype (the kernels' inputs and the emulation's P and O).
double round_to(double x, DType t) { return storage_value(storage_bits(static_cast<float>(x), t), t); }

struct Stored {
  std::vector<std::uint16_t> bits;  // what the device reads
  std::vector<double> value;        // the same numbers for the oracle
};
Stored store(const std::vector<float>& x, DType t) {
  Stored s;
  s.bits.resize(x.size());
  s.value.resize(x.size());
  for (std::size_t i = 0; i < x.size(); ++i) {
    s.bits[i] = storage_bits(x[i], t);
    s.value[i] = storage_value(s.bits[i], t);
  }
  return s;
}

// The same-dtype emulation: the oracle's visibility rules, float64 softmax, P rounded to the storage
// dtype before P.V (normalised by the unrounded sum, as the kernels do), O rounded to o_dtype.
std::vector<double> emulate_forward(const ReferenceProblem& pr, const HostBlockTable& table, DType dtype,
                                    DType o_dtype) {
  const AttentionShape& s = pr.shape;
  const int d = s.head_dim;
  const int group = s.heads / s.kv_heads;
  std::vector<double> o(static_cast<std::size_t>(s.batch * s.seq_q * s.heads * d), 0.0);
  struct Key {
    double logit;
    const double* v;
  };
  std::vector<std::vector<Key>> keys(static_cast<std::size_t>(s.batch * s.seq_q * s.heads));
  for (std::int64_t u = 0; u < s.num_units(); ++u) {
    const int kvh = static_cast<int>(u % s.kv_heads);
    const std::int64_t tile = (u / s.kv_heads) % s.num_tiles();
    const std::int64_t b = u / (s.kv_heads * s.num_tiles());
    const int rows = kernels::tile_rows(s, tile);
    for (std::int64_t ei = table.offsets[u]; ei < table.offsets[u + 1]; ++ei) {
      const BlockEntry& e = table.entries[ei];
      for (int r = 0; r < rows; ++r) {
        if (!((e.row_mask[r / 64] >> (r % 64)) & 1u)) continue;
        const std::int64_t i = tile * kernels::kQueryTile + r;
        for (int j = 0; j < e.key_count; ++j) {
          if ((e.flags & kernels::kEntryCausal) && static_cast<std::int64_t>(e.key_pos0) + j > pr.q_pos[i]) continue;
          if (!((e.key_mask >> j) & 1u)) continue;  // page_size is 64 here
          const std::size_t page_key = (static_cast<std::size_t>(kvh) * s.num_pages + e.page) * s.page_size + j;
          double bias = e.bias;
          if (e.flags & kernels::kEntryKeyBias) bias += pr.key_bias[page_key];
          if (e.key_meta >= 0) {
            const KeyMeta& m = table.key_meta[e.key_meta + j];
            if (!((m.row_mask[r / 64] >> (r % 64)) & 1u)) continue;
            bias += m.bias;
          }
          const std::size_t kv = page_key * d;
          for (int h = kvh * group; h < (kvh + 1) * group; ++h) {
            const std::size_t qi = ((b * s.seq_q + i) * s.heads + h) * d;
            double dot = 0.0;
            for (int c = 0; c < d; ++c) dot += pr.q[qi + c] * pr.k[kv + c];
            keys[(b * s.seq_q + i) * s.heads + h].push_back({pr.softmax_scale * dot + bias, &pr.v[kv]});
          }
        }
      }
    }
  }
  for (std::size_t row = 0; row < keys.size(); ++row) {
    if (keys[row].empty()) continue;
    double m = -INFINITY;
    for (const Key& k : keys[row]) m = std::max(m, k.logit);
    double l = 0.0;
    for (const Key& k : keys[row]) l += std::exp(k.logit - m);
    for (const Key& k : keys[row]) {
      const double p = round_to(std::exp(k.logit - m), dtype);
      for (int c = 0; c < d; ++c) o[row * d + c] += p * k.v[c];
    }
    for (int c = 0; c < d; ++c) {
      o[row * d + c] /= l;
      if (o_dtype != DType::kF32) o[row * d + c] = round_to(o[row * d + c], o_dtype);
    }
  }
  return o;
}

enum class Pattern { kDense, kDenseCausal, kWindow, kRandom };

struct Case {
  std::string name;
  int batch = 1;
  std::int64_t seq_q = 200;
  int heads = 2;
  int kv_heads = 1;
  int head_dim = 64;
  DType dtype = DType::kBF16;
  DType o_dtype = DType::kBF16;
  Pattern pattern = Pattern::kRandom;
  RandomTableOptions random{};  // kRandom
  std::int64_t num_pages = 0;  // kRandom: pool pages per KV head (dense patterns: enough for seq_q keys)
  bool backward = true;
  bool accumulate = false;
  bool empty_key_masks = false;  // every third entry takes no key (key_mask = 0, with a key bias)
};

std::vector<double> widen(const std::vector<float>& x) { return {x.begin(), x.end()}; }

std::vector<double> storage_to_f64(const std::vector<std::uint16_t>& bits, DType t) {
  std::vector<double> out(bits.size());
  for (std::size_t i = 0; i < bits.size(); ++i) out[i] = storage_value(bits[i], t);
  return out;
}

void run_case(const Case& c) {
  const std::uint64_t seed = std::random_device{}();
  SCOPED_TRACE("case " + c.name + ", seed " + std::to_string(seed));

  AttentionShape s;
  s.batch = c.batch;
  s.seq_q = c.seq_q;
  s.heads = c.heads;
  s.kv_heads = c.kv_heads;
  s.head_dim = c.head_dim;
  s.page_size = 64;
  s.num_pages = c.pattern == Pattern::kRandom ? c.num_pages : (c.seq_q + s.page_size - 1) / s.page_size;

  std::vector<std::int32_t> q_pos(static_cast<std::size_t>(s.seq_q));
  for (std::int64_t i = 0; i < s.seq_q; ++i) q_pos[i] = static_cast<std::int32_t>(i);
  const kernels::KeyRange keys{0, s.seq_q, 0};
  HostBlockTable table;
  switch (c.pattern) {
    case Pattern::kDense: table = kernels::dense_table(s, {&keys, 1}, q_pos, false); break;
    case Pattern::kDenseCausal: table = kernels::dense_table(s, {&keys, 1}, q_pos, true); break;
    case Pattern::kWindow: table = kernels::sliding_window_table(s, {&keys, 1}, q_pos, true, 150, 0); break;
    case Pattern::kRandom: table = random_block_table(s, q_pos, c.random, seed); break;
  }
  if (c.empty_key_masks) {
    for (std::size_t i = 0; i < table.entries.size(); i += 3) {
      table.entries[i].key_mask = 0;
      table.entries[i].flags |= kernels::kEntryKeyBias;
    }
  }
  const kernels::HostTransposedTable transposed = kernels::transpose(table, s);

  const std::size_t nq = static_cast<std::size_t>(s.batch * s.seq_q * s.heads * s.head_dim);
  const std::size_t nkv = static_cast<std::size_t>(s.kv_heads * s.num_pages * s.page_size * s.head_dim);
  const std::size_t nlse = static_cast<std::size_t>(s.batch * s.heads * s.seq_q);
  const Stored q = store(random_normal(nq, seed + 1), c.dtype);
  const Stored k = store(random_normal(nkv, seed + 2), c.dtype);
  const Stored v = store(random_normal(nkv, seed + 3), c.dtype);
  const Stored d_o = store(random_normal(nq, seed + 4), c.dtype);
  const std::vector<float> key_bias = random_normal(nkv / static_cast<std::size_t>(s.head_dim), seed + 8);
  const std::vector<double> key_bias64 = widen(key_bias);
  const float scale = 1.f / std::sqrt(static_cast<float>(s.head_dim));

  const DeviceArray<std::uint16_t> dq_in(q.bits), dk_in(k.bits), dv_in(v.bits), ddo(d_o.bits);
  const DeviceArray<std::int32_t> dpos(q_pos);
  const DeviceArray<float> dkey_bias(key_bias);
  const DeviceArray<std::int64_t> doffsets(table.offsets), dtoffsets(transposed.offsets);
  const DeviceArray<BlockEntry> dentries(table.entries);
  const DeviceArray<KeyMeta> dmeta(table.key_meta.empty() ? std::vector<KeyMeta>(1) : table.key_meta);
  const DeviceArray<kernels::PageRef> drefs(transposed.refs.empty() ? std::vector<kernels::PageRef>(1)
                                                                    : transposed.refs);
  // O in its dtype (one of the two is empty), LSE.
  const bool o_f32 = c.o_dtype == DType::kF32;
  const DeviceArray<float> d_out32(o_f32 ? nq : 0), d_lse(nlse);
  const DeviceArray<std::uint16_t> d_out16(o_f32 ? 0 : nq);

  const kernels::ExecContext ctx{{DeviceKind::kCuda, 0}, nullptr};
  kernels::AttentionForwardParams p;
  p.shape = s;
  p.dtype = c.dtype;
  p.o_dtype = c.o_dtype;
  p.softmax_scale = scale;
  p.q = dq_in.get();
  p.k_pages = dk_in.get();
  p.v_pages = dv_in.get();
  p.q_pos = dpos.get();
  p.key_bias = dkey_bias.get();
  p.table = {doffsets.get(), dentries.get(), table.key_meta.empty() ? nullptr : dmeta.get(),
             static_cast<std::int64_t>(table.entries.size())};
  p.o = o_f32 ? static_cast<void*>(d_out32.get()) : static_cast<void*>(d_out16.get());
  p.lse = d_lse.get();
  ASSERT_EQ(kernels::attention_forward_workspace_bytes(s, ctx), 0u);
  kernels::attention_forward(p, ctx);
  cuda_require(cudaDeviceSynchronize(), "forward");

  const ReferenceProblem pr{s, scale, &table, q_pos, q.value, k.value, v.value, key_bias64};
  const ReferenceOutputs ref = reference_attention_forward(pr);
  const std::vector<double> emu = emulate_forward(pr, table, c.dtype, c.o_dtype);
  const std::vector<double> o = o_f32 ? widen(d_out32.download()) : storage_to_f64(d_out16.download(), c.o_dtype);
  const std::vector<float> lse = d_lse.download();
  const double err_o = relative_error(o, ref.o);
  const double err_emu = relative_error(emu, ref.o);
  const double err_lse = relative_error(lse, ref.lse);
  EXPECT_LE(err_o, 1e-2) << "O relative error";
  EXPECT_LE(err_o, 2.0 * err_emu + 1e-6) << "O error " << err_o << " vs same-dtype emulation " << err_emu;
  EXPECT_LE(err_lse, 1e-4) << "LSE relative error";
  if (!c.backward) return;

  // Backward; with accumulate the gradients land on top of random prior values.
  const std::size_t ws = kernels::attention_backward_workspace_bytes(s, ctx);
  const DeviceArray<std::uint8_t> workspace(ws);
  DeviceArray<float> g_q(nq), g_k(nkv), g_v(nkv);
  std::vector<float> prior_q, prior_k, prior_v;
  if (c.accumulate) {
    prior_q = random_normal(nq, seed + 5);
    prior_k = random_normal(nkv, seed + 6);
    prior_v = random_normal(nkv, seed + 7);
    g_q.upload(prior_q);
    g_k.upload(prior_k);
    g_v.upload(prior_v);
  }
  kernels::AttentionBackwardParams bp;
  bp.fwd = p;
  bp.d_o = ddo.get();
  bp.transposed = {dtoffsets.get(), drefs.get(), static_cast<std::int64_t>(transposed.refs.size())};
  bp.d_q = g_q.get();
  bp.d_k_pages = g_k.get();
  bp.d_v_pages = g_v.get();
  bp.accumulate = c.accumulate;
  bp.workspace = workspace.get();
  bp.workspace_bytes = ws;
  kernels::attention_backward(bp, ctx);
  cuda_require(cudaDeviceSynchronize(), "backward");

  const ReferenceGradients gref = reference_attention_backward(pr, d_o.value);
  auto grad = [&](const DeviceArray<float>& buf, const std::vector<float>& prior) {
    std::vector<double> x = widen(buf.download());
    for (std::size_t i = 0; i < prior.size(); ++i) x[i] -= prior[i];
    return x;
  };
  const double err_dq = relative_error(grad(g_q, prior_q), gref.d_q);
  const double err_dk = relative_error(grad(g_k, prior_k), gref.d_k);
  const double err_dv = relative_error(grad(g_v, prior_v), gref.d_v);
  EXPECT_LE(err_dq, 1e-2) << "dQ relative error";
  EXPECT_LE(err_dk, 1e-2) << "dK relative error";
  EXPECT_LE(err_dv, 1e-2) << "dV relative error";
  std::printf("[ %-28s ] O %.2e (emulation %.2e)  LSE %.2e  dQ %.2e  dK %.2e  dV %.2e\n", c.name.c_str(), err_o,
              err_emu, err_lse, err_dq, err_dk, err_dv);
}

RandomTableOptions sparse(int max_entries, double keep) {
  RandomTableOptions o;
  o.min_entries = 1;
  o.max_entries = max_entries;
  o.row_mask_keep = keep;
  o.causal_fraction = 0.3;
  o.partial_fraction = 0.3;
  o.bias_stddev = 1.0;
  return o;
}

TEST(AttentionGpu, DenseNonCausal) {
  RINGCAST_SKIP_WITHOUT_CUDA();
  run_case({.name = "dense d64 bf16", .batch = 2, .seq_q = 300, .heads = 4, .kv_heads = 2, .head_dim = 64,
            .pattern = Pattern::kDense});
  run_case({.name = "dense d128 f16", .seq_q = 257, .heads = 2, .kv_heads = 2, .head_dim = 128,
            .dtype = DType::kF16, .o_dtype = DType::kF16, .pattern = Pattern::kDense});
}

TEST(AttentionGpu, DenseCausal) {
  RINGCAST_SKIP_WITHOUT_CUDA();
  run_case({.name = "causal d128 bf16", .seq_q = 383, .heads = 2, .kv_heads = 1, .head_dim = 128,
            .pattern = Pattern::kDenseCausal});
  run_case({.name = "causal d64 f16", .batch = 2, .seq_q = 129, .heads = 4, .kv_heads = 4, .head_dim = 64,
            .dtype = DType::kF16, .o_dtype = DType::kF16, .pattern = Pattern::kDenseCausal});
}

TEST(AttentionGpu, SlidingWindow) {
  RINGCAST_SKIP_WITHOUT_CUDA();
  run_case({.name = "window d128 bf16", .seq_q = 700, .heads = 2, .kv_heads = 1, .head_dim = 128,
            .pattern = Pattern::kWindow});
}

TEST(AttentionGpu, RandomSparseGqa) {
  RINGCAST_SKIP_WITHOUT_CUDA();
  for (int group : {1, 2, 4, 8}) {
    for (int d : {64, 128}) {
      run_case({.name = "random g" + std::to_string(group) + " d" + std::to_string(d), .batch = 2, .seq_q = 250,
                .heads = 8, .kv_heads = 8 / group, .head_dim = d, .random = sparse(6, 0.7), .num_pages = 7});
    }
  }
  run_case({.name = "random f16 d128", .seq_q = 300, .heads = 4, .kv_heads = 2, .head_dim = 128,
            .dtype = DType::kF16, .o_dtype = DType::kF16, .random = sparse(5, 0.8), .num_pages = 5});
}

TEST(AttentionGpu, SummaryPagesWithKeyMeta) {
  RINGCAST_SKIP_WITHOUT_CUDA();
  RandomTableOptions o = sparse(5, 0.9);
  o.key_meta_fraction = 0.5;
  run_case({.name = "keymeta d64", .seq_q = 200, .heads = 4, .kv_heads = 2, .head_dim = 64, .random = o,
            .num_pages = 6});
  run_case({.name = "keymeta d128 f16", .seq_q = 140, .heads = 2, .kv_heads = 1, .head_dim = 128,
            .dtype = DType::kF16, .o_dtype = DType::kF16, .random = o, .num_pages = 4});
}

TEST(AttentionGpu, KeyMasksAndKeyBiases) {
  RINGCAST_SKIP_WITHOUT_CUDA();
  RandomTableOptions o = sparse(6, 0.8);
  o.key_mask_fraction = 0.6;
  o.key_bias_fraction = 0.6;
  for (int d : {64, 128}) {
    run_case({.name = "key masks+bias d" + std::to_string(d), .batch = 2, .seq_q = 230, .heads = 4, .kv_heads = 2,
              .head_dim = d, .random = o, .num_pages = 6});
  }
  o.key_meta_fraction = 0.4;  // with KeyMeta on top
  run_case({.name = "key masks+bias+meta f16", .seq_q = 170, .heads = 2, .kv_heads = 1, .head_dim = 128,
            .dtype = DType::kF16, .o_dtype = DType::kF16, .random = o, .num_pages = 5});
  // Entries that take no key at all contribute nothing (also their key biases).
  run_case({.name = "empty key masks d64", .seq_q = 200, .heads = 4, .kv_heads = 2, .head_dim = 64,
            .random = sparse(5, 0.9), .num_pages = 5, .empty_key_masks = true});
}

// Whole pages seen by every row (the mask-free path) mixed in one unit with masked, causal,
// partial, key-masked and key-biased pages; every tile row exists (seq_q a multiple of 128) and not.
TEST(AttentionGpu, WholePagesMixedWithMaskedPages) {
  RINGCAST_SKIP_WITHOUT_CUDA();
  RandomTableOptions o;
  o.min_entries = 2;
  o.max_entries = 8;
  o.row_mask_keep = 1.0;
  o.causal_fraction = 0.2;
  o.partial_fraction = 0.15;
  o.bias_stddev = 1.0;
  o.key_mask_fraction = 0.15;
  o.key_bias_fraction = 0.15;
  run_case({.name = "whole+masked d128", .seq_q = 256, .heads = 4, .kv_heads = 1, .head_dim = 128, .random = o,
            .num_pages = 9});
  run_case({.name = "whole+masked d64 f16", .batch = 2, .seq_q = 300, .heads = 2, .kv_heads = 2, .head_dim = 64,
            .dtype = DType::kF16, .o_dtype = DType::kF16, .random = o, .num_pages = 7});
  run_case({.name = "whole pages d128", .seq_q = 384, .heads = 2, .kv_heads = 1, .head_dim = 128,
            .random = {.min_entries = 1, .max_entries = 6, .bias_stddev = 1.0}, .num_pages = 8});
}

TEST(AttentionGpu, EmptyRowsAndEmptyUnits) {
  RINGCAST_SKIP_WITHOUT_CUDA();
  RandomTableOptions o = sparse(3, 0.3);
  o.min_entries = 0;
  run_case({.name = "empty rows d64", .batch = 2, .seq_q = 333, .heads = 2, .kv_heads = 1, .head_dim = 64,
            .random = o, .num_pages = 9});
  run_case({.name = "empty rows d128", .seq_q = 100, .heads = 2, .kv_heads = 2, .head_dim = 128, .random = o,
            .num_pages = 3});
}

TEST(AttentionGpu, Fp32Output) {
  RINGCAST_SKIP_WITHOUT_CUDA();
  run_case({.name = "o f32 d128", .seq_q = 190, .heads = 4, .kv_heads = 1, .head_dim = 128,
            .o_dtype = DType::kF32, .random = sparse(4, 0.8), .num_pages = 5});
  run_case({.name = "o f32 d64 f16", .seq_q = 64, .heads = 2, .kv_heads = 1, .head_dim = 64, .dtype = DType::kF16,
            .o_dtype = DType::kF32, .pattern = Pattern::kDenseCausal});
}

TEST(AttentionGpu, BackwardAccumulates) {
  RINGCAST_SKIP_WITHOUT_CUDA();
  run_case({.name = "accumulate d128", .seq_q = 260, .heads = 4, .kv_heads = 2, .head_dim = 128,
            .random = sparse(5, 0.8), .num_pages = 6, .accumulate = true});
  run_case({.name = "accumulate d64 causal", .seq_q = 200, .heads = 2, .kv_heads = 1, .head_dim = 64,
            .pattern = Pattern::kDenseCausal, .accumulate = true});
}

TEST(AttentionGpu, MergeByLse) {
  RINGCAST_SKIP_WITHOUT_CUDA();
  const std::uint64_t seed = std::random_device{}();
  SCOPED_TRACE("seed " + std::to_string(seed));
  kernels::MergeParams m;
  m.batch = 2;
  m.seq = 77;
  m.heads = 3;
  m.head_dim = 40;
  const std::size_t no = static_cast<std::size_t>(m.batch * m.seq * m.heads * m.head_dim);
  const std::size_t nl = static_cast<std::size_t>(m.batch * m.seq * m.heads);
  const std::vector<float> o_a = random_normal(no, seed), o_b = random_normal(no, seed + 1);
  std::vector<float> l_a = random_normal(nl, seed + 2, 3.0), l_b = random_normal(nl, seed + 3, 3.0);
  // Rows where one side, or both, saw nothing.
  for (std::size_t r = 0; r < nl; r += 5) l_a[r] = kernels::kNegInf;
  for (std::size_t r = 0; r < nl; r += 7) l_b[r] = kernels::kNegInf;
  const DeviceArray<float> d_oa(o_a), d_ob(o_b), d_la(l_a), d_lb(l_b);
  m.o_acc = d_oa.get();
  m.lse_acc = d_la.get();
  m.o_part = d_ob.get();
  m.lse_part = d_lb.get();
  kernels::merge_by_lse(m, {{DeviceKind::kCuda, 0}, nullptr});
  cuda_require(cudaDeviceSynchronize(), "merge");

  std::vector<double> ref_o(no), ref_l(nl);
  for (std::int64_t b = 0; b < m.batch; ++b) {
    for (std::int64_t i = 0; i < m.seq; ++i) {
      for (int h = 0; h < m.heads; ++h) {
        const std::size_t st = (b * m.heads + h) * m.seq + i;
        const std::size_t row = (b * m.seq + i) * m.heads + h;
        const double la = l_a[st], lb = l_b[st], mx = std::max(la, lb);
        const double l = mx == -INFINITY ? -INFINITY : mx + std::log(std::exp(la - mx) + std::exp(lb - mx));
        ref_l[st] = l;
        for (int c = 0; c < m.head_dim; ++c) {
          const std::size_t idx = row * m.head_dim + c;
          ref_o[idx] = (la == -INFINITY ? 0.0 : std::exp(la - l) * o_a[idx]) +
                       (lb == -INFINITY ? 0.0 : std::exp(lb - l) * o_b[idx]);
        }
      }
    }
  }
  EXPECT_LE(relative_error(d_oa.download(), ref_o), 1e-6);
  EXPECT_LE(relative_error(d_la.download(), ref_l), 1e-6);
}

}  // namespace
}  // namespace ringcast::test
