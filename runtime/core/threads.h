// Threads per rank. Under mpirun each rank would otherwise get one intra-op
// thread (or, worse, every core each): Loom sets the count explicitly.
// The request is parallel.threads_per_rank of the resolved config, where
// LOOM_THREADS_PER_RANK has already been applied (apply_environment in
// config.h: --set over the environment over the file); 0 means cores on this
// node / ranks on this node.
// Collective over `world` (it counts the ranks that share a node).
#pragma once

#include <mpi.h>

namespace loom {

int default_threads_per_rank(MPI_Comm world);
// Applies the choice to libtorch (at::set_num_threads) and returns it.
int configure_threads(int requested, MPI_Comm world);

}  // namespace loom
