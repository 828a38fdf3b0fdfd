// Communication microbenchmark: times each op over `iters` iterations after `warmup`, takes the
// slowest rank's mean, and checks the received payload element by element (receive buffers are
// poisoned first, so unwritten elements count as wrong).
#include "comm_bench.hpp"

#include <ringcast/error.hpp>
#include <ringcast/memory.hpp>

#include <fmt/format.h>
#include <mpi.h>

#include <algorithm>
#include <sstream>

namespace ringcast::launch {
namespace {

constexpr std::int32_t kPoison = -1;

// The element rank `src` puts at index i of its message to rank `dst`.
std::int32_t pattern(int src, int dst, std::size_t i) {
  return static_cast<std::int32_t>((static_cast<std::uint64_t>(src) * 1000003u + static_cast<std::uint64_t>(dst) * 7919u +
                                    i * 13u) & 0x7fffffffu);
}

struct OpPlan {
  std::size_t send_count, recv_count, size_bytes;
  double bus_factor;
};

OpPlan plan_op(const std::string& op, std::size_t count, int p) {
  const double coll = p > 1 ? double(p - 1) / p : 1.0;
  if (op == "ring") return {count, count, count * 4, 1.0};
  if (op == "allgather") return {count, count * p, count * p * 4, coll};
  return {count * p, count * p, count * p * 4, coll};  // alltoall: count elements per peer
}

}  // namespace

void add_comm_bench_options(po::options_description& desc, const std::string& default_ops) {
  desc.add_options()
      ("ops", po::value<std::string>()->default_value(default_ops), "comma-separated: ring, allgather, alltoall")
      ("min-bytes", po::value<std::string>()->default_value("1K"), "smallest message per rank (e.g. 1K)")
      ("max-bytes", po::value<std::string>()->default_value("16M"), "largest message per rank (e.g. 64M)")
      ("factor", po::value<int>()->default_value(4), "size multiplier between rows")
      ("warmup", po::value<int>()->default_value(3), "untimed iterations per size")
      ("iters", po::value<int>()->default_value(10), "timed iterations per size");
}

CommBenchOptions read_comm_bench_options(const po::variables_map& vm) {
  CommBenchOptions opt;
  std::stringstream ops(vm["ops"].as<std::string>());
  for (std::string op; std::getline(ops, op, ',');) {
    if (op != "ring" && op != "allgather" && op != "alltoall")
      throw UsageError(fmt::format("--ops: unknown operation '{}' (ring, allgather, alltoall)", op));
    opt.ops.push_back(op);
  }
  opt.min_bytes = parse_size(vm["min-bytes"].as<std::string>());
  opt.max_bytes = parse_size(vm["max-bytes"].as<std::string>());
  opt.factor = vm["factor"].as<int>();
  opt.warmup = vm["warmup"].as<int>();
  opt.iters = vm["iters"].as<int>();
  if (opt.ops.empty()) throw UsageError("--ops: name at least one operation");
  if (opt.min_bytes < 4 || opt.max_bytes < opt.min_bytes)
    throw UsageError("--min-bytes must be at least 4 and no larger than --max-bytes");
  if (opt.factor < 2) throw UsageError("--factor must be at least 2");
  if (opt.warmup < 0 || opt.iters < 1) throw UsageError("--warmup must be >= 0 and --iters >= 1");
  return opt;
}

Report comm_benchmark(const Session& session, const CommBenchOptions& opt, std::int64_t& wrong_total) {
  auto& comm = session.comm();
  const int p = comm.size(), r = comm.rank();
  const Stream stream = session.stream();
  Report report;
  wrong_total = 0;
  for (std::size_t bytes = opt.min_bytes; bytes <= opt.max_bytes; bytes *= opt.factor) {
    const std::size_t count = bytes / 4;
    for (const auto& op : opt.ops) {
      const OpPlan plan = plan_op(op, count, p);
      std::vector<std::int32_t> host_send(plan.send_count), host_recv(plan.recv_count, kPoison);
      for (std::size_t i = 0; i < plan.send_count; ++i) {
        const int dst = op == "ring" ? (r + 1) % p : op == "alltoall" ? static_cast<int>(i / count) : -1;
        host_send[i] = pattern(r, dst, op == "alltoall" ? i % count : i);
      }
      DeviceBuffer send(plan.send_count * 4, session.device()), recv(plan.recv_count * 4, session.device());
      send.upload<std::int32_t>(host_send, stream);
      recv.upload<std::int32_t>(host_recv, stream);
      const comm::ConstBuffer sb{send.data(), plan.send_count, DType::kI32};
      const comm::Buffer rb{recv.data(), plan.recv_count, DType::kI32};
      auto once = [&] {
        if (op == "ring") comm.ring_shift(sb, rb, 1, stream);
        else if (op == "allgather") comm.all_gather(sb, rb, stream);
        else comm.all_to_all(sb, rb, stream);
      };
      for (int i = 0; i < opt.warmup; ++i) once();
      comm.synchronize(stream);
      MPI_Barrier(MPI_COMM_WORLD);
      const double t0 = MPI_Wtime();
      for (int i = 0; i < opt.iters; ++i) once();
      comm.synchronize(stream);
      const double seconds = (MPI_Wtime() - t0) / opt.iters;

      recv.download<std::int32_t>(host_recv, stream);
      std::int64_t wrong = 0;
      for (std::size_t i = 0; i < plan.recv_count; ++i) {
        int src = 0;
        std::size_t idx = i;
        if (op == "ring") src = (r - 1 + p) % p;
        else { src = static_cast<int>(i / count); idx = i % count; }
        const int dst = op == "allgather" ? -1 : r;
        wrong += host_recv[i] != pattern(src, dst, idx);
      }
      double slowest = 0;
      std::int64_t wrong_all = 0;
      MPI_Allreduce(&seconds, &slowest, 1, MPI_DOUBLE, MPI_MAX, MPI_COMM_WORLD);
      MPI_Allreduce(&wrong, &wrong_all, 1, MPI_INT64_T, MPI_SUM, MPI_COMM_WORLD);
      wrong_total += wrong_all;
      const double algbw = plan.size_bytes / slowest / 1e9;
      report.add_row()
          .set("op", op)
          .set("size_B", static_cast<std::int64_t>(plan.size_bytes))
          .set("count", static_cast<std::int64_t>(plan.recv_count))
          .set("type", std::string("i32"))
          .set("time_us", slowest * 1e6)
          .set("algbw_GBps", algbw)
          .set("busbw_GBps", algbw * plan.bus_factor)
          .set("wrong", wrong_all);
    }
    if (bytes > opt.max_bytes / opt.factor) break;  // avoid overflow on the last multiply
  }
  return report;
}

}  // namespace ringcast::launch
