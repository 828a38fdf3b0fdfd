// CUDA rank-level top-R of remote coarse blocks (selection.hpp select_remote_blocks, DESIGN.md §4.1
// step 4). One warp per remote block carries the block's running max of tile scores through the tiles
// in order; causal, a chunk of tiles at a time leaves each tile's running maxima in a bounded buffer
// ([chunk tiles, remote blocks], at most kChunkValues floats) and one warp per tile keeps the R best
// eligible blocks, best first. Bidirectional, one warp keeps the R best final maxima. Admission into
// the fetch list (tile order, capped) is a short sequential pass over tiles x R ids on the host.
#include <ringcast/cuda_check.hpp>
#include <ringcast/error.hpp>

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#include "selection_cuda.hpp"
#include "selection_launch.hpp"

namespace ringcast::kernels::cuda {
namespace {

using detail::Geometry;
using detail::LayoutArgs;
using detail::Scratch;
using detail::WarpTopK;

constexpr int kThreads = 256;
constexpr std::int64_t kChunkValues = std::int64_t{1} << 22;  // 16 MB of running maxima per chunk

struct RemoteArgs {
  LayoutArgs L;
  detail::SummaryArgs coarse;  // [num_blocks, d]
  const float* tile_q;         // [tiles, d]
  const std::int32_t* remote;  // remote block ids, ascending
  std::int64_t remote_count;
  int head_dim;
  int top_r;
  bool bound;
};

// Tiles [t_begin, t_end): running[i] = max(running[i], score of tile t); rows (if not null) receives
// the running maxima after each tile, [t_end - t_begin, remote_count].
template <int kPerLane>
__global__ void running_max_kernel(const RemoteArgs a, std::int64_t t_begin, std::int64_t t_end,
                                   float* __restrict__ running, float* __restrict__ rows) {
  const int lane = threadIdx.x & 31;
  const int d = a.head_dim;
  for (std::int64_t i = (blockIdx.x * std::int64_t{blockDim.x} + threadIdx.x) / 32; i < a.remote_count;
       i += std::int64_t{gridDim.x} * blockDim.x / 32) {
    float best = running[i];
    for (std::int64_t t = t_begin; t < t_end; ++t) {
      float q[kPerLane];
#pragma unroll
      for (int j = 0; j < kPerLane; ++j) {
        const int c = lane + 32 * j;
        q[j] = c < d ? a.tile_q[t * d + c] : 0.0f;
      }
      const float s = detail::warp_score(a.bound, q, a.coarse, a.remote[i], d);
      best = best < s ? s : best;  // std::max(running, score), as on the CPU
      if (rows != nullptr && lane == 0) rows[(t - t_begin) * a.remote_count + i] = best;
    }
    if (lane == 0) running[i] = best;
  }
}

// One warp per row of `values` ([rows, remote_count]; row r is tile t_begin + r when causal): the
// top_r best eligible blocks, best first, into out[(t_begin + r) * top_r ...] and counts.
__global__ void remote_topk_kernel(const RemoteArgs a, std::int64_t t_begin, std::int64_t rows,
                                   const float* __restrict__ values, std::int32_t* __restrict__ out,
                                   std::int32_t* __restrict__ counts) {
  const int lane = threadIdx.x & 31;
  const std::int64_t r = (blockIdx.x * std::int64_t{blockDim.x} + threadIdx.x) / 32;
  if (r >= rows) return;
  const Geometry g(a.L, t_begin + r);
  const std::int64_t bk = std::int64_t{a.L.page_size} * a.L.coarse_pages;
  WarpTopK<1> best(a.top_r);
  // 32 candidates per step; only those that would enter the list are pushed, in lane order.
  for (std::int64_t base = 0; base < a.remote_count; base += 32) {
    const std::int64_t i = base + lane;
    const int block = i < a.remote_count ? a.remote[i] : 0;
    const bool valid = i < a.remote_count && (!a.L.causal || g.keys_eligible(block * bk, bk));
    const float v = valid ? values[r * a.remote_count + i] : 0.0f;
    unsigned todo = __ballot_sync(detail::kFullMask, valid && (best.count < best.k ||
                                                              detail::better(v, block, best.worst_score,
                                                                             best.worst_index)));
    while (todo != 0) {
      const int src = __ffs(todo) - 1;
      todo &= todo - 1;
      best.push(__shfl_sync(detail::kFullMask, v, src), __shfl_sync(detail::kFullMask, block, src));
    }
  }
  if (lane < best.count) out[(t_begin + r) * a.top_r + lane] = best.index[0];
  if (lane == 0) counts[t_begin + r] = best.count;
}

template <int kPerLane>
void launch_running_max(const RemoteArgs& a, std::int64_t t_begin, std::int64_t t_end, float* running, float* rows,
                        cudaStream_t stream) {
  const std::int64_t warps_per_block = kThreads / 32;
  const auto blocks = static_cast<unsigned>((a.remote_count + warps_per_block - 1) / warps_per_block);
  running_max_kernel<kPerLane><<<blocks, kThreads, 0, stream>>>(a, t_begin, t_end, running, rows);
  RINGCAST_CUDA_CHECK_LAUNCH();
}

void running_max(const RemoteArgs& a, std::int64_t t_begin, std::int64_t t_end, float* running, float* rows,
                 cudaStream_t stream) {
  if (a.head_dim <= 64) return launch_running_max<2>(a, t_begin, t_end, running, rows, stream);
  if (a.head_dim <= 128) return launch_running_max<4>(a, t_begin, t_end, running, rows, stream);
  launch_running_max<8>(a, t_begin, t_end, running, rows, stream);
}

void remote_topk(const RemoteArgs& a, std::int64_t t_begin, std::int64_t rows, const float* values,
                 std::int32_t* out, std::int32_t* counts, cudaStream_t stream) {
  const std::int64_t warps_per_block = kThreads / 32;
  const auto blocks = static_cast<unsigned>((rows + warps_per_block - 1) / warps_per_block);
  remote_topk_kernel<<<blocks, kThreads, 0, stream>>>(a, t_begin, rows, values, out, counts);
  RINGCAST_CUDA_CHECK_LAUNCH();
}

__global__ void fill_kernel(float* x, std::int64_t n, float value) {
  for (std::int64_t i = blockIdx.x * std::int64_t{blockDim.x} + threadIdx.x; i < n;
       i += std::int64_t{gridDim.x} * blockDim.x)
    x[i] = value;
}

}  // namespace

RemoteSelection select_remote_blocks(const RemoteSelectionParams& p, Stream stream_handle) {
  const ClusteredLayout& L = *p.layout;
  const SelectionOptions& opt = p.options;
  const SelectionQueries& sq = p.queries;
  RINGCAST_CHECK(sq.head_dim <= detail::kMaxHeadDim && opt.remote_blocks <= 32,
                 "select_remote_blocks on CUDA: head_dim {} (at most {}) or remote_blocks {} (at most 32) is not "
                 "supported",
                 sq.head_dim, detail::kMaxHeadDim, opt.remote_blocks);
  const auto stream = static_cast<cudaStream_t>(stream_handle);
  const std::int64_t tiles = L.num_tiles();
  std::vector<std::int32_t> remote;
  for (std::int64_t b = 0; b < L.num_blocks(); ++b) {
    if (!L.is_local_block(b) && b != L.halo_before && b != L.halo_after) remote.push_back(static_cast<std::int32_t>(b));
  }
  const auto remote_count = static_cast<std::int64_t>(remote.size());
  const std::int64_t top_r = opt.remote_blocks;
  RemoteSelection out;
  if (remote_count == 0 || top_r == 0) {
    out.usable_offsets.assign(static_cast<std::size_t>(tiles) + 1, 0);
    return out;
  }

  const Scratch<std::int32_t> d_remote(remote, stream);
  const Scratch<float> tile_q(static_cast<std::size_t>(tiles * sq.head_dim), stream);
  const Scratch<float> running(static_cast<std::size_t>(remote_count), stream);
  const std::int64_t chunk = opt.causal ? std::clamp<std::int64_t>(kChunkValues / remote_count, 1, tiles) : 1;
  const Scratch<float> rows(opt.causal ? static_cast<std::size_t>(chunk * remote_count) : 0, stream);
  const std::int64_t out_rows = opt.causal ? tiles : 1;
  const Scratch<std::int32_t> best(static_cast<std::size_t>(out_rows * top_r), stream);
  const Scratch<std::int32_t> counts(static_cast<std::size_t>(out_rows), stream);

  RemoteArgs a{};
  a.L = detail::layout_args(L, opt);
  a.coarse = {p.coarse.mean, p.coarse.min, p.coarse.max};
  a.tile_q = tile_q.get();
  a.remote = d_remote.get();
  a.remote_count = remote_count;
  a.head_dim = sq.head_dim;
  a.top_r = static_cast<int>(top_r);
  a.bound = opt.score == SelectScore::kBound;
  detail::launch_tile_queries(a.L, sq, tiles, tile_q.get(), stream);
  fill_kernel<<<static_cast<unsigned>((remote_count + kThreads - 1) / kThreads), kThreads, 0, stream>>>(
      running.get(), remote_count, -INFINITY);
  RINGCAST_CUDA_CHECK_LAUNCH();
  if (opt.causal) {
    for (std::int64_t t = 0; t < tiles; t += chunk) {
      const std::int64_t t_end = std::min(t + chunk, tiles);
      running_max(a, t, t_end, running.get(), rows.get(), stream);
      remote_topk(a, t, t_end - t, rows.get(), best.get(), counts.get(), stream);
    }
  } else {
    running_max(a, 0, tiles, running.get(), nullptr, stream);
    remote_topk(a, 0, 1, running.get(), best.get(), counts.get(), stream);
  }
  std::vector<std::int32_t> ids, id_counts;
  best.download(ids);
  counts.download(id_counts);
  RINGCAST_CUDA_CHECK(cudaStreamSynchronize(stream));

  if (!opt.causal) {  // the R best are fetched, and every tile uses them all
    out.fetch.assign(ids.begin(), ids.begin() + id_counts[0]);
    std::vector<std::int64_t> sorted = out.fetch;
    std::sort(sorted.begin(), sorted.end());
    for (std::int64_t t = 0; t < tiles; ++t) {
      out.usable.insert(out.usable.end(), sorted.begin(), sorted.end());
      out.usable_offsets.push_back(static_cast<std::int64_t>(out.usable.size()));
    }
    return out;
  }
  // Causal admission: tile order, within a tile best first, up to remote_cap fetched blocks; a tile
  // keeps the blocks of its top-R that made it into the fetch list.
  for (std::int64_t t = 0; t < tiles; ++t) {
    const std::size_t tile_begin = out.usable.size();
    for (std::int64_t r = 0; r < id_counts[t]; ++r) {
      const std::int64_t block = ids[t * top_r + r];
      bool fetched = std::find(out.fetch.begin(), out.fetch.end(), block) != out.fetch.end();
      if (!fetched && static_cast<int>(out.fetch.size()) < opt.remote_cap) {
        out.fetch.push_back(block);
        fetched = true;
      }
      if (fetched) out.usable.push_back(block);
    }
    std::sort(out.usable.begin() + static_cast<std::ptrdiff_t>(tile_begin), out.usable.end());
    out.usable_offsets.push_back(static_cast<std::int64_t>(out.usable.size()));
  }
  return out;
}

}  // namespace ringcast::kernels::cuda
