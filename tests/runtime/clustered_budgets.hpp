// The clustered mode's budgets for the runtime tests' small sequences (hundreds of tokens): pages of
// 32 keys, coarse blocks of 2 pages, windows of 64 (causal) and 32 (each side), 3 pages of 2 coarse
// blocks per unit and 2 remote blocks, so that selections are sparse and every resolution (window,
// selected, page and coarse summaries) takes part.
#pragma once

#include <ringcast/attention_options.hpp>

namespace ringcast::test {

inline void use_small_clustered_budgets(AttentionOptions& o) {
  o.page_size = 32;
  o.coarse_pages = 2;
  o.window_before = 64;
  o.window_bidir = 32;
  o.top_k = 3;
  o.coarse_k = 2;
  o.remote_blocks = 2;
}

}  // namespace ringcast::test
