// NcclCommunicator: NCCL collectives for the uniform operations, one ncclGroupStart/End of
// ncclSend/ncclRecv for every point-to-point pattern (never unbatched pairs, which deadlock when two
// ranks send to each other first). The communicator is non-blocking: a call that answers
// ncclInProgress is polled through ncclCommGetAsyncError until it settles or the timeout passes.
// Any NCCL failure aborts the communicator (later calls throw) so that no call can wait on state a
// failed operation left behind. Metadata for the checks travels through a device scratch buffer on
// an internal stream; the barrier reduces one device word of its own on the caller's stream.
// Exposed-time marks are timing events, recycled through a pool the communicator owns.
#include <ringcast/comm/nccl_communicator.hpp>
#include <ringcast/cuda_check.hpp>
#include <ringcast/log.hpp>

#include "mpi_check.hpp"
#include "nccl_check.hpp"

#include <cuda_runtime_api.h>
#include <nccl.h>

#include <algorithm>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <string>
#include <thread>
#include <utility>
#include <vector>

namespace ringcast::comm {
namespace {

static_assert(sizeof(ncclUniqueId) == std::tuple_size_v<NcclUniqueId>, "NcclUniqueId must hold an ncclUniqueId");

using Clock = std::chrono::steady_clock;

constexpr double kDefaultTimeoutS = 300.0;

double timeout_from_env() {
  const char* env = std::getenv("RINGCAST_COMM_TIMEOUT_S");
  if (env == nullptr || *env == '\0') return kDefaultTimeoutS;
  char* end = nullptr;
  const double seconds = std::strtod(env, &end);
  RINGCAST_CHECK(end != env && *end == '\0' && seconds > 0, "RINGCAST_COMM_TIMEOUT_S={} is not a positive number",
                 env);
  return seconds;
}

ncclDataType_t nccl_type(DType t) {
  switch (t) {
    case DType::kF32: return ncclFloat32;
    case DType::kF64: return ncclFloat64;
    case DType::kBF16: return ncclBfloat16;
    case DType::kF16: return ncclFloat16;
    case DType::kI32: return ncclInt32;
    case DType::kI64: return ncclInt64;
    case DType::kU8: return ncclUint8;
  }
  RINGCAST_THROW("NCCL backend: unknown dtype {}", static_cast<int>(t));
}

ncclRedOp_t nccl_op(ReduceOp op) { return op == ReduceOp::kSum ? ncclSum : ncclMax; }

cudaStream_t cuda_stream(Stream s) { return static_cast<cudaStream_t>(s); }

const std::byte* at(const void* base, std::size_t offset_elems, DType t) {
  return static_cast<const std::byte*>(base) + offset_elems * dtype_size(t);
}
std::byte* at(void* base, std::size_t offset_elems, DType t) {
  return static_cast<std::byte*>(base) + offset_elems * dtype_size(t);
}

// Makes `device` current for a scope and restores the caller's device: the library must not change
// the device of a thread it was embedded in.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    RINGCAST_CUDA_CHECK(cudaGetDevice(&previous_));
    if (previous_ != device) RINGCAST_CUDA_CHECK(cudaSetDevice(device));
  }
  ~DeviceGuard() {
    if (const cudaError_t e = cudaSetDevice(previous_); e != cudaSuccess) {
      log::warn("NcclCommunicator: restoring device {} failed: {}", previous_, cudaGetErrorString(e));
    }
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
};

void warn_on_error(cudaError_t e, const char* what) {
  if (e != cudaSuccess) log::warn("NcclCommunicator: {} failed: {}", what, cudaGetErrorString(e));
}

NcclUniqueId bootstrap_id(MPI_Comm comm) {
  int rank = 0;
  RINGCAST_MPI_CHECK(MPI_Comm_rank(comm, &rank));
  NcclUniqueId id{};
  if (rank == 0) id = NcclCommunicator::make_unique_id();
  RINGCAST_MPI_CHECK(MPI_Bcast(id.data(), static_cast<int>(id.size()), MPI_BYTE, 0, comm));
  return id;
}

int mpi_rank(MPI_Comm comm) {
  int rank = 0;
  RINGCAST_MPI_CHECK(MPI_Comm_rank(comm, &rank));
  return rank;
}

int mpi_size(MPI_Comm comm) {
  int size = 0;
  RINGCAST_MPI_CHECK(MPI_Comm_size(comm, &size));
  return size;
}

// One message of a grouped pattern: `count` elements at `data`.
struct Block {
  const void* data;
  std::size_t count;
};
struct MutableBlock {
  void* data;
  std::size_t count;
};

}  // namespace

struct NcclCommunicator::Impl {
  ncclComm_t comm = nullptr;  // null once aborted
  int rank = 0;
  int size = 1;
  int device = 0;
  std::chrono::duration<double> timeout{kDefaultTimeoutS};
  cudaStream_t metadata_stream = nullptr;
  // Scratch for metadata_all_gather: device memory and a pinned host mirror, so that the copies
  // stay asynchronous and wait() can poll them (a copy to pageable memory would block untimed).
  std::int64_t* metadata = nullptr;
  std::int64_t* metadata_host = nullptr;
  std::size_t metadata_capacity = 0;  // elements of each
  std::int32_t* barrier_word = nullptr;
  // Timing events of exposed-time marks: every one made (destroyed with the communicator) and the free ones.
  std::vector<cudaEvent_t> events;
  std::vector<cudaEvent_t> free_events;

  ~Impl();

  // Everything but the NCCL communicator: the fields, the metadata stream and the barrier word.
  void prepare(int rank_in, int size_in, int device_in);

  ncclComm_t handle() const {
    RINGCAST_CHECK(comm != nullptr, "NCCL communicator (rank {}/{}) was aborted after an earlier error", rank, size);
    return comm;
  }

  // Polls the asynchronous state until it leaves ncclInProgress or `deadline` passes (then it
  // returns ncclInProgress). Never throws: the destructor uses it too.
  ncclResult_t settle(Clock::time_point deadline) const {
    for (;;) {
      ncclResult_t state = ncclSuccess;
      const ncclResult_t r = ncclCommGetAsyncError(comm, &state);
      if (r != ncclSuccess) return r;
      if (state != ncclInProgress || Clock::now() > deadline) return state;
      std::this_thread::yield();
    }
  }

  void abort() {
    if (comm == nullptr) return;
    if (const ncclResult_t r = ncclCommAbort(comm); r != ncclSuccess) {
      log::warn("ncclCommAbort failed: {}", ncclGetErrorString(r));
    }
    comm = nullptr;
  }

  [[noreturn]] void fail(std::string_view what, std::string_view why) {
    abort();
    RINGCAST_THROW("NCCL rank {}/{}: {}: {}; the communicator was aborted", rank, size, what, why);
  }

  // The result of a call on the communicator: waits for ncclInProgress to settle.
  void check(ncclResult_t r, std::string_view what) {
    if (r == ncclInProgress) r = settle(Clock::now() + std::chrono::duration_cast<Clock::duration>(timeout));
    if (r == ncclInProgress) fail(what, fmt::format("did not complete within {} s", timeout.count()));
    if (r != ncclSuccess) fail(what, fmt::format("{} ({})", ncclGetErrorString(r), ncclGetLastError(comm)));
  }

  // One group: post() issues the ncclSend/ncclRecv calls. The group is closed even when post throws.
  template <typename Post>
  void grouped(Post&& post) {
    RINGCAST_NCCL_CHECK(ncclGroupStart());
    try {
      post();
    } catch (...) {
      // Closing the group is all that matters here; the error being thrown is the one to report.
      static_cast<void>(ncclGroupEnd());
      throw;
    }
    check(ncclGroupEnd(), "ncclGroupEnd");
  }

  // A message to and from every rank in one group; the block this rank keeps is a local copy.
  // Zero-length messages are skipped: both sides know every count (checked), so they skip the same.
  void blocks(DType t, std::span<const Block> sends, std::span<const MutableBlock> recvs, cudaStream_t stream) {
    const ncclComm_t c = handle();
    const auto self = static_cast<std::size_t>(rank);
    if (sends[self].count > 0) {
      RINGCAST_CUDA_CHECK(cudaMemcpyAsync(recvs[self].data, sends[self].data, sends[self].count * dtype_size(t),
                                          cudaMemcpyDefault, stream));
    }
    grouped([&] {
      for (int p = 0; p < size; ++p) {
        const auto& s = sends[static_cast<std::size_t>(p)];
        const auto& r = recvs[static_cast<std::size_t>(p)];
        if (p == rank) continue;
        if (r.count > 0) RINGCAST_NCCL_CHECK(ncclRecv(r.data, r.count, nccl_type(t), p, c, stream));
        if (s.count > 0) RINGCAST_NCCL_CHECK(ncclSend(s.data, s.count, nccl_type(t), p, c, stream));
      }
    });
  }

  void wait(cudaStream_t stream, std::string_view what) {
    const ncclComm_t c = handle();
    const auto deadline = Clock::now() + std::chrono::duration_cast<Clock::duration>(timeout);
    for (;;) {
      const cudaError_t q = cudaStreamQuery(stream);
      if (q == cudaSuccess) return;
      if (q != cudaErrorNotReady) fail(what, fmt::format("CUDA error {}", cudaGetErrorString(q)));
      ncclResult_t state = ncclSuccess;
      const ncclResult_t r = ncclCommGetAsyncError(c, &state);
      if (r != ncclSuccess) fail(what, fmt::format("ncclCommGetAsyncError: {}", ncclGetErrorString(r)));
      if (state != ncclSuccess && state != ncclInProgress) {
        fail(what, fmt::format("{} ({})", ncclGetErrorString(state), ncclGetLastError(c)));
      }
      if (Clock::now() > deadline) {
        fail(what, fmt::format("not complete after {} s (RINGCAST_COMM_TIMEOUT_S); a peer may have failed or not "
                               "posted the matching call",
                               timeout.count()));
      }
      std::this_thread::yield();
    }
  }
};

NcclCommunicator::Impl::~Impl() {
  // Tear down on the communicator's device, then give the thread its device back.
  int previous = device;
  warn_on_error(cudaGetDevice(&previous), "cudaGetDevice");
  if (previous != device) warn_on_error(cudaSetDevice(device), "cudaSetDevice");
  if (comm != nullptr) {
    // Finalize flushes this rank's outstanding operations; when that fails or hangs, abort instead.
    ncclResult_t r = ncclCommFinalize(comm);
    if (r == ncclInProgress) r = settle(Clock::now() + std::chrono::duration_cast<Clock::duration>(timeout));
    if (r == ncclSuccess) {
      if (const ncclResult_t d = ncclCommDestroy(comm); d != ncclSuccess) {
        log::warn("ncclCommDestroy failed: {}", ncclGetErrorString(d));
      }
      comm = nullptr;
    } else {
      log::warn("ncclCommFinalize failed ({}); aborting the communicator", ncclGetErrorString(r));
      abort();
    }
  }
  for (cudaEvent_t e : events) warn_on_error(cudaEventDestroy(e), "cudaEventDestroy");
  warn_on_error(cudaFree(metadata), "cudaFree(metadata)");
  warn_on_error(cudaFreeHost(metadata_host), "cudaFreeHost(metadata_host)");
  warn_on_error(cudaFree(barrier_word), "cudaFree(barrier_word)");
  if (metadata_stream != nullptr) warn_on_error(cudaStreamDestroy(metadata_stream), "cudaStreamDestroy");
  if (previous != device) warn_on_error(cudaSetDevice(previous), "cudaSetDevice");
}

NcclCommunicator::NcclCommunicator(MPI_Comm comm, int device)
    : NcclCommunicator(bootstrap_id(comm), mpi_rank(comm), mpi_size(comm), device) {}

void NcclCommunicator::Impl::prepare(int rank_in, int size_in, int device_in) {
  RINGCAST_CHECK(size_in >= 1 && rank_in >= 0 && rank_in < size_in, "NcclCommunicator: rank {} of {} is invalid",
                 rank_in, size_in);
  rank = rank_in;
  size = size_in;
  device = device_in;
  timeout = std::chrono::duration<double>(timeout_from_env());
  DeviceGuard guard(device);
  RINGCAST_CUDA_CHECK(cudaStreamCreateWithFlags(&metadata_stream, cudaStreamNonBlocking));
  RINGCAST_CUDA_CHECK(cudaMalloc(&barrier_word, sizeof(std::int32_t)));
  RINGCAST_CUDA_CHECK(cudaMemset(barrier_word, 0, sizeof(std::int32_t)));
}

NcclCommunicator::NcclCommunicator(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}

NcclCommunicator::NcclCommunicator(const NcclUniqueId& id, int rank, int size, int device)
    : impl_(std::make_unique<Impl>()) {
  auto& m = *impl_;
  m.prepare(rank, size, device);
  DeviceGuard guard(device);
  ncclUniqueId nccl_id;
  std::memcpy(&nccl_id, id.data(), sizeof(nccl_id));
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;
  m.check(ncclCommInitRankConfig(&m.comm, size, nccl_id, rank, &config), "ncclCommInitRankConfig");
}

std::unique_ptr<NcclCommunicator> NcclCommunicator::split(NcclCommunicator& parent) {
#if NCCL_VERSION_CODE >= NCCL_VERSION(2, 18, 0)
  const Impl& p = *parent.impl_;
  auto impl = std::make_unique<Impl>();
  impl->prepare(p.rank, p.size, p.device);
  DeviceGuard guard(p.device);
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;
  config.splitShare = 0;  // resources of its own: its kernels run beside the parent's
  // One colour: every rank joins, keyed by its parent rank, so the order is the parent's. The child
  // is non-blocking, so the split settles through its own asynchronous state (check()).
  impl->check(ncclCommSplit(p.handle(), 0, p.rank, &impl->comm, &config), "ncclCommSplit");
  RINGCAST_CHECK(impl->comm != nullptr, "NCCL rank {}/{}: ncclCommSplit left this rank out", p.rank, p.size);
  return std::unique_ptr<NcclCommunicator>(new NcclCommunicator(std::move(impl)));
#else
  static_cast<void>(parent);
  RINGCAST_THROW("NcclCommunicator::split needs NCCL >= 2.18 (ncclCommSplit); this build has {}.{}",
                 NCCL_MAJOR, NCCL_MINOR);
#endif
}

NcclCommunicator::~NcclCommunicator() = default;

NcclUniqueId NcclCommunicator::make_unique_id() {
  ncclUniqueId id;
  RINGCAST_NCCL_CHECK(ncclGetUniqueId(&id));
  NcclUniqueId bytes;
  std::memcpy(bytes.data(), &id, bytes.size());
  return bytes;
}

int NcclCommunicator::rank() const { return impl_->rank; }
int NcclCommunicator::size() const { return impl_->size; }

void NcclCommunicator::synchronize(Stream stream) { impl_->wait(cuda_stream(stream), "synchronize"); }

TimeMark NcclCommunicator::do_mark(Stream stream) {
  auto& m = *impl_;
  DeviceGuard guard(m.device);
  if (m.free_events.empty()) {
    cudaEvent_t e = nullptr;
    RINGCAST_CUDA_CHECK(cudaEventCreate(&e));  // with timing
    m.events.push_back(e);
    m.free_events.push_back(e);
  }
  cudaEvent_t e = m.free_events.back();
  RINGCAST_CUDA_CHECK(cudaEventRecord(e, cuda_stream(stream)));
  m.free_events.pop_back();
  return {.set = true, .event = e};
}

double NcclCommunicator::do_seconds_between(const TimeMark& from, const TimeMark& to) {
  auto& m = *impl_;
  DeviceGuard guard(m.device);
  const auto from_event = static_cast<cudaEvent_t>(from.event), to_event = static_cast<cudaEvent_t>(to.event);
  RINGCAST_CUDA_CHECK(cudaEventSynchronize(to_event));
  RINGCAST_CUDA_CHECK(cudaEventSynchronize(from_event));
  float ms = 0;
  RINGCAST_CUDA_CHECK(cudaEventElapsedTime(&ms, from_event, to_event));
  m.free_events.push_back(from_event);
  m.free_events.push_back(to_event);
  return 1e-3 * ms;
}

void NcclCommunicator::do_local_copy(ConstBuffer src, Buffer dst, Stream stream) {
  RINGCAST_CUDA_CHECK(cudaMemcpyAsync(dst.data, src.data, src.bytes(), cudaMemcpyDefault, cuda_stream(stream)));
}

void NcclCommunicator::do_exchange(std::span<const SendOp> sends, std::span<const RecvOp> recvs, Stream stream) {
  const ncclComm_t c = impl_->handle();
  const cudaStream_t s = cuda_stream(stream);
  impl_->grouped([&] {
    for (const auto& r : recvs) RINGCAST_NCCL_CHECK(ncclRecv(r.buf.data, r.buf.count, nccl_type(r.buf.dtype), r.peer, c, s));
    for (const auto& m : sends) RINGCAST_NCCL_CHECK(ncclSend(m.buf.data, m.buf.count, nccl_type(m.buf.dtype), m.peer, c, s));
  });
}

// The uniform collectives skip zero-length calls: every rank passes the same count, so all skip.
void NcclCommunicator::do_all_gather(ConstBuffer send, Buffer recv, Stream stream) {
  if (send.count == 0) return;
  impl_->check(ncclAllGather(send.data, recv.data, send.count, nccl_type(send.dtype), impl_->handle(),
                             cuda_stream(stream)),
               "ncclAllGather");
}

void NcclCommunicator::do_all_gather_v(ConstBuffer send, Buffer recv, std::span<const std::size_t> recv_counts,
                                       Stream stream) {
  std::vector<Block> sends(recv_counts.size(), Block{send.data, send.count});
  std::vector<MutableBlock> recvs;
  recvs.reserve(recv_counts.size());
  std::size_t offset = 0;
  for (std::size_t n : recv_counts) {
    recvs.push_back({at(recv.data, offset, recv.dtype), n});
    offset += n;
  }
  impl_->blocks(send.dtype, sends, recvs, cuda_stream(stream));
}

void NcclCommunicator::do_all_reduce(ConstBuffer send, Buffer recv, ReduceOp op, Stream stream) {
  if (recv.count == 0) return;
  impl_->check(ncclAllReduce(send.data, recv.data, recv.count, nccl_type(recv.dtype), nccl_op(op), impl_->handle(),
                             cuda_stream(stream)),
               "ncclAllReduce");
}

void NcclCommunicator::do_reduce_scatter(ConstBuffer send, Buffer recv, ReduceOp op, Stream stream) {
  if (recv.count == 0) return;
  impl_->check(ncclReduceScatter(send.data, recv.data, recv.count, nccl_type(recv.dtype), nccl_op(op),
                                 impl_->handle(), cuda_stream(stream)),
               "ncclReduceScatter");
}

void NcclCommunicator::do_all_to_all(ConstBuffer send, Buffer recv, Stream stream) {
  const std::size_t block = send.count / static_cast<std::size_t>(impl_->size);
  std::vector<Block> sends;
  std::vector<MutableBlock> recvs;
  for (int p = 0; p < impl_->size; ++p) {
    const std::size_t offset = static_cast<std::size_t>(p) * block;
    sends.push_back({at(send.data, offset, send.dtype), block});
    recvs.push_back({at(recv.data, offset, recv.dtype), block});
  }
  impl_->blocks(send.dtype, sends, recvs, cuda_stream(stream));
}

void NcclCommunicator::do_all_to_all_v(ConstBuffer send, std::span<const std::size_t> send_counts, Buffer recv,
                                       std::span<const std::size_t> recv_counts, Stream stream) {
  std::vector<Block> sends;
  std::vector<MutableBlock> recvs;
  std::size_t send_offset = 0;
  std::size_t recv_offset = 0;
  for (std::size_t p = 0; p < send_counts.size(); ++p) {
    sends.push_back({at(send.data, send_offset, send.dtype), send_counts[p]});
    recvs.push_back({at(recv.data, recv_offset, recv.dtype), recv_counts[p]});
    send_offset += send_counts[p];
    recv_offset += recv_counts[p];
  }
  impl_->blocks(send.dtype, sends, recvs, cuda_stream(stream));
}

void NcclCommunicator::do_broadcast(Buffer buf, int root, Stream stream) {
  if (buf.count == 0) return;
  impl_->check(ncclBroadcast(buf.data, buf.data, buf.count, nccl_type(buf.dtype), root, impl_->handle(),
                             cuda_stream(stream)),
               "ncclBroadcast");
}

// NCCL has no barrier: a one-word all-reduce is one, ordered on the stream. Max keeps the word fixed.
void NcclCommunicator::do_barrier(Stream stream) {
  impl_->check(ncclAllReduce(impl_->barrier_word, impl_->barrier_word, 1, ncclInt32, ncclMax, impl_->handle(),
                             cuda_stream(stream)),
               "ncclAllReduce (barrier)");
}

void NcclCommunicator::metadata_all_gather(std::span<const std::int64_t> mine, std::span<std::int64_t> all) {
  auto& m = *impl_;
  const std::size_t n = mine.size();
  RINGCAST_CHECK(all.size() == n * static_cast<std::size_t>(m.size), "metadata_all_gather: {} slots for {} ranks x {}",
                 all.size(), m.size, n);
  DeviceGuard guard(m.device);
  if (all.size() > m.metadata_capacity) {
    // Nothing else uses the scratch: every metadata exchange finishes before this call returns.
    RINGCAST_CUDA_CHECK(cudaFree(m.metadata));
    RINGCAST_CUDA_CHECK(cudaFreeHost(m.metadata_host));
    m.metadata = m.metadata_host = nullptr;
    m.metadata_capacity = 0;
    RINGCAST_CUDA_CHECK(cudaMalloc(&m.metadata, all.size() * sizeof(std::int64_t)));
    RINGCAST_CUDA_CHECK(cudaMallocHost(&m.metadata_host, all.size() * sizeof(std::int64_t)));
    m.metadata_capacity = all.size();
  }
  const std::size_t mine_offset = n * static_cast<std::size_t>(m.rank);
  std::copy(mine.begin(), mine.end(), m.metadata_host + mine_offset);
  RINGCAST_CUDA_CHECK(cudaMemcpyAsync(m.metadata + mine_offset, m.metadata_host + mine_offset, n * sizeof(std::int64_t),
                                      cudaMemcpyHostToDevice, m.metadata_stream));
  m.check(ncclAllGather(m.metadata + mine_offset, m.metadata, n, ncclInt64, m.handle(), m.metadata_stream),
          "ncclAllGather (metadata)");
  RINGCAST_CUDA_CHECK(cudaMemcpyAsync(m.metadata_host, m.metadata, all.size() * sizeof(std::int64_t),
                                      cudaMemcpyDeviceToHost, m.metadata_stream));
  m.wait(m.metadata_stream, "metadata_all_gather");
  std::copy(m.metadata_host, m.metadata_host + all.size(), all.begin());
}

}  // namespace ringcast::comm
