// The Communicator suite on host memory through MpiCommunicator (run with 1, 2 and 4 ranks), plus
// what only the MPI backend and the bootstrap do: bf16/f16 reductions are refused, local topology.
#include "comm_suite.hpp"

#include <ringcast/comm/bootstrap.hpp>
#include <ringcast/comm/mpi_communicator.hpp>

#include <cstring>

namespace ringcast::comm::testing {
namespace {

struct MpiBackend {
  static constexpr bool kReducesHalf = false;
  static std::unique_ptr<Communicator> make() { return std::make_unique<MpiCommunicator>(MPI_COMM_WORLD); }
  static void* allocate(std::size_t bytes) { return bytes == 0 ? nullptr : ::operator new(bytes); }
  static void release(void* p) { ::operator delete(p); }
  static void upload(void* dst, const void* src, std::size_t bytes) {
    if (bytes > 0) std::memcpy(dst, src, bytes);
  }
  static void download(void* dst, const void* src, std::size_t bytes) {
    if (bytes > 0) std::memcpy(dst, src, bytes);
  }
  static Stream stream() { return nullptr; }
};

INSTANTIATE_TYPED_TEST_SUITE_P(Mpi, CommSuite, ::testing::Types<MpiBackend>);

TEST(MpiCommunicator, HalfPrecisionReductionsAreRefused) {
  MpiCommunicator comm(MPI_COMM_WORLD);
  std::vector<std::uint16_t> a(4 * static_cast<std::size_t>(comm.size()), 0x3f80);  // bf16 1.0
  for (DType t : {DType::kBF16, DType::kF16}) {
    const Buffer all{a.data(), a.size(), t};
    const Buffer one{a.data(), 4, t};
    try {
      comm.all_reduce(one, one, ReduceOp::kSum);
      ADD_FAILURE() << "all_reduce on " << dtype_name(t) << " did not throw";
    } catch (const Error& e) {
      EXPECT_NE(e.message().find("not supported"), std::string::npos) << e.message();
    }
    std::vector<std::uint16_t> out(4);
    EXPECT_THROW(comm.reduce_scatter(all, Buffer{out.data(), 4, t}, ReduceOp::kMax), Error);
  }
}

TEST(MpiCommunicator, DescribesItself) {
  MpiCommunicator comm(MPI_COMM_WORLD);
  int rank = 0, size = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  EXPECT_EQ(comm.rank(), rank);
  EXPECT_EQ(comm.size(), size);
  EXPECT_EQ(comm.memory(), DeviceKind::kCpu);
  EXPECT_EQ(comm.backend_name(), "mpi");
}

TEST(Bootstrap, LocalTopologyCountsTheRanksOfThisHost) {
  const LocalTopology t = local_topology(MPI_COMM_WORLD);
  int rank = 0, size = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  EXPECT_EQ(t.rank, rank);
  EXPECT_EQ(t.size, size);
  EXPECT_FALSE(t.host.empty());
  ASSERT_GE(t.local_rank, 0);
  ASSERT_LT(t.local_rank, t.local_size);
  // Local ranks on each host are 0..local_size-1, once each: their sum over the world says so.
  int local_sum = 0, expected_sum = 0;
  int leaders = t.local_rank == 0 ? 1 : 0, hosts = 0;
  const int triangle = t.local_rank == 0 ? t.local_size * (t.local_size - 1) / 2 : 0;
  MPI_Allreduce(&t.local_rank, &local_sum, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
  MPI_Allreduce(&triangle, &expected_sum, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
  MPI_Allreduce(&leaders, &hosts, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
  EXPECT_EQ(local_sum, expected_sum);
  EXPECT_GE(hosts, 1);
}

TEST(Bootstrap, CpuDeviceGetsTheMpiBackend) {
  const auto comm = make_communicator(MPI_COMM_WORLD, Device{DeviceKind::kCpu, 0});
  EXPECT_EQ(comm->backend_name(), "mpi");
  EXPECT_EQ(comm->memory(), DeviceKind::kCpu);
}

}  // namespace
}  // namespace ringcast::comm::testing
