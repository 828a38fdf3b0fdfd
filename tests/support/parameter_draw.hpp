// Random values for one parameter tensor of a layer under test, the same on every backend and rank:
// norm gains (one-row tensors) near 1, weights U(±1.5/sqrt(cols)).
#pragma once

#include <ringcast/model.hpp>

#include <cmath>
#include <cstdint>
#include <vector>

#include "test_util.hpp"

namespace ringcast::test {

inline std::vector<float> draw_parameter(const ParameterInfo& info, std::uint32_t seed) {
  const bool gain = info.rows == 1;
  std::vector<float> v = random_floats(static_cast<std::size_t>(info.numel()), seed,
                                       gain ? 0.3f : 1.5f / std::sqrt(static_cast<float>(info.cols)));
  if (gain)
    for (float& f : v) f += 1.0f;
  return v;
}

}  // namespace ringcast::test
