#include "loom/runtime/core/error.h"

#include <mpi.h>
#include <unistd.h>

#include <climits>
#include <cstdlib>
#include <sstream>

namespace loom {

int world_rank_or_minus_one() {
  int initialized = 0, finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  if (!initialized || finalized) {
    // A torchrun job (the Python module over c10d) has no MPI: its launcher's
    // RANK names the process.
    const char* env = std::getenv("RANK");
    if (env == nullptr || *env == '\0') return -1;
    char* end = nullptr;
    const long rank = std::strtol(env, &end, 10);
    return *end == '\0' && rank >= 0 && rank <= INT_MAX ? static_cast<int>(rank) : -1;
  }
  int rank = -1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  return rank;
}

const std::string& host_name() {
  static const std::string name = [] {
    char buf[256] = {0};
    if (gethostname(buf, sizeof(buf) - 1) != 0) return std::string("unknown-host");
    return std::string(buf);
  }();
  return name;
}

std::string error_location(const char* file, int line, const std::string& what) {
  std::ostringstream out;
  out << file << ":" << line << " rank " << world_rank_or_minus_one() << " on host " << host_name() << ": "
      << what;
  return out.str();
}

namespace detail {
void throw_mpi_error(int code, const char* call, const char* op, const char* file, int line) {
  char text[MPI_MAX_ERROR_STRING] = {0};
  int len = 0;
  MPI_Error_string(code, text, &len);
  std::ostringstream what;
  what << "MPI error in operation '" << op << "' (" << call << "): " << std::string(text, len);
  throw CommError(error_location(file, line, what.str()));
}
}  // namespace detail

}  // namespace loom
