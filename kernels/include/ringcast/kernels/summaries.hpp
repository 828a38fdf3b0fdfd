// Page and coarse-block summaries of consecutive keys (DESIGN.md §4.1 step 2, `clusters = blocks`).
//
// Keys and values are [B, n, kv_heads, head_dim] fp32. Page p of batch b holds keys [p * page_size,
// min((p + 1) * page_size, n)); a coarse block holds coarse_pages consecutive pages. Both levels use
// one layout: slot s = b * units + u (units = pages or blocks per batch element), and every per-key
// array is [kv_heads, rows, head_dim] with rows = slots rounded up to whole pages, so a summary pool
// is an attention page pool ([kv_heads, rows / page_size, page_size, head_dim]) that the attention
// kernel reads as pages of summary keys. Padding rows are written as zeros; count is [slots].
//
// Only the means are differentiable: min/max feed selection scores (hard choices, DESIGN.md §4.2), so
// they have no backward. Backward passes add into their outputs (the caller zeroes them first).
#pragma once

#include <ringcast/kernels/attention.hpp>

#include <cstdint>

namespace ringcast::kernels {

struct SummaryShape {
  int batch = 1;
  std::int64_t seq = 0;  // n keys per batch element, any n >= 1 (the last page may be partial)
  int kv_heads = 1;
  int head_dim = 64;
  int page_size = 64;
  int coarse_pages = 16;  // pages per coarse block

  std::int64_t num_pages() const { return (seq + page_size - 1) / page_size; }
  std::int64_t num_blocks() const { return (num_pages() + coarse_pages - 1) / coarse_pages; }
  // Rows of a summary pool holding `units` summaries per batch element.
  std::int64_t pool_rows(std::int64_t units) const {
    return (batch * units + page_size - 1) / page_size * page_size;
  }
  std::int64_t page_rows() const { return pool_rows(num_pages()); }
  std::int64_t block_rows() const { return pool_rows(num_blocks()); }
};

// One level of summaries. key_mean / value_mean / key_min / key_max: [kv_heads, rows, head_dim];
// count: [B * units], the number of keys each summary stands for.
struct SummaryPools {
  float* key_mean = nullptr;
  float* value_mean = nullptr;
  float* key_min = nullptr;
  float* key_max = nullptr;
  std::int32_t* count = nullptr;
};

struct PageSummaryParams {
  SummaryShape shape;
  const float* k = nullptr;  // [B, n, kv_heads, head_dim]
  const float* v = nullptr;
  SummaryPools pages;  // written, rows = shape.page_rows()
};

// Coarse summaries from page summaries: count-weighted means, min of the minima, max of the maxima.
struct CoarseSummaryParams {
  SummaryShape shape;
  const float* page_key_mean = nullptr;  // the page level, as written by page_summaries
  const float* page_value_mean = nullptr;
  const float* page_key_min = nullptr;
  const float* page_key_max = nullptr;
  const std::int32_t* page_count = nullptr;
  SummaryPools blocks;  // written, rows = shape.block_rows()
};

// d k_i += d key_mean[page(i)] / count, likewise for values. Counts follow from the shape.
struct PageSummaryBackwardParams {
  SummaryShape shape;
  const float* d_key_mean = nullptr;  // [kv_heads, page_rows, head_dim]
  const float* d_value_mean = nullptr;
  float* d_k = nullptr;  // [B, n, kv_heads, head_dim], added into
  float* d_v = nullptr;
};

// d page_mean[p] += count[p] / count[block(p)] * d block_mean[block(p)].
struct CoarseSummaryBackwardParams {
  SummaryShape shape;
  const float* d_block_key_mean = nullptr;  // [kv_heads, block_rows, head_dim]
  const float* d_block_value_mean = nullptr;
  float* d_page_key_mean = nullptr;  // [kv_heads, page_rows, head_dim], added into
  float* d_page_value_mean = nullptr;
};

void page_summaries(const PageSummaryParams& p, const ExecContext& ctx);
void coarse_summaries(const CoarseSummaryParams& p, const ExecContext& ctx);
void page_summaries_backward(const PageSummaryBackwardParams& p, const ExecContext& ctx);
void coarse_summaries_backward(const CoarseSummaryBackwardParams& p, const ExecContext& ctx);

}  // namespace ringcast::kernels
