// Device pieces shared by the CUDA selection kernels: the layout and tile geometry of selection.hpp
// restated as plain structs, warp-cooperative summary scores, and a warp-wide top-k. A warp works on
// one selection unit; every decision is warp-uniform (scores are reduced with a butterfly, whose
// result is bitwise the same in every lane), so all lanes follow one control path. Lane l holds
// channels l, l + 32, ... of a query, and ranks l, l + 32, ... of a top-k list.
#pragma once

#include <ringcast/kernels/selection.hpp>

#include <cuda_runtime.h>

#include <climits>
#include <cstdint>

namespace ringcast::kernels::cuda::detail {

inline constexpr unsigned kFullMask = 0xffffffffu;

// ClusteredLayout and the options that shape tile geometry, without the fetched list (block_pool
// below maps blocks to pool pages instead).
struct LayoutArgs {
  std::int64_t n, first_pos, n_loc;
  std::int64_t first_block, local_blocks, num_blocks;
  std::int64_t halo_before, halo_after;
  int page_size, coarse_pages;
  int window;
  bool causal;
};

inline LayoutArgs layout_args(const ClusteredLayout& L, const SelectionOptions& o) {
  return {L.n,           L.first_pos,   L.n_loc,        L.first_block(), L.local_blocks(), L.num_blocks(),
          L.halo_before, L.halo_after,  L.page_size,    L.coarse_pages,  o.window,         o.causal};
}

// tile_geometry() of selection.hpp: which keys tile `tile` may score (DESIGN.md §4.1 "Visibility rules").
struct Geometry {
  std::int64_t window_lo, window_hi, eligible_end;
  bool causal;

  __device__ Geometry(const LayoutArgs& L, std::int64_t tile) {
    const std::int64_t t0 = L.first_pos + tile * kQueryTile;
    const std::int64_t t1 = min(t0 + kQueryTile, L.first_pos + L.n_loc);
    const std::int64_t before = L.causal ? L.window : L.window / 2;
    const std::int64_t after = L.causal ? 0 : L.window / 2;
    window_lo = max(std::int64_t{0}, t0 - before);
    window_hi = min(L.n, t1 + after);
    eligible_end = t0 - before;
    causal = L.causal;
  }
  __device__ bool keys_eligible(std::int64_t pos0, std::int64_t count) const {
    return causal ? pos0 + count <= eligible_end : pos0 + count <= window_lo || pos0 >= window_hi;
  }
};

// Summary rows of one level, [rows, head_dim] fp32; the score reads min / max (bound) or mean.
struct SummaryArgs {
  const float* mean;
  const float* min;
  const float* max;
};

__device__ inline float warp_sum(float x) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_xor_sync(kFullMask, x, offset);
  return x;
}

// Quest's bound q+.k_max + q-.k_min = sum_c max(q_c k_max_c, q_c k_min_c) (k_min <= k_max), or q.k_mean,
// of summary row `row`; q holds this lane's channels (zero past head_dim). Every lane gets the score.
template <int kPerLane>
__device__ __forceinline__ float warp_score(bool bound, const float (&q)[kPerLane], const SummaryArgs& s, std::int64_t row, int d) {
  const int lane = threadIdx.x & 31;
  float acc = 0.0f;
  if (bound) {
    const float* mx = s.max + row * d;
    const float* mn = s.min + row * d;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const int c = lane + 32 * i;
      if (c < d) acc += fmaxf(q[i] * __ldg(mx + c), q[i] * __ldg(mn + c));
    }
  } else {
    const float* m = s.mean + row * d;
#pragma unroll
    for (int i = 0; i < kPerLane; ++i) {
      const int c = lane + 32 * i;
      if (c < d) acc += q[i] * __ldg(m + c);
    }
  }
  return warp_sum(acc);
}

// Higher score first; ties toward the lower global index (DESIGN.md §4.1 step 5).
__device__ inline bool better(float sa, int ia, float sb, int ib) { return sa > sb || (sa == sb && ia < ib); }

// The best k (<= 32 kSlots) of the (score, index) pairs pushed so far, best first: rank r lives in
// lane r % 32, slot r / 32. push() takes warp-uniform arguments and must be called by the whole warp;
// the result does not depend on the order of the pushes (a strict total order decides).
template <int kSlots>
struct WarpTopK {
  float score[kSlots];
  int index[kSlots];
  int k = 0;
  int count = 0;  // ranks [0, count) hold pushed pairs
  float worst_score = 0.0f;  // rank k - 1, valid once count == k
  int worst_index = 0;

  __device__ explicit WarpTopK(int capacity) : k(capacity) {
#pragma unroll
    for (int s = 0; s < kSlots; ++s) {
      score[s] = -INFINITY;
      index[s] = INT_MAX;
    }
  }

  __device__ __forceinline__ void push(float new_score, int new_index) {
    if (k == 0 || (count == k && !better(new_score, new_index, worst_score, worst_index))) return;
    const int lane = threadIdx.x & 31;
    int pos = 0;  // ranks better than the new pair form a prefix
#pragma unroll
    for (int s = 0; s < kSlots; ++s) {
      const bool ahead = s * 32 + lane < count && better(score[s], index[s], new_score, new_index);
      pos += __popc(__ballot_sync(kFullMask, ahead));
    }
    // Ranks >= pos move down one: rank r takes rank r - 1, which is lane - 1 of the slot, or lane 31
    // of the slot before for lane 0. All shuffles read the old list.
    float prev_score[kSlots];
    int prev_index[kSlots];
#pragma unroll
    for (int s = 0; s < kSlots; ++s) {
      prev_score[s] = __shfl_up_sync(kFullMask, score[s], 1);
      prev_index[s] = __shfl_up_sync(kFullMask, index[s], 1);
      const float carry_score = __shfl_sync(kFullMask, score[s > 0 ? s - 1 : 0], 31);
      const int carry_index = __shfl_sync(kFullMask, index[s > 0 ? s - 1 : 0], 31);
      if (lane == 0) {
        prev_score[s] = carry_score;
        prev_index[s] = carry_index;
      }
    }
#pragma unroll
    for (int s = 0; s < kSlots; ++s) {
      const int rank = s * 32 + lane;
      if (rank == pos) {
        score[s] = new_score;
        index[s] = new_index;
      } else if (rank > pos) {
        score[s] = prev_score[s];
        index[s] = prev_index[s];
      }
    }
    if (count < k) ++count;
    if (count == k) {
      const int last = k - 1;
      float ws = 0.0f;
      int wi = 0;
#pragma unroll
      for (int s = 0; s < kSlots; ++s) {
        if (s == last / 32) {
          ws = score[s];
          wi = index[s];
        }
      }
      worst_score = __shfl_sync(kFullMask, ws, last % 32);
      worst_index = __shfl_sync(kFullMask, wi, last % 32);
    }
  }

  // Index of rank r (warp-uniform r < count).
  __device__ int index_at(int r) const {
    int x = 0;
#pragma unroll
    for (int s = 0; s < kSlots; ++s) {
      if (s == r / 32) x = index[s];
    }
    return __shfl_sync(kFullMask, x, r % 32);
  }

  // Where rank (slot s, this lane) goes when the kept pairs are sorted by ascending index, or -1 for
  // ranks past count. Indices are distinct.
  __device__ int ascending_position(int s) const {
    const int lane = threadIdx.x & 31;
    int pos = 0;
    for (int r = 0; r < count; ++r) pos += index_at(r) < index[s];
    return s * 32 + lane < count ? pos : -1;
  }
};

}  // namespace ringcast::kernels::cuda::detail
