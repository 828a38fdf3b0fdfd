// CPU surrogate-cluster operations (cluster_ops.hpp). Every sum runs in a fixed order (ascending
// members, rows, heads, clusters) and no loop is contracted into fused multiply-adds, so the CUDA
// backend, written in the same order, matches these values bitwise where its header says so.
#include "cluster_ops_cpu.hpp"

#include <algorithm>
#include <cmath>
#include <limits>

namespace ringcast::kernels::cpu {

void page_key_bounds(const PageBoundsParams& p) {
  const int d = p.head_dim;
#pragma omp parallel for schedule(static)
  for (std::int64_t page = 0; page < p.pages; ++page) {
    const std::int32_t count = p.counts[page];
    float* mn = p.key_min + page * d;
    float* mx = p.key_max + page * d;
    std::fill(mn, mn + d, count > 0 ? std::numeric_limits<float>::infinity() : 0.f);
    std::fill(mx, mx + d, count > 0 ? -std::numeric_limits<float>::infinity() : 0.f);
    for (std::int32_t s = 0; s < count; ++s) {
      const float* k = p.keys + (page * p.page_size + s) * d;
      for (int e = 0; e < d; ++e) {
        mn[e] = std::min(mn[e], k[e]);
        mx[e] = std::max(mx[e], k[e]);
      }
    }
  }
}

void cluster_blocks(const ClusterBlockParams& p) {
  const int d = p.head_dim, cp = p.coarse_pages;
#pragma omp parallel for schedule(static)
  for (std::int64_t l = 0; l < p.blocks; ++l) {
    float* km = p.block_key_mean + l * d;
    float* vm = p.block_value_mean + l * d;
    float* mn = p.block_key_min + l * d;
    float* mx = p.block_key_max + l * d;
    std::fill(km, km + d, 0.f);
    std::fill(vm, vm + d, 0.f);
    std::int32_t total = 0;
    for (std::int64_t cl = l * cp; cl < (l + 1) * cp; ++cl) {
      const std::int32_t count = p.counts[cl];
      if (count == 0) continue;
      const float* ks = p.key_mean + cl * d;
      const float* vs = p.value_mean + cl * d;
      const float* cmn = p.key_min + cl * d;
      const float* cmx = p.key_max + cl * d;
      for (int e = 0; e < d; ++e) {
        km[e] += count * ks[e];
        vm[e] += count * vs[e];
        mn[e] = total == 0 ? cmn[e] : std::min(mn[e], cmn[e]);
        mx[e] = total == 0 ? cmx[e] : std::max(mx[e], cmx[e]);
      }
      total += count;
    }
    if (total == 0) {
      std::fill(mn, mn + d, 0.f);
      std::fill(mx, mx + d, 0.f);
    }
    const float inv = total > 0 ? 1.f / static_cast<float>(total) : 0.f;
    for (int e = 0; e < d; ++e) {
      km[e] *= inv;
      vm[e] *= inv;
    }
  }
}

void cluster_blocks_backward(const ClusterBlockBackwardParams& p) {
  const int d = p.head_dim, cp = p.coarse_pages;
#pragma omp parallel for schedule(static)
  for (std::int64_t l = 0; l < p.blocks; ++l) {
    std::int32_t total = 0;
    for (std::int64_t cl = l * cp; cl < (l + 1) * cp; ++cl) total += p.counts[cl];
    for (std::int64_t cl = l * cp; cl < (l + 1) * cp && total > 0; ++cl) {
      const float w = static_cast<float>(p.counts[cl]) / static_cast<float>(total);
      for (int e = 0; e < d; ++e) {
        p.d_key_mean[cl * d + e] += w * p.d_block_key_mean[l * d + e];
        p.d_value_mean[cl * d + e] += w * p.d_block_value_mean[l * d + e];
      }
    }
  }
}

void unit_queries(const UnitQueryParams& p) {
  const int d = p.head_dim, group = p.heads / p.kv_heads;
  const std::int64_t units = (p.rows + p.unit_rows - 1) / p.unit_rows;
#pragma omp parallel for schedule(static)
  for (std::int64_t u = 0; u < units; ++u) {
    const std::int64_t r0 = u * p.unit_rows, r1 = std::min(p.rows, r0 + p.unit_rows);
    float* out = p.out + u * d;
    std::fill(out, out + d, 0.f);
    for (std::int64_t r = r0; r < r1; ++r)
      for (int h = p.kv_head * group; h < (p.kv_head + 1) * group; ++h) {
        const float* q = p.q + (std::int64_t{p.order[r]} * p.heads + h) * d;
        for (int c = 0; c < d; ++c) out[c] += q[c];
      }
    const float inv = 1.f / static_cast<float>(r1 - r0);
    for (int c = 0; c < d; ++c) out[c] *= inv;
  }
}

namespace {

// Cluster cl of (b, g): its members and its A_k column.
struct Cluster {
  const std::int32_t* members;
  std::int32_t count;
  const float* a;  // A_k of (b, g): [seq, clusters]
  std::int64_t slot;  // g * B * clusters + b * clusters + cl
};
Cluster cluster(const ClusterMembers& m, const float* a_k, int b, int g, int cl) {
  const std::int64_t unit = std::int64_t{b} * m.kv_heads + g;
  return {m.members + (unit * m.clusters + cl) * m.page_size, m.counts[unit * m.clusters + cl],
          a_k + unit * m.seq * m.clusters, (std::int64_t{g} * m.batch + b) * m.clusters + cl};
}

}  // namespace

void member_lse(const MemberLseParams& p) {
  const ClusterMembers& m = p.m;
  const int c = m.clusters;
#pragma omp parallel for collapse(3) schedule(static)
  for (int b = 0; b < m.batch; ++b)
    for (int g = 0; g < m.kv_heads; ++g)
      for (int cl = 0; cl < c; ++cl) {
        const Cluster x = cluster(m, p.a_k, b, g, cl);
        float mx = -std::numeric_limits<float>::infinity();
        for (std::int32_t s = 0; s < x.count; ++s) mx = std::max(mx, x.a[std::int64_t{x.members[s]} * c + cl]);
        if (x.count == 0) {
          p.lse[x.slot] = mx;
          continue;
        }
        float sum = 0.f;
        for (std::int32_t s = 0; s < x.count; ++s) sum += std::exp(x.a[std::int64_t{x.members[s]} * c + cl] - mx);
        p.lse[x.slot] = mx + std::log(sum);
      }
}

void member_lse_merge_backward(const MemberLseMergeBackwardParams& p) {
  const ClusterMembers& m = p.m;
  const int c = m.clusters, d = p.head_dim;
#pragma omp parallel for collapse(2) schedule(static)
  for (int b = 0; b < m.batch; ++b)
    for (int g = 0; g < m.kv_heads; ++g)
      for (int cl = 0; cl < c; ++cl) {  // clusters of (b, g) share A_k rows: one thread adds them all
        const Cluster x = cluster(m, p.a_k, b, g, cl);
        if (x.count == 0) continue;
        const float lse_r = p.lse[x.slot];
        const float alpha = std::exp(lse_r - p.merged_lse[x.slot]);
        const std::int64_t row = (std::int64_t{g} * p.summary_rows + std::int64_t{b} * c + cl) * d;
        const float* r_local = p.local_value + row;
        const float* r_global = p.merged_value + row;
        const float* dr = p.d_merged_value + row;
        float* d_local = p.d_local_value + row;
        float d_lse = 0.f;
        for (int e = 0; e < d; ++e) {
          d_local[e] = alpha * dr[e];
          d_lse += alpha * (r_local[e] - r_global[e]) * dr[e];
        }
        float* da = p.d_a_k + (x.a - p.a_k);
        for (std::int32_t s = 0; s < x.count; ++s) {
          const std::int64_t at = std::int64_t{x.members[s]} * c + cl;
          da[at] += std::exp(x.a[at] - lse_r) * d_lse;
        }
      }
}

}  // namespace ringcast::kernels::cpu
