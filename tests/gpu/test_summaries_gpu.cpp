// CUDA page and coarse summaries and their backward (summaries.hpp) against float64 references and
// the CPU backend on the same bf16-valued inputs. Output pools start poisoned (NaN), padding rows
// included, so a row the kernel skips fails. Minima, maxima and counts must be exact; means within
// twice the CPU backend's own error against float64 (the same-precision naive run), floor 1e-7.
// Shapes: partial last pages and blocks, batch > 1, head dims that are not powers of two, one page.
#include <ringcast/kernels/summaries.hpp>

#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <sstream>
#include <string>
#include <vector>

#include "device_array.hpp"
#include "test_util.hpp"

namespace ringcast::test {
namespace {

using kernels::SummaryShape;

struct Pools {
  std::vector<float> key_mean, value_mean, key_min, key_max;
  std::vector<std::int32_t> count;
};

struct DevicePools {
  DeviceArray<float> key_mean, value_mean, key_min, key_max;
  DeviceArray<std::int32_t> count;
  DevicePools(std::size_t elems, std::size_t slots)
      : key_mean(elems), value_mean(elems), key_min(elems), key_max(elems), count(slots) {}
  kernels::SummaryPools view() const {
    return {key_mean.get(), value_mean.get(), key_min.get(), key_max.get(), count.get()};
  }
  Pools download() const {
    return {key_mean.download(), value_mean.download(), key_min.download(), key_max.download(), count.download()};
  }
};

// float64 summaries of the keys [k0, k1) of every (head, slot) row; zeros on padding rows.
struct Reference {
  Vec key_mean, value_mean, key_min, key_max;
  std::vector<std::int32_t> count;
};

Reference reference(const SummaryShape& s, const std::vector<float>& k, const std::vector<float>& v,
                    std::int64_t keys_per_unit, std::int64_t units, std::int64_t rows) {
  const int d = s.head_dim;
  Reference r;
  const std::size_t elems = static_cast<std::size_t>(s.kv_heads * rows * d);
  r.key_mean.assign(elems, 0.0);
  r.value_mean = r.key_min = r.key_max = r.key_mean;
  r.count.assign(static_cast<std::size_t>(s.batch * units), 0);
  for (int h = 0; h < s.kv_heads; ++h) {
    for (std::int64_t slot = 0; slot < s.batch * units; ++slot) {
      const std::int64_t b = slot / units, i0 = (slot % units) * keys_per_unit;
      const std::int64_t i1 = std::min(i0 + keys_per_unit, s.seq);
      r.count[slot] = static_cast<std::int32_t>(i1 - i0);
      for (int c = 0; c < d; ++c) {
        double km = 0, vm = 0, mn = 1e300, mx = -1e300;
        for (std::int64_t i = i0; i < i1; ++i) {
          const std::size_t at = static_cast<std::size_t>(((b * s.seq + i) * s.kv_heads + h) * d + c);
          km += k[at];
          vm += v[at];
          mn = std::min(mn, double(k[at]));
          mx = std::max(mx, double(k[at]));
        }
        const std::size_t out = static_cast<std::size_t>((h * rows + slot) * d + c);
        r.key_mean[out] = km / double(i1 - i0);
        r.value_mean[out] = vm / double(i1 - i0);
        r.key_min[out] = mn;
        r.key_max[out] = mx;
      }
    }
  }
  return r;
}

void expect_pools(const std::string& what, const Pools& gpu, const Pools& cpu, const Reference& ref) {
  EXPECT_EQ(gpu.count, ref.count) << what << ": counts";
  EXPECT_EQ(Vec(gpu.key_min.begin(), gpu.key_min.end()), ref.key_min) << what << ": key minima are not exact";
  EXPECT_EQ(Vec(gpu.key_max.begin(), gpu.key_max.end()), ref.key_max) << what << ": key maxima are not exact";
  for (const auto& [label, g, c, r] : {std::tuple{"key mean", &gpu.key_mean, &cpu.key_mean, &ref.key_mean},
                                       std::tuple{"value mean", &gpu.value_mean, &cpu.value_mean, &ref.value_mean}}) {
    const double cpu_err = relative_error(*c, *r);
    expect_close(what + " " + label + " (CPU " + std::to_string(cpu_err) + ")", *g, *r, std::max(2 * cpu_err, 1e-7));
  }
}

struct Case {
  int batch;
  std::int64_t seq;
  int kv_heads;
  int head_dim;
  int page_size;
  int coarse_pages;
};

std::string name(const Case& c) {
  std::ostringstream os;
  os << 'B' << c.batch << " n" << c.seq << " kv" << c.kv_heads << " d" << c.head_dim << " page " << c.page_size
     << " x" << c.coarse_pages;
  return os.str();
}

const Case kCases[] = {
    {2, 1000, 3, 40, 64, 4},   // partial last page and block, batch 2, d not a power of two
    {1, 4096, 2, 128, 64, 16},  // the production page and block size
    {3, 77, 1, 16, 32, 3},      // one partial block per element
    {1, 64, 2, 64, 64, 16},     // one page
};

TEST(SummariesGpu, ForwardMatchesReferenceAndCpu) {
  RINGCAST_SKIP_WITHOUT_CUDA();
  std::uint32_t seed = 11;
  for (const Case& c : kCases) {
    SummaryShape s{c.batch, c.seq, c.kv_heads, c.head_dim, c.page_size, c.coarse_pages};
    const std::size_t tokens = static_cast<std::size_t>(c.batch * c.seq * c.kv_heads * c.head_dim);
    const std::vector<float> k = bf16_values(random_floats(tokens, seed++, 2.0f));
    const std::vector<float> v = bf16_values(random_floats(tokens, seed++));
    const std::size_t page_elems = static_cast<std::size_t>(c.kv_heads * s.page_rows() * c.head_dim);
    const std::size_t block_elems = static_cast<std::size_t>(c.kv_heads * s.block_rows() * c.head_dim);
    const auto page_slots = static_cast<std::size_t>(c.batch * s.num_pages());
    const auto block_slots = static_cast<std::size_t>(c.batch * s.num_blocks());

    Pools cpu_pages{std::vector<float>(page_elems), std::vector<float>(page_elems), std::vector<float>(page_elems),
                    std::vector<float>(page_elems), std::vector<std::int32_t>(page_slots)};
    Pools cpu_blocks{std::vector<float>(block_elems), std::vector<float>(block_elems), std::vector<float>(block_elems),
                     std::vector<float>(block_elems), std::vector<std::int32_t>(block_slots)};
    const kernels::SummaryPools cp{cpu_pages.key_mean.data(), cpu_pages.value_mean.data(), cpu_pages.key_min.data(),
                                   cpu_pages.key_max.data(), cpu_pages.count.data()};
    kernels::page_summaries({s, k.data(), v.data(), cp}, {});
    kernels::coarse_summaries({s, cp.key_mean, cp.value_mean, cp.key_min, cp.key_max, cp.count,
                               {cpu_blocks.key_mean.data(), cpu_blocks.value_mean.data(), cpu_blocks.key_min.data(),
                                cpu_blocks.key_max.data(), cpu_blocks.count.data()}},
                              {});

    const DeviceArray<float> dk(k), dv(v);
    const DevicePools pages(page_elems, page_slots), blocks(block_elems, block_slots);
    const kernels::SummaryPools gp = pages.view();
    kernels::page_summaries({s, dk.get(), dv.get(), gp}, cuda_context());
    kernels::coarse_summaries({s, gp.key_mean, gp.value_mean, gp.key_min, gp.key_max, gp.count, blocks.view()},
                              cuda_context());

    const std::int64_t block_keys = std::int64_t{c.page_size} * c.coarse_pages;
    expect_pools(name(c) + " pages", pages.download(), cpu_pages,
                 reference(s, k, v, c.page_size, s.num_pages(), s.page_rows()));
    expect_pools(name(c) + " blocks", blocks.download(), cpu_blocks,
                 reference(s, k, v, block_keys, s.num_blocks(), s.block_rows()));
  }
}

TEST(SummariesGpu, BackwardAddsTheMeansGradients) {
  RINGCAST_SKIP_WITHOUT_CUDA();
  std::uint32_t seed = 101;
  for (const Case& c : kCases) {
    SummaryShape s{c.batch, c.seq, c.kv_heads, c.head_dim, c.page_size, c.coarse_pages};
    const int d = c.head_dim;
    const std::size_t tokens = static_cast<std::size_t>(c.batch * c.seq * c.kv_heads * d);
    const std::size_t page_elems = static_cast<std::size_t>(c.kv_heads * s.page_rows() * d);
    const std::size_t block_elems = static_cast<std::size_t>(c.kv_heads * s.block_rows() * d);
    const std::vector<float> d_block_k = bf16_values(random_floats(block_elems, seed++));
    const std::vector<float> d_block_v = bf16_values(random_floats(block_elems, seed++));
    const std::vector<float> d_page_k0 = random_floats(page_elems, seed++);  // added into
    const std::vector<float> d_page_v0 = random_floats(page_elems, seed++);
    const std::vector<float> d_k0 = random_floats(tokens, seed++);
    const std::vector<float> d_v0 = random_floats(tokens, seed++);

    // float64: block -> pages (weights keys(p) / keys(block)), then pages -> keys (1 / keys(p)).
    Vec ref_page_k = to_double(d_page_k0), ref_page_v = to_double(d_page_v0);
    Vec ref_k = to_double(d_k0), ref_v = to_double(d_v0);
    const std::int64_t pages = s.num_pages(), blocks = s.num_blocks();
    const auto keys_in = [&](std::int64_t first_key, std::int64_t count) {
      return double(std::min(first_key + count, c.seq) - first_key);
    };
    for (int h = 0; h < c.kv_heads; ++h) {
      for (int b = 0; b < c.batch; ++b) {
        for (std::int64_t p = 0; p < pages; ++p) {
          const std::int64_t blk = p / c.coarse_pages;
          const double w = keys_in(p * c.page_size, c.page_size) /
                           keys_in(blk * c.coarse_pages * c.page_size, std::int64_t{c.coarse_pages} * c.page_size);
          for (int ch = 0; ch < d; ++ch) {
            const std::size_t dst = static_cast<std::size_t>((h * s.page_rows() + b * pages + p) * d + ch);
            const std::size_t src = static_cast<std::size_t>((h * s.block_rows() + b * blocks + blk) * d + ch);
            ref_page_k[dst] += w * d_block_k[src];
            ref_page_v[dst] += w * d_block_v[src];
          }
        }
      }
    }
    for (int b = 0; b < c.batch; ++b) {
      for (std::int64_t i = 0; i < c.seq; ++i) {
        const std::int64_t p = i / c.page_size;
        const double inv = 1.0 / keys_in(p * c.page_size, c.page_size);
        for (int h = 0; h < c.kv_heads; ++h) {
          for (int ch = 0; ch < d; ++ch) {
            const std::size_t dst = static_cast<std::size_t>(((b * c.seq + i) * c.kv_heads + h) * d + ch);
            const std::size_t src = static_cast<std::size_t>((h * s.page_rows() + b * pages + p) * d + ch);
            ref_k[dst] += inv * ref_page_k[src];
            ref_v[dst] += inv * ref_page_v[src];
          }
        }
      }
    }

    std::vector<float> cpu_page_k = d_page_k0, cpu_page_v = d_page_v0, cpu_k = d_k0, cpu_v = d_v0;
    kernels::coarse_summaries_backward({s, d_block_k.data(), d_block_v.data(), cpu_page_k.data(), cpu_page_v.data()},
                                       {});
    kernels::page_summaries_backward({s, cpu_page_k.data(), cpu_page_v.data(), cpu_k.data(), cpu_v.data()}, {});

    const DeviceArray<float> g_block_k(d_block_k), g_block_v(d_block_v);
    DeviceArray<float> g_page_k(d_page_k0), g_page_v(d_page_v0), g_k(d_k0), g_v(d_v0);
    kernels::coarse_summaries_backward({s, g_block_k.get(), g_block_v.get(), g_page_k.get(), g_page_v.get()},
                                       cuda_context());
    kernels::page_summaries_backward({s, g_page_k.get(), g_page_v.get(), g_k.get(), g_v.get()}, cuda_context());

    // Padding rows of the page pools are not gradients of anything: compare the slots only.
    const auto slots_only = [&](const auto& pool) {
      std::vector<double> out;
      for (int h = 0; h < c.kv_heads; ++h) {
        const auto first = pool.begin() + h * s.page_rows() * d;
        out.insert(out.end(), first, first + c.batch * pages * d);
      }
      return out;
    };
    const std::string what = name(c);
    for (const auto& [label, gpu, cpu, ref] :
         {std::tuple{"d page key mean", slots_only(g_page_k.download()), slots_only(cpu_page_k), slots_only(ref_page_k)},
          std::tuple{"d page value mean", slots_only(g_page_v.download()), slots_only(cpu_page_v),
                     slots_only(ref_page_v)},
          std::tuple{"d k", to_double(g_k.download()), to_double(cpu_k), ref_k},
          std::tuple{"d v", to_double(g_v.download()), to_double(cpu_v), ref_v}}) {
      const double cpu_err = relative_error(cpu, ref);
      expect_close(what + " " + label + " (CPU " + std::to_string(cpu_err) + ")", gpu, ref,
                   std::max(2 * cpu_err, 1e-7));
    }
  }
}

}  // namespace
}  // namespace ringcast::test
