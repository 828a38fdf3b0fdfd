// Grouped query rows: the clustered mode's row order under GQA with per-row selection
// (SelectionOptions::rows_per_token, selection.hpp). Every query head of a KV group takes what its
// token selected, so the attention runs on rows (token, head in group) of each KV head -- the G heads
// of a token consecutive rows of one query tile, NSA's layout -- and a tile's page list is the union
// of 128 / G tokens' choices, each page loaded once for the group. GroupedRows moves one batch element
// between token order ([tokens, heads, d] rows, LSE [heads, tokens]) and that order ([tokens * G,
// kv_heads, d], LSE [kv_heads, tokens * G]); each is one copy_strided (layout.hpp) on the context's
// backend, converting dtype where asked.
#pragma once

#include <ringcast/dtype.hpp>
#include <ringcast/kernels/attention.hpp>

#include <cstdint>
#include <span>
#include <vector>

namespace ringcast::kernels {

class GroupedRows {
 public:
  // group: the rows per token, G = heads / kv_heads when the rows are grouped, else 1 (token order).
  GroupedRows(std::int64_t tokens, int heads, int kv_heads, int head_dim, int group);

  // The rows per token of the clustered mode: grouped_rows_per_token() with per-row
  // selection, 1 with tile selection (a tile's rows share their entries anyway).
  static int group_for(int heads, int kv_heads, bool row_selection);

  int group() const { return group_; }
  bool grouped() const { return group_ > 1; }
  // Whether query-shaped rows move: grouped over more than one KV head. With one KV head row
  // t * G + j of the grouped order is token t's head j, where token order has it already; only the
  // LSE ([heads, tokens] against [tokens * G]) moves.
  bool moves_rows() const { return grouped() && kv_heads_ > 1; }
  // The attention's shape over an element's pool of num_pages pages (batch 1).
  AttentionShape attention_shape(int page_size, std::int64_t num_pages) const;
  // The query positions of the attention's rows: each token's position G times.
  std::vector<std::int32_t> row_positions(std::span<const std::int32_t> token_positions) const;

  // Query-shaped rows (Q, O, dO, dQ) of one element, token order to grouped order and back (a plain
  // copy when !moves_rows()).
  void to_grouped(const void* src, DType src_dtype, void* dst, DType dst_dtype, const ExecContext& ctx) const;
  void to_tokens(const void* src, DType src_dtype, void* dst, DType dst_dtype, const ExecContext& ctx) const;
  // LSE of one element, fp32.
  void lse_to_grouped(const float* src, float* dst, const ExecContext& ctx) const;
  void lse_to_tokens(const float* src, float* dst, const ExecContext& ctx) const;

 private:
  std::int64_t tokens_;
  int heads_, kv_heads_, head_dim_, group_;
};

}  // namespace ringcast::kernels
