// Bootstrap: from an MPI communicator to a device and a Communicator. Ranks on one host (one
// MPI_COMM_TYPE_SHARED group) take GPUs round-robin by local rank; with no usable GPU (no CUDA in
// the build, no driver, no device) the rank runs on the CPU with the MPI backend. All collective
// over the given communicator.
#pragma once

#include <ringcast/comm/communicator.hpp>
#include <ringcast/tensor.hpp>

#include <mpi.h>

#include <memory>
#include <string>

namespace ringcast::comm {

struct LocalTopology {
  int rank = 0;
  int size = 1;
  int local_rank = 0;  // among the ranks that share this host's memory
  int local_size = 1;
  std::string host;
};

LocalTopology local_topology(MPI_Comm comm);

// Makes the chosen GPU current. When more local ranks than GPUs share a host, each rank gets
// NCCL_HOSTID=ringcast-<host>-<rank> (unless the variable is set) so that NCCL accepts several
// ranks on one GPU: correct and slow, for tests only (DESIGN.md §7). Call before creating NCCL
// communicators.
Device select_device(const LocalTopology& topology);

// NcclCommunicator for a CUDA device (it must be current), MpiCommunicator for the CPU.
std::unique_ptr<Communicator> make_communicator(MPI_Comm comm, const Device& device);

}  // namespace ringcast::comm
