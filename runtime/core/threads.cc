#include "loom/runtime/core/threads.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdlib>
#include <string>
#include <thread>

#include "loom/runtime/core/error.h"

namespace loom {

int default_threads_per_rank(MPI_Comm world) {
  MPI_Comm node = MPI_COMM_NULL;
  LOOM_MPI_CHECK(MPI_Comm_split_type(world, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &node), "threads per rank");
  int ranks_on_node = 1;
  MPI_Comm_size(node, &ranks_on_node);
  MPI_Comm_free(&node);
  const int cores = std::max(1u, std::thread::hardware_concurrency());
  return std::max(1, cores / std::max(1, ranks_on_node));
}

int configure_threads(int requested, MPI_Comm world) {
  int threads = requested;
  // Collective either way, so that every rank runs the same MPI calls.
  const int fallback = default_threads_per_rank(world);
  if (threads <= 0) threads = fallback;
  at::set_num_threads(threads);
  return threads;
}

}  // namespace loom
