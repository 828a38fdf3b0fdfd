// The backend-independent half of Communicator: argument checks, the symmetric cross-rank checks,
// the byte/call accounting and the exposed-time accounting (conventions in communicator.hpp),
// written once for every backend.
// A cross-rank check gathers the same fixed-size record from every rank, so all ranks see the same
// table and throw the same Error; a local error is folded into the record rather than thrown early,
// so that a rank with bad arguments never leaves its peers waiting in the collective.
#include <ringcast/comm/communicator.hpp>
#include <ringcast/error.hpp>
#include <ringcast/log.hpp>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <cstdlib>
#include <numeric>

namespace ringcast::comm {
namespace {

std::int64_t as_i64(std::size_t v) { return static_cast<std::int64_t>(v); }

std::string_view reduce_op_name(ReduceOp op) { return op == ReduceOp::kSum ? "sum" : "max"; }

// A non-empty buffer needs storage; an empty one may be null.
std::string check_storage(std::string_view op, std::string_view what, ConstBuffer b) {
  if (b.count > 0 && b.data == nullptr) return fmt::format("{}: {} is null but holds {} elements", op, what, b.count);
  return {};
}

bool overlap(ConstBuffer a, ConstBuffer b) {
  if (a.bytes() == 0 || b.bytes() == 0) return false;
  const auto* pa = static_cast<const std::byte*>(a.data);
  const auto* pb = static_cast<const std::byte*>(b.data);
  return pa < pb + b.bytes() && pb < pa + a.bytes();
}

// The checks every out-of-place collective shares: storage, matching dtypes, no aliasing.
std::string check_pair(std::string_view op, ConstBuffer send, ConstBuffer recv) {
  if (auto e = check_storage(op, "send", send); !e.empty()) return e;
  if (auto e = check_storage(op, "recv", recv); !e.empty()) return e;
  if (send.dtype != recv.dtype) {
    return fmt::format("{}: send is {} but recv is {}", op, dtype_name(send.dtype), dtype_name(recv.dtype));
  }
  if (overlap(send, recv)) return fmt::format("{}: send and recv overlap", op);
  return {};
}

std::uint64_t sum(std::span<const std::size_t> counts) {
  return std::accumulate(counts.begin(), counts.end(), std::uint64_t{0});
}

}  // namespace

std::string_view op_kind_name(OpKind kind) {
  switch (kind) {
    case OpKind::kSendRecv: return "exchange";
    case OpKind::kRingShift: return "ring_shift";
    case OpKind::kAllGather: return "all_gather";
    case OpKind::kAllGatherV: return "all_gather_v";
    case OpKind::kAllReduce: return "all_reduce";
    case OpKind::kReduceScatter: return "reduce_scatter";
    case OpKind::kAllToAll: return "all_to_all";
    case OpKind::kAllToAllV: return "all_to_all_v";
    case OpKind::kBroadcast: return "broadcast";
    case OpKind::kBarrier: return "barrier";
    case OpKind::kCount: break;
  }
  return "?";
}

OpCounters Counters::total() const {
  OpCounters t;
  for (const auto& c : by_kind) {
    t.calls += c.calls;
    t.bytes_sent += c.bytes_sent;
    t.bytes_received += c.bytes_received;
  }
  return t;
}

Communicator::Communicator() {
  const char* env = std::getenv("RINGCAST_COMM_VALIDATE");
  validate_ = env != nullptr && std::string_view(env) == "1";
}

void Communicator::record(OpKind kind, std::uint64_t sent, std::uint64_t received, const TimeMark& start,
                          Stream stream) {
  auto& c = counters_[kind];
  ++c.calls;
  c.bytes_sent += sent;
  c.bytes_received += received;
  if (start.set) add_exposed(start, mark(stream));
}

TimeMark Communicator::begin_call(Stream stream) { return stream == compute_ ? mark(stream) : TimeMark{}; }

void Communicator::start_exposed_timing(Stream compute) {
  stop_exposed_timing();
  compute_ = compute;
  timing_thread_ = std::this_thread::get_id();
  timing_.store(true);  // after the fields helper threads read once it is set
}

void Communicator::stop_exposed_timing() {
  timing_.store(false);
  compute_ = nullptr;
  take_exposed_seconds();  // releases the device marks
}

double Communicator::take_exposed_seconds() {
  for (const auto& [from, to] : pending_) exposed_s_ += std::max(0.0, do_seconds_between(from, to));
  pending_.clear();
  return std::exchange(exposed_s_, 0.0);
}

TimeMark Communicator::mark(Stream stream) {
  if (!timing_ || (memory() == DeviceKind::kCpu && std::this_thread::get_id() != timing_thread_)) return {};
  return do_mark(stream);
}

void Communicator::add_exposed(const TimeMark& from, const TimeMark& to) {
  if (!from.set || !to.set) return;
  if (from.event == nullptr && to.event == nullptr) {
    exposed_s_ += std::max(0.0, do_seconds_between(from, to));
    return;
  }
  pending_.emplace_back(from, to);
}

std::vector<std::int64_t> Communicator::gather_checked(OpKind kind, const std::string& local_error,
                                                       std::span<const std::int64_t> record) {
  const int p = size();
  const std::size_t width = record.size() + 1;
  std::vector<std::int64_t> mine(width);
  mine[0] = local_error.empty() ? 0 : 1;
  std::copy(record.begin(), record.end(), mine.begin() + 1);
  std::vector<std::int64_t> all(width * static_cast<std::size_t>(p));
  metadata_all_gather(mine, all);

  std::vector<int> failed;
  for (int i = 0; i < p; ++i) {
    if (all[static_cast<std::size_t>(i) * width] != 0) failed.push_back(i);
  }
  if (!failed.empty()) {
    RINGCAST_THROW("{}: invalid arguments on rank(s) {}{}{}", op_kind_name(kind), fmt::join(failed, ", "),
                   local_error.empty() ? "" : "; here: ", local_error);
  }
  std::vector<std::int64_t> records;
  records.reserve(record.size() * static_cast<std::size_t>(p));
  for (int i = 0; i < p; ++i) {
    const auto* row = all.data() + static_cast<std::size_t>(i) * width;
    records.insert(records.end(), row + 1, row + width);
  }
  return records;
}

void Communicator::check_uniform(OpKind kind, const std::string& local_error, ConstBuffer send,
                                 ConstBuffer recv, std::int64_t extra) {
  if (!validate_) {
    if (!local_error.empty()) RINGCAST_THROW("{}", local_error);
    return;
  }
  enum Field { kKind, kSendDType, kSendCount, kRecvDType, kRecvCount, kExtra, kFields };
  const std::array<std::int64_t, kFields> mine{static_cast<std::int64_t>(kind),  static_cast<std::int64_t>(send.dtype),
                                               as_i64(send.count),               static_cast<std::int64_t>(recv.dtype),
                                               as_i64(recv.count),               extra};
  const auto all = gather_checked(kind, local_error, mine);
  auto describe = [&](int r) {
    const auto* f = all.data() + static_cast<std::size_t>(r) * kFields;
    const auto k = static_cast<OpKind>(f[kKind]);
    std::string extra_text;
    if (k == OpKind::kBroadcast) extra_text = fmt::format(", root {}", f[kExtra]);
    if (k == OpKind::kAllReduce || k == OpKind::kReduceScatter) {
      extra_text = fmt::format(", op {}", reduce_op_name(static_cast<ReduceOp>(f[kExtra])));
    }
    return fmt::format("{} (send {} x {}, recv {} x {}{})", op_kind_name(k), f[kSendCount],
                       dtype_name(static_cast<DType>(f[kSendDType])), f[kRecvCount],
                       dtype_name(static_cast<DType>(f[kRecvDType])), extra_text);
  };
  for (int r = 1; r < size(); ++r) {
    if (!std::equal(all.begin(), all.begin() + kFields, all.begin() + static_cast<std::ptrdiff_t>(r) * kFields)) {
      RINGCAST_THROW("{}: ranks disagree: rank 0 calls {}; rank {} calls {}", op_kind_name(kind), describe(0), r,
                     describe(r));
    }
  }
}

void Communicator::exchange(std::span<const SendOp> sends, std::span<const RecvOp> recvs, Stream stream) {
  const TimeMark start = begin_call(stream);
  const int r = rank();
  const int p = size();
  std::uint64_t sent = 0;
  std::uint64_t received = 0;
  for (const auto& s : sends) {
    RINGCAST_CHECK(s.peer >= 0 && s.peer < p, "exchange: send peer {} is outside [0, {})", s.peer, p);
    if (auto e = check_storage("exchange", "a send buffer", s.buf); !e.empty()) RINGCAST_THROW("{}", e);
    if (s.peer != r) sent += s.buf.bytes();
  }
  for (const auto& v : recvs) {
    RINGCAST_CHECK(v.peer >= 0 && v.peer < p, "exchange: recv peer {} is outside [0, {})", v.peer, p);
    if (auto e = check_storage("exchange", "a recv buffer", v.buf); !e.empty()) RINGCAST_THROW("{}", e);
    if (v.peer != r) received += v.buf.bytes();
  }
  do_exchange(sends, recvs, stream);
  record(OpKind::kSendRecv, sent, received, start, stream);
}

void Communicator::ring_shift(ConstBuffer send, Buffer recv, int step, Stream stream) {
  const TimeMark start = begin_call(stream);
  const int p = size();
  const int s = ((step % p) + p) % p;
  RINGCAST_CHECK(send.count == recv.count && send.dtype == recv.dtype,
                 "ring_shift: send is {} x {} but recv is {} x {}", send.count, dtype_name(send.dtype), recv.count,
                 dtype_name(recv.dtype));
  if (s == 0) {
    for (const auto& e : {check_storage("ring_shift", "send", send), check_storage("ring_shift", "recv", recv)}) {
      if (!e.empty()) RINGCAST_THROW("{}", e);
    }
    if (send.data != recv.data && send.count > 0) do_local_copy(send, recv, stream);
    record(OpKind::kRingShift, 0, 0, start, stream);
    return;
  }
  if (auto e = check_pair("ring_shift", send, recv); !e.empty()) RINGCAST_THROW("{}", e);
  const int r = rank();
  const SendOp to{(r + s) % p, send};
  const RecvOp from{(r - s + p) % p, recv};
  do_exchange({&to, 1}, {&from, 1}, stream);
  record(OpKind::kRingShift, send.bytes(), recv.bytes(), start, stream);
}

void Communicator::all_gather(ConstBuffer send, Buffer recv, Stream stream) {
  const TimeMark start = begin_call(stream);
  const auto p = static_cast<std::size_t>(size());
  std::string error = check_pair("all_gather", send, recv);
  if (error.empty() && recv.count != p * send.count) {
    error = fmt::format("all_gather: recv holds {} elements, expected {} ranks x {}", recv.count, p, send.count);
  }
  check_uniform(OpKind::kAllGather, error, send, recv, 0);
  do_all_gather(send, recv, stream);
  record(OpKind::kAllGather, (p - 1) * send.bytes(), (p - 1) * send.bytes(), start, stream);
}

void Communicator::all_gather_v(ConstBuffer send, Buffer recv, std::span<const std::size_t> recv_counts,
                                Stream stream) {
  const TimeMark start = begin_call(stream);
  const int p = size();
  const int r = rank();
  std::string error = check_pair("all_gather_v", send, recv);
  if (error.empty() && recv_counts.size() != static_cast<std::size_t>(p)) {
    error = fmt::format("all_gather_v: {} recv_counts for {} ranks", recv_counts.size(), p);
  }
  if (error.empty() && recv.count != sum(recv_counts)) {
    error = fmt::format("all_gather_v: recv holds {} elements but recv_counts sum to {}", recv.count, sum(recv_counts));
  }
  // Record: dtype, send.count, recv_counts (or -1s when there are not P of them).
  std::vector<std::int64_t> mine(2 + static_cast<std::size_t>(p), -1);
  mine[0] = static_cast<std::int64_t>(send.dtype);
  mine[1] = as_i64(send.count);
  if (recv_counts.size() == static_cast<std::size_t>(p)) {
    std::transform(recv_counts.begin(), recv_counts.end(), mine.begin() + 2, as_i64);
  }
  const auto all = gather_checked(OpKind::kAllGatherV, error, mine);
  const std::size_t width = mine.size();
  auto row = [&](int i) { return all.begin() + static_cast<std::ptrdiff_t>(i * width); };
  for (int i = 0; i < p; ++i) {
    if (row(i)[0] != row(0)[0]) {
      RINGCAST_THROW("all_gather_v: rank 0 sends {} but rank {} sends {}", dtype_name(static_cast<DType>(row(0)[0])),
                     i, dtype_name(static_cast<DType>(row(i)[0])));
    }
    if (!std::equal(row(0) + 2, row(0) + width, row(i) + 2)) {
      RINGCAST_THROW("all_gather_v: ranks pass different recv_counts: rank 0 [{}], rank {} [{}]",
                     fmt::join(row(0) + 2, row(0) + width, ", "), i, fmt::join(row(i) + 2, row(i) + width, ", "));
    }
    if (row(0)[2 + i] != row(i)[1]) {
      RINGCAST_THROW("all_gather_v: recv_counts[{}] = {} but rank {} sends {} elements", i, row(0)[2 + i], i,
                     row(i)[1]);
    }
  }
  do_all_gather_v(send, recv, recv_counts, stream);
  const auto elem = dtype_size(send.dtype);
  record(OpKind::kAllGatherV, static_cast<std::uint64_t>(p - 1) * send.bytes(),
         (sum(recv_counts) - recv_counts[static_cast<std::size_t>(r)]) * elem, start, stream);
}

void Communicator::all_reduce(ConstBuffer send, Buffer recv, ReduceOp op, Stream stream) {
  const TimeMark start = begin_call(stream);
  const auto p = static_cast<std::size_t>(size());
  std::string error;
  if (send.data != recv.data) error = check_pair("all_reduce", send, recv);
  if (error.empty() && (send.count != recv.count || send.dtype != recv.dtype)) {
    error = fmt::format("all_reduce: send is {} x {} but recv is {} x {}", send.count, dtype_name(send.dtype),
                        recv.count, dtype_name(recv.dtype));
  }
  if (error.empty()) error = check_storage("all_reduce", "recv", recv);
  check_uniform(OpKind::kAllReduce, error, send, recv, static_cast<std::int64_t>(op));
  do_all_reduce(send, recv, op, stream);
  record(OpKind::kAllReduce, (p - 1) * send.bytes(), (p - 1) * recv.bytes(), start, stream);
}

void Communicator::reduce_scatter(ConstBuffer send, Buffer recv, ReduceOp op, Stream stream) {
  const TimeMark start = begin_call(stream);
  const auto p = static_cast<std::size_t>(size());
  std::string error = check_pair("reduce_scatter", send, recv);
  if (error.empty() && send.count != p * recv.count) {
    error = fmt::format("reduce_scatter: send holds {} elements, expected {} ranks x {}", send.count, p, recv.count);
  }
  check_uniform(OpKind::kReduceScatter, error, send, recv, static_cast<std::int64_t>(op));
  do_reduce_scatter(send, recv, op, stream);
  record(OpKind::kReduceScatter, (p - 1) * recv.bytes(), (p - 1) * recv.bytes(), start, stream);
}

void Communicator::all_to_all(ConstBuffer send, Buffer recv, Stream stream) {
  const TimeMark start = begin_call(stream);
  const auto p = static_cast<std::size_t>(size());
  std::string error = check_pair("all_to_all", send, recv);
  if (error.empty() && (send.count != recv.count || send.count % p != 0)) {
    error = fmt::format("all_to_all: send holds {} and recv {} elements; both must be the same multiple of {} ranks",
                        send.count, recv.count, p);
  }
  check_uniform(OpKind::kAllToAll, error, send, recv, 0);
  do_all_to_all(send, recv, stream);
  const std::uint64_t others = send.bytes() / p * (p - 1);
  record(OpKind::kAllToAll, others, others, start, stream);
}

void Communicator::all_to_all_v(ConstBuffer send, std::span<const std::size_t> send_counts, Buffer recv,
                                std::span<const std::size_t> recv_counts, Stream stream) {
  const TimeMark start = begin_call(stream);
  const int p = size();
  const int r = rank();
  const auto up = static_cast<std::size_t>(p);
  std::string error = check_pair("all_to_all_v", send, recv);
  if (error.empty() && (send_counts.size() != up || recv_counts.size() != up)) {
    error = fmt::format("all_to_all_v: {} send_counts and {} recv_counts for {} ranks", send_counts.size(),
                        recv_counts.size(), p);
  }
  if (error.empty() && (send.count != sum(send_counts) || recv.count != sum(recv_counts))) {
    error = fmt::format("all_to_all_v: send holds {} elements (send_counts sum to {}), recv holds {} (recv_counts sum "
                        "to {})",
                        send.count, sum(send_counts), recv.count, sum(recv_counts));
  }
  // Record: dtype, send_counts, recv_counts (-1s when the spans have the wrong length).
  std::vector<std::int64_t> mine(1 + 2 * up, -1);
  mine[0] = static_cast<std::int64_t>(send.dtype);
  if (send_counts.size() == up && recv_counts.size() == up) {
    std::transform(send_counts.begin(), send_counts.end(), mine.begin() + 1, as_i64);
    std::transform(recv_counts.begin(), recv_counts.end(), mine.begin() + 1 + p, as_i64);
  }
  const auto all = gather_checked(OpKind::kAllToAllV, error, mine);
  const std::size_t width = mine.size();
  auto sends = [&](int i, int j) { return all[i * width + 1 + j]; };          // rank i -> rank j
  auto expects = [&](int j, int i) { return all[j * width + 1 + up + i]; };  // rank j <- rank i
  for (int i = 0; i < p; ++i) {
    if (all[i * width] != all[0]) {
      RINGCAST_THROW("all_to_all_v: rank 0 sends {} but rank {} sends {}", dtype_name(static_cast<DType>(all[0])), i,
                     dtype_name(static_cast<DType>(all[i * width])));
    }
    for (int j = 0; j < p; ++j) {
      if (sends(i, j) != expects(j, i)) {
        RINGCAST_THROW("all_to_all_v: rank {} sends {} elements to rank {}, which expects {} (its recv_counts[{}])", i,
                       sends(i, j), j, expects(j, i), i);
      }
    }
  }
  do_all_to_all_v(send, send_counts, recv, recv_counts, stream);
  const auto elem = dtype_size(send.dtype);
  record(OpKind::kAllToAllV, (sum(send_counts) - send_counts[static_cast<std::size_t>(r)]) * elem,
         (sum(recv_counts) - recv_counts[static_cast<std::size_t>(r)]) * elem, start, stream);
}

void Communicator::broadcast(Buffer buf, int root, Stream stream) {
  const TimeMark start = begin_call(stream);
  const int p = size();
  std::string error = check_storage("broadcast", "buf", buf);
  if (error.empty() && (root < 0 || root >= p)) error = fmt::format("broadcast: root {} is outside [0, {})", root, p);
  check_uniform(OpKind::kBroadcast, error, buf, buf, root);
  do_broadcast(buf, root, stream);
  if (rank() == root) {
    record(OpKind::kBroadcast, static_cast<std::uint64_t>(p - 1) * buf.bytes(), 0, start, stream);
  } else {
    record(OpKind::kBroadcast, 0, buf.bytes(), start, stream);
  }
}

void Communicator::barrier(Stream stream) {
  const TimeMark start = begin_call(stream);
  check_uniform(OpKind::kBarrier, {}, {}, {}, 0);
  do_barrier(stream);
  record(OpKind::kBarrier, 0, 0, start, stream);
}

ExposedTimingScope::ExposedTimingScope(std::initializer_list<Communicator*> comms, Stream compute) : comms_(comms) {
  for (Communicator* c : comms_) c->start_exposed_timing(compute);
}

ExposedTimingScope::~ExposedTimingScope() {
  for (Communicator* c : comms_) {
    try {
      c->stop_exposed_timing();
    } catch (const std::exception& e) {  // an error being handled may have left the device marks unreadable
      log::warn("exposed communication timing: {}", e.what());
    }
  }
}

double ExposedTimingScope::take() {
  double seconds = 0;
  for (Communicator* c : comms_) seconds += c->take_exposed_seconds();
  return seconds;
}

}  // namespace ringcast::comm
