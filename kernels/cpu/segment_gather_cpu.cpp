// Indexed row gather-sum and row dot products on the CPU (segment_gather.hpp): one output row per
// iteration, its sum in index order from the first term.
#include "seed_rows_cpu.hpp"

#include <cstdint>

namespace ringcast::kernels::cpu {

void gather_segments(const SegmentGatherParams& p) {
  const std::int64_t D = p.dim, ss = p.src_stride ? p.src_stride : D, ds = p.dst_stride ? p.dst_stride : D;
#pragma omp parallel for schedule(static)
  for (std::int64_t o = 0; o < p.rows; ++o) {
    const std::int64_t begin = p.offsets ? p.offsets[o] : o, end = p.offsets ? p.offsets[o + 1] : o + 1;
    const float w = p.weights ? p.weights[o] : p.scale;
    float* dst = p.dst + (p.dst_rows ? p.dst_rows[o] : o) * ds;
    for (std::int64_t i = 0; i < D; ++i) {
      float s = 0.0f;
      for (std::int64_t k = begin; k < end; ++k) {
        const float x = p.src[(p.index ? p.index[k] : k) * ss + i];
        s = k == begin ? x : s + x;
      }
      dst[i] = p.accumulate ? dst[i] + w * s : w * s;
    }
  }
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
