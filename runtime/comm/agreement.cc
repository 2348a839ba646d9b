#include "loom/runtime/comm/agreement.h"

#include <algorithm>
#include <cstring>
#include <string>

#include "loom/runtime/comm/mpi_communicator.h"
#include "loom/runtime/core/error.h"

namespace loom {
namespace {

enum ErrorKind : int64_t { kConfig = 0, kUnsupported = 1, kOther = 2 };

struct Failure {
  bool failed = false;
  int64_t kind = kOther;
  std::string message;
};

[[noreturn]] void throw_kind(int64_t kind, const std::string& message) {
  if (kind == kConfig) throw ConfigError(message);
  if (kind == kUnsupported) throw UnsupportedError(message);
  throw LoomError(message);
}

// Collective: the lowest failing rank's failure, the same on every rank.
Failure agree(Communicator& comm, const Failure& mine) {
  const at::Device device = comm.device();
  const int64_t size = comm.size(), rank = comm.rank();
  at::Tensor first = at::tensor({mine.failed ? rank : size}, at::kLong).to(device);
  comm.all_reduce(first, ReduceOp::kMin)->wait();
  const int64_t failing = first.cpu().item<int64_t>();
  if (failing == size) return {};
  at::Tensor header = at::tensor({mine.kind, static_cast<int64_t>(mine.message.size())}, at::kLong).to(device);
  comm.broadcast(header, static_cast<int>(failing))->wait();
  header = header.cpu();
  const int64_t length = header[1].item<int64_t>();
  at::Tensor bytes = at::zeros({std::max<int64_t>(length, 1)}, at::kByte);
  if (rank == failing) std::memcpy(bytes.data_ptr(), mine.message.data(), static_cast<size_t>(length));
  bytes = bytes.to(device);
  comm.broadcast(bytes, static_cast<int>(failing))->wait();
  bytes = bytes.cpu();
  const std::string message(static_cast<const char*>(bytes.data_ptr()), static_cast<size_t>(length));
  Failure agreed;
  agreed.failed = true;
  agreed.kind = header[0].item<int64_t>();
  agreed.message =
      failing == rank || failing == 0 ? message : "on rank " + std::to_string(failing) + ": " + message;
  return agreed;
}

Failure run(const std::function<void()>& step) {
  Failure f;
  f.failed = true;
  try {
    step();
    f.failed = false;
  } catch (const ConfigError& e) {
    f.message = e.what(), f.kind = kConfig;
  } catch (const UnsupportedError& e) {
    f.message = e.what(), f.kind = kUnsupported;
  } catch (const std::exception& e) {
    f.message = e.what(), f.kind = kOther;
  }
  if (f.failed && f.message.empty()) f.message = "unknown error";
  return f;
}

}  // namespace

void agree_on_failure(Communicator& comm, const std::function<void()>& step) {
  const Failure agreed = agree(comm, run(step));
  if (agreed.failed) throw_kind(agreed.kind, agreed.message);
}

void agree_on_failure(MPI_Comm comm, const std::function<void()>& step) {
  const Failure mine = run(step);
  const std::shared_ptr<MpiCommunicator> wrapped = MpiCommunicator::create(comm, "set-up agreement");
  const Failure agreed = agree(*wrapped, mine);
  if (agreed.failed) throw_kind(agreed.kind, agreed.message);
}

std::string agree_on_error(Communicator& comm, const std::string& error) {
  Failure mine;
  mine.failed = !error.empty();
  mine.message = error;
  return agree(comm, mine).message;
}

}  // namespace loom
