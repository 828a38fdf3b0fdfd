// Definitions of bench_device.hpp.
#include "bench_device.hpp"

#include <ringcast/storage_bits.hpp>

#include <random>

namespace ringcast::launch::bench {

void fill_repeating(const DeviceArray& d, DType t, std::uint64_t seed) {
  const std::size_t n = d.bytes() / 2;
  const std::size_t chunk = std::min<std::size_t>(n, std::size_t{1} << 22);
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal;
  std::vector<std::uint16_t> h(chunk);
  for (auto& x : h) x = storage_bits(normal(rng), t);
  for (std::size_t off = 0; off < n; off += chunk) {
    RINGCAST_CUDA_CHECK(cudaMemcpy(d.as<std::uint16_t>() + off, h.data(), std::min(chunk, n - off) * 2,
                                   cudaMemcpyHostToDevice));
  }
}

void fill_repeating_f32(const DeviceArray& d, std::uint64_t seed) {
  const std::size_t n = d.bytes() / sizeof(float);
  const std::size_t chunk = std::min<std::size_t>(n, (std::size_t{1} << 22) + 7);  // odd period: pages differ
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> normal;
  std::vector<float> h(chunk);
  for (float& x : h) x = normal(rng);
  for (std::size_t off = 0; off < n; off += chunk) {
    RINGCAST_CUDA_CHECK(
        cudaMemcpy(d.as<float>() + off, h.data(), std::min(chunk, n - off) * sizeof(float), cudaMemcpyHostToDevice));
  }
}

kernels::AttentionShape make_shape(int batch, std::int64_t seq, int heads, int kv_heads, int head_dim) {
  kernels::AttentionShape s;
  s.batch = batch;
  s.seq_q = seq;
  s.heads = heads;
  s.kv_heads = kv_heads;
  s.head_dim = head_dim;
  s.page_size = kPageSize;
  s.num_pages = (seq + kPageSize - 1) / kPageSize;
  return s;
}

std::vector<std::int32_t> positions(std::int64_t seq) {
  std::vector<std::int32_t> p(static_cast<std::size_t>(seq));
  for (std::int64_t i = 0; i < seq; ++i) p[i] = static_cast<std::int32_t>(i);
  return p;
}

}  // namespace ringcast::launch::bench
