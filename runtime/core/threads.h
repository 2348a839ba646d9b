// Threads per rank. Under mpirun each rank would otherwise get one intra-op
// thread (or, worse, every core each): Loom sets the count explicitly.
// The request is parallel.threads_per_rank of the resolved config, where
// LOOM_THREADS_PER_RANK has already been applied (apply_environment in
// config.h: --set over the environment over the file); 0 means cores on this
// node / ranks on this node.
// A request beyond the cores available to a rank (its CPU affinity mask, and
// the cgroup CPU quota where one is set) is a ConfigError naming the field,
// the value, the rank and its core count, thrown on every rank alike (the
// ranks agree on the smallest core count).
// Collective over `world` (it counts the ranks that share a node).
#pragma once

#include <mpi.h>

namespace loom {

int default_threads_per_rank(MPI_Comm world);
// Cores this process may run on: its affinity mask, capped by a cgroup v2
// CPU quota (cpu.max) when there is one; at least 1.
int cores_available_to_this_process();
// Applies the choice to libtorch (at::set_num_threads) and returns it.
int configure_threads(int requested, MPI_Comm world);

}  // namespace loom
