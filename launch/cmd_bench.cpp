// `ringcast bench <what>`: `layer` (one distributed attention layer over a sweep of configurations;
// bench_layer.hpp, driven by scripts/scaling.sh), `comm` (communication test: ring shift, all-gather,
// all-to-all) and `kernels` (the CUDA attention kernel on one configuration, checked against the CPU
// backend first; see bench_kernels.hpp and scripts/bench_attention.py, which runs it beside PyTorch's).
#include "bench_kernels.hpp"
#include "bench_layer.hpp"
#include "commands.hpp"

#include <fmt/format.h>
#include <mpi.h>

namespace ringcast::launch {
namespace {

int kernels_main(const CommandLine& cmd, int rank) {
  BenchKernelsOptions o;
  po::options_description desc("ringcast bench kernels options");
  add_common_options(desc);
  desc.add_options()
      ("seq", po::value(&o.seq)->default_value(o.seq), "query rows = keys")
      ("batch", po::value(&o.batch)->default_value(o.batch), "batch")
      ("heads", po::value(&o.heads)->default_value(o.heads), "query heads")
      ("kv-heads", po::value(&o.kv_heads)->default_value(o.kv_heads), "KV heads")
      ("head-dim", po::value(&o.head_dim)->default_value(o.head_dim), "64 or 128")
      ("pattern", po::value(&o.pattern)->default_value(o.pattern),
       "dense | dense-causal | random-pages | per-row | per-row-grouped | selection-tile | selection-row")
      ("k", po::value(&o.k)->default_value(o.k), "random-pages: pages per tile; per-row(-grouped): pages per row")
      ("seed", po::value(&o.seed)->default_value(o.seed), "seed of inputs and page choices")
      ("warmup", po::value(&o.warmup)->default_value(o.warmup), "untimed runs")
      ("repeats", po::value(&o.repeats)->default_value(o.repeats), "timed runs (median)")
      ("dtype", po::value(&o.dtype)->default_value(o.dtype), "bf16 | f16")
      ("backward", po::bool_switch(&o.backward), "also time forward + backward")
      ("dump", po::value(&o.dump_dir), "write the page lists as .npy files here");
  po::variables_map vm;
  if (!parse_options(cmd, desc, vm, "usage: ringcast bench kernels [options]   (one process, one GPU)", rank == 0))
    return 0;
  return bench_kernels(o);
}

}  // namespace

int bench_command(const CommandLine& cmd) {
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  const std::string what = cmd.args.empty() ? std::string() : cmd.args[0];
  if (what.empty() || what == "--help" || what == "-h") {
    if (rank == 0)
      fmt::print("usage: ringcast bench layer [options]     attention layer sweep (ringcast bench layer --help)\n"
                 "       ringcast bench comm [options]      communication test (ringcast bench comm --help)\n"
                 "       ringcast bench kernels [options]   CUDA attention kernel (ringcast bench kernels --help)\n");
    return what.empty() ? 2 : 0;
  }
  const CommandLine sub{"bench " + what, {cmd.args.begin() + 1, cmd.args.end()}};
  if (what == "layer") return bench_layer_main(sub);
  if (what == "comm") return comm_test_main(sub, "ring,allgather,alltoall");
  if (what == "kernels") return kernels_main(sub, rank);
  throw UsageError(fmt::format("ringcast bench: unknown benchmark '{}' (layer, comm, kernels)", what));
}

}  // namespace ringcast::launch
