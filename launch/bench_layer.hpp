// One distributed attention layer, timed: the measurement behind `ringcast run` (one configuration)
// and `ringcast bench layer` (a sweep over sequence lengths, modes, heads and head dims on the
// world's ranks). Every rank times its own forward and forward+backward passes (each pass starts
// after a barrier, ends when the rank's stream is idle); a rank's figure is the median of its timed
// passes, and the report gives the min, median and max of those over the ranks. The exposed
// communication time of a pass is the communicator's (Communicator::start_exposed_timing): the part
// of its communication the rank's compute waited for.
#pragma once

#include "cli.hpp"
#include "report.hpp"

#include <ringcast/attention_options.hpp>
#include <ringcast/session.hpp>

#include <cstdint>
#include <optional>

namespace ringcast::launch {

// A per-rank value over the ranks.
struct Spread {
  double min = 0, median = 0, max = 0;
};

struct LayerTiming {
  Spread fwd_s, fwd_bwd_s;
  Spread exposed_fwd_s, exposed_fwd_bwd_s;  // exposed communication within those passes
  std::int64_t bytes_sent_fwd = 0, bytes_sent_bwd = 0;  // the communicator's counters, max over ranks
  std::int64_t peak_memory_bytes = 0;                   // the layer's allocations at their peak, max over ranks
  // Clustered mode: the last forward's table entries per (element, tile, KV head) over all ranks
  // (DistributedAttention::table_entries), the mean and the longest list.
  std::optional<double> table_entries_mean;
  std::int64_t table_entries_max = 0;
};

// Collective. Builds the layer (the peak memory counts from here) and seeded random inputs on the
// session's device, then times `warmup` untimed and `iters` timed passes. Rank 0 logs each pass
// once the whole takes longer than a few seconds.
LayerTiming time_layer(const Session& session, const LayerShape& shape, const AttentionOptions& options, int warmup,
                       int iters);

// The columns `run` and `bench layer` share: the configuration, the times and exposed communication (ms), plan's FLOPs per
// rank and the effective TFLOP/s per rank (on the slowest rank's time), the bytes each rank sent
// (counters, plan's figures beside them), the peak memory and, clustered mode, the table's size.
void set_layer_columns(Report::Row& row, const Session& session, const LayerShape& shape,
                       const AttentionOptions& options, const LayerTiming& timing);

// `ringcast bench layer [options]`.
int bench_layer_main(const CommandLine& cmd);

}  // namespace ringcast::launch
