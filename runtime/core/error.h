// Loom's error types and the one error macro per library.
//
// Library code never calls exit(): it throws. Each macro turns a failing call of
// its library into a typed exception whose message names file:line, the rank,
// the host, the operation and the library's own message, so that a log line from
// a 64-rank job says where and what broke.
//   LOOM_MPI_CHECK(MPI_Allgather(...), "all_gather")   -> loom::CommError
//   LOOM_NCCL_CHECK / LOOM_CUDA_CHECK live in nccl_check.h / cuda_check.h, which
//   only the CUDA builds include.
// Argument checks use TORCH_CHECK (c10::Error), as libtorch itself does.
#pragma once

#include <stdexcept>
#include <string>

namespace loom {

// Base of every error Loom throws on purpose.
class LoomError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// A communication library reported a failure, or an operation was not supported
// by the backend it was called on.
class CommError : public LoomError {
 public:
  using LoomError::LoomError;
};

// A collective did not finish within the communicator's timeout (only thrown
// when the watchdog is configured to throw rather than abort the job).
class CommTimeout : public CommError {
 public:
  using CommError::CommError;
};

// A configuration file or override is invalid; the message names the field.
class ConfigError : public LoomError {
 public:
  using LoomError::LoomError;
};

// A valid request that this build cannot serve (a device it was not built
// for, a combination loom-train does not offer): the message names it.
class UnsupportedError : public LoomError {
 public:
  using LoomError::LoomError;
};


// Rank in MPI_COMM_WORLD (-1 before MPI_Init) and host name of this process.
int world_rank_or_minus_one();
const std::string& host_name();

// "file:line rank R on host H: <what>" as used by every error macro.
std::string error_location(const char* file, int line, const std::string& what);

namespace detail {
[[noreturn]] void throw_mpi_error(int code, const char* call, const char* op, const char* file, int line);
}  // namespace detail

}  // namespace loom

#define LOOM_MPI_CHECK(call, op)                                                \
  do {                                                                          \
    int loom_mpi_rc_ = (call);                                                  \
    if (loom_mpi_rc_ != MPI_SUCCESS)                                            \
      ::loom::detail::throw_mpi_error(loom_mpi_rc_, #call, op, __FILE__, __LINE__); \
  } while (0)
