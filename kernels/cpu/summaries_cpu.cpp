// CPU page and coarse summaries (summaries.hpp). One OpenMP work item per (kv head, slot) row of a
// pool, so every output row, and in the backward every key, is written by exactly one thread.
// Coarse summaries are built from the page level, as the distributed path will have to (step 3
// exchanges page summaries, not keys).
#include "cpu/selection_cpu.hpp"

#include <algorithm>
#include <cstdint>

namespace ringcast::kernels::cpu {
namespace {

// Keys of page `page` of a sequence of n keys: [page * page_size, end).
std::int64_t page_end(const SummaryShape& s, std::int64_t page) {
  return std::min((page + 1) * s.page_size, s.seq);
}
std::int64_t block_end(const SummaryShape& s, std::int64_t block) {
  return std::min((block + 1) * s.coarse_pages, s.num_pages());
}

void zero_padding(const SummaryShape& s, const SummaryPools& out, std::int64_t slots, std::int64_t rows) {
  for (int h = 0; h < s.kv_heads; ++h) {
    for (float* pool : {out.key_mean, out.value_mean, out.key_min, out.key_max}) {
      std::fill(pool + (h * rows + slots) * s.head_dim, pool + (h + 1) * rows * s.head_dim, 0.0f);
    }
  }
}

}  // namespace

void page_summaries(const PageSummaryParams& p) {
  const SummaryShape& s = p.shape;
  const int d = s.head_dim;
  const std::int64_t pages = s.num_pages();
  const std::int64_t slots = s.batch * pages;
  const std::int64_t rows = s.page_rows();
  const std::int64_t ld = std::int64_t{s.kv_heads} * d;  // stride between consecutive keys of a head
#pragma omp parallel for collapse(2) schedule(static)
  for (int h = 0; h < s.kv_heads; ++h) {
    for (std::int64_t slot = 0; slot < slots; ++slot) {
      const std::int64_t b = slot / pages;
      const std::int64_t page = slot % pages;
      const std::int64_t i0 = page * s.page_size;
      const std::int64_t i1 = page_end(s, page);
      const std::int64_t row = (h * rows + slot) * d;
      float* km = p.pages.key_mean + row;
      float* vm = p.pages.value_mean + row;
      float* kmin = p.pages.key_min + row;
      float* kmax = p.pages.key_max + row;
      const float* k = p.k + (b * s.seq + i0) * ld + std::int64_t{h} * d;
      const float* v = p.v + (b * s.seq + i0) * ld + std::int64_t{h} * d;
      std::copy(k, k + d, km);
      std::copy(v, v + d, vm);
      std::copy(k, k + d, kmin);
      std::copy(k, k + d, kmax);
      for (std::int64_t i = 1; i < i1 - i0; ++i) {
        const float* ki = k + i * ld;
        const float* vi = v + i * ld;
#pragma omp simd
        for (int c = 0; c < d; ++c) {
          km[c] += ki[c];
          vm[c] += vi[c];
          kmin[c] = std::min(kmin[c], ki[c]);
          kmax[c] = std::max(kmax[c], ki[c]);
        }
      }
      const float inv = 1.0f / static_cast<float>(i1 - i0);
      for (int c = 0; c < d; ++c) {
        km[c] *= inv;
        vm[c] *= inv;
      }
      if (h == 0) p.pages.count[slot] = static_cast<std::int32_t>(i1 - i0);
    }
  }
  zero_padding(s, p.pages, slots, rows);
}

void coarse_summaries(const CoarseSummaryParams& p) {
  const SummaryShape& s = p.shape;
  const int d = s.head_dim;
  const std::int64_t pages = s.num_pages();
  const std::int64_t blocks = s.num_blocks();
  const std::int64_t slots = s.batch * blocks;
  const std::int64_t page_rows = s.page_rows();
  const std::int64_t rows = s.block_rows();
#pragma omp parallel for collapse(2) schedule(static)
  for (int h = 0; h < s.kv_heads; ++h) {
    for (std::int64_t slot = 0; slot < slots; ++slot) {
      const std::int64_t b = slot / blocks;
      const std::int64_t block = slot % blocks;
      const std::int64_t pg0 = b * pages + block * s.coarse_pages;  // first page slot of the block
      const std::int64_t num = block_end(s, block) - block * s.coarse_pages;
      const std::int64_t row = (h * rows + slot) * d;
      float* km = p.blocks.key_mean + row;
      float* vm = p.blocks.value_mean + row;
      float* kmin = p.blocks.key_min + row;
      float* kmax = p.blocks.key_max + row;
      std::fill(km, km + d, 0.0f);
      std::fill(vm, vm + d, 0.0f);
      const std::int64_t first = (h * page_rows + pg0) * d;
      std::copy(p.page_key_min + first, p.page_key_min + first + d, kmin);
      std::copy(p.page_key_max + first, p.page_key_max + first + d, kmax);
      std::int64_t total = 0;
      for (std::int64_t i = 0; i < num; ++i) {
        const std::int64_t src = (h * page_rows + pg0 + i) * d;
        const float w = static_cast<float>(p.page_count[pg0 + i]);
        total += p.page_count[pg0 + i];
#pragma omp simd
        for (int c = 0; c < d; ++c) {
          km[c] += w * p.page_key_mean[src + c];
          vm[c] += w * p.page_value_mean[src + c];
          kmin[c] = std::min(kmin[c], p.page_key_min[src + c]);
          kmax[c] = std::max(kmax[c], p.page_key_max[src + c]);
        }
      }
      const float inv = 1.0f / static_cast<float>(total);
      for (int c = 0; c < d; ++c) {
        km[c] *= inv;
        vm[c] *= inv;
      }
      if (h == 0) p.blocks.count[slot] = static_cast<std::int32_t>(total);
    }
  }
  zero_padding(s, p.blocks, slots, rows);
}

void page_summaries_backward(const PageSummaryBackwardParams& p) {
  const SummaryShape& s = p.shape;
  const int d = s.head_dim;
  const std::int64_t pages = s.num_pages();
  const std::int64_t rows = s.page_rows();
  const std::int64_t ld = std::int64_t{s.kv_heads} * d;
#pragma omp parallel for collapse(2) schedule(static)
  for (int h = 0; h < s.kv_heads; ++h) {
    for (std::int64_t slot = 0; slot < s.batch * pages; ++slot) {
      const std::int64_t b = slot / pages;
      const std::int64_t page = slot % pages;
      const std::int64_t i0 = page * s.page_size;
      const std::int64_t i1 = page_end(s, page);
      const float inv = 1.0f / static_cast<float>(i1 - i0);
      const float* dkm = p.d_key_mean + (h * rows + slot) * d;
      const float* dvm = p.d_value_mean + (h * rows + slot) * d;
      for (std::int64_t i = i0; i < i1; ++i) {
        float* dk = p.d_k + (b * s.seq + i) * ld + std::int64_t{h} * d;
        float* dv = p.d_v + (b * s.seq + i) * ld + std::int64_t{h} * d;
#pragma omp simd
        for (int c = 0; c < d; ++c) {
          dk[c] += inv * dkm[c];
          dv[c] += inv * dvm[c];
        }
      }
    }
  }
}

void coarse_summaries_backward(const CoarseSummaryBackwardParams& p) {
  const SummaryShape& s = p.shape;
  const int d = s.head_dim;
  const std::int64_t pages = s.num_pages();
  const std::int64_t blocks = s.num_blocks();
  const std::int64_t page_rows = s.page_rows();
  const std::int64_t rows = s.block_rows();
#pragma omp parallel for collapse(2) schedule(static)
  for (int h = 0; h < s.kv_heads; ++h) {
    for (std::int64_t slot = 0; slot < s.batch * blocks; ++slot) {
      const std::int64_t b = slot / blocks;
      const std::int64_t block = slot % blocks;
      const std::int64_t pg0 = block * s.coarse_pages;
      const std::int64_t pg1 = block_end(s, block);
      const float inv = 1.0f / static_cast<float>(std::min(pg1 * s.page_size, s.seq) - pg0 * s.page_size);
      const float* dkm = p.d_block_key_mean + (h * rows + slot) * d;
      const float* dvm = p.d_block_value_mean + (h * rows + slot) * d;
      for (std::int64_t page = pg0; page < pg1; ++page) {
        const float w = static_cast<float>(page_end(s, page) - page * s.page_size) * inv;
        float* dk = p.d_page_key_mean + (h * page_rows + b * pages + page) * d;
        float* dv = p.d_page_value_mean + (h * page_rows + b * pages + page) * d;
#pragma omp simd
        for (int c = 0; c < d; ++c) {
          dk[c] += w * dkm[c];
          dv[c] += w * dvm[c];
        }
      }
    }
  }
}

}  // namespace ringcast::kernels::cpu
