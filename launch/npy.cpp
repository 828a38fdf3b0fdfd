// .npy writer (npy.hpp): the 10-byte preamble, a Python-dict header padded with spaces to a multiple
// of 64 bytes (ending in '\n'), then the raw little-endian elements.
#include "npy.hpp"

#include <ringcast/error.hpp>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <fstream>
#include <functional>
#include <numeric>

namespace ringcast::launch {
namespace {

void write_raw(const std::string& path, const char* descr, const void* data, std::size_t count, std::size_t elem,
               const std::vector<std::int64_t>& shape) {
  const std::int64_t elems = std::accumulate(shape.begin(), shape.end(), std::int64_t{1}, std::multiplies<>());
  RINGCAST_CHECK(elems == static_cast<std::int64_t>(count), "npy: {} elements do not fill the shape ({}) of {}", count,
                 fmt::join(shape, ", "), path);
  std::string dims = fmt::format("{}", fmt::join(shape, ", "));
  if (shape.size() == 1) dims += ",";  // a one-element Python tuple
  std::string header = fmt::format("{{'descr': '{}', 'fortran_order': False, 'shape': ({}), }}", descr, dims);
  const std::size_t total = 10 + header.size() + 1;
  header.append((64 - total % 64) % 64, ' ');
  header.push_back('\n');
  std::ofstream f(path, std::ios::binary);
  RINGCAST_CHECK(f.good(), "npy: cannot write {}", path);
  const char magic[8] = {'\x93', 'N', 'U', 'M', 'P', 'Y', 1, 0};
  f.write(magic, 8);
  const auto len = static_cast<std::uint16_t>(header.size());
  f.write(reinterpret_cast<const char*>(&len), 2);
  f.write(header.data(), static_cast<std::streamsize>(header.size()));
  f.write(static_cast<const char*>(data), static_cast<std::streamsize>(count * elem));
  RINGCAST_CHECK(f.good(), "npy: error writing {}", path);
}

}  // namespace

void write_npy(const std::string& path, std::span<const float> data, const std::vector<std::int64_t>& shape) {
  write_raw(path, "<f4", data.data(), data.size(), sizeof(float), shape);
}
void write_npy(const std::string& path, std::span<const std::int32_t> data, const std::vector<std::int64_t>& shape) {
  write_raw(path, "<i4", data.data(), data.size(), sizeof(std::int32_t), shape);
}
void write_npy(const std::string& path, std::span<const std::int64_t> data, const std::vector<std::int64_t>& shape) {
  write_raw(path, "<i8", data.data(), data.size(), sizeof(std::int64_t), shape);
}

}  // namespace ringcast::launch
