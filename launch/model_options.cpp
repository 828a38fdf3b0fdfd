// Model options (model_options.hpp).
#include "model_options.hpp"

#include <fmt/format.h>

#include <cmath>
#include <sstream>

namespace ringcast::launch {
namespace {

constexpr double kMiB = 1024.0 * 1024.0;

// "1,3" -> {1, 3}; empty -> {}.
template <typename T> std::vector<T> parse_list(const std::string& option, const std::string& text) {
  std::vector<T> out;
  std::stringstream in(text);
  std::string item;
  while (std::getline(in, item, ',')) {
    try {
      std::size_t used = 0;
      const long long v = std::stoll(item, &used);
      if (used != item.size()) throw std::invalid_argument(item);
      out.push_back(static_cast<T>(v));
    } catch (const std::exception&) {
      throw UsageError(fmt::format("--{}: '{}' is not a comma-separated list of integers", option, text));
    }
  }
  return out;
}

}  // namespace

void add_model_options(po::options_description& desc) {
  desc.add_options()
      ("dim", po::value<int>()->default_value(256), "D: the residual stream width")
      ("layers", po::value<int>()->default_value(2), "blocks")
      ("ffn-hidden", po::value<int>()->default_value(768), "F: the SwiGLU FFN's hidden width")
      ("row-chunk", po::value<std::int64_t>()->default_value(ModelConfig{}.row_chunk),
       "rows the FFN and the attention projections run at once (FFN scratch: 6 x rows x F floats)")
      ("seed", po::value<std::uint64_t>()->default_value(0), "parameters and training data")
      ("grad-bucket-mib",
       po::value<double>()->default_value(static_cast<double>(ModelConfig{}.grad_bucket_bytes) / kMiB),
       "gradients are summed over ranks in buckets of this many MiB during the backward (0: one sum at the end)")
      ("colt5", po::value<bool>()->default_value(false), "CoLT5 conditional FFN and attention (encoders)")
      ("colt5-light-heads", po::value<int>()->default_value(0), "CoLT5: heads of the light window attention (0: h/4)")
      ("colt5-window", po::value<int>()->default_value(127), "CoLT5: light attention radius")
      ("colt5-ffn-fraction", po::value<double>()->default_value(1.0 / 16), "CoLT5: m / n, tokens of the heavy FFN")
      ("colt5-query-fraction", po::value<double>()->default_value(1.0 / 16), "CoLT5: q / n, routed queries")
      ("colt5-kv-fraction", po::value<double>()->default_value(1.0 / 8), "CoLT5: v / n, routed keys and values")
      ("pool-after", po::value<std::string>()->default_value(""), "Pyramidion: layers to pool after, e.g. 0,1")
      ("pool-to", po::value<std::string>()->default_value(""), "Pyramidion: sequence length after each pooling")
      ("pool-beta", po::value<float>()->default_value(20.0f), "Pyramidion: soft top-k base β")
      ("vcc", po::value<bool>()->default_value(false), "VCC: VIP-token centric compression (encoders)")
      ("vcc-vip", po::value<int>()->default_value(16), "VCC: VIP tokens (the sequence's prefix)")
      ("vcc-block", po::value<int>()->default_value(16), "VCC: tokens per coarse block")
      ("vcc-fine-blocks", po::value<int>()->default_value(8), "VCC: blocks kept at full resolution")
      ("vcc-first-layer", po::value<int>()->default_value(0), "VCC: first compressed layer")
      ("vcc-explore", po::value<float>()->default_value(0.1f), "VCC: probability of a random ranking (training)");
}

void read_model_options(const po::variables_map& vm, const LayerShape& layer, const AttentionOptions& attention,
                        ModelConfig& c) {
  c.dim = vm["dim"].as<int>();
  c.layers = vm["layers"].as<int>();
  c.ffn_hidden = vm["ffn-hidden"].as<int>();
  c.row_chunk = vm["row-chunk"].as<std::int64_t>();
  c.seed = vm["seed"].as<std::uint64_t>();
  const double bucket_mib = vm["grad-bucket-mib"].as<double>();
  // At most 1 TiB: far beyond any model's gradients, and exact as a byte count.
  if (!(bucket_mib >= 0 && bucket_mib <= 1 << 20)) throw UsageError("--grad-bucket-mib must be in [0, 1048576]");
  c.grad_bucket_bytes = static_cast<std::int64_t>(std::llround(bucket_mib * kMiB));
  c.heads = layer.heads;
  c.kv_heads = layer.kv_heads;
  c.head_dim = layer.head_dim;
  c.attention = attention;
  if (c.dim < 1 || c.layers < 1 || c.ffn_hidden < 1 || c.row_chunk < 1)
    throw UsageError("--dim, --layers, --ffn-hidden and --row-chunk must be positive");
  c.colt5.enabled = vm["colt5"].as<bool>();
  c.colt5.light_heads = vm["colt5-light-heads"].as<int>();
  c.colt5.window_radius = vm["colt5-window"].as<int>();
  c.colt5.ffn_fraction = vm["colt5-ffn-fraction"].as<double>();
  c.colt5.query_fraction = vm["colt5-query-fraction"].as<double>();
  c.colt5.kv_fraction = vm["colt5-kv-fraction"].as<double>();
  c.pyramidion.pool_after = parse_list<int>("pool-after", vm["pool-after"].as<std::string>());
  c.pyramidion.pool_to = parse_list<std::int64_t>("pool-to", vm["pool-to"].as<std::string>());
  c.pyramidion.beta = vm["pool-beta"].as<float>();
  if (c.pyramidion.pool_after.size() != c.pyramidion.pool_to.size())
    throw UsageError("--pool-after and --pool-to must list the same number of entries");
  c.vcc.enabled = vm["vcc"].as<bool>();
  c.vcc.vip_tokens = vm["vcc-vip"].as<int>();
  c.vcc.block = vm["vcc-block"].as<int>();
  c.vcc.fine_blocks = vm["vcc-fine-blocks"].as<int>();
  c.vcc.first_layer = vm["vcc-first-layer"].as<int>();
  c.vcc.explore_prob = vm["vcc-explore"].as<float>();
}

}  // namespace ringcast::launch
