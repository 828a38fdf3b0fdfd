// MpiCommunicator: the host-memory backend (the CPU backend's, and the oracle the NCCL backend is
// compared with). Works on its own duplicate of the caller's communicator, with MPI_ERRORS_RETURN,
// so its messages never match the caller's and MPI failures become Errors. Every call completes
// before it returns; the stream arguments are ignored. MPI takes int counts: a message or a
// displacement beyond INT_MAX elements is rejected with an Error (Open MPI 4.1 has no MPI-4 _c calls).
#pragma once

#include <ringcast/comm/communicator.hpp>

#include <mpi.h>

namespace ringcast::comm {

class MpiCommunicator final : public Communicator {
 public:
  explicit MpiCommunicator(MPI_Comm comm);
  ~MpiCommunicator() override;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  DeviceKind memory() const override { return DeviceKind::kCpu; }
  std::string_view backend_name() const override { return "mpi"; }
  void synchronize(Stream) override {}

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
  MPI_Comm comm_ = MPI_COMM_NULL;
  int rank_ = 0;
  int size_ = 1;
};

}  // namespace ringcast::comm
