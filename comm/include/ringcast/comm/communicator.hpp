// The Communicator interface: moving bytes between the ranks of one job. Two backends implement it:
// MpiCommunicator (host memory; the CPU backend's) and NcclCommunicator (device memory, ordered on
// the stream argument). Every buffer is a typed view of `count` elements; counts are in elements.
// Public calls are non-virtual: they validate, count bytes and calls per operation kind, then call
// the backend's do_* hook, so the accounting is written once.
// Host backend: calls complete before they return. Device backend: calls are enqueued on the stream;
// synchronize(stream) waits for them and turns asynchronous failures and timeouts into Errors.
// Checks: local arguments always; the _v operations always agree their counts across ranks (a small
// metadata all-gather); the uniform collectives do so when RINGCAST_COMM_VALIDATE=1 at construction.
// Every cross-rank check is symmetric: all ranks see all metadata and throw the same Error.
// Exposed communication time (benches, training steps): how long this rank's compute waits for communication,
// off until start_exposed_timing.
#pragma once

#include <ringcast/dtype.hpp>
#include <ringcast/tensor.hpp>

#include <array>
#include <atomic>
#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <span>
#include <string>
#include <string_view>
#include <thread>
#include <utility>
#include <vector>

namespace ringcast::comm {

enum class ReduceOp : std::uint8_t { kSum, kMax };

enum class OpKind : std::uint8_t {
  kSendRecv,
  kRingShift,
  kAllGather,
  kAllGatherV,
  kAllReduce,
  kReduceScatter,
  kAllToAll,
  kAllToAllV,
  kBroadcast,
  kBarrier,
  kCount
};
std::string_view op_kind_name(OpKind kind);

// A typed buffer view: `count` elements of `dtype` at `data`.
struct ConstBuffer {
  const void* data = nullptr;
  std::size_t count = 0;
  DType dtype = DType::kU8;
  std::size_t bytes() const { return count * dtype_size(dtype); }
};
struct Buffer {
  void* data = nullptr;
  std::size_t count = 0;
  DType dtype = DType::kU8;
  std::size_t bytes() const { return count * dtype_size(dtype); }
  operator ConstBuffer() const { return {data, count, dtype}; }
};

template <typename T> ConstBuffer buffer(std::span<const T> s) { return {s.data(), s.size(), dtype_of<T>()}; }
template <typename T> Buffer buffer(std::span<T> s) { return {s.data(), s.size(), dtype_of<T>()}; }

// One message of a grouped point-to-point exchange.
struct SendOp {
  int peer;
  ConstBuffer buf;
};
struct RecvOp {
  int peer;
  Buffer buf;
};

// Byte counters count what this rank logically sends to and receives from *other* ranks, as if
// every message went straight to its destination, whatever algorithm the backend runs; data that
// stays on the rank (a self-send, step 0 of a ring shift, the own block of a gather) counts nothing.
//   exchange, ring_shift: the messages whose peer is another rank.
//   all_gather(_v):   sent (P-1) * send.bytes(); received the other ranks' blocks.
//   all_reduce:       sent (P-1) * send.bytes(); received (P-1) * recv.bytes().
//   reduce_scatter:   sent the P-1 blocks of other ranks; received (P-1) * recv.bytes().
//   all_to_all(_v):   sent the blocks for other ranks; received the blocks from other ranks.
//   broadcast:        root sent (P-1) * buf.bytes(); every other rank received buf.bytes().
//   barrier:          calls only.
// A call counts once it was issued without error (on the device backend: enqueued).
struct OpCounters {
  std::uint64_t calls = 0;
  std::uint64_t bytes_sent = 0;
  std::uint64_t bytes_received = 0;
};

struct Counters {
  std::array<OpCounters, static_cast<std::size_t>(OpKind::kCount)> by_kind{};
  const OpCounters& operator[](OpKind k) const { return by_kind[static_cast<std::size_t>(k)]; }
  OpCounters& operator[](OpKind k) { return by_kind[static_cast<std::size_t>(k)]; }
  OpCounters total() const;
};

// A point on a stream's timeline, for exposed-communication timing; unset where nothing is timed.
struct TimeMark {
  bool set = false;
  double host_s = 0;      // host backend: steady-clock seconds
  void* event = nullptr;  // device backend: a timing cudaEvent_t recorded on the stream
};

class Communicator {
 public:
  virtual ~Communicator() = default;
  Communicator(const Communicator&) = delete;
  Communicator& operator=(const Communicator&) = delete;

  virtual int rank() const = 0;
  virtual int size() const = 0;
  // Where the buffers must live: kCpu for MPI, kCuda for NCCL.
  virtual DeviceKind memory() const = 0;
  virtual std::string_view backend_name() const = 0;

  // Grouped point-to-point: every send and receive is posted together and completes together
  // (one ncclGroupStart/End, or one MPI_Waitall). A peer may appear in both lists and several times;
  // messages between two ranks match in the order they are listed.
  void exchange(std::span<const SendOp> sends, std::span<const RecvOp> recvs, Stream stream = nullptr);

  // Ring shift, step s: send `send` to rank (r + s) mod P and receive `recv` from (r - s) mod P.
  // Any integer step; a step that is 0 mod P copies send to recv locally.
  void ring_shift(ConstBuffer send, Buffer recv, int step, Stream stream = nullptr);

  // recv holds size() * send.count elements, rank i's contribution at i * send.count.
  void all_gather(ConstBuffer send, Buffer recv, Stream stream = nullptr);
  // recv_counts[i] elements from rank i, packed in rank order; recv_counts[rank()] must equal
  // send.count and every rank must pass the same recv_counts (checked: a mismatch throws).
  void all_gather_v(ConstBuffer send, Buffer recv, std::span<const std::size_t> recv_counts,
                    Stream stream = nullptr);
  // In place when send.data == recv.data.
  void all_reduce(ConstBuffer send, Buffer recv, ReduceOp op, Stream stream = nullptr);
  // send holds size() * recv.count elements; rank i receives the reduction of block i.
  void reduce_scatter(ConstBuffer send, Buffer recv, ReduceOp op, Stream stream = nullptr);
  // send and recv hold size() blocks of send.count / size() elements; block i goes to rank i.
  void all_to_all(ConstBuffer send, Buffer recv, Stream stream = nullptr);
  // Packed blocks (send.count and recv.count are the sums of the counts): send_counts[i] elements to
  // rank i, recv_counts[i] from rank i. Each rank's
  // recv_counts[j] must equal rank j's send_counts[rank()] (checked: a mismatch throws).
  void all_to_all_v(ConstBuffer send, std::span<const std::size_t> send_counts, Buffer recv,
                    std::span<const std::size_t> recv_counts, Stream stream = nullptr);
  void broadcast(Buffer buf, int root, Stream stream = nullptr);
  void barrier(Stream stream = nullptr);

  // Waits for the work enqueued on `stream` (no-op on the host backend). On the device backend,
  // asynchronous errors and a timeout (RINGCAST_COMM_TIMEOUT_S, default 300 s) abort the
  // communicator and throw, so no rank waits forever on a peer that failed.
  virtual void synchronize(Stream stream) = 0;

  const Counters& counters() const { return counters_; }
  void reset_counters() { counters_ = {}; }

  // Exposed communication time: the part of communication the compute on `compute` waits for. From
  // start_exposed_timing on, a call issued on `compute` counts whole: the compute stream runs it
  // (device backend), or the calling thread blocks in it (host backend: calls from the thread that
  // started timing; a helper thread running communication beside the compute counts nothing). Code
  // that runs communication beside the compute adds what its join leaves exposed: add_exposed(mark
  // where the compute reaches the join, mark where the communication ends). Start, stop, take and
  // add from the thread that started timing; marks made on other threads come back unset (host
  // backend). Device marks are kept until the next take: take once per step or pass.
  void start_exposed_timing(Stream compute);
  void stop_exposed_timing();
  // The exposed seconds since timing started or the last take; waits for the timed device work.
  double take_exposed_seconds();
  // Now, on `stream`'s timeline: unset when timing is off or (host backend) on another thread.
  TimeMark mark(Stream stream);
  // Adds max(0, to - from) once both are reached; ignores unset marks.
  void add_exposed(const TimeMark& from, const TimeMark& to);
  // Whether the uniform collectives check count and dtype agreement across ranks.
  bool validating() const { return validate_; }

 protected:
  // Reads RINGCAST_COMM_VALIDATE once: every rank of a job must see the same value.
  Communicator();

  // Copies src to dst on this rank (same count and dtype), ordered on `stream` on the device backend.
  virtual void do_local_copy(ConstBuffer src, Buffer dst, Stream stream) = 0;

  virtual void do_exchange(std::span<const SendOp> sends, std::span<const RecvOp> recvs, Stream stream) = 0;
  virtual void do_all_gather(ConstBuffer send, Buffer recv, Stream stream) = 0;
  virtual void do_all_gather_v(ConstBuffer send, Buffer recv, std::span<const std::size_t> recv_counts,
                               Stream stream) = 0;
  virtual void do_all_reduce(ConstBuffer send, Buffer recv, ReduceOp op, Stream stream) = 0;
  virtual void do_reduce_scatter(ConstBuffer send, Buffer recv, ReduceOp op, Stream stream) = 0;
  virtual void do_all_to_all(ConstBuffer send, Buffer recv, Stream stream) = 0;
  virtual void do_all_to_all_v(ConstBuffer send, std::span<const std::size_t> send_counts, Buffer recv,
                               std::span<const std::size_t> recv_counts, Stream stream) = 0;
  virtual void do_broadcast(Buffer buf, int root, Stream stream) = 0;
  virtual void do_barrier(Stream stream) = 0;

  // Host-side exchange of small metadata used by the checks (counts, dtypes). Synchronous; every
  // rank passes the same mine.size(), all holds size() * mine.size() values in rank order.
  virtual void metadata_all_gather(std::span<const std::int64_t> mine, std::span<std::int64_t> all) = 0;

  // The backend's clock: a mark on `stream` now, and the seconds from one mark to a later one (on
  // the device: waiting until `to` is reached; releases both marks). Only called while timing.
  virtual TimeMark do_mark(Stream stream) = 0;
  virtual double do_seconds_between(const TimeMark& from, const TimeMark& to) = 0;

 private:
  // The start of a public call: a mark when the call is timed (issued on the compute stream).
  TimeMark begin_call(Stream stream);
  // The end of a successful public call: counts its bytes and, when timed, its exposed time.
  void record(OpKind kind, std::uint64_t sent, std::uint64_t received, const TimeMark& start, Stream stream);
  // Gathers every rank's record (prefixed with whether its local checks passed) and throws on every
  // rank when any rank's local checks failed; returns the P records, rank-major.
  std::vector<std::int64_t> gather_checked(OpKind kind, const std::string& local_error,
                                           std::span<const std::int64_t> record);
  // RINGCAST_COMM_VALIDATE: the uniform collectives agree (kind, dtypes, counts, root/op) across ranks.
  void check_uniform(OpKind kind, const std::string& local_error, ConstBuffer send, ConstBuffer recv,
                     std::int64_t extra);

  Counters counters_;
  bool validate_ = false;
  // Exposed-time accounting.
  std::atomic<bool> timing_ = false;  // read by helper threads' calls
  Stream compute_ = nullptr;
  std::thread::id timing_thread_;
  double exposed_s_ = 0;
  std::vector<std::pair<TimeMark, TimeMark>> pending_;  // device marks not yet resolved
};

// Exposed-time accounting on some communicators for a scope (a benchmark's or a training loop's):
// started on construction, stopped on destruction, also when an exception leaves the scope (then a
// failure to read the device marks is logged, not thrown).
class ExposedTimingScope {
 public:
  ExposedTimingScope(std::initializer_list<Communicator*> comms, Stream compute);
  ~ExposedTimingScope();
  ExposedTimingScope(const ExposedTimingScope&) = delete;
  ExposedTimingScope& operator=(const ExposedTimingScope&) = delete;
  // The exposed seconds of all of them since timing started or the last take.
  double take();

 private:
  std::vector<Communicator*> comms_;
};

}  // namespace ringcast::comm
