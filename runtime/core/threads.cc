#include "loom/runtime/core/threads.h"

#include <ATen/Parallel.h>
#include <sched.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <fstream>
#include <string>
#include <thread>

#include "loom/runtime/core/error.h"

namespace loom {

int cores_available_to_this_process() {
  int cores = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  cpu_set_t set;
  CPU_ZERO(&set);
  if (::sched_getaffinity(0, sizeof(set), &set) == 0) cores = std::max(1, CPU_COUNT(&set));
  // A container's CPU quota: "max 100000" (none) or "<quota> <period>".
  std::ifstream quota_file("/sys/fs/cgroup/cpu.max");
  std::string quota;
  double period = 0;
  if (quota_file >> quota >> period && quota != "max" && period > 0) {
    const double q = std::atof(quota.c_str());
    if (q > 0) cores = std::min(cores, std::max(1, static_cast<int>(std::ceil(q / period))));
  }
  return cores;
}

int default_threads_per_rank(MPI_Comm world) {
  MPI_Comm node = MPI_COMM_NULL;
  LOOM_MPI_CHECK(MPI_Comm_split_type(world, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &node), "threads per rank");
  int ranks_on_node = 1;
  MPI_Comm_size(node, &ranks_on_node);
  MPI_Comm_free(&node);
  const int cores = std::max(1u, std::thread::hardware_concurrency());
  return std::min(cores_available_to_this_process(), std::max(1, cores / std::max(1, ranks_on_node)));
}

int configure_threads(int requested, MPI_Comm world) {
  int threads = requested;
  // LOOM_THREADS_PER_RANK is already folded into the request (config.h's
  // apply_environment), so the message names the field.
  const std::string source = "parallel.threads_per_rank = " + std::to_string(requested) +
                             " (or LOOM_THREADS_PER_RANK)";
  // Collective either way, so that every rank runs the same MPI calls.
  const int fallback = default_threads_per_rank(world);
  // The rank with the fewest cores decides, so that every rank throws alike.
  struct {
    int cores;
    int rank;
  } fewest{cores_available_to_this_process(), 0};
  MPI_Comm_rank(world, &fewest.rank);
  LOOM_MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, &fewest, 1, MPI_2INT, MPI_MINLOC, world), "threads per rank");
  if (threads > fewest.cores)
    throw ConfigError(source + ": more threads than the " + std::to_string(fewest.cores) +
                      " core(s) available to rank " + std::to_string(fewest.rank) +
                      " (its CPU affinity / quota); use at most " + std::to_string(fewest.cores) +
                      ", or 0 for cores per node / ranks per node");
  if (threads <= 0) threads = fallback;
  at::set_num_threads(threads);
  return threads;
}

}  // namespace loom
