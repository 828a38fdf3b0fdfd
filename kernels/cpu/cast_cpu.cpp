// CPU CAST building blocks (cast.hpp). The products over all tokens (affinities, the mixing's
// W·R_inter and their gradients) are BLAS calls on a head's rows in place (leading dimension
// heads * d); per-membership work is plain loops. Work items that write gradients shared by the
// heads of a group, or by the clusters a token belongs to, are one (b, KV head), so there are no races.
#include "cpu/selection_cpu.hpp"
#include "cpu/tile_math.hpp"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <vector>

namespace ringcast::kernels::cpu {
namespace {

// Addressing of one call's tensors (see the layouts in cast.hpp).
struct CastIndex {
  const CastShape& s;

  std::int64_t n() const { return s.seq; }
  int c() const { return s.clusters; }
  int d() const { return s.head_dim; }
  std::int64_t q_ld() const { return std::int64_t{s.heads} * s.head_dim; }
  std::int64_t kv_ld() const { return std::int64_t{s.kv_heads} * s.head_dim; }
  std::int64_t q_row(std::int64_t b, std::int64_t i, int h) const { return ((b * s.seq + i) * s.heads + h) * s.head_dim; }
  std::int64_t kv_row(std::int64_t b, std::int64_t i, int hk) const {
    return ((b * s.seq + i) * s.kv_heads + hk) * s.head_dim;
  }
  std::int64_t a_q(std::int64_t b, int h) const { return (b * s.heads + h) * s.seq * s.clusters; }
  std::int64_t a_k(std::int64_t b, int hk) const { return (b * s.kv_heads + hk) * s.seq * s.clusters; }
  std::int64_t surrogates(int hk) const { return std::int64_t{hk} * s.clusters * s.head_dim; }
  // Index of (b, hk, cl) in counts, and of its first slot in members.
  std::int64_t cluster(std::int64_t b, int hk, int cl) const { return (b * s.kv_heads + hk) * s.clusters + cl; }
  std::int64_t member(std::int64_t b, int hk, int cl) const { return cluster(b, hk, cl) * s.page_size; }
  std::int64_t gathered_q_row(std::int64_t b, int cl, int slot, int h) const {
    return ((b * s.member_rows() + std::int64_t{cl} * s.page_size + slot) * s.heads + h) * s.head_dim;
  }
  std::int64_t page_row(std::int64_t b, int hk, int cl, int slot) const {
    return ((std::int64_t{hk} * s.batch + b) * s.clusters + cl) * s.page_size * s.head_dim +
           std::int64_t{slot} * s.head_dim;
  }
  // First of the c summary rows of (b, hk).
  std::int64_t summary(std::int64_t b, int hk) const {
    return (hk * s.summary_rows() + b * s.clusters) * s.head_dim;
  }
};

void softmax_row(const float* a, int c, float* w) {
  const float m = *std::max_element(a, a + c);
  float sum = 0.0f;
  for (int i = 0; i < c; ++i) {
    w[i] = std::exp(a[i] - m);
    sum += w[i];
  }
  const float inv = 1.0f / sum;
  for (int i = 0; i < c; ++i) w[i] *= inv;
}

void softmax_rows(const float* a, std::int64_t n, int c, float* w) {
  for (std::int64_t i = 0; i < n; ++i) softmax_row(a + i * c, c, w + i * c);
}

// Softmax over a cluster's members of A_k[member, cl], into pi[0, count).
void member_softmax(const float* a_k, const std::int32_t* mem, int count, int c, int cl, float* pi) {
  float m = -std::numeric_limits<float>::infinity();
  for (int t = 0; t < count; ++t) m = std::max(m, a_k[std::int64_t{mem[t]} * c + cl]);
  float sum = 0.0f;
  for (int t = 0; t < count; ++t) {
    pi[t] = std::exp(a_k[std::int64_t{mem[t]} * c + cl] - m);
    sum += pi[t];
  }
  for (int t = 0; t < count; ++t) pi[t] /= sum;
}

// A_g [n, c] of (b, hk): mean of the group's softmax_c(A_q) plus softmax_c(A_k).
void assignment_affinity(const CastIndex& ix, const float* a_q, const float* a_k, std::int64_t b, int hk,
                         float* ag, float* row) {
  const int c = ix.c();
  const int g = ix.s.group();
  softmax_rows(a_k + ix.a_k(b, hk), ix.n(), c, ag);
  const float inv_g = 1.0f / static_cast<float>(g);
  for (int hq = hk * g; hq < (hk + 1) * g; ++hq) {
    const float* a = a_q + ix.a_q(b, hq);
    for (std::int64_t j = 0; j < ix.n(); ++j) {
      softmax_row(a + j * c, c, row);
      for (int cl = 0; cl < c; ++cl) ag[j * c + cl] += inv_g * row[cl];
    }
  }
}

}  // namespace

void cast_affinities(const CastAffinityParams& p) {
  use_single_threaded_blas();
  const CastIndex ix{p.shape};
  const int n = static_cast<int>(ix.n());
#pragma omp parallel for collapse(2) schedule(static)
  for (int b = 0; b < p.shape.batch; ++b) {
    for (int h = 0; h < p.shape.heads; ++h) {
      gemm(false, true, n, ix.c(), ix.d(), 1.0f, p.q + ix.q_row(b, 0, h), ix.q_ld(),
           p.surrogates + ix.surrogates(h / p.shape.group()), ix.d(), 0.0f, p.a_q + ix.a_q(b, h), ix.c());
    }
  }
#pragma omp parallel for collapse(2) schedule(static)
  for (int b = 0; b < p.shape.batch; ++b) {
    for (int hk = 0; hk < p.shape.kv_heads; ++hk) {
      gemm(false, true, n, ix.c(), ix.d(), 1.0f, p.k + ix.kv_row(b, 0, hk), ix.kv_ld(), p.surrogates + ix.surrogates(hk),
           ix.d(), 0.0f, p.a_k + ix.a_k(b, hk), ix.c());
    }
  }
}

void cast_affinities_backward(const CastAffinityBackwardParams& p) {
  use_single_threaded_blas();
  const CastIndex ix{p.shape};
  const int n = static_cast<int>(ix.n());
  const int g = p.shape.group();
  // dQ = dA_q S, dK = dA_k S.
#pragma omp parallel for collapse(2) schedule(static)
  for (int b = 0; b < p.shape.batch; ++b) {
    for (int h = 0; h < p.shape.heads; ++h) {
      gemm(false, false, n, ix.d(), ix.c(), 1.0f, p.d_a_q + ix.a_q(b, h), ix.c(), p.surrogates + ix.surrogates(h / g),
           ix.d(), 1.0f, p.d_q + ix.q_row(b, 0, h), ix.q_ld());
    }
  }
#pragma omp parallel for collapse(2) schedule(static)
  for (int b = 0; b < p.shape.batch; ++b) {
    for (int hk = 0; hk < p.shape.kv_heads; ++hk) {
      gemm(false, false, n, ix.d(), ix.c(), 1.0f, p.d_a_k + ix.a_k(b, hk), ix.c(), p.surrogates + ix.surrogates(hk),
           ix.d(), 1.0f, p.d_k + ix.kv_row(b, 0, hk), ix.kv_ld());
    }
  }
  // dS = Σ dA_qᵀ Q + dA_kᵀ K over the batch and the group's heads.
#pragma omp parallel for schedule(static)
  for (int hk = 0; hk < p.shape.kv_heads; ++hk) {
    float* ds = p.d_surrogates + ix.surrogates(hk);
    for (int b = 0; b < p.shape.batch; ++b) {
      for (int h = hk * g; h < (hk + 1) * g; ++h) {
        gemm(true, false, ix.c(), ix.d(), n, 1.0f, p.d_a_q + ix.a_q(b, h), ix.c(), p.q + ix.q_row(b, 0, h), ix.q_ld(),
             1.0f, ds, ix.d());
      }
      gemm(true, false, ix.c(), ix.d(), n, 1.0f, p.d_a_k + ix.a_k(b, hk), ix.c(), p.k + ix.kv_row(b, 0, hk),
           ix.kv_ld(), 1.0f, ds, ix.d());
    }
  }
}

void cast_assign(const CastAssignParams& p) {
  const CastIndex ix{p.shape};
  const std::int64_t n = ix.n();
  const int c = ix.c();
  const int ps = p.shape.page_size;
#pragma omp parallel
  {
    std::vector<float> ag(n * c);
    std::vector<float> row(c);
    std::vector<std::int32_t> order(n);
    std::vector<int> cluster_order(c);
    std::vector<std::int32_t> assigned(n);
    std::vector<float> best(n);
#pragma omp for collapse(2) schedule(dynamic)
    for (int b = 0; b < p.shape.batch; ++b) {
      for (int hk = 0; hk < p.shape.kv_heads; ++hk) {
        assignment_affinity(ix, p.a_q, p.a_k, b, hk, ag.data(), row.data());
        std::int32_t* counts = p.counts + ix.cluster(b, hk, 0);
        std::int32_t* members = p.members + ix.member(b, hk, 0);
        std::fill(members, members + std::int64_t{c} * ps, -1);
        std::fill(counts, counts + c, 0);
        if (p.rule == CastAssignment::kTopK) {
          const std::int64_t take = std::min<std::int64_t>(ps, n);
          for (int cl = 0; cl < c; ++cl) {
            std::iota(order.begin(), order.end(), 0);
            std::partial_sort(order.begin(), order.begin() + take, order.end(), [&](std::int32_t i, std::int32_t j) {
              const float ai = ag[i * c + cl];
              const float aj = ag[j * c + cl];
              return ai > aj || (ai == aj && i < j);
            });
            std::sort(order.begin(), order.begin() + take);
            std::copy(order.begin(), order.begin() + take, members + std::int64_t{cl} * ps);
            counts[cl] = static_cast<std::int32_t>(take);
          }
        } else {
          // Greedy: the most confident tokens choose first, each taking its best cluster with room.
          for (std::int64_t j = 0; j < n; ++j) best[j] = *std::max_element(&ag[j * c], &ag[j * c] + c);
          std::iota(order.begin(), order.end(), 0);
          std::stable_sort(order.begin(), order.end(), [&](std::int32_t i, std::int32_t j) { return best[i] > best[j]; });
          std::fill(assigned.begin(), assigned.end(), -1);
          for (const std::int32_t j : order) {
            const float* a = &ag[j * c];
            std::iota(cluster_order.begin(), cluster_order.end(), 0);
            std::stable_sort(cluster_order.begin(), cluster_order.end(), [&](int x, int y) { return a[x] > a[y]; });
            for (const int cl : cluster_order) {
              if (counts[cl] < ps) {
                ++counts[cl];
                assigned[j] = cl;
                break;
              }
            }
          }
          std::fill(counts, counts + c, 0);
          for (std::int64_t j = 0; j < n; ++j) {
            if (assigned[j] >= 0) members[std::int64_t{assigned[j]} * ps + counts[assigned[j]]++] = static_cast<std::int32_t>(j);
          }
        }
      }
    }
  }
}

void cast_gather(const CastGatherParams& p) {
  const CastIndex ix{p.shape};
  const int d = ix.d();
  const int g = p.shape.group();
#pragma omp parallel for collapse(2) schedule(static)
  for (int b = 0; b < p.shape.batch; ++b) {
    for (int hk = 0; hk < p.shape.kv_heads; ++hk) {
      for (int cl = 0; cl < ix.c(); ++cl) {
        const std::int32_t* mem = p.members + ix.member(b, hk, cl);
        const int count = p.counts[ix.cluster(b, hk, cl)];
        for (int slot = 0; slot < p.shape.page_size; ++slot) {
          float* kd = p.k_pages + ix.page_row(b, hk, cl, slot);
          float* vd = p.v_pages + ix.page_row(b, hk, cl, slot);
          if (slot >= count) {
            std::fill(kd, kd + d, 0.0f);
            std::fill(vd, vd + d, 0.0f);
            for (int h = hk * g; h < (hk + 1) * g; ++h) {
              float* qd = p.q_gathered + ix.gathered_q_row(b, cl, slot, h);
              std::fill(qd, qd + d, 0.0f);
            }
            continue;
          }
          const std::int64_t j = mem[slot];
          std::copy_n(p.k + ix.kv_row(b, j, hk), d, kd);
          std::copy_n(p.v + ix.kv_row(b, j, hk), d, vd);
          for (int h = hk * g; h < (hk + 1) * g; ++h) {
            std::copy_n(p.q + ix.q_row(b, j, h), d, p.q_gathered + ix.gathered_q_row(b, cl, slot, h));
          }
        }
      }
    }
  }
}

void cast_gather_backward(const CastGatherBackwardParams& p) {
  const CastIndex ix{p.shape};
  const int d = ix.d();
  const int g = p.shape.group();
  auto add = [d](float* dst, const float* src) {
#pragma omp simd
    for (int i = 0; i < d; ++i) dst[i] += src[i];
  };
#pragma omp parallel for collapse(2) schedule(static)
  for (int b = 0; b < p.shape.batch; ++b) {
    for (int hk = 0; hk < p.shape.kv_heads; ++hk) {
      for (int cl = 0; cl < ix.c(); ++cl) {
        const std::int32_t* mem = p.members + ix.member(b, hk, cl);
        const int count = p.counts[ix.cluster(b, hk, cl)];
        for (int slot = 0; slot < count; ++slot) {
          const std::int64_t j = mem[slot];
          add(p.d_k + ix.kv_row(b, j, hk), p.d_k_pages + ix.page_row(b, hk, cl, slot));
          add(p.d_v + ix.kv_row(b, j, hk), p.d_v_pages + ix.page_row(b, hk, cl, slot));
          for (int h = hk * g; h < (hk + 1) * g; ++h) {
            add(p.d_q + ix.q_row(b, j, h), p.d_q_gathered + ix.gathered_q_row(b, cl, slot, h));
          }
        }
      }
    }
  }
}

void cast_summaries(const CastSummaryParams& p) {
  const CastIndex ix{p.shape};
  const int d = ix.d();
  const int c = ix.c();
#pragma omp parallel
  {
    std::vector<float> pi(p.shape.page_size);
#pragma omp for collapse(2) schedule(static)
    for (int b = 0; b < p.shape.batch; ++b) {
      for (int hk = 0; hk < p.shape.kv_heads; ++hk) {
        const float* a_k = p.a_k + ix.a_k(b, hk);
        for (int cl = 0; cl < c; ++cl) {
          const std::int32_t* mem = p.members + ix.member(b, hk, cl);
          const int count = p.counts[ix.cluster(b, hk, cl)];
          float* ks = p.key_summary + ix.summary(b, hk) + std::int64_t{cl} * d;
          float* vs = p.value_summary + ix.summary(b, hk) + std::int64_t{cl} * d;
          std::fill(ks, ks + d, 0.0f);
          std::fill(vs, vs + d, 0.0f);
          member_softmax(a_k, mem, count, c, cl, pi.data());
          for (int t = 0; t < count; ++t) {
            const float* k = p.k + ix.kv_row(b, mem[t], hk);
            const float* v = p.v + ix.kv_row(b, mem[t], hk);
#pragma omp simd
            for (int i = 0; i < d; ++i) {
              ks[i] += pi[t] * k[i];
              vs[i] += pi[t] * v[i];
            }
          }
        }
      }
    }
  }
  const std::int64_t used = std::int64_t{p.shape.batch} * c * d;
  const std::int64_t rows = p.shape.summary_rows() * d;
  for (int hk = 0; hk < p.shape.kv_heads; ++hk) {
    std::fill(p.key_summary + hk * rows + used, p.key_summary + (hk + 1) * rows, 0.0f);
    std::fill(p.value_summary + hk * rows + used, p.value_summary + (hk + 1) * rows, 0.0f);
  }
}

void cast_summaries_backward(const CastSummaryBackwardParams& p) {
  const CastIndex ix{p.shape};
  const int d = ix.d();
  const int c = ix.c();
#pragma omp parallel
  {
    std::vector<float> pi(p.shape.page_size);
    std::vector<float> dpi(p.shape.page_size);
#pragma omp for collapse(2) schedule(static)
    for (int b = 0; b < p.shape.batch; ++b) {
      for (int hk = 0; hk < p.shape.kv_heads; ++hk) {
        const float* a_k = p.a_k + ix.a_k(b, hk);
        float* d_a_k = p.d_a_k + ix.a_k(b, hk);
        for (int cl = 0; cl < c; ++cl) {
          const std::int32_t* mem = p.members + ix.member(b, hk, cl);
          const int count = p.counts[ix.cluster(b, hk, cl)];
          const float* dks = p.d_key_summary + ix.summary(b, hk) + std::int64_t{cl} * d;
          const float* dvs = p.d_value_summary + ix.summary(b, hk) + std::int64_t{cl} * d;
          member_softmax(a_k, mem, count, c, cl, pi.data());
          float pi_dpi = 0.0f;
          for (int t = 0; t < count; ++t) {
            const std::int64_t row = ix.kv_row(b, mem[t], hk);
            const float* k = p.k + row;
            const float* v = p.v + row;
            float* dk = p.d_k + row;
            float* dv = p.d_v + row;
            float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
            for (int i = 0; i < d; ++i) {
              dot += dks[i] * k[i] + dvs[i] * v[i];
              dk[i] += pi[t] * dks[i];
              dv[i] += pi[t] * dvs[i];
            }
            dpi[t] = dot;
            pi_dpi += pi[t] * dot;
          }
          for (int t = 0; t < count; ++t) d_a_k[std::int64_t{mem[t]} * c + cl] += pi[t] * (dpi[t] - pi_dpi);
        }
      }
    }
  }
}

void cast_mix(const CastMixParams& p) {
  use_single_threaded_blas();
  const CastIndex ix{p.shape};
  const std::int64_t n = ix.n();
  const int d = ix.d();
  const int c = ix.c();
  const int g = p.shape.group();
#pragma omp parallel
  {
    std::vector<float> w(n * c);
#pragma omp for collapse(2) schedule(static)
    for (int b = 0; b < p.shape.batch; ++b) {
      for (int h = 0; h < p.shape.heads; ++h) {
        const int hk = h / g;
        const float* r = p.value_summary + ix.summary(b, hk);
        float* o = p.o + ix.q_row(b, 0, h);
        softmax_rows(p.a_q + ix.a_q(b, h), n, c, w.data());
        // Every token first mixes all summaries; members then swap R_inter[cl] for their intra row.
        gemm(false, false, static_cast<int>(n), d, c, 1.0f, w.data(), c, r, d, 0.0f, o, ix.q_ld());
        for (int cl = 0; cl < c; ++cl) {
          const std::int32_t* mem = p.members + ix.member(b, hk, cl);
          const int count = p.counts[ix.cluster(b, hk, cl)];
          const float* rc = r + std::int64_t{cl} * d;
          for (int slot = 0; slot < count; ++slot) {
            const std::int64_t i = mem[slot];
            const float wi = w[i * c + cl];
            const float* x = p.intra + ix.gathered_q_row(b, cl, slot, h);
            float* oi = o + i * ix.q_ld();
#pragma omp simd
            for (int e = 0; e < d; ++e) oi[e] += wi * (x[e] - rc[e]);
          }
        }
      }
    }
  }
}

void cast_mix_backward(const CastMixBackwardParams& p) {
  use_single_threaded_blas();
  const CastIndex ix{p.shape};
  const std::int64_t n = ix.n();
  const int d = ix.d();
  const int c = ix.c();
  const int g = p.shape.group();
#pragma omp parallel
  {
    std::vector<float> w(n * c);
    std::vector<float> dw(n * c);
#pragma omp for collapse(2) schedule(static)
    for (int b = 0; b < p.shape.batch; ++b) {
      for (int hk = 0; hk < p.shape.kv_heads; ++hk) {
        const float* r = p.value_summary + ix.summary(b, hk);
        float* dr = p.d_value_summary + ix.summary(b, hk);
        for (int h = hk * g; h < (hk + 1) * g; ++h) {
          const float* d_o = p.d_o + ix.q_row(b, 0, h);
          softmax_rows(p.a_q + ix.a_q(b, h), n, c, w.data());
          // As in the forward: the all-summaries product, then the members' corrections.
          gemm(false, true, static_cast<int>(n), c, d, 1.0f, d_o, ix.q_ld(), r, d, 0.0f, dw.data(), c);
          gemm(true, false, c, d, static_cast<int>(n), 1.0f, w.data(), c, d_o, ix.q_ld(), 1.0f, dr, d);
          for (int cl = 0; cl < c; ++cl) {
            const std::int32_t* mem = p.members + ix.member(b, hk, cl);
            const int count = p.counts[ix.cluster(b, hk, cl)];
            const float* rc = r + std::int64_t{cl} * d;
            float* drc = dr + std::int64_t{cl} * d;
            for (int slot = 0; slot < count; ++slot) {
              const std::int64_t i = mem[slot];
              const float wi = w[i * c + cl];
              const float* x = p.intra + ix.gathered_q_row(b, cl, slot, h);
              float* dx = p.d_intra + ix.gathered_q_row(b, cl, slot, h);
              const float* doi = d_o + i * ix.q_ld();
              float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
              for (int e = 0; e < d; ++e) {
                dot += doi[e] * (x[e] - rc[e]);
                dx[e] += wi * doi[e];
                drc[e] -= wi * doi[e];
              }
              dw[i * c + cl] += dot;
            }
          }
          // Softmax backward: dA = w ⊙ (dw - <w, dw>).
          float* da = p.d_a_q + ix.a_q(b, h);
          for (std::int64_t i = 0; i < n; ++i) {
            const float* wi = &w[i * c];
            const float* dwi = &dw[i * c];
            float dot = 0.0f;
            for (int cl = 0; cl < c; ++cl) dot += wi[cl] * dwi[cl];
            for (int cl = 0; cl < c; ++cl) da[i * c + cl] += wi[cl] * (dwi[cl] - dot);
          }
        }
      }
    }
  }
}

}  // namespace ringcast::kernels::cpu
