// Indexed row movement on the CPU (row_gather.hpp): one output row per iteration, its terms in index
// order; the scatter-add is the gather over the inverse index, built here by a counting sort in host
// memory (row_gather_inverse.hpp). No loop is contracted into fused multiply-adds (the build targets
// baseline x86-64), so the CUDA backend, which rounds each operation explicitly, matches bitwise.
#include "seed_rows_cpu.hpp"

#include <ringcast/error.hpp>

#include <algorithm>
#include <cstring>
#include <vector>

#include "../row_gather_inverse.hpp"

namespace ringcast::kernels::cpu {
namespace {

std::int64_t entry(RowIndex index, std::int64_t k) {
  return index.wide ? static_cast<const std::int64_t*>(index.data)[k] : static_cast<const std::int32_t*>(index.data)[k];
}

// bf16 / f16 rows: one term, bits copied; a row without a source is zero bits.
void copy_row(const RowGather& p, std::int64_t source, std::int64_t src_elem, std::int64_t dst_elem) {
  const std::size_t size = dtype_size(p.dtype), bytes = static_cast<std::size_t>(p.width) * size;
  char* dst = static_cast<char*>(p.dst) + dst_elem * size;
  if (source < 0) {
    std::memset(dst, 0, bytes);
  } else {
    std::memcpy(dst, static_cast<const char*>(p.src) + src_elem * size, bytes);
  }
}

}  // namespace

void gather_rows(const RowGather& p) {
  const std::int64_t width = p.width;
  const std::int64_t src_rs = p.src_row_stride ? p.src_row_stride : width;
  const std::int64_t dst_rs = p.dst_row_stride ? p.dst_row_stride : width;
#pragma omp parallel for collapse(2) schedule(static)
  for (int h = 0; h < p.heads; ++h)
    for (std::int64_t o = 0; o < p.rows; ++o) {
      const std::int64_t list = h / p.group;
      const std::int64_t* segment = p.offsets ? p.offsets + list * (p.rows + 1) + o : nullptr;
      const std::int64_t begin = segment ? segment[0] : o, end = segment ? segment[1] : o + 1;
      const auto source = [&](std::int64_t k) { return p.index ? entry(p.index, list * p.index_stride + k) : k; };
      const std::int64_t dst_elem = (p.dst_rows ? entry(p.dst_rows, o) : o) * dst_rs + h * p.dst_head_stride;
      if (p.dtype != DType::kF32) {
        const std::int64_t j = source(begin);
        copy_row(p, j, j * src_rs + h * p.src_head_stride, dst_elem);
        continue;
      }
      const float* src = static_cast<const float*>(p.src) + h * p.src_head_stride;
      float* dst = static_cast<float*>(p.dst) + dst_elem;
      const float w = p.weights ? p.weights[o] : p.scale;
      bool first = true;
      for (std::int64_t k = begin; k < end; ++k) {
        const std::int64_t j = source(k);
        if (j < 0) continue;
        const float* x = src + j * src_rs;
        if (p.accumulate) {
          for (std::int64_t e = 0; e < width; ++e) dst[e] = dst[e] + w * x[e];
        } else if (first) {
          std::copy_n(x, width, dst);
        } else {
          for (std::int64_t e = 0; e < width; ++e) dst[e] = dst[e] + x[e];
        }
        first = false;
      }
      if (p.accumulate) continue;
      if (first) std::fill_n(dst, width, p.fill);
      for (std::int64_t e = 0; e < width; ++e) dst[e] = w * dst[e];
    }
}

void scatter_add_rows(const RowScatter& p) {
  const std::int64_t lists = inverse_lists(p), buckets = p.out_rows + 1;
  std::vector<std::int64_t> offsets(static_cast<std::size_t>(lists * buckets));
  std::vector<std::int64_t> sources(static_cast<std::size_t>(lists * p.rows));
  std::vector<std::int64_t> start(static_cast<std::size_t>(buckets + 1));
  for (std::int64_t list = 0; list < lists; ++list) {
    const auto bucket = [&](std::int64_t i) {
      const std::int64_t j = entry(p.index, list * p.index_stride + i);
      RINGCAST_CHECK(j < p.out_rows, "scatter_add_rows: index {} of list {} row {} is not below out_rows {}", j, list,
                     i, p.out_rows);
      return j < 0 ? 0 : j + 1;
    };
    // Counting sort, stable: start[b] is where bucket b begins once the counts are summed.
    std::fill(start.begin(), start.end(), 0);
    for (std::int64_t i = 0; i < p.rows; ++i) ++start[static_cast<std::size_t>(bucket(i) + 1)];
    for (std::int64_t b = 0; b < buckets; ++b)
      start[static_cast<std::size_t>(b + 1)] += start[static_cast<std::size_t>(b)];
    const std::int64_t base = list * p.rows;
    for (std::int64_t t = 0; t < buckets; ++t)
      offsets[static_cast<std::size_t>(list * buckets + t)] = base + start[static_cast<std::size_t>(t + 1)];
    for (std::int64_t i = 0; i < p.rows; ++i)
      sources[static_cast<std::size_t>(base + start[static_cast<std::size_t>(bucket(i))]++)] = i;
  }
  gather_rows(inverse_gather(p, offsets.data(), sources.data()));
}

void rowwise_dot(const RowwiseDotParams& p) {
  const std::int64_t D = p.dim;
#pragma omp parallel for schedule(static)
  for (std::int64_t r = 0; r < p.rows; ++r) {
    const float *a = p.a + r * D, *b = p.b + r * D;
    float s = 0.0f;
    for (std::int64_t i = 0; i < D; ++i) s += a[i] * b[i];
    p.out[r] = s;
  }
}

}  // namespace ringcast::kernels::cpu
