// Shape and attention options of one layer, for plan/check/run/train.
#include "layer_options.hpp"

#include <ringcast/error.hpp>

namespace ringcast::launch {

namespace {

void add_shape_options(po::options_description& desc, std::int64_t default_seq_len, int default_heads,
                       int default_head_dim) {
  desc.add_options()
      ("seq-len", po::value<std::int64_t>()->default_value(default_seq_len), "n: tokens in the whole sequence")
      ("batch", po::value<int>()->default_value(1), "sequences per step")
      ("heads", po::value<int>()->default_value(default_heads), "query heads h")
      ("kv-heads", po::value<int>()->default_value(0), "key/value heads h_kv (h % h_kv == 0; 0: = h)")
      ("head-dim", po::value<int>()->default_value(default_head_dim), "head dim d (64 or 128)");
}

void add_attention_options(po::options_description& desc) {
  desc.add_options()
      ("mode", po::value<std::string>()->default_value("ring"), "ring|ulysses|allgather|clustered")
      ("placement", po::value<std::string>()->default_value("auto"), "auto|contiguous|zigzag")
      ("clusters", po::value<std::string>()->default_value("blocks"), "clustered: blocks|surrogate")
      ("surrogate-clusters", po::value<int>()->default_value(0),
       "clustered, surrogate: clusters per rank and KV head (0 = n_loc / page-size)")
      ("assignment", po::value<std::string>()->default_value("single"),
       "clustered, surrogate: single (single-assignment Top-K, capacity page-size)|topk")
      ("combine", po::value<std::string>()->default_value("joint"),
       "clustered, surrogate: joint (one softmax with summaries)|cast (CAST's mix)")
      ("selection", po::value<std::string>()->default_value("auto"), "clustered: auto|tile|row")
      ("score", po::value<std::string>()->default_value("bound"), "clustered: bound|mean")
      ("page-size", po::value<int>()->default_value(64), "clustered: keys per page (32|64|128)")
      ("coarse-pages", po::value<int>()->default_value(16), "clustered: pages per coarse block")
      ("top-k", po::value<int>()->default_value(16), "clustered: pages each selection unit keeps")
      ("coarse-k", po::value<int>()->default_value(4), "clustered: coarse blocks each unit keeps")
      ("remote-blocks", po::value<int>()->default_value(8), "clustered: R, remote coarse blocks fetched")
      ("remote-cap", po::value<int>()->default_value(0), "clustered, causal: fetch cap per rank (0 = 2R)")
      ("pipeline-groups", po::value<int>()->default_value(0),
       "ulysses: head groups whose all-to-alls overlap the attention of the group before (0 = auto)")
      ("check-inputs", po::value<bool>()->default_value(true), "refuse NaN/Inf inputs on every rank (costs a pass)");
}

}  // namespace

void add_layer_options(po::options_description& desc, bool with_ranks, std::int64_t default_seq_len) {
  add_shape_options(desc, default_seq_len, 16, 128);
  desc.add_options()
      ("dtype", po::value<std::string>()->default_value("bf16"), "storage dtype on GPUs: bf16|f16 (CPU computes f32)")
      ("causal", po::value<bool>()->default_value(true), "causal (decoder) or bidirectional (encoder) attention");
  add_attention_options(desc);
  if (with_ranks) desc.add_options()("ranks", po::value<int>()->default_value(4), "P: ranks the sequence is sharded over");
}

void add_model_layer_options(po::options_description& desc, std::int64_t default_seq_len, int default_heads,
                             int default_head_dim) {
  add_shape_options(desc, default_seq_len, default_heads, default_head_dim);
  add_attention_options(desc);
}

void read_layer_options(const po::variables_map& vm, int world_size, LayerShape& s, AttentionOptions& o,
                        bool causal) {
  try {
    s.seq_len = vm["seq-len"].as<std::int64_t>();
    s.ranks = vm.count("ranks") ? vm["ranks"].as<int>() : world_size;
    s.batch = vm["batch"].as<int>();
    s.heads = vm["heads"].as<int>();
    s.kv_heads = vm["kv-heads"].as<int>() == 0 ? s.heads : vm["kv-heads"].as<int>();
    s.head_dim = vm["head-dim"].as<int>();
    s.dtype = vm.count("dtype") ? parse_dtype(vm["dtype"].as<std::string>()) : DType::kF32;
    s.causal = vm.count("causal") ? vm["causal"].as<bool>() : causal;
    o.mode = parse_mode(vm["mode"].as<std::string>());
    o.placement = parse_placement(vm["placement"].as<std::string>());
    o.clusters = parse_clusters(vm["clusters"].as<std::string>());
    o.surrogate_clusters = vm["surrogate-clusters"].as<int>();
    o.assignment = parse_assignment(vm["assignment"].as<std::string>());
    o.combine = parse_combine(vm["combine"].as<std::string>());
    o.selection = parse_selection(vm["selection"].as<std::string>());
    o.score = parse_score(vm["score"].as<std::string>());
    o.page_size = vm["page-size"].as<int>();
    o.coarse_pages = vm["coarse-pages"].as<int>();
    o.top_k = vm["top-k"].as<int>();
    o.coarse_k = vm["coarse-k"].as<int>();
    o.remote_blocks = vm["remote-blocks"].as<int>();
    o.remote_cap = vm["remote-cap"].as<int>();
    o.pipeline_groups = vm["pipeline-groups"].as<int>();
    o.check_inputs = vm["check-inputs"].as<bool>();
    validate(s, o);
  } catch (const Error& e) {
    throw UsageError(e.message());
  }
}

}  // namespace ringcast::launch
