// NcclCommunicator: the device-memory backend. Every operation is enqueued on the caller's stream
// (cudaStream_t passed as Stream) and returns at once; synchronize(stream) waits for it, polling
// ncclCommGetAsyncError, and on an asynchronous error or after RINGCAST_COMM_TIMEOUT_S seconds
// (default 300) aborts the communicator and throws, so no rank waits forever on a failed peer.
// The NCCL communicator is non-blocking (ncclConfig_t::blocking = 0): init and every call are polled
// with the same timeout. Buffers live on `device`; this header includes neither CUDA nor NCCL.
#pragma once

#include <ringcast/comm/communicator.hpp>

#include <mpi.h>

#include <array>
#include <memory>

namespace ringcast::comm {

// The bytes of an ncclUniqueId: made on one rank, handed to all others (MPI, a PyTorch store, ...).
using NcclUniqueId = std::array<char, 128>;

class NcclCommunicator final : public Communicator {
 public:
  // Collective over `comm`: rank 0 makes the unique id and broadcasts it; ranks keep their MPI order.
  NcclCommunicator(MPI_Comm comm, int device);
  // Collective over the `size` processes that received `id` (for embedding in another job).
  NcclCommunicator(const NcclUniqueId& id, int rank, int size, int device);
  // Collective over the parent's ranks: a second communicator over the same ranks in the same order,
  // for traffic that runs beside the parent's on another stream (NCCL orders one communicator's
  // operations, whatever their streams). ncclCommSplit with resources of its own (splitShare = 0:
  // a shared split would order its kernels behind the parent's). Every rank must issue the two
  // communicators' operations in the same order. Call it while nothing is in flight on the parent,
  // and destroy it before the parent. Needs NCCL >= 2.18.
  static std::unique_ptr<NcclCommunicator> split(NcclCommunicator& parent);
  ~NcclCommunicator() override;

  static NcclUniqueId make_unique_id();

  int rank() const override;
  int size() const override;
  DeviceKind memory() const override { return DeviceKind::kCuda; }
  std::string_view backend_name() const override { return "nccl"; }
  void synchronize(Stream stream) override;

 protected:
  void do_local_copy(ConstBuffer src, Buffer dst, Stream stream) override;
  void do_exchange(std::span<const SendOp> sends, std::span<const RecvOp> recvs, Stream stream) override;
  void do_all_gather(ConstBuffer send, Buffer recv, Stream stream) override;
  void do_all_gather_v(ConstBuffer send, Buffer recv, std::span<const std::size_t> recv_counts,
                       Stream stream) override;
  void do_all_reduce(ConstBuffer send, Buffer recv, ReduceOp op, Stream stream) override;
  void do_reduce_scatter(ConstBuffer send, Buffer recv, ReduceOp op, Stream stream) override;
  void do_all_to_all(ConstBuffer send, Buffer recv, Stream stream) override;
  void do_all_to_all_v(ConstBuffer send, std::span<const std::size_t> send_counts, Buffer recv,
                       std::span<const std::size_t> recv_counts, Stream stream) override;
  void do_broadcast(Buffer buf, int root, Stream stream) override;
  void do_barrier(Stream stream) override;
  void metadata_all_gather(std::span<const std::int64_t> mine, std::span<std::int64_t> all) override;
  TimeMark do_mark(Stream stream) override;
  double do_seconds_between(const TimeMark& from, const TimeMark& to) override;

 private:
  struct Impl;
  explicit NcclCommunicator(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace ringcast::comm
