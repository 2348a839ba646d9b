#include "runtime/job.h"

#include <mpi.h>

#include <climits>
#include <chrono>

#include "runtime/error.h"
#include "runtime/logging.h"
#include "runtime/threads.h"

namespace loom {

pb::LoomConfig resolve_config_on_all_ranks(const std::string& path, const std::vector<std::string>& overrides) {
  pb::LoomConfig config;
  std::string error;
  try {
    config = resolve_config(path, overrides);
  } catch (const std::exception& e) {
    error = e.what();
    if (error.empty()) error = "unknown error";
  }
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  int first_failing = error.empty() ? INT_MAX : rank;
  LOOM_MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, &first_failing, 1, MPI_INT, MPI_MIN, MPI_COMM_WORLD), "config agreement");
  if (first_failing == INT_MAX) return config;
  int length = static_cast<int>(error.size());
  LOOM_MPI_CHECK(MPI_Bcast(&length, 1, MPI_INT, first_failing, MPI_COMM_WORLD), "config agreement");
  error.resize(length);
  LOOM_MPI_CHECK(MPI_Bcast(error.data(), length, MPI_CHAR, first_failing, MPI_COMM_WORLD), "config agreement");
  throw ConfigError(first_failing == 0 ? error : "on rank " + std::to_string(first_failing) + ": " + error);
}

Job::Job(pb::LoomConfig config) : config_(std::move(config)) {
  auto world = MpiCommunicator::world();
  configure_logging(world->rank(), world->size(), config_.log().all_ranks(), parse_log_level(config_.log().level()));
  world->set_timeout(std::chrono::milliseconds(static_cast<int64_t>(config_.parallel().comm_timeout_s() * 1000.0)));
  threads_ = configure_threads(config_.parallel().threads_per_rank(), world->handle());
  mesh_ = std::make_unique<ProcessMesh>(world, config_.parallel().dp(), config_.parallel().sp());
}

}  // namespace loom
