// Checks that every rank makes the same way, before a collective can hang on a disagreement: the
// same layer configuration on every rank, and finite inputs on every rank. Each gathers a small
// record from all ranks through the session's communicator, so all ranks reach the same verdict and
// throw the same Error.
#pragma once

#include <ringcast/attention_options.hpp>
#include <ringcast/session.hpp>
#include <ringcast/tensor.hpp>

#include <cstdint>
#include <span>
#include <string_view>
#include <utility>
#include <vector>

namespace ringcast {

// Every rank's `mine` (the same length on every rank), concatenated in rank order.
std::vector<std::int64_t> gather_from_all_ranks(const Session& session, std::span<const std::int64_t> mine);

// Throws on every rank when any rank was given a different shape or options.
void require_same_layer_on_all_ranks(const Session& session, const LayerShape& shape, const AttentionOptions& options);

// Throws on every rank, naming the ranks and tensors, when any rank's tensors hold NaN or Inf.
void require_finite_on_all_ranks(const Session& session, std::span<const std::pair<std::string_view, TensorView>> tensors);

}  // namespace ringcast
