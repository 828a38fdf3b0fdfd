// ringcast::Session: one rank's place in a job -- its communicator, its device and its stream.
// Created from MPI_COMM_WORLD, from another MPI communicator, or (for frameworks that own the process
// group, e.g. PyTorch) from an NCCL unique id + rank + size. On a machine with GPUs the local rank
// picks the device and the communicator is NCCL; without GPUs it is MPI on host memory. A second
// communicator over the same ranks carries the model's gradient sums (grad_comm()).
#pragma once

#include <ringcast/comm/communicator.hpp>
#include <ringcast/tensor.hpp>

#include <mpi.h>

#include <array>
#include <memory>
#include <string>

namespace ringcast {

// Which backend a session runs on: kAuto picks CUDA where a device exists, else the CPU.
enum class Backend { kAuto, kCpu, kCuda };

class Session {
 public:
  // Collective over `comm`: every rank must call it. MPI must be initialised.
  static Session from_mpi(MPI_Comm comm = MPI_COMM_WORLD, Backend backend = Backend::kAuto);
  // For embedding: the caller made the NCCL unique id (rank 0) and distributed it; `device` is the
  // CUDA device index this rank uses. `stream` is the caller's cudaStream_t (may be null).
  static Session from_nccl_id(const std::array<char, 128>& unique_id, int rank, int size, int device,
                              Stream stream = nullptr);

  Session(Session&&) noexcept;
  Session& operator=(Session&&) noexcept;
  ~Session();

  int rank() const;
  int size() const;
  const Device& device() const;
  const std::string& host() const;
  comm::Communicator& comm() const;
  // The same ranks, same backend, for the model's gradient all-reduce, which runs beside the layers'
  // own communication (its own stream on CUDA, a helper thread on the CPU): NCCL orders one
  // communicator's operations whatever their streams, and MPI calls on two threads at once need
  // distinct communicators. On NCCL it is split from comm() (resources of its own; NCCL >= 2.18) the
  // first time it is asked for: that call is collective (Model's constructor makes it).
  comm::Communicator& grad_comm() const;
  // The stream work is enqueued on (null on the CPU backend, or the default stream).
  Stream stream() const;

 private:
  struct State;
  explicit Session(std::unique_ptr<State> state);
  std::unique_ptr<State> state_;
};

}  // namespace ringcast
