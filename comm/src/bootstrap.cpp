// Bootstrap: local ranks from MPI_Comm_split_type, the GPU from the local rank, the backend from
// the device. A missing driver is not an error: CI machines have none and run on the CPU.
#include <ringcast/comm/bootstrap.hpp>
#include <ringcast/comm/mpi_communicator.hpp>
#include <ringcast/error.hpp>
#include <ringcast/log.hpp>

#include "mpi_check.hpp"

#if RINGCAST_WITH_CUDA
#include <ringcast/comm/nccl_communicator.hpp>
#include <ringcast/cuda_check.hpp>

#include <cuda_runtime_api.h>
#endif

#include <cstdlib>

namespace ringcast::comm {

LocalTopology local_topology(MPI_Comm comm) {
  LocalTopology t;
  RINGCAST_MPI_CHECK(MPI_Comm_rank(comm, &t.rank));
  RINGCAST_MPI_CHECK(MPI_Comm_size(comm, &t.size));
  MPI_Comm local = MPI_COMM_NULL;
  RINGCAST_MPI_CHECK(MPI_Comm_split_type(comm, MPI_COMM_TYPE_SHARED, t.rank, MPI_INFO_NULL, &local));
  const int rank_status = MPI_Comm_rank(local, &t.local_rank);
  const int size_status = MPI_Comm_size(local, &t.local_size);
  RINGCAST_MPI_CHECK(MPI_Comm_free(&local));
  RINGCAST_MPI_CHECK(rank_status);
  RINGCAST_MPI_CHECK(size_status);
  char name[MPI_MAX_PROCESSOR_NAME] = {};
  int length = 0;
  RINGCAST_MPI_CHECK(MPI_Get_processor_name(name, &length));
  t.host.assign(name, static_cast<std::size_t>(length));
  return t;
}

Device select_device(const LocalTopology& topology) {
#if RINGCAST_WITH_CUDA
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    // No driver or no device: clear the error so that later CUDA calls do not report it.
    static_cast<void>(cudaGetLastError());
    count = 0;
  }
  if (count > 0) {
    const int index = topology.local_rank % count;
    RINGCAST_CUDA_CHECK(cudaSetDevice(index));
    if (topology.local_size > count) {
      const std::string host_id = fmt::format("ringcast-{}-{}", topology.host, topology.rank);
      RINGCAST_CHECK(setenv("NCCL_HOSTID", host_id.c_str(), /*overwrite=*/0) == 0, "setenv(NCCL_HOSTID) failed");
      if (topology.rank == 0) {
        log::warn("{} ranks share {} GPU(s) on {}: correct but slow, meant for tests only", topology.local_size,
                  count, topology.host);
      }
    }
    return Device{DeviceKind::kCuda, index};
  }
#endif
  static_cast<void>(topology);
  return Device{DeviceKind::kCpu, 0};
}

std::unique_ptr<Communicator> make_communicator(MPI_Comm comm, const Device& device) {
  if (device.kind == DeviceKind::kCpu) return std::make_unique<MpiCommunicator>(comm);
#if RINGCAST_WITH_CUDA
  return std::make_unique<NcclCommunicator>(comm, device.index);
#else
  RINGCAST_THROW("make_communicator: this build has no CUDA backend");
#endif
}

}  // namespace ringcast::comm
