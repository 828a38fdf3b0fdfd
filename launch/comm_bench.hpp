// The communication microbenchmark behind `ringcast run` and `ringcast bench comm`: nccl-tests style
// rows (size, count, type, op, time, algbw, busbw, #wrong) for ring shift, all-gather and all-to-all
// on whichever communicator the session has. Every rank verifies every element it received.
// size_B follows nccl-tests: the message per rank for ring shift, the whole receive buffer for
// all-gather, the whole send buffer for all-to-all; busbw = algbw * (P-1)/P for the collectives.
#pragma once

#include "cli.hpp"
#include "report.hpp"

#include <ringcast/session.hpp>

#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

namespace ringcast::launch {

struct CommBenchOptions {
  std::vector<std::string> ops;  // ring | allgather | alltoall
  std::size_t min_bytes = 0;
  std::size_t max_bytes = 0;
  int factor = 4;
  int warmup = 3;
  int iters = 10;
};

// Registers --ops, --min-bytes, --max-bytes, --factor, --warmup, --iters with these defaults.
void add_comm_bench_options(po::options_description& desc, const std::string& default_ops);
CommBenchOptions read_comm_bench_options(const po::variables_map& vm);  // throws UsageError

// Collective: every rank calls it with the same options. The rows are complete on every rank;
// wrong_total is the number of wrong elements summed over ranks and sizes.
Report comm_benchmark(const Session& session, const CommBenchOptions& opt, std::int64_t& wrong_total);

}  // namespace ringcast::launch
