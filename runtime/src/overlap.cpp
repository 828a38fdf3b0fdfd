// CommOverlap: a comm stream + two events on CUDA, a helper thread on the CPU backend.
#include "overlap.hpp"

#include <ringcast/error.hpp>

#include <mpi.h>

#include <utility>

#if RINGCAST_WITH_CUDA
#include <ringcast/cuda_check.hpp>
#endif

namespace ringcast {

CommOverlap::CommOverlap(const Session& session, comm::Communicator& comm, CallerComm caller)
    : session_(session), comm_(comm) {
  if (session.device().kind == DeviceKind::kCuda) {
#if RINGCAST_WITH_CUDA
    cudaStream_t s = nullptr;
    cudaEvent_t ready = nullptr, done = nullptr;
    RINGCAST_CUDA_CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    RINGCAST_CUDA_CHECK(cudaEventCreateWithFlags(&ready, cudaEventDisableTiming));
    RINGCAST_CUDA_CHECK(cudaEventCreateWithFlags(&done, cudaEventDisableTiming));
    comm_stream_ = s;
    ready_ = ready;
    done_ = done;
#endif
    return;
  }
  int level = MPI_THREAD_SINGLE;
  MPI_Query_thread(&level);
  threaded_ = level >= (caller == CallerComm::kBusy ? MPI_THREAD_MULTIPLE : MPI_THREAD_SERIALIZED);
}

CommOverlap::~CommOverlap() {
  if (thread_.joinable()) thread_.join();
#if RINGCAST_WITH_CUDA
  if (comm_stream_) {
    cudaStreamSynchronize(static_cast<cudaStream_t>(comm_stream_));
    cudaEventDestroy(static_cast<cudaEvent_t>(ready_));
    cudaEventDestroy(static_cast<cudaEvent_t>(done_));
    cudaStreamDestroy(static_cast<cudaStream_t>(comm_stream_));
  }
#endif
}

void CommOverlap::start(std::function<void(Stream)> step) {
#if RINGCAST_WITH_CUDA
  if (comm_stream_) {  // behind the steps in flight: the comm stream keeps their order
    const auto compute = static_cast<cudaStream_t>(session_.stream());
    const auto comm = static_cast<cudaStream_t>(comm_stream_);
    RINGCAST_CUDA_CHECK(cudaEventRecord(static_cast<cudaEvent_t>(ready_), compute));
    RINGCAST_CUDA_CHECK(cudaStreamWaitEvent(comm, static_cast<cudaEvent_t>(ready_), 0));
    step(comm_stream_);
    RINGCAST_CUDA_CHECK(cudaEventRecord(static_cast<cudaEvent_t>(done_), comm));
    // Only once enqueued: a step that threw leaves nothing for wait() (the destructor drains the stream).
    pending_ = true;
    return;
  }
#endif
  if (pending_) wait();
  pending_ = true;
  if (!threaded_) {
    step(nullptr);
    return;
  }
  error_ = nullptr;
  thread_ = std::thread([this, step = std::move(step)] {
    try {
      step(nullptr);
    } catch (...) {
      error_ = std::current_exception();
    }
  });
}

void CommOverlap::wait() {
  RINGCAST_CHECK(pending_, "CommOverlap: no step in flight");
  pending_ = false;
#if RINGCAST_WITH_CUDA
  if (comm_stream_) {
    // Where the compute reaches the wait (marked before the host blocks, which may drain the compute)
    // and where the comm stream's work ends.
    const comm::TimeMark reached = comm_.mark(session_.stream());
    comm_.add_exposed(reached, comm_.mark(comm_stream_));
    // The host waits here (the compute already enqueued keeps the GPU busy) so that a failed or
    // silent peer surfaces as an Error within the communicator's timeout.
    comm_.synchronize(comm_stream_);
    RINGCAST_CUDA_CHECK(cudaStreamWaitEvent(static_cast<cudaStream_t>(session_.stream()),
                                            static_cast<cudaEvent_t>(done_), 0));
    return;
  }
#endif
  const comm::TimeMark reached = comm_.mark(nullptr);
  if (thread_.joinable()) thread_.join();
  comm_.add_exposed(reached, comm_.mark(nullptr));
  if (error_) std::rethrow_exception(std::exchange(error_, nullptr));
}

}  // namespace ringcast
