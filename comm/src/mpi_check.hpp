// RINGCAST_MPI_CHECK: every MPI call is checked; an error code becomes an Error carrying MPI's own
// message and the call. Only works on communicators with MPI_ERRORS_RETURN (MpiCommunicator sets it
// on its duplicate); with the default MPI_ERRORS_ARE_FATAL, MPI aborts before returning a code.
#pragma once

#include <ringcast/error.hpp>

#include <mpi.h>

namespace ringcast::comm::detail {

[[noreturn]] inline void throw_mpi_error(const char* file, int line, int code, const char* call) {
  char text[MPI_MAX_ERROR_STRING] = {};
  int length = 0;
  if (MPI_Error_string(code, text, &length) != MPI_SUCCESS) length = 0;
  throw_error(file, line, fmt::format("MPI error {} ({}) in {}", code, std::string_view(text, length), call));
}

}  // namespace ringcast::comm::detail

#define RINGCAST_MPI_CHECK(call)                                                                 \
  do {                                                                                           \
    const int ringcast_mpi_status_ = (call);                                                     \
    if (ringcast_mpi_status_ != MPI_SUCCESS) [[unlikely]] {                                      \
      ::ringcast::comm::detail::throw_mpi_error(__FILE__, __LINE__, ringcast_mpi_status_, #call); \
    }                                                                                            \
  } while (0)
