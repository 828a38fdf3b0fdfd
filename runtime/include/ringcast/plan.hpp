// The layer plan: what one distributed attention layer costs each rank, from formulas alone (no
// kernels run). Bytes follow the communicator's counting convention (what this rank puts on the wire;
// the all-gather and reduce-scatter count (P-1) blocks, the all-to-all (P-1)/P of the buffer). The
// implementation's byte counters are checked against these figures in the tests, so the formulas
// here are the specification of what each mode sends:
// Ring and all-gather move K/V as page pools (each shard segment padded to whole 64-key pages).
//   ring       fwd: K,V shards travel P-1 ring steps. bwd: K,V again, plus fp32 dK,dV accumulators
//              that travel with them and one last step home (P steps).
//   ulysses    fwd: all-to-all Q,K,V to head shards and O and the LSE back. bwd: dO to head shards; fp32 dQ,dK,dV
//              back. (O, LSE and the head-sharded Q,K,V are kept from the forward.)
//   allgather  fwd: all-gather K,V. bwd: reduce-scatter of fp32 dK,dV (gathered K,V kept).
//   clustered  fwd: ring all-gather of coarse summaries (mean key, mean value, min, max), halo (K,V
//              of the neighbours' edge coarse blocks), request counts and ids, and the requested
//              coarse blocks' K,V (their page summaries are recomputed on arrival). bwd: fp32 dK,dV of
//              fetched and halo blocks back to their owners, and the reduce-scatter of the fp32
//              gradients of every coarse summary (mean key, mean value). Fetches at the cap: the
//              figures bound the mean over ranks, not every rank (see plan.cpp).
//   clustered, clusters = surrogate: joint combine as clustered over cluster pages (no halo; block
//              counts travel with the coarse summaries, page summaries and counts with a fetched
//              block, their gradients back); cast combine: all-gather of the clusters' value
//              summaries and log-sum-exps, all-reduce of their gradients (see plan.cpp).
// With check_inputs, each call also all-gathers one 8-byte count per checked tensor (q, k, v; d_o).
#pragma once

#include <ringcast/attention_options.hpp>
#include <ringcast/tensor.hpp>

#include <cstdint>

namespace ringcast {

struct LayerPlan {
  std::int64_t bytes_sent_fwd = 0;
  std::int64_t bytes_recv_fwd = 0;
  std::int64_t bytes_sent_bwd = 0;
  std::int64_t bytes_recv_bwd = 0;
  double keys_per_query = 0;        // mean over the rank's queries (an upper bound for clustered)
  double attention_flops_fwd = 0;   // 4 * queries * keys_per_query * head_dim * heads (per batch element x batch)
  std::int64_t activation_bytes = 0;  // forward working set of the layer on one rank
};

LayerPlan plan_layer(const LayerShape& shape, const AttentionOptions& options);

// The bytes one DistributedAttention of this shape holds on the rank that needs the most, on a
// `device` backend: what workspace_bytes() reports once it is built (pools, staging, gradient
// accumulators, the exact modes' block tables, the attention kernels' workspace), plus the tables a
// clustered forward builds (bounded: their size depends on the selection). From the modes'
// constructors' formulas (attention_ring.cpp, attention_ulysses.cpp, attention_clustered.cpp),
// without allocating; the model tests check it against the built operators on the CPU backend, the
// clustered GPU test on CUDA.
// The clustered tables are counted as the rows of a tile agree (tile selection makes them; with row
// selection a tile's lists are the union of its rows' choices, which correlated queries keep close).
// Throws Error for clusters = surrogate (CAST, CPU only: not estimated).
std::int64_t attention_workspace_bytes(const LayerShape& shape, const AttentionOptions& options, DeviceKind device);

// Clustered mode with row selection: what the tables of the rank that needs the most could take
// beyond attention_workspace_bytes() if no two tokens of a kernel tile chose alike (each token's top_k
// pages and coarse_k blocks its own, up to the resident pages and blocks; a tile holds 128 / G tokens
// under GQA, see TableEntries). 0 for other modes and selections.
// `ringcast run` reports the union a run actually built (table_entries_mean / _max).
std::int64_t row_union_extra_bytes(const LayerShape& shape, const AttentionOptions& options);

}  // namespace ringcast
