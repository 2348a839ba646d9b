// LOOM_NCCL_CHECK / LOOM_CUDA_CHECK: the error macros of the CUDA builds.
// They throw loom::CommError with file:line, rank, host, the operation and
// the library's message (ncclGetErrorString + ncclGetLastError, or
// cudaGetErrorString). Included only by the NCCL backend.
#pragma once

#include <cuda_runtime_api.h>
#include <nccl.h>

#include <string>

#include "loom/runtime/core/error.h"

#define LOOM_NCCL_CHECK(call, op)                                                                       \
  do {                                                                                                  \
    ncclResult_t loom_nccl_rc_ = (call);                                                                \
    if (loom_nccl_rc_ != ncclSuccess && loom_nccl_rc_ != ncclInProgress)                                \
      throw ::loom::CommError(::loom::error_location(                                                   \
          __FILE__, __LINE__,                                                                           \
          std::string("NCCL error in operation '") + (op) + "' (" #call "): " +                         \
              ncclGetErrorString(loom_nccl_rc_) + " (" + ncclGetLastError(nullptr) + ")"));             \
  } while (0)

#define LOOM_CUDA_CHECK(call, op)                                                                       \
  do {                                                                                                  \
    cudaError_t loom_cuda_rc_ = (call);                                                                 \
    if (loom_cuda_rc_ != cudaSuccess)                                                                   \
      throw ::loom::CommError(::loom::error_location(__FILE__, __LINE__,                                \
                                                     std::string("CUDA error in operation '") + (op) +  \
                                                         "' (" #call "): " + cudaGetErrorString(loom_cuda_rc_))); \
  } while (0)
