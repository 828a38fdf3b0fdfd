// `ringcast bench kernels`: times the CUDA block-sparse attention kernel on one configuration
// (dense, dense-causal, random pages per tile, or per-row page choices, with the GQA group's heads of
// a token as consecutive rows in per-row-grouped), after checking it against
// the CPU backend on a small shape of the same pattern in the same run. Prints one table row and the
// same row as a "csv," line (collected by scripts/bench_attention.py), and can dump the page lists
// as .npy so that baselines (FlexAttention) run on exactly the same mask.
// Patterns selection-tile and selection-row time the clustered mode's selection on one rank instead
// (summaries, scoring + top-k of k pages per tile or per row, block table) next to the attention
// over the table it builds, after checking the CUDA selection against the CPU backend.
#pragma once

#include <cstdint>
#include <string>

namespace ringcast::launch {

struct BenchKernelsOptions {
  int batch = 1;
  std::int64_t seq = 65536;  // query rows = keys (self-attention over one sequence)
  int heads = 16;
  int kv_heads = 16;
  int head_dim = 128;
  // dense | dense-causal | random-pages | per-row | per-row-grouped | selection-tile | selection-row
  std::string pattern = "dense";
  int k = 16;  // pages per tile (random-pages, selection-tile) or per row (per-row(-grouped), selection-row)
  std::uint64_t seed = 1;
  int warmup = 3;
  int repeats = 10;               // median of these
  std::string dtype = "bf16";     // bf16 | f16
  bool backward = false;          // also time forward + backward
  std::string dump_dir;           // write pages.npy (and rows.npy for per-row(-grouped)) here; empty: none
};

// Returns the exit code: 0, or 1 when the correctness check fails. Throws Error on bad options or
// when this build has no CUDA backend.
int bench_kernels(const BenchKernelsOptions& opt);

}  // namespace ringcast::launch
