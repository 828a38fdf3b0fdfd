// The inverse index that turns scatter_add_rows into gather_rows (row_gather.hpp), laid out alike by
// both backends. Entries of list g are sorted stably by bucket: bucket 0 holds the entries that add
// nothing (negative; on CUDA also those at or past out_rows),
// bucket t + 1 the entries equal to t. `sources` [lists][rows] holds each sorted entry's source row i
// (ascending within a bucket), `offsets` [lists][out_rows + 1] at [g][t] the absolute position in
// `sources` where list g's bucket t + 1 starts (t = out_rows: where the list ends), so a gather with
// index_stride 0 reads target t's source rows in ascending order.
#pragma once

#include <ringcast/kernels/row_gather.hpp>

#include <cstdint>

namespace ringcast::kernels {

inline std::int64_t inverse_lists(const RowScatter& p) { return p.heads / p.group; }

// The gather that adds, into dst row t of head h, the src rows i listed for t in (offsets, sources).
inline RowGather inverse_gather(const RowScatter& p, const std::int64_t* offsets, const std::int64_t* sources) {
  RowGather g;
  g.rows = p.out_rows;
  g.width = p.width;
  g.heads = p.heads;
  g.group = p.group;
  g.offsets = offsets;
  g.index = sources;
  g.accumulate = true;
  g.src = p.src;
  g.src_row_stride = p.src_row_stride;
  g.src_head_stride = p.src_head_stride;
  g.dst = p.dst;
  g.dst_row_stride = p.dst_row_stride;
  g.dst_head_stride = p.dst_head_stride;
  return g;
}

}  // namespace ringcast::kernels
