#include "loom/runtime/comm/agreement.h"

#include <climits>
#include <string>

#include "loom/runtime/core/error.h"

namespace loom {
namespace {

enum ErrorKind : int { kConfig = 0, kUnsupported = 1, kOther = 2 };

[[noreturn]] void throw_kind(int kind, const std::string& message) {
  if (kind == kConfig) throw ConfigError(message);
  if (kind == kUnsupported) throw UnsupportedError(message);
  throw LoomError(message);
}

}  // namespace

void agree_on_failure(MPI_Comm comm, const std::function<void()>& step) {
  std::string error;
  int kind = kOther;
  bool failed = true;
  try {
    step();
    failed = false;
  } catch (const ConfigError& e) {
    error = e.what(), kind = kConfig;
  } catch (const UnsupportedError& e) {
    error = e.what(), kind = kUnsupported;
  } catch (const std::exception& e) {
    error = e.what(), kind = kOther;
  }
  if (failed && error.empty()) error = "unknown error";
  int rank = 0;
  MPI_Comm_rank(comm, &rank);
  int first_failing = failed ? rank : INT_MAX;
  LOOM_MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, &first_failing, 1, MPI_INT, MPI_MIN, comm), "set-up agreement");
  if (first_failing == INT_MAX) return;
  int header[2] = {kind, static_cast<int>(error.size())};
  LOOM_MPI_CHECK(MPI_Bcast(header, 2, MPI_INT, first_failing, comm), "set-up agreement");
  error.resize(static_cast<size_t>(header[1]));
  LOOM_MPI_CHECK(MPI_Bcast(error.data(), header[1], MPI_CHAR, first_failing, comm), "set-up agreement");
  throw_kind(header[0], first_failing == rank || first_failing == 0 ? error
                                                                     : "on rank " + std::to_string(first_failing) + ": " + error);
}

}  // namespace loom
