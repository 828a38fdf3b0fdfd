// MpiCommunicator: each operation maps to one MPI call (grouped point-to-point to Irecv/Isend and
// one Waitall). bf16/f16 travel as 16-bit words; MPI cannot reduce them, so reductions reject them.
// Counts and displacements are converted to int with a check: MPI's int counts would silently wrap.
#include <ringcast/comm/mpi_communicator.hpp>

#include "mpi_check.hpp"

#include <chrono>
#include <climits>
#include <cstring>
#include <vector>

namespace ringcast::comm {
namespace {

// One tag for every message: each exchange completes before the next starts, and MPI keeps the
// order of messages between a pair of ranks, which is the order the callers list them in.
constexpr int kTag = 0x52c;

MPI_Datatype mpi_type(DType t) {
  switch (t) {
    case DType::kF32: return MPI_FLOAT;
    case DType::kF64: return MPI_DOUBLE;
    case DType::kBF16:
    case DType::kF16: return MPI_UINT16_T;
    case DType::kI32: return MPI_INT32_T;
    case DType::kI64: return MPI_INT64_T;
    case DType::kU8: return MPI_UINT8_T;
  }
  RINGCAST_THROW("MPI backend: unknown dtype {}", static_cast<int>(t));
}

MPI_Datatype reduction_type(std::string_view op, DType t) {
  RINGCAST_CHECK(t != DType::kBF16 && t != DType::kF16,
                 "MPI backend: {} on {} is not supported (reductions take f32, f64, i32, i64, u8)", op,
                 dtype_name(t));
  return mpi_type(t);
}

MPI_Op mpi_op(ReduceOp op) { return op == ReduceOp::kSum ? MPI_SUM : MPI_MAX; }

// MPI computes offsets into whole buffers in int elements too, so callers check buffer sizes as
// well as message counts.
void require_int(std::string_view op, std::size_t n) {
  RINGCAST_CHECK(n <= static_cast<std::size_t>(INT_MAX),
                 "MPI backend: {} of {} elements exceeds MPI's int count limit ({})", op, n, INT_MAX);
}

int mpi_count(std::string_view op, std::size_t n) {
  require_int(op, n);
  return static_cast<int>(n);
}

// Per-rank counts and packed displacements as MPI's ints.
struct CountsAndDispls {
  std::vector<int> counts;
  std::vector<int> displs;
};

CountsAndDispls counts_and_displs(std::string_view op, std::span<const std::size_t> counts) {
  CountsAndDispls c;
  c.counts.reserve(counts.size());
  c.displs.reserve(counts.size());
  std::size_t offset = 0;
  for (std::size_t n : counts) {
    c.counts.push_back(mpi_count(op, n));
    c.displs.push_back(mpi_count(op, offset));
    offset += n;
  }
  require_int(op, offset);
  return c;
}

}  // namespace

MpiCommunicator::MpiCommunicator(MPI_Comm comm) {
  RINGCAST_CHECK(comm != MPI_COMM_NULL, "MpiCommunicator: MPI_COMM_NULL");
  // The duplicate gets MPI_ERRORS_RETURN before any call on it can fail fatally.
  RINGCAST_MPI_CHECK(MPI_Comm_dup(comm, &comm_));
  RINGCAST_MPI_CHECK(MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN));
  RINGCAST_MPI_CHECK(MPI_Comm_rank(comm_, &rank_));
  RINGCAST_MPI_CHECK(MPI_Comm_size(comm_, &size_));
}

MpiCommunicator::~MpiCommunicator() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  // After MPI_Finalize every communicator is gone; freeing would be an error.
  if (!finalized) MPI_Comm_free(&comm_);
}

void MpiCommunicator::do_local_copy(ConstBuffer src, Buffer dst, Stream) {
  std::memcpy(dst.data, src.data, src.bytes());
}

void MpiCommunicator::do_exchange(std::span<const SendOp> sends, std::span<const RecvOp> recvs, Stream) {
  std::vector<MPI_Request> requests;
  requests.reserve(sends.size() + recvs.size());
  // Receives first, so that a send to a rank that already posted its receive can complete in place.
  for (const auto& r : recvs) {
    RINGCAST_MPI_CHECK(MPI_Irecv(r.buf.data, mpi_count("exchange", r.buf.count), mpi_type(r.buf.dtype), r.peer, kTag,
                                 comm_, &requests.emplace_back()));
  }
  for (const auto& s : sends) {
    RINGCAST_MPI_CHECK(MPI_Isend(s.buf.data, mpi_count("exchange", s.buf.count), mpi_type(s.buf.dtype), s.peer, kTag,
                                 comm_, &requests.emplace_back()));
  }
  RINGCAST_MPI_CHECK(MPI_Waitall(static_cast<int>(requests.size()), requests.data(), MPI_STATUSES_IGNORE));
}

void MpiCommunicator::do_all_gather(ConstBuffer send, Buffer recv, Stream) {
  const int n = mpi_count("all_gather", send.count);
  require_int("all_gather", recv.count);
  const MPI_Datatype t = mpi_type(send.dtype);
  RINGCAST_MPI_CHECK(MPI_Allgather(send.data, n, t, recv.data, n, t, comm_));
}

void MpiCommunicator::do_all_gather_v(ConstBuffer send, Buffer recv, std::span<const std::size_t> recv_counts,
                                      Stream) {
  const auto c = counts_and_displs("all_gather_v", recv_counts);
  const MPI_Datatype t = mpi_type(send.dtype);
  RINGCAST_MPI_CHECK(MPI_Allgatherv(send.data, mpi_count("all_gather_v", send.count), t, recv.data, c.counts.data(),
                                    c.displs.data(), t, comm_));
}

void MpiCommunicator::do_all_reduce(ConstBuffer send, Buffer recv, ReduceOp op, Stream) {
  const MPI_Datatype t = reduction_type("all_reduce", send.dtype);
  const void* in = send.data == recv.data ? MPI_IN_PLACE : send.data;
  RINGCAST_MPI_CHECK(MPI_Allreduce(in, recv.data, mpi_count("all_reduce", recv.count), t, mpi_op(op), comm_));
}

void MpiCommunicator::do_reduce_scatter(ConstBuffer send, Buffer recv, ReduceOp op, Stream) {
  const MPI_Datatype t = reduction_type("reduce_scatter", send.dtype);
  require_int("reduce_scatter", send.count);
  RINGCAST_MPI_CHECK(
      MPI_Reduce_scatter_block(send.data, recv.data, mpi_count("reduce_scatter", recv.count), t, mpi_op(op), comm_));
}

void MpiCommunicator::do_all_to_all(ConstBuffer send, Buffer recv, Stream) {
  require_int("all_to_all", send.count);
  const int block = mpi_count("all_to_all", send.count / static_cast<std::size_t>(size_));
  const MPI_Datatype t = mpi_type(send.dtype);
  RINGCAST_MPI_CHECK(MPI_Alltoall(send.data, block, t, recv.data, block, t, comm_));
}

void MpiCommunicator::do_all_to_all_v(ConstBuffer send, std::span<const std::size_t> send_counts, Buffer recv,
                                      std::span<const std::size_t> recv_counts, Stream) {
  const auto s = counts_and_displs("all_to_all_v", send_counts);
  const auto r = counts_and_displs("all_to_all_v", recv_counts);
  const MPI_Datatype t = mpi_type(send.dtype);
  RINGCAST_MPI_CHECK(MPI_Alltoallv(send.data, s.counts.data(), s.displs.data(), t, recv.data, r.counts.data(),
                                   r.displs.data(), t, comm_));
}

void MpiCommunicator::do_broadcast(Buffer buf, int root, Stream) {
  RINGCAST_MPI_CHECK(MPI_Bcast(buf.data, mpi_count("broadcast", buf.count), mpi_type(buf.dtype), root, comm_));
}

void MpiCommunicator::do_barrier(Stream) { RINGCAST_MPI_CHECK(MPI_Barrier(comm_)); }

void MpiCommunicator::metadata_all_gather(std::span<const std::int64_t> mine, std::span<std::int64_t> all) {
  RINGCAST_CHECK(all.size() == mine.size() * static_cast<std::size_t>(size_),
                 "metadata_all_gather: {} slots for {} ranks x {}", all.size(), size_, mine.size());
  const int n = mpi_count("metadata_all_gather", mine.size());
  RINGCAST_MPI_CHECK(MPI_Allgather(mine.data(), n, MPI_INT64_T, all.data(), n, MPI_INT64_T, comm_));
}

TimeMark MpiCommunicator::do_mark(Stream) {
  return {.set = true,
          .host_s = std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count()};
}

double MpiCommunicator::do_seconds_between(const TimeMark& from, const TimeMark& to) { return to.host_s - from.host_s; }

}  // namespace ringcast::comm
