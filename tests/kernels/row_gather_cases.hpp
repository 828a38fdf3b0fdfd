// Seeded cases of the indexed row movement (row_gather.hpp), shared by the CPU test against float64
// (row_gather_test.cpp) and the CUDA-vs-CPU test (tests/gpu/test_row_gather_gpu.cpp). Shapes are not
// powers of two; rows carry padding between them (strides above the width) that must stay untouched.
// Gathers: segments with empty ones, weights or a scale, accumulate, per-head index lists (group > 1)
// with negative entries and a fill, destination rows; scatters: repeated and negative entries and
// destination rows that receive nothing.
#pragma once

#include <ringcast/kernels/row_gather.hpp>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "test_util.hpp"

namespace ringcast::test {

// One call's host data; `p` holds the shape, strides and flags, its pointers are bound per backend.
struct GatherCase {
  std::string name;
  kernels::RowGather p;
  std::vector<std::int64_t> offsets;
  std::vector<std::int32_t> index32, dst_rows;
  std::vector<std::int64_t> index64;
  std::vector<float> weights, src, dst;  // dst: the contents before the call
};

struct ScatterCase {
  std::string name;
  kernels::RowScatter p;
  std::vector<std::int32_t> index32;
  std::vector<std::int64_t> index64;
  std::vector<float> src, dst;
};

// Elements a side needs for `rows` rows of `heads` heads at the given strides.
inline std::size_t side_size(std::int64_t rows, int heads, std::int64_t width, std::int64_t row_stride,
                             std::int64_t head_stride) {
  if (rows == 0) return 0;
  return static_cast<std::size_t>((rows - 1) * (row_stride ? row_stride : width) + (heads - 1) * head_stride + width);
}

// Entries in [-1, limit) (negative with probability `negative`).
template <typename T>
std::vector<T> random_index(std::size_t n, std::int64_t limit, double negative, std::uint32_t seed) {
  std::mt19937 gen(seed);
  std::uniform_int_distribution<std::int64_t> row(0, limit - 1);
  std::bernoulli_distribution skip(negative);
  std::vector<T> out(n);
  for (T& v : out) v = static_cast<T>(skip(gen) ? -1 : row(gen));
  return out;
}

// Offsets of `lists` lists of `rows` segments of 0 to 4 terms each (a fifth empty).
inline std::vector<std::int64_t> random_offsets(int lists, std::int64_t rows, std::uint32_t seed) {
  std::mt19937 gen(seed);
  std::uniform_int_distribution<int> len(0, 4);
  std::vector<std::int64_t> out;
  for (int g = 0; g < lists; ++g) {
    std::int64_t at = 0;
    out.push_back(at);
    for (std::int64_t o = 0; o < rows; ++o) out.push_back(at += len(gen));
  }
  return out;
}

inline void fill_sides(GatherCase& c, std::int64_t src_rows, std::uint32_t seed) {
  const kernels::RowGather& p = c.p;
  c.src = random_floats(side_size(src_rows, p.heads, p.width, p.src_row_stride, p.src_head_stride), seed);
  const std::int64_t dst_rows =
      c.dst_rows.empty() ? p.rows : *std::max_element(c.dst_rows.begin(), c.dst_rows.end()) + 1;
  c.dst = random_floats(side_size(dst_rows, p.heads, p.width, p.dst_row_stride, p.dst_head_stride), seed + 1, 3.0f);
}

inline std::vector<GatherCase> gather_cases() {
  std::vector<GatherCase> cases;
  std::uint32_t seed = 700;
  for (const bool accumulate : {false, true}) {
    const std::string mode = accumulate ? ", accumulate" : "";
    {  // VCC-style segment sums: int64 index with repeats, weights, empty segments
      GatherCase c;
      c.name = "segments, weights" + mode;
      c.p.rows = 29;
      c.p.width = 13;
      c.p.accumulate = accumulate;
      c.offsets = random_offsets(1, c.p.rows, seed++);
      c.index64 = random_index<std::int64_t>(static_cast<std::size_t>(c.offsets.back()), 41, 0.0, seed++);
      c.weights = random_floats(static_cast<std::size_t>(c.p.rows), seed++, 2.0f);
      fill_sides(c, 41, seed++);
      cases.push_back(c);
    }
    {  // segments over consecutive rows (no index), a scale, strided sides, distinct destination rows
      GatherCase c;
      c.name = "segments, scale, destination rows" + mode;
      c.p.rows = 17;
      c.p.width = 5;
      c.p.scale = 0.37f;
      c.p.accumulate = accumulate;
      c.p.src_row_stride = 8;
      c.p.dst_row_stride = 6;
      c.offsets = random_offsets(1, c.p.rows, seed++);
      c.dst_rows.resize(static_cast<std::size_t>(c.p.rows));
      std::iota(c.dst_rows.begin(), c.dst_rows.end(), 0);
      std::shuffle(c.dst_rows.begin(), c.dst_rows.end(), std::mt19937(seed++));
      for (auto& r : c.dst_rows) r = 2 * r + 1;  // every other row of dst stays untouched
      fill_sides(c, std::max<std::int64_t>(c.offsets.back(), 1), seed++);
      cases.push_back(c);
    }
    {  // CAST-style: heads 6 in groups of 3 (two int32 index lists), negative entries, a fill
      GatherCase c;
      c.name = "head groups, negative index, fill" + mode;
      c.p.rows = 23;
      c.p.width = 7;
      c.p.heads = 6;
      c.p.group = 3;
      c.p.index_stride = 25;
      c.p.fill = accumulate ? 0.0f : -std::numeric_limits<float>::infinity();
      c.p.accumulate = accumulate;
      c.p.src_row_stride = 6 * 7 + 3;
      c.p.src_head_stride = 7;
      c.p.dst_row_stride = 9;
      c.p.dst_head_stride = 23 * 9 + 4;
      c.index32 = random_index<std::int32_t>(2 * 25, 31, 0.2, seed++);
      fill_sides(c, 31, seed++);
      cases.push_back(c);
    }
    {  // per-list segments over an int32 index, heads 4 in groups of 2, weights
      GatherCase c;
      c.name = "head groups, segments" + mode;
      c.p.rows = 11;
      c.p.width = 3;
      c.p.heads = 4;
      c.p.group = 2;
      c.p.accumulate = accumulate;
      c.p.src_row_stride = 4 * 3;
      c.p.src_head_stride = 3;
      c.p.dst_row_stride = 4 * 3;
      c.p.dst_head_stride = 3;
      c.offsets = random_offsets(2, c.p.rows, seed++);
      c.p.index_stride = std::max({c.offsets[11], c.offsets.back(), std::int64_t{1}});  // list 0 ends at [11]
      c.index32 = random_index<std::int32_t>(static_cast<std::size_t>(2 * c.p.index_stride), 19, 0.0, seed++);
      c.weights = random_floats(static_cast<std::size_t>(c.p.rows), seed++);
      fill_sides(c, 19, seed++);
      cases.push_back(c);
    }
  }
  return cases;
}

inline std::vector<ScatterCase> scatter_cases() {
  std::vector<ScatterCase> cases;
  std::uint32_t seed = 900;
  {  // CAST's cluster slots to tokens: heads 4 in groups of 2, many slots per token, padding (-1)
    ScatterCase c;
    c.name = "head groups, repeated and negative index";
    c.p.rows = 53;
    c.p.out_rows = 19;
    c.p.width = 11;
    c.p.heads = 4;
    c.p.group = 2;
    c.p.index_stride = 57;
    c.p.src_row_stride = 11;
    c.p.src_head_stride = 53 * 11 + 2;
    c.p.dst_row_stride = 4 * 11 + 1;
    c.p.dst_head_stride = 11;
    c.index32 = random_index<std::int32_t>(2 * 57, 17, 0.15, seed++);  // rows 17 and 18 receive nothing
    cases.push_back(c);
  }
  {  // int64 index, one head, more destinations than sources
    ScatterCase c;
    c.name = "int64 index, sparse destinations";
    c.p.rows = 9;
    c.p.out_rows = 40;
    c.p.width = 6;
    c.index64 = random_index<std::int64_t>(9, 40, 0.1, seed++);
    c.index64[3] = c.index64[7] = 5;  // a repeat for sure
    cases.push_back(c);
  }
  {  // many sources per destination: long sums, two heads with their own lists
    ScatterCase c;
    c.name = "many sources per destination";
    c.p.rows = 4099;
    c.p.out_rows = 37;
    c.p.width = 3;
    c.p.heads = 2;
    c.p.index_stride = 4099;
    c.p.src_head_stride = 3;
    c.p.src_row_stride = 6;
    c.index32 = random_index<std::int32_t>(2 * 4099, 37, 0.05, seed++);
    cases.push_back(c);
  }
  for (ScatterCase& c : cases) {
    const kernels::RowScatter& p = c.p;
    c.src = random_floats(side_size(p.rows, p.heads, p.width, p.src_row_stride, p.src_head_stride), seed++);
    c.dst = random_floats(side_size(p.out_rows, p.heads, p.width, p.dst_row_stride, p.dst_head_stride), seed++, 3.0f);
  }
  return cases;
}

// The op of a case's parameters, on either backend.
inline void run(const kernels::RowGather& p, const kernels::ExecContext& ctx) { kernels::gather_rows(p, ctx); }
inline void run(const kernels::RowScatter& p, const kernels::ExecContext& ctx) { kernels::scatter_add_rows(p, ctx); }

// The call's parameters with every buffer taken from `bind` (a host pointer or a device copy) and
// the destination `dst`.
template <typename Bind>
kernels::RowGather bind(const GatherCase& c, Bind&& bind, float* dst) {
  kernels::RowGather p = c.p;
  if (!c.offsets.empty()) p.offsets = bind(c.offsets);
  if (!c.index32.empty()) p.index = bind(c.index32);
  if (!c.index64.empty()) p.index = bind(c.index64);
  if (!c.dst_rows.empty()) p.dst_rows = bind(c.dst_rows);
  if (!c.weights.empty()) p.weights = bind(c.weights);
  p.src = bind(c.src);
  p.dst = dst;
  return p;
}

template <typename Bind>
kernels::RowScatter bind(const ScatterCase& c, Bind&& bind, float* dst) {
  kernels::RowScatter p = c.p;
  if (!c.index32.empty()) p.index = bind(c.index32);
  if (!c.index64.empty()) p.index = bind(c.index64);
  p.src = bind(c.src);
  p.dst = dst;
  return p;
}

}  // namespace ringcast::test
