// float64 attention oracle on block-table semantics, and the random inputs and error measure the
// tests use with it. Row by row: list the visible keys, then softmax / its gradient in closed form.
#include "attention_reference.hpp"

#include <ringcast/error.hpp>

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>

namespace ringcast::test {
namespace {

using kernels::AttentionShape;
using kernels::BlockEntry;
using kernels::HostBlockTable;
using kernels::KeyMeta;
using kernels::kQueryTile;

bool has_row(const std::uint64_t (&mask)[2], int r) { return (mask[r / 64] >> (r % 64)) & 1u; }

// A key that row (b, i, h) sees: its row in the flattened K / V pool and its additive bias.
struct VisibleKey {
  std::int64_t key;
  double bias;
};

std::vector<VisibleKey> visible_keys(const ReferenceProblem& pr, std::int64_t b, std::int64_t i, int h) {
  const AttentionShape& s = pr.shape;
  const HostBlockTable& t = *pr.table;
  const std::int64_t tile = i / kQueryTile;
  const int r = static_cast<int>(i % kQueryTile);
  const int kvh = h / (s.heads / s.kv_heads);
  const std::int64_t unit = (b * s.num_tiles() + tile) * s.kv_heads + kvh;
  std::vector<VisibleKey> keys;
  for (std::int64_t idx = t.offsets[unit]; idx < t.offsets[unit + 1]; ++idx) {
    const BlockEntry& e = t.entries[idx];
    if (!has_row(e.row_mask, r)) continue;
    const std::int64_t page_key0 = (kvh * s.num_pages + e.page) * s.page_size;
    for (int j = 0; j < e.key_count; ++j) {
      if ((e.flags & kernels::kEntryCausal) && std::int64_t{e.key_pos0} + j > pr.q_pos[i]) continue;
      if (j < 64 && !((e.key_mask >> j) & 1u)) continue;
      double bias = e.bias;
      if (e.flags & kernels::kEntryKeyBias) bias += pr.key_bias[page_key0 + j];
      if (e.key_meta >= 0) {
        const KeyMeta& m = t.key_meta[e.key_meta + j];
        if (!has_row(m.row_mask, r)) continue;
        bias += m.bias;
      }
      keys.push_back({page_key0 + j, bias});
    }
  }
  return keys;
}

void check_problem(const ReferenceProblem& pr) {
  const AttentionShape& s = pr.shape;
  const std::size_t q_size = static_cast<std::size_t>(s.batch * s.seq_q * s.heads * s.head_dim);
  const std::size_t kv_size = static_cast<std::size_t>(s.kv_heads * s.num_pages * s.page_size * s.head_dim);
  RINGCAST_CHECK(pr.table && pr.table->offsets.size() == static_cast<std::size_t>(s.num_units()) + 1,
                 "reference attention: the table does not match the shape");
  RINGCAST_CHECK(pr.q.size() == q_size && pr.k.size() == kv_size && pr.v.size() == kv_size &&
                     pr.q_pos.size() == static_cast<std::size_t>(s.seq_q),
                 "reference attention: input sizes do not match the shape");
  const bool reads_key_bias = std::any_of(pr.table->entries.begin(), pr.table->entries.end(),
                                          [](const BlockEntry& e) { return e.flags & kernels::kEntryKeyBias; });
  RINGCAST_CHECK(!reads_key_bias || pr.key_bias.size() == kv_size / static_cast<std::size_t>(s.head_dim),
                 "reference attention: kEntryKeyBias entries need key_bias [kv_heads, num_pages, page_size]");
}

double dot(const double* a, const double* b, int n) {
  double sum = 0.0;
  for (int c = 0; c < n; ++c) sum += a[c] * b[c];
  return sum;
}

// Softmax weights of one row over its visible keys; returns the LSE (-inf when there are none).
double row_softmax(const ReferenceProblem& pr, const double* q_row, const std::vector<VisibleKey>& keys,
                   std::vector<double>& p) {
  const int d = pr.shape.head_dim;
  p.resize(keys.size());
  double mx = -std::numeric_limits<double>::infinity();
  for (std::size_t j = 0; j < keys.size(); ++j) {
    p[j] = pr.softmax_scale * dot(q_row, pr.k.data() + keys[j].key * d, d) + keys[j].bias;
    mx = std::max(mx, p[j]);
  }
  if (keys.empty()) return mx;
  double sum = 0.0;
  for (double& x : p) sum += (x = std::exp(x - mx));
  for (double& x : p) x /= sum;
  return mx + std::log(sum);
}

}  // namespace

ReferenceOutputs reference_attention_forward(const ReferenceProblem& pr) {
  check_problem(pr);
  const AttentionShape& s = pr.shape;
  const int d = s.head_dim;
  ReferenceOutputs out;
  out.o.assign(pr.q.size(), 0.0);
  out.lse.assign(static_cast<std::size_t>(s.batch * s.heads * s.seq_q), 0.0);
  std::vector<double> p;
  for (std::int64_t b = 0; b < s.batch; ++b) {
    for (std::int64_t i = 0; i < s.seq_q; ++i) {
      for (int h = 0; h < s.heads; ++h) {
        const std::int64_t row = ((b * s.seq_q + i) * s.heads + h) * d;
        const std::vector<VisibleKey> keys = visible_keys(pr, b, i, h);
        out.lse[(b * s.heads + h) * s.seq_q + i] = row_softmax(pr, pr.q.data() + row, keys, p);
        for (std::size_t j = 0; j < keys.size(); ++j) {
          const double* v = pr.v.data() + keys[j].key * d;
          for (int c = 0; c < d; ++c) out.o[row + c] += p[j] * v[c];
        }
      }
    }
  }
  return out;
}

ReferenceGradients reference_attention_backward(const ReferenceProblem& pr, std::span<const double> d_o) {
  check_problem(pr);
  RINGCAST_CHECK(d_o.size() == pr.q.size(), "reference attention: d_o size does not match the shape");
  const AttentionShape& s = pr.shape;
  const int d = s.head_dim;
  ReferenceGradients g;
  g.d_q.assign(pr.q.size(), 0.0);
  g.d_k.assign(pr.k.size(), 0.0);
  g.d_v.assign(pr.v.size(), 0.0);
  std::vector<double> p;
  std::vector<double> dp;
  for (std::int64_t b = 0; b < s.batch; ++b) {
    for (std::int64_t i = 0; i < s.seq_q; ++i) {
      for (int h = 0; h < s.heads; ++h) {
        const std::int64_t row = ((b * s.seq_q + i) * s.heads + h) * d;
        const double* q = pr.q.data() + row;
        const double* dout = d_o.data() + row;
        const std::vector<VisibleKey> keys = visible_keys(pr, b, i, h);
        row_softmax(pr, q, keys, p);
        // dP_j = dO . v_j; D = sum_j P_j dP_j (= dO . O); dS_j = P_j (dP_j - D)
        dp.resize(keys.size());
        double delta = 0.0;
        for (std::size_t j = 0; j < keys.size(); ++j) {
          dp[j] = dot(dout, pr.v.data() + keys[j].key * d, d);
          delta += p[j] * dp[j];
        }
        for (std::size_t j = 0; j < keys.size(); ++j) {
          const double ds = p[j] * (dp[j] - delta);
          const std::int64_t kr = keys[j].key * d;
          for (int c = 0; c < d; ++c) {
            g.d_q[row + c] += pr.softmax_scale * ds * pr.k[kr + c];
            g.d_k[kr + c] += pr.softmax_scale * ds * q[c];
            g.d_v[kr + c] += p[j] * dout[c];
          }
        }
      }
    }
  }
  return g;
}

std::vector<float> random_normal(std::size_t n, std::uint64_t seed, double stddev) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<double> normal(0.0, stddev);
  std::vector<float> x(n);
  for (float& v : x) v = static_cast<float>(normal(rng));
  return x;
}

std::vector<double> to_f64(std::span<const float> x) { return {x.begin(), x.end()}; }

double relative_error(std::span<const float> x, std::span<const double> ref) {
  return relative_error(to_f64(x), ref);
}

double relative_error(std::span<const double> x, std::span<const double> ref) {
  constexpr double kInf = std::numeric_limits<double>::infinity();
  if (x.size() != ref.size()) return kInf;
  double diff2 = 0.0;
  double ref2 = 0.0;
  for (std::size_t i = 0; i < x.size(); ++i) {
    const double xi = x[i];
    if (xi == ref[i]) {
      if (std::isfinite(ref[i])) ref2 += ref[i] * ref[i];
      continue;
    }
    if (!std::isfinite(xi) || !std::isfinite(ref[i])) return kInf;
    diff2 += (xi - ref[i]) * (xi - ref[i]);
    ref2 += ref[i] * ref[i];
  }
  if (diff2 == 0.0) return 0.0;
  return ref2 == 0.0 ? kInf : std::sqrt(diff2 / ref2);
}

kernels::HostBlockTable random_block_table(const AttentionShape& shape, std::span<const std::int32_t> q_pos,
                                           const RandomTableOptions& opt, std::uint64_t seed) {
  RINGCAST_CHECK(q_pos.size() == static_cast<std::size_t>(shape.seq_q) && shape.num_pages > 0,
                 "random_block_table: q_pos size or num_pages does not fit the shape");
  RINGCAST_CHECK(opt.key_mask_fraction == 0.0 || shape.page_size <= 64,
                 "random_block_table: key masks cover pages of up to 64 keys");
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<double> unit(0.0, 1.0);
  std::normal_distribution<double> normal(0.0, 1.0);
  const auto uniform_int = [&](std::int64_t lo, std::int64_t hi) {  // [lo, hi]
    return std::uniform_int_distribution<std::int64_t>(lo, hi)(rng);
  };

  HostBlockTable t;
  for (std::int64_t u = 0; u < shape.num_units(); ++u) {
    const std::int64_t tile = (u / shape.kv_heads) % shape.num_tiles();
    const int rows = kernels::tile_rows(shape, tile);
    const auto n_entries = uniform_int(opt.min_entries, opt.max_entries);
    for (std::int64_t n = 0; n < n_entries; ++n) {
      BlockEntry e{};
      for (int r = 0; r < rows; ++r) {
        if (unit(rng) < opt.row_mask_keep) e.row_mask[r / 64] |= std::uint64_t{1} << (r % 64);
      }
      e.page = static_cast<std::int32_t>(uniform_int(0, shape.num_pages - 1));
      e.key_count = unit(rng) < opt.partial_fraction ? static_cast<int>(uniform_int(1, shape.page_size - 1))
                                                     : shape.page_size;
      e.bias = static_cast<float>(opt.bias_stddev * normal(rng));
      e.key_meta = -1;
      if (unit(rng) < opt.causal_fraction) {
        // Put the diagonal inside the page for a random row of the tile, so the mask cuts.
        const std::int32_t row_pos = q_pos[tile * kQueryTile + uniform_int(0, rows - 1)];
        e.key_pos0 = static_cast<std::int32_t>(row_pos - uniform_int(0, e.key_count - 1));
        e.flags = kernels::kEntryCausal;
      }
      // Draw only for the options in use, so tables of the other options stay as they were.
      if (opt.key_mask_fraction > 0.0 && unit(rng) < opt.key_mask_fraction) {
        e.key_mask = 0;
        for (int j = 0; j < shape.page_size; ++j) {
          if (unit(rng) < 0.5) e.key_mask |= std::uint64_t{1} << j;
        }
      }
      if (opt.key_bias_fraction > 0.0 && unit(rng) < opt.key_bias_fraction) e.flags |= kernels::kEntryKeyBias;
      if (unit(rng) < opt.key_meta_fraction) {
        e.key_meta = static_cast<std::int32_t>(t.key_meta.size());
        for (int j = 0; j < shape.page_size; ++j) {
          KeyMeta m{};
          for (int r = 0; r < rows; ++r) {
            if (unit(rng) < 0.5) m.row_mask[r / 64] |= std::uint64_t{1} << (r % 64);
          }
          m.bias = static_cast<float>(normal(rng));
          t.key_meta.push_back(m);
        }
      }
      t.entries.push_back(e);
    }
    t.offsets.push_back(static_cast<std::int64_t>(t.entries.size()));
  }
  return t;
}

}  // namespace ringcast::test
