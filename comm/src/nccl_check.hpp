// RINGCAST_NCCL_CHECK: for NCCL calls that complete synchronously (ncclGetUniqueId, ncclGroupStart,
// ncclSend/ncclRecv inside a group). Calls on a non-blocking communicator that may return
// ncclInProgress go through NcclCommunicator's poll instead, which also handles the timeout.
#pragma once

#include <ringcast/error.hpp>

#include <nccl.h>

#define RINGCAST_NCCL_CHECK(call)                                                                  \
  do {                                                                                             \
    const ncclResult_t ringcast_nccl_status_ = (call);                                             \
    if (ringcast_nccl_status_ != ncclSuccess) [[unlikely]] {                                       \
      RINGCAST_THROW("NCCL error {} ({}) in {}", ncclGetErrorString(ringcast_nccl_status_),        \
                     ncclGetLastError(nullptr), #call);                                            \
    }                                                                                              \
  } while (0)
