// Session: binds a rank to its communicator, device and stream. Device selection and the choice of
// communicator (NCCL on GPUs, MPI on host memory) are comm/bootstrap's; the session owns what it
// creates (both communicators, the stream when the caller did not hand one in).
#include <ringcast/comm/bootstrap.hpp>
#include <ringcast/error.hpp>
#include <ringcast/log.hpp>
#include <ringcast/session.hpp>

#if RINGCAST_WITH_CUDA
#include <ringcast/comm/nccl_communicator.hpp>
#include <ringcast/cuda_check.hpp>
#endif

#include <unistd.h>

#include <utility>

namespace ringcast {

struct Session::State {
  int rank = 0;
  int size = 1;
  Device device{};
  std::string host;
  std::unique_ptr<comm::Communicator> comm, grad_comm;
  Stream stream = nullptr;
  bool owns_stream = false;

  ~State() {
#if RINGCAST_WITH_CUDA
    grad_comm.reset();  // the split before its parent, both before the stream they may be using
    comm.reset();
    if (owns_stream && stream) cudaStreamDestroy(static_cast<cudaStream_t>(stream));
#endif
  }
};

Session::Session(std::unique_ptr<State> state) : state_(std::move(state)) {}
Session::Session(Session&&) noexcept = default;
Session& Session::operator=(Session&&) noexcept = default;
Session::~Session() = default;

Session Session::from_mpi(MPI_Comm mpi_comm, Backend backend) {
  auto s = std::make_unique<State>();
  const comm::LocalTopology topo = comm::local_topology(mpi_comm);
  s->rank = topo.rank;
  s->size = topo.size;
  s->host = topo.host;
  // Log lines name the process by its rank in the job, whatever communicator this session spans
  // (a reference run on MPI_COMM_SELF must not relabel every rank as rank 0).
  int world_rank = 0, world_size = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &world_rank);
  MPI_Comm_size(MPI_COMM_WORLD, &world_size);
  log::set_rank(world_rank, world_size, topo.host);
  if (backend != Backend::kCpu) s->device = comm::select_device(topo);
  RINGCAST_CHECK(backend != Backend::kCuda || s->device.kind == DeviceKind::kCuda,
                 "the CUDA backend was requested but rank {} on {} sees no CUDA device", topo.rank, topo.host);
#if RINGCAST_WITH_CUDA
  if (s->device.kind == DeviceKind::kCuda) {
    cudaStream_t stream = nullptr;
    RINGCAST_CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    s->stream = stream;
    s->owns_stream = true;
  }
#endif
  s->comm = comm::make_communicator(mpi_comm, s->device);
  // grad_comm(): on MPI its own duplicate, made now (cheap); on NCCL a split, made on first use.
  if (s->device.kind == DeviceKind::kCpu) s->grad_comm = comm::make_communicator(mpi_comm, s->device);
  log::debug("session: rank {}/{} on {} uses {} device {} and the {} communicator", s->rank, s->size, s->host,
             s->device.kind == DeviceKind::kCuda ? "CUDA" : "CPU", s->device.index, s->comm->backend_name());
  return Session(std::move(s));
}

Session Session::from_nccl_id(const std::array<char, 128>& unique_id, int rank, int size, int device,
                              Stream stream) {
#if RINGCAST_WITH_CUDA
  auto s = std::make_unique<State>();
  s->rank = rank;
  s->size = size;
  char host[256] = {};
  gethostname(host, sizeof(host) - 1);
  s->host = host;
  log::set_rank(rank, size, s->host);
  RINGCAST_CUDA_CHECK(cudaSetDevice(device));
  s->device = Device{DeviceKind::kCuda, device};
  s->stream = stream;
  s->comm = std::make_unique<comm::NcclCommunicator>(unique_id, rank, size, device);
  return Session(std::move(s));
#else
  (void)unique_id, (void)rank, (void)size, (void)device, (void)stream;
  RINGCAST_THROW("Session::from_nccl_id needs the CUDA backend; this build has none");
#endif
}

int Session::rank() const { return state_->rank; }
int Session::size() const { return state_->size; }
const Device& Session::device() const { return state_->device; }
const std::string& Session::host() const { return state_->host; }
comm::Communicator& Session::comm() const { return *state_->comm; }
comm::Communicator& Session::grad_comm() const {
#if RINGCAST_WITH_CUDA
  if (!state_->grad_comm)  // NCCL: split on first use, collectively (session.hpp)
    state_->grad_comm = comm::NcclCommunicator::split(static_cast<comm::NcclCommunicator&>(*state_->comm));
#endif
  return *state_->grad_comm;
}
Stream Session::stream() const { return state_->stream; }

}  // namespace ringcast
