// The shape and attention options shared by `plan`, `check`, `run` and `train` (--seq-len, --ranks,
// --heads, --kv-heads, --head-dim, --mode, ... ), registered once and read back into LayerShape and
// AttentionOptions.
#pragma once

#include "cli.hpp"

#include <ringcast/attention_options.hpp>

namespace ringcast::launch {

// with_ranks: `plan` takes --ranks (it runs nothing); `check` and `run` use the MPI world size.
void add_layer_options(po::options_description& desc, bool with_ranks, std::int64_t default_seq_len = 1 << 20);
// The subset `train` takes: the model fixes the dtype (fp32, CPU) and causality (a decoder), so it
// registers no --dtype, --causal or --ranks, and read_layer_options then reads f32 and `causal` (the
// model's kind: decoder or encoder).
void add_model_layer_options(po::options_description& desc, std::int64_t default_seq_len, int default_heads,
                             int default_head_dim);
// Throws UsageError for values that do not parse or do not fit together (validate()).
void read_layer_options(const po::variables_map& vm, int world_size, LayerShape& shape, AttentionOptions& options,
                        bool causal = true);

}  // namespace ringcast::launch
