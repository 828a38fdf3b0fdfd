// CommOverlap: runs one communication step concurrently with the compute that follows it. On CUDA
// the communication goes on a second stream, ordered after the work already on the compute stream
// (an event) and joined back before the compute that needs its result (another event). On the CPU
// backend it runs on a helper thread while the calling thread computes. That needs MPI at
// MPI_THREAD_SERIALIZED or above when only the helper calls MPI meanwhile, and MPI_THREAD_MULTIPLE
// when the calling thread keeps communicating on another communicator (the model's gradient sums
// beside the layers' own communication); with less, the step runs inline, at the same point.
// While the step's communicator times exposed communication, wait() adds what the compute could not
// hide: from where the compute reached the wait to where the comm stream's work ended (CUDA), or the
// time the calling thread blocked in the join (CPU).
#pragma once

#include <ringcast/session.hpp>

#include <exception>
#include <functional>
#include <thread>

namespace ringcast {

// Whether the calling thread communicates on another communicator while a step is in flight.
enum class CallerComm { kIdle, kBusy };

class CommOverlap {
 public:
  // Steps communicate on session.comm(), which the calling thread leaves alone meanwhile.
  explicit CommOverlap(const Session& session) : CommOverlap(session, session.comm(), CallerComm::kIdle) {}
  // Steps communicate on `comm` (it must outlive this object).
  CommOverlap(const Session& session, comm::Communicator& comm, CallerComm caller);
  ~CommOverlap();
  CommOverlap(const CommOverlap&) = delete;
  CommOverlap& operator=(const CommOverlap&) = delete;

  // Starts `step(stream)`, which enqueues communication on `stream` (or, on the CPU, performs it).
  // With steps in flight, CUDA queues it behind them on the comm stream (nothing waits); the CPU
  // waits for them first (one helper thread at a time).
  void start(std::function<void(Stream)> step);
  // Makes the compute stream wait for the steps in flight; surfaces their errors (and, on CUDA, the
  // communicator's asynchronous errors and timeout).
  void wait();
  // Whether steps run beside the compute (CUDA, or a helper thread on the CPU) rather than inline.
  bool concurrent() const { return comm_stream_ != nullptr || threaded_; }

 private:
  const Session& session_;
  comm::Communicator& comm_;
  bool threaded_ = false;
  Stream comm_stream_ = nullptr;
  void* ready_ = nullptr;  // cudaEvent_t: compute work before the step is done
  void* done_ = nullptr;   // cudaEvent_t: the step is done
  std::thread thread_;
  std::exception_ptr error_;
  bool pending_ = false;
};

}  // namespace ringcast
