// The Communicator suite on device memory through NcclCommunicator (1, 2 and 4 ranks; on a machine
// with one GPU the ranks share it, see select_device), plus the NCCL-only paths: the unique-id
// constructor, bf16/f16 reductions (in the suite), and the timeout that aborts a stuck exchange.
// Skips (exit 77) where no CUDA device is usable.
#include "comm_suite.hpp"

#include <ringcast/comm/bootstrap.hpp>
#include <ringcast/comm/nccl_communicator.hpp>
#include <ringcast/cuda_check.hpp>

#include <cuda_runtime_api.h>

namespace ringcast::comm::testing {
namespace {

// The device this process uses, chosen once (collective: every rank calls it in the first suite).
const Device& device() {
  static const Device d = select_device(local_topology(MPI_COMM_WORLD));
  return d;
}

struct NcclBackend {
  static constexpr bool kReducesHalf = true;
  static std::unique_ptr<Communicator> make() {
    if (device().kind != DeviceKind::kCuda) return nullptr;
    return std::make_unique<NcclCommunicator>(MPI_COMM_WORLD, device().index);
  }
  static void* allocate(std::size_t bytes) {
    void* p = nullptr;
    if (bytes > 0) RINGCAST_CUDA_CHECK(cudaMalloc(&p, bytes));
    return p;
  }
  static void release(void* p) { RINGCAST_CUDA_CHECK(cudaFree(p)); }
  // Copies go on the test's stream and finish before returning: a cudaMemcpy from pageable memory may
  // return before its DMA lands, and nothing orders the legacy stream with a non-blocking one.
  static void upload(void* dst, const void* src, std::size_t bytes) { copy(dst, src, bytes, cudaMemcpyHostToDevice); }
  static void download(void* dst, const void* src, std::size_t bytes) { copy(dst, src, bytes, cudaMemcpyDeviceToHost); }
  static void copy(void* dst, const void* src, std::size_t bytes, cudaMemcpyKind kind) {
    if (bytes == 0) return;
    const auto s = static_cast<cudaStream_t>(stream());
    RINGCAST_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, kind, s));
    RINGCAST_CUDA_CHECK(cudaStreamSynchronize(s));
  }
  // One non-blocking stream for the whole run; the legacy default stream would hide ordering bugs.
  static Stream stream() {
    static const cudaStream_t s = [] {
      cudaStream_t created = nullptr;
      RINGCAST_CUDA_CHECK(cudaStreamCreateWithFlags(&created, cudaStreamNonBlocking));
      return created;
    }();
    return s;
  }
};

INSTANTIATE_TYPED_TEST_SUITE_P(Nccl, CommSuite, ::testing::Types<NcclBackend>);

class NcclOnly : public ::testing::Test {
 protected:
  void SetUp() override {
    if (device().kind != DeviceKind::kCuda) GTEST_SKIP() << "no CUDA device";
  }
};

TEST_F(NcclOnly, MakeCommunicatorPicksNccl) {
  const auto comm = make_communicator(MPI_COMM_WORLD, device());
  EXPECT_EQ(comm->backend_name(), "nccl");
  EXPECT_EQ(comm->memory(), DeviceKind::kCuda);
}

TEST_F(NcclOnly, UniqueIdConstructorForEmbedding) {
  int rank = 0, size = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);
  // As an embedding job would: one rank makes the id, its own channel hands it over.
  NcclUniqueId id{};
  if (rank == 0) id = NcclCommunicator::make_unique_id();
  MPI_Bcast(id.data(), static_cast<int>(id.size()), MPI_BYTE, 0, MPI_COMM_WORLD);
  NcclCommunicator comm(id, rank, size, device().index);
  EXPECT_EQ(comm.rank(), rank);
  EXPECT_EQ(comm.size(), size);
  const std::size_t n = 1001;
  Region<NcclBackend> buf(payload(DType::kF64, n, 140, rank, -1));
  comm.all_reduce(buf.view(DType::kF64, n), buf.view(DType::kF64, n), ReduceOp::kSum, NcclBackend::stream());
  comm.synchronize(NcclBackend::stream());
  Bytes want(n * sizeof(double));
  for (std::size_t i = 0; i < n; ++i) {
    double s = 0;
    for (int j = 0; j < size; ++j) s += sample(DType::kF64, key(140, j, -1, i));
    store(DType::kF64, s, want.data() + i * sizeof(double));
  }
  EXPECT_TRUE(same(DType::kF64, buf.read(), want));
}

// Every rank sends 64 MiB to its right neighbour (itself when alone) and nobody posts a receive.
// A ring exchange first connects the peers, so the send is enqueued and its kernel waits for a
// receiver that never comes (far more than NCCL buffers): synchronize must time out, abort and
// throw. Alone, NCCL refuses the unmatched self-send at once, which must abort and throw as well.
// Symmetric by construction: every rank gets stuck on its own and none depends on another to leave.
TEST_F(NcclOnly, UnmatchedSendTimesOutAndAborts) {
  std::unique_ptr<NcclCommunicator> comm;
  {
    ScopedEnv env("RINGCAST_COMM_TIMEOUT_S", "3");
    comm = std::make_unique<NcclCommunicator>(MPI_COMM_WORLD, device().index);
  }
  const int r = comm->rank();
  const int p = comm->size();
  cudaStream_t stream = nullptr;
  RINGCAST_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  const std::size_t n = std::size_t{16} << 20;
  Region<NcclBackend> out(payload(DType::kF32, 1, 150, r, -1));
  Region<NcclBackend> in(sizeof(float));
  comm->ring_shift(out.view(DType::kF32, 1), in.view(DType::kF32, 1), 1, stream);
  comm->synchronize(stream);
  EXPECT_TRUE(same(DType::kF32, in.read(), payload(DType::kF32, 1, 150, (r + p - 1) % p, -1)));
  Region<NcclBackend> big(n * sizeof(float));
  const SendOp send{(r + 1) % p, big.view(DType::kF32, n)};
  try {
    comm->exchange({&send, 1}, {}, stream);
    comm->synchronize(stream);
    ADD_FAILURE() << "a send that nobody receives completed";
  } catch (const Error& e) {
    EXPECT_NE(e.message().find(p > 1 ? "RINGCAST_COMM_TIMEOUT_S" : "aborted"), std::string::npos) << e.message();
  }
  // The communicator is unusable now and says so instead of hanging; the abort ended its kernels.
  EXPECT_THROW(comm->barrier(stream), Error);
  comm.reset();
  RINGCAST_CUDA_CHECK(cudaStreamSynchronize(stream));
  RINGCAST_CUDA_CHECK(cudaStreamDestroy(stream));
}

}  // namespace
}  // namespace ringcast::comm::testing
