// .npy writer (NumPy format version 1.0, little-endian, C order) for the launcher's dumps: the page
// lists of `ringcast bench kernels --dump` and the tensors and entries of `ringcast check --dump`,
// read by baselines and references outside the code base with numpy.load.
#pragma once

#include <cstdint>
#include <span>
#include <string>
#include <vector>

namespace ringcast::launch {

// Writes `data` as an array of `shape` (the product of shape must equal data.size()); throws Error
// when the file cannot be written.
void write_npy(const std::string& path, std::span<const float> data, const std::vector<std::int64_t>& shape);
void write_npy(const std::string& path, std::span<const std::int32_t> data, const std::vector<std::int64_t>& shape);
void write_npy(const std::string& path, std::span<const std::int64_t> data, const std::vector<std::int64_t>& shape);

}  // namespace ringcast::launch
