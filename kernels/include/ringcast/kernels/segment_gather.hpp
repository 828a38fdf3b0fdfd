// Indexed row movement for layers whose rows change places (VCC's compress / decompress, Pyramidion's
// exchange packing): one segmented gather-sum with optional source index, destination index and
// weights, and a row-wise dot product. fp32, row-major; pointers are host memory on the CPU backend and
// device memory of ctx.device on CUDA (work enqueued on ctx.stream, no host synchronization). Every
// sum runs in index order from its first term, so both backends are deterministic, and a one-term
// segment with weight 1 is an exact copy.
#pragma once

#include <ringcast/kernels/attention.hpp>

#include <cstdint>

namespace ringcast::kernels {

// For every output o in [0, rows):
//   dst[dst_row(o)] (+)= weight(o) · Σ_{k ∈ [begin(o), end(o))} src[src_row(k)]
// with begin/end = offsets[o], offsets[o + 1] (or o, o + 1 when offsets is null), src_row(k) =
// index[k] (or k), dst_row(o) = dst_rows[o] (or o), weight(o) = weights[o] (or scale). An empty segment
// contributes 0. Rows are `dim` floats, src_stride / dst_stride floats apart (0: dim). Destination
// rows must be distinct, and dst must not overlap src.
struct SegmentGatherParams {
  std::int64_t rows = 0;
  int dim = 0;
  std::int64_t src_stride = 0;
  std::int64_t dst_stride = 0;
  const std::int64_t* offsets = nullptr;   // [rows + 1], non-decreasing, or null
  const std::int64_t* index = nullptr;     // source rows, or null
  const std::int64_t* dst_rows = nullptr;  // [rows], or null
  const float* weights = nullptr;          // [rows], or null
  float scale = 1.0f;
  const float* src = nullptr;
  float* dst = nullptr;
  bool accumulate = false;
};

void gather_segments(const SegmentGatherParams& p, const ExecContext& ctx);

// out[r] = Σ_i a[r, i] · b[r, i] in fp32, i ascending (written, not added).
struct RowwiseDotParams {
  std::int64_t rows = 0;
  int dim = 0;
  const float* a = nullptr;  // [rows, dim]
  const float* b = nullptr;  // [rows, dim]
  float* out = nullptr;      // [rows]
};

void rowwise_dot(const RowwiseDotParams& p, const ExecContext& ctx);

}  // namespace ringcast::kernels
