// Indexed row movement, one family for every layer whose rows change places (VCC's compress and
// decompress, Pyramidion's exchange packing, CoLT5's routed rows, CAST's token / row / cluster-slot
// orders): a gather(-sum) by index, its scatter-add form (the gather over the inverse index), and the
// row-wise dot product those layers pair with it. Pointers are host memory on the CPU backend and
// device memory of ctx.device on CUDA (enqueued on ctx.stream, no host synchronization). Gathers and
// scatters sum in an explicit order with the same fp32 operations on both backends and no atomics, so
// CUDA's results equal the CPU's bitwise.
#pragma once

#include <ringcast/dtype.hpp>
#include <ringcast/kernels/attention.hpp>

#include <cstddef>
#include <cstdint>

namespace ringcast::kernels {

// A row index of int32 or int64 entries (the callers' index buffers come in both widths).
struct RowIndex {
  RowIndex() = default;
  RowIndex(std::nullptr_t) {}
  RowIndex(const std::int32_t* entries) : data(entries) {}
  RowIndex(const std::int64_t* entries) : data(entries), wide(true) {}
  explicit operator bool() const { return data != nullptr; }

  const void* data = nullptr;
  bool wide = false;  // int64 entries
};

// For every head h in [0, heads) and output row o in [0, rows), with index list g = h / group:
//   terms        k in [b, e) = [O[o], O[o + 1]) with O = offsets + g (rows + 1), or [o, o + 1) without
//   source rows  j_k = index[g index_stride + k], or k without an index; a negative j_k is no term
//   destination  y = dst row (dst_rows ? dst_rows[o] : o) of head h
//   weight       w = weights ? weights[o] : scale
//   written      y = w (x_{j_b} + x_{j_b+1} + ...), summed left to right from the first term;
//                y = w fill when the row has no term
//   accumulate   y = y + w x_{j_b} + w x_{j_b+1} + ..., left to right (a sequential scatter-add's
//                order); a row with no term keeps y
// where x_j is src row j of head h. Element (row r, head h, e) of a side sits at r row_stride +
// h head_stride + e (row_stride 0: width). Sums are fp32; dtype bf16 / f16 moves bits (one term per
// row, w = 1, fill 0, no accumulate). Destination rows must be distinct per head, dst must not
// overlap src.
struct RowGather {
  std::int64_t rows = 0;
  std::int64_t width = 0;
  int heads = 1;
  int group = 1;
  const std::int64_t* offsets = nullptr;  // [heads / group][rows + 1], non-decreasing, or null
  RowIndex index{};                       // or null
  std::int64_t index_stride = 0;          // between index lists
  RowIndex dst_rows{};                    // [rows], shared by the heads, or null
  const float* weights = nullptr;         // [rows], or null
  float scale = 1.0f;
  float fill = 0.0f;
  bool accumulate = false;
  DType dtype = DType::kF32;
  const void* src = nullptr;
  std::int64_t src_row_stride = 0, src_head_stride = 0;
  void* dst = nullptr;
  std::int64_t dst_row_stride = 0, dst_head_stride = 0;
};
void gather_rows(const RowGather& p, const ExecContext& ctx);

// The adjoint of a one-term gather by index, fp32: for every head h and source row i in ascending
// order, dst row index[g index_stride + i] of head h += src row i of head h (nothing for a negative
// entry; an entry at or past out_rows is an error: the CPU throws, CUDA, which would need a host
// synchronization to check, adds nothing for it). The embedding backward is this scatter. Run as gather_rows with accumulate over the inverse index, a CSR
// of every list built by a stable counting sort (backend scratch on CUDA, host memory on the CPU),
// so each destination row adds its source rows in ascending i on both backends.
struct RowScatter {
  std::int64_t rows = 0;      // source rows per head (entries of each index list)
  std::int64_t out_rows = 0;  // destination rows per head
  std::int64_t width = 0;
  int heads = 1;
  int group = 1;
  RowIndex index{};
  std::int64_t index_stride = 0;
  const float* src = nullptr;
  std::int64_t src_row_stride = 0, src_head_stride = 0;
  float* dst = nullptr;
  std::int64_t dst_row_stride = 0, dst_head_stride = 0;
};
void scatter_add_rows(const RowScatter& p, const ExecContext& ctx);

// out[r] = sum_i a[r, i] b[r, i] in fp32 (written, not added): i ascending on the CPU, a fixed warp
// tree on CUDA.
struct RowwiseDotParams {
  std::int64_t rows = 0;
  int dim = 0;
  const float* a = nullptr;  // [rows, dim]
  const float* b = nullptr;  // [rows, dim]
  float* out = nullptr;      // [rows]
};
void rowwise_dot(const RowwiseDotParams& p, const ExecContext& ctx);

}  // namespace ringcast::kernels
