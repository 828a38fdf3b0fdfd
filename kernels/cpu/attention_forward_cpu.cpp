// CPU attention forward: blockwise online softmax (FlashAttention), fp32. OpenMP threads take
// (batch, query tile, head) items; per entry, or per run of entries over consecutive pages
// (tile_math.hpp, entry_run), S = scale * Q_rows K^T and O_rows += P V are cblas_sgemm calls over the
// rows the entry's mask sets (for_each_row_block: in place when they are contiguous whole-tile rows,
// else gathered into blocks and scatter-added back), and the masked softmax update between them is a
// vectorized row loop. Each thread keeps S, the O accumulator, the row statistics and the compact
// blocks in its own slice of the workspace; outputs are written once per item, so no two threads
// share a row.
#include "attention_cpu.hpp"
#include "tile_math.hpp"

#include <cmath>

namespace ringcast::kernels::cpu {
namespace {

// Per thread: S / P [kQueryTile, kRunKeys]; O accumulator, gathered Q rows and P V of gathered rows,
// each [kQueryTile, head_dim]; row max, row sum.
ScratchLayout forward_layout(const AttentionShape& s) {
  using L = ScratchLayout;
  ScratchLayout layout;
  layout.floats_per_thread = L::round_up(std::size_t{kQueryTile} * kRunKeys) +
                             3 * L::round_up(std::size_t{kQueryTile} * s.head_dim) + 2 * L::round_up(kQueryTile);
  return layout;
}

struct ForwardScratch {
  float* s;
  float* acc;
  float* q_rows;
  float* pv_rows;
  float* row_max;
  float* row_sum;

  ForwardScratch(float* base, const AttentionShape& shape) {
    const std::size_t tile_dim = ScratchLayout::round_up(std::size_t{kQueryTile} * shape.head_dim);
    s = base;
    acc = s + ScratchLayout::round_up(std::size_t{kQueryTile} * kRunKeys);
    q_rows = acc + tile_dim;
    pv_rows = q_rows + tile_dim;
    row_max = pv_rows + tile_dim;
    row_sum = row_max + ScratchLayout::round_up(kQueryTile);
  }
};

// Softmax update of row r with the scores in s[0, key_count): turns them into P (0 for keys the row
// does not see), rescales the row's accumulator when its running max grows.
RINGCAST_ROW_LOOP void online_softmax_row(float* s, const BlockEntry& e, const KeyMeta* meta, const float* key_bias,
                                          int r, std::int32_t q_pos, float& row_max, float& row_sum, float* acc_row,
                                          int head_dim) {
  const int kc = e.key_count;
  const int n = row_logits(s, e, meta, key_bias, r, q_pos);
  const float mx = max_of(s, n);
  if (mx == kNegInf) {  // the row sees no key of this entry
    std::fill(s, s + kc, 0.f);
    return;
  }
  const float new_max = std::max(row_max, mx);
  const float alpha = std::exp(row_max - new_max);  // 0 on the row's first keys (row_max = -inf)
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int j = 0; j < n; ++j) {
    const float p = fast_exp(s[j] - new_max);
    s[j] = p;
    sum += p;
  }
  std::fill(s + n, s + kc, 0.f);
  row_sum = row_sum * alpha + sum;
  row_max = new_max;
  if (alpha != 1.f) {
#pragma omp simd
    for (int c = 0; c < head_dim; ++c) acc_row[c] *= alpha;
  }
}

void forward_item(const Problem& pb, float* o, float* lse, std::int64_t b, std::int64_t tile, int h,
                  const ForwardScratch& w) {
  const AttentionShape& s = pb.shape;
  const int d = s.head_dim;
  const int ps = s.page_size;
  const std::int64_t t0 = tile * kQueryTile;
  const int rows = static_cast<int>(std::min<std::int64_t>(kQueryTile, s.seq_q - t0));
  const int kvh = h / pb.group;
  const std::int64_t ld = pb.ld();
  const float* q = pb.q + pb.row_offset(b, t0, h);
  const std::int32_t* q_pos = pb.q_pos + t0;

  std::fill(w.acc, w.acc + std::size_t(rows) * d, 0.f);
  std::fill(w.row_max, w.row_max + rows, kNegInf);
  std::fill(w.row_sum, w.row_sum + rows, 0.f);

  const std::int64_t u = pb.unit(b, tile, kvh);
  const std::int64_t end = pb.table.offsets[u + 1];
  for (std::int64_t i = pb.table.offsets[u]; i < end;) {
    const EntryRun run = entry_run(pb.table.entries, i, end, ps);
    i += run.count;
    const BlockEntry& e = run.entry;
    const int kc = e.key_count;  // S, P rows are kc apart
    const EntryRows er(e, rows);
    if (er.count == 0) continue;
    const KeyMeta* meta = pb.key_meta(e);
    const float* key_bias = pb.key_bias_of(e, kvh);
    const float* k = pb.k + pb.page_offset(kvh, e.page);
    const float* v = pb.v + pb.page_offset(kvh, e.page);
    for_each_row_block(er, pb.table.rows_vary, [&](const RowBlock& blk) {
      std::int64_t lda = 0;
      const float* q_rows = block_rows(blk, q, ld, w.q_rows, d, lda);
      gemm(false, true, blk.m, kc, d, pb.scale, q_rows, lda, k, d, 0.f, w.s, kc);
      for (int i = 0; i < blk.n; ++i) {
        const int r = blk.index[i];
        online_softmax_row(w.s + std::int64_t{i} * kc, e, meta, key_bias, r, q_pos[r], w.row_max[r], w.row_sum[r],
                           w.acc + std::int64_t{r} * d, d);
      }
      if (blk.in_place) {
        gemm(false, false, blk.m, d, kc, 1.f, w.s, kc, v, d, 1.f, w.acc + std::int64_t{blk.index[0]} * d, d);
      } else {
        gemm(false, false, blk.m, d, kc, 1.f, w.s, kc, v, d, 0.f, w.pv_rows, d);
        scatter_add_tile_rows(w.acc, d, w.pv_rows, blk.index, blk.n, d);
      }
    });
  }

  float* o_tile = o + pb.row_offset(b, t0, h);
  float* lse_tile = lse + pb.stat_offset(b, h, t0);
  for (int r = 0; r < rows; ++r) {
    float* o_row = o_tile + r * ld;
    const float* acc_row = w.acc + std::int64_t{r} * d;
    if (w.row_sum[r] == 0.f) {  // the row saw no key
      std::fill(o_row, o_row + d, 0.f);
      lse_tile[r] = kNegInf;
      continue;
    }
    const float inv = 1.f / w.row_sum[r];
#pragma omp simd
    for (int c = 0; c < d; ++c) o_row[c] = acc_row[c] * inv;
    lse_tile[r] = w.row_max[r] + std::log(w.row_sum[r]);
  }
}

}  // namespace

std::size_t attention_forward_workspace_bytes(const AttentionShape& shape) {
  return forward_layout(shape).bytes(omp_get_max_threads());
}

void attention_forward(const AttentionForwardParams& p) {
  use_single_threaded_blas();
  const Problem pb(p);
  const ScratchLayout layout = forward_layout(p.shape);
  const int threads = layout.threads(p.workspace_bytes);
  float* o = static_cast<float*>(p.o);
  const std::int64_t items = pb.num_tiles * p.shape.batch * p.shape.heads;
  // Items run head-fastest, so neighbouring items (often on neighbouring threads) share KV pages.
#pragma omp parallel num_threads(threads)
  {
    const ForwardScratch scratch(layout.thread(p.workspace, omp_get_thread_num()), p.shape);
#pragma omp for schedule(dynamic)
    for (std::int64_t item = 0; item < items; ++item) {
      const int h = static_cast<int>(item % p.shape.heads);
      const std::int64_t tile = (item / p.shape.heads) % pb.num_tiles;
      const std::int64_t b = item / (std::int64_t{p.shape.heads} * pb.num_tiles);
      forward_item(pb, o, p.lse, b, tile, h, scratch);
    }
  }
}

}  // namespace ringcast::kernels::cpu
