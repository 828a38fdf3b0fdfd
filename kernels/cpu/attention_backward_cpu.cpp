// CPU attention backward (FlashAttention-2 recomputation), fp32, in three passes with no atomics:
//   1. D = rowsum(dO * O) per (b, head, row), into the shared part of the workspace;
//   2. dQ: threads take (batch, query tile, head) items and walk the unit's entries (runs of entries
//      over consecutive pages as one, tile_math.hpp: entry_run);
//   3. dK, dV: threads take (kv_head, page) items and walk the transposed table's refs to that page,
//      over every query head of the group, so each page's gradient has exactly one writer.
// Both gradient passes recompute P = exp(scale * Q K^T + bias - LSE) and dS = P * (dO V^T - D), over
// the rows an entry sets (tile_math.hpp, for_each_row_block: in place, or gathered into blocks).
#include "attention_cpu.hpp"
#include "tile_math.hpp"

#include <ringcast/error.hpp>

namespace ringcast::kernels::cpu {
namespace {

// Shared: D [B, heads, n_q]. Per thread: P and dS [kQueryTile, kRunKeys]; two accumulators: dQ and
// dS K of gathered rows (pass 2), or dK, dV [page_size, head_dim] (pass 3; page_size <= kQueryTile);
// gathered Q and dO rows [kQueryTile, head_dim].
ScratchLayout backward_layout(const AttentionShape& s) {
  using L = ScratchLayout;
  ScratchLayout layout;
  layout.shared_floats = static_cast<std::size_t>(s.batch) * s.heads * s.seq_q;
  layout.floats_per_thread = 2 * L::round_up(std::size_t{kQueryTile} * kRunKeys) +
                             4 * L::round_up(std::size_t{kQueryTile} * s.head_dim);
  return layout;
}

struct BackwardScratch {
  float* p;
  float* ds;
  float* acc0;
  float* acc1;
  float* q_rows;
  float* d_o_rows;

  BackwardScratch(float* base, const AttentionShape& shape) {
    const std::size_t tile_page = ScratchLayout::round_up(std::size_t{kQueryTile} * kRunKeys);
    const std::size_t tile_dim = ScratchLayout::round_up(std::size_t{kQueryTile} * shape.head_dim);
    p = base;
    ds = p + tile_page;
    acc0 = ds + tile_page;
    acc1 = acc0 + tile_dim;
    q_rows = acc1 + tile_dim;
    d_o_rows = q_rows + tile_dim;
  }
};

// The forward outputs and backward inputs of one call, beside the problem.
struct Grads {
  const float* o;
  const float* lse;
  const float* d_o;
  const float* delta;  // D
  bool accumulate;
};

// The transposed table is host memory here: check that it is the transpose of the forward table
// (right size, every ref pointing at an entry of its unit for its page), so a stale one fails loudly.
void check_transposed(const Problem& pb, const TransposedTable& tt) {
  const AttentionShape& s = pb.shape;
  const std::int64_t slots = s.kv_heads * s.num_pages;
  RINGCAST_CHECK(tt.offsets[0] == 0 && tt.offsets[slots] == tt.num_refs && tt.num_refs == pb.table.num_entries,
                 "attention backward: transposed table has {} refs (offsets {} .. {}), the table {} entries",
                 tt.num_refs, tt.offsets[0], tt.offsets[slots], pb.table.num_entries);
  RINGCAST_CHECK(tt.num_refs == 0 || tt.refs, "attention backward: transposed table has no ref array");
  for (std::int64_t slot = 0; slot < slots; ++slot) {
    RINGCAST_CHECK(tt.offsets[slot] <= tt.offsets[slot + 1], "attention backward: transposed offsets decrease");
    for (std::int64_t i = tt.offsets[slot]; i < tt.offsets[slot + 1]; ++i) {
      const PageRef& ref = tt.refs[i];
      const bool ok = ref.unit >= 0 && ref.unit < s.num_units() && ref.unit % s.kv_heads == slot / s.num_pages &&
                      ref.entry >= pb.table.offsets[ref.unit] && ref.entry < pb.table.offsets[ref.unit + 1] &&
                      pb.table.entries[ref.entry].page == slot % s.num_pages;
      RINGCAST_CHECK(ok, "attention backward: transposed ref {} (unit {}, entry {}) does not match the table", i,
                     ref.unit, ref.entry);
    }
  }
}

// A block's Q and dO rows as its products read them (in place or gathered), rows ld apart.
struct BlockInputs {
  const float* q;
  const float* d_o;
  std::int64_t ld;
};

// Row r of one entry: its scores p[0, key_count) and dP = dO V^T in ds become P = exp(logit - LSE) and
// dS = P * (dP - D), 0 past the keys it sees; all 0 for a row that is not live (no such row, or one
// that saw no key: LSE = -inf).
RINGCAST_ROW_LOOP void probs_and_dscores_row(float* p, float* ds, const BlockEntry& e, const KeyMeta* meta,
                                             const float* key_bias, bool live, int r, std::int32_t q_pos,
                                             float row_lse, float row_delta) {
  int m = 0;
  if (live) {
    m = row_logits(p, e, meta, key_bias, r, q_pos);
#pragma omp simd
    for (int j = 0; j < m; ++j) {
      const float pj = fast_exp(p[j] - row_lse);
      p[j] = pj;
      ds[j] = pj * (ds[j] - row_delta);
    }
  }
  std::fill(p + m, p + e.key_count, 0.f);
  std::fill(ds + m, ds + e.key_count, 0.f);
}

// One row block (RowBlock) of one (entry, head): P into w.p and dS into w.ds, block row i at row i
// (stride key_count; rows past n and rows with LSE = -inf get 0). q, d_o point at the tile's row 0 of
// the head; lse, delta at its row 0 in [B, heads, n].
BlockInputs probs_and_dscores(const Problem& pb, const BlockEntry& e, std::int64_t kvh, const RowBlock& blk,
                              const float* q, const float* d_o, const float* k, const float* v, const float* lse,
                              const float* delta, const std::int32_t* q_pos, const BackwardScratch& w) {
  const int d = pb.shape.head_dim;
  const int kc = e.key_count;
  const KeyMeta* meta = pb.key_meta(e);
  const float* key_bias = pb.key_bias_of(e, kvh);
  BlockInputs in{};
  in.q = block_rows(blk, q, pb.ld(), w.q_rows, d, in.ld);
  in.d_o = block_rows(blk, d_o, pb.ld(), w.d_o_rows, d, in.ld);
  gemm(false, true, blk.m, kc, d, pb.scale, in.q, in.ld, k, d, 0.f, w.p, kc);
  gemm(false, true, blk.m, kc, d, 1.f, in.d_o, in.ld, v, d, 0.f, w.ds, kc);
  for (int i = 0; i < blk.m; ++i) {
    const bool live = i < blk.n && lse[blk.index[i]] != kNegInf;
    const int r = live ? blk.index[i] : 0;
    probs_and_dscores_row(w.p + std::int64_t{i} * kc, w.ds + std::int64_t{i} * kc, e, meta, key_bias, live, r,
                          q_pos[r], lse[r], delta[r]);
  }
  return in;
}

// out = scale * acc, or out += scale * acc.
void store(float* out, const float* acc, int n, float scale, bool accumulate) {
  if (accumulate) {
#pragma omp simd
    for (int c = 0; c < n; ++c) out[c] += scale * acc[c];
  } else {
#pragma omp simd
    for (int c = 0; c < n; ++c) out[c] = scale * acc[c];
  }
}

void d_q_item(const Problem& pb, const Grads& g, float* d_q, std::int64_t b, std::int64_t tile, int h,
              const BackwardScratch& w) {
  const AttentionShape& s = pb.shape;
  const int d = s.head_dim;
  const std::int64_t t0 = tile * kQueryTile;
  const int rows = static_cast<int>(std::min<std::int64_t>(kQueryTile, s.seq_q - t0));
  const int kvh = h / pb.group;
  const std::int64_t ld = pb.ld();
  const std::int64_t row0 = pb.row_offset(b, t0, h);
  const std::int64_t stat0 = pb.stat_offset(b, h, t0);

  std::fill(w.acc0, w.acc0 + std::size_t(rows) * d, 0.f);
  const std::int64_t u = pb.unit(b, tile, kvh);
  const std::int64_t end = pb.table.offsets[u + 1];
  for (std::int64_t i = pb.table.offsets[u]; i < end;) {
    const EntryRun run = entry_run(pb.table.entries, i, end, s.page_size);
    i += run.count;
    const BlockEntry& e = run.entry;
    const EntryRows er(e, rows);
    if (er.count == 0) continue;
    const float* k = pb.k + pb.page_offset(kvh, e.page);
    const float* v = pb.v + pb.page_offset(kvh, e.page);
    for_each_row_block(er, pb.table.rows_vary, [&](const RowBlock& blk) {
      probs_and_dscores(pb, e, kvh, blk, pb.q + row0, g.d_o + row0, k, v, g.lse + stat0, g.delta + stat0,
                        pb.q_pos + t0, w);
      // dQ += dS K (the softmax scale is applied once, at the store)
      if (blk.in_place) {
        gemm(false, false, blk.m, d, e.key_count, 1.f, w.ds, e.key_count, k, d, 1.f,
             w.acc0 + std::int64_t{blk.index[0]} * d, d);
      } else {
        gemm(false, false, blk.m, d, e.key_count, 1.f, w.ds, e.key_count, k, d, 0.f, w.acc1, d);
        scatter_add_tile_rows(w.acc0, d, w.acc1, blk.index, blk.n, d);
      }
    });
  }
  for (int r = 0; r < rows; ++r) store(d_q + row0 + r * ld, w.acc0 + std::int64_t{r} * d, d, pb.scale, g.accumulate);
}

void d_kv_item(const Problem& pb, const Grads& g, const TransposedTable& tt, float* d_k, float* d_v,
               std::int64_t kvh, std::int64_t page, const BackwardScratch& w) {
  const AttentionShape& s = pb.shape;
  const int d = s.head_dim;
  const int ps = s.page_size;
  const float* k = pb.k + pb.page_offset(kvh, page);
  const float* v = pb.v + pb.page_offset(kvh, page);
  float* d_k_acc = w.acc0;
  float* d_v_acc = w.acc1;
  std::fill(d_k_acc, d_k_acc + std::size_t(ps) * d, 0.f);
  std::fill(d_v_acc, d_v_acc + std::size_t(ps) * d, 0.f);

  const std::int64_t slot = kvh * s.num_pages + page;
  for (std::int64_t i = tt.offsets[slot]; i < tt.offsets[slot + 1]; ++i) {
    const PageRef& ref = tt.refs[i];
    const BlockEntry& e = pb.table.entries[ref.entry];
    const std::int64_t tile = (ref.unit / s.kv_heads) % pb.num_tiles;
    const std::int64_t b = ref.unit / (s.kv_heads * pb.num_tiles);
    const std::int64_t t0 = tile * kQueryTile;
    const int rows = static_cast<int>(std::min<std::int64_t>(kQueryTile, s.seq_q - t0));
    const EntryRows er(e, rows);
    if (er.count == 0) continue;
    for (int gi = 0; gi < pb.group; ++gi) {
      const int h = static_cast<int>(kvh) * pb.group + gi;
      const std::int64_t row0 = pb.row_offset(b, t0, h);
      const std::int64_t stat0 = pb.stat_offset(b, h, t0);
      for_each_row_block(er, pb.table.rows_vary, [&](const RowBlock& blk) {
        const BlockInputs in = probs_and_dscores(pb, e, kvh, blk, pb.q + row0, g.d_o + row0, k, v, g.lse + stat0,
                                                 g.delta + stat0, pb.q_pos + t0, w);
        // dV += P^T dO, dK += dS^T Q (scale applied at the store)
        gemm(true, false, e.key_count, d, blk.m, 1.f, w.p, e.key_count, in.d_o, in.ld, 1.f, d_v_acc, d);
        gemm(true, false, e.key_count, d, blk.m, 1.f, w.ds, e.key_count, in.q, in.ld, 1.f, d_k_acc, d);
      });
    }
  }
  const std::int64_t out = pb.page_offset(kvh, page);
  store(d_k + out, d_k_acc, ps * d, pb.scale, g.accumulate);
  store(d_v + out, d_v_acc, ps * d, 1.f, g.accumulate);
}

}  // namespace

std::size_t attention_backward_workspace_bytes(const AttentionShape& shape) {
  return backward_layout(shape).bytes(omp_get_max_threads());
}

void attention_backward(const AttentionBackwardParams& p) {
  use_single_threaded_blas();
  const Problem pb(p.fwd);
  const AttentionShape& s = p.fwd.shape;
  check_transposed(pb, p.transposed);
  const ScratchLayout layout = backward_layout(s);
  const int threads = layout.threads(p.workspace_bytes);
  float* delta = layout.shared(p.workspace);
  const Grads g{static_cast<const float*>(p.fwd.o), p.fwd.lse, static_cast<const float*>(p.d_o), delta,
                p.accumulate};
  const int d = s.head_dim;
  const std::int64_t rows = s.batch * s.seq_q * s.heads;  // every (b, row, head)
  const std::int64_t q_items = pb.num_tiles * s.batch * s.heads;
  const std::int64_t kv_items = s.kv_heads * s.num_pages;

#pragma omp parallel num_threads(threads)
  {
    const BackwardScratch scratch(layout.thread(p.workspace, omp_get_thread_num()), s);
#pragma omp for schedule(static)
    for (std::int64_t row = 0; row < rows; ++row) {  // row = (b * seq_q + i) * heads + h
      const float* o = g.o + row * d;
      const float* d_o = g.d_o + row * d;
      float dot = 0.f;
#pragma omp simd reduction(+ : dot)
      for (int c = 0; c < d; ++c) dot += o[c] * d_o[c];
      const int h = static_cast<int>(row % s.heads);
      const std::int64_t i = (row / s.heads) % s.seq_q;
      delta[pb.stat_offset(row / (s.heads * s.seq_q), h, i)] = dot;
    }
    // The barrier above completes D; the dQ and dK/dV passes only read it, so they need none.
#pragma omp for schedule(dynamic) nowait
    for (std::int64_t item = 0; item < q_items; ++item) {
      const int h = static_cast<int>(item % s.heads);
      const std::int64_t tile = (item / s.heads) % pb.num_tiles;
      const std::int64_t b = item / (std::int64_t{s.heads} * pb.num_tiles);
      d_q_item(pb, g, p.d_q, b, tile, h, scratch);
    }
#pragma omp for schedule(dynamic) nowait
    for (std::int64_t item = 0; item < kv_items; ++item) {
      d_kv_item(pb, g, p.transposed, p.d_k_pages, p.d_v_pages, item / s.num_pages, item % s.num_pages, scratch);
    }
  }
}

}  // namespace ringcast::kernels::cpu
