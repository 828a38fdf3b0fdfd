// The command table: each command's name, one-line summary and entry point.
#include "commands.hpp"

#include <array>

namespace ringcast::launch {

std::span<const Command> commands() {
  static constexpr std::array<Command, 5> kCommands{{
      {"run", "the main job: one distributed attention layer, forward and backward, timed on every rank", run_command},
      {"train", "train the decoder model on synthetic associative recall or a file's bytes (CPU backend)", train_command},
      {"bench", "benchmarks: `bench layer` (layer sweeps), `bench comm`, `bench kernels` (CUDA)", bench_command},
      {"plan", "predict bytes, FLOPs and memory per rank for a configuration, without running it", plan_command},
      {"check", "run one distributed attention layer against the single-rank reference", check_command},
  }};
  return kCommands;
}

}  // namespace ringcast::launch
