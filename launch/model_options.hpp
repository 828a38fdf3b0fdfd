// The model options of `train` (and anything else that builds a ringcast::Model): widths, depth, the
// gradient bucket size, and the seed methods' switches (--colt5-*, --pool-*, --vcc-*), registered
// once and read back into a ModelConfig on top of the layer options.
#pragma once

#include "cli.hpp"

#include <ringcast/attention_options.hpp>
#include <ringcast/model.hpp>

namespace ringcast::launch {

void add_model_options(po::options_description& desc);
// Fills everything but kind and num_classes (the task decides those). Throws UsageError for values
// that do not parse or are out of range.
void read_model_options(const po::variables_map& vm, const LayerShape& layer, const AttentionOptions& attention,
                        ModelConfig& config);

}  // namespace ringcast::launch
