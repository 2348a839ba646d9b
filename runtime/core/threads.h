// Threads per rank. Under mpirun each rank would otherwise get one intra-op
// thread (or, worse, every core each): Loom sets the count explicitly.
// Priority: the explicit request (config parallel.threads_per_rank > 0), then
// LOOM_THREADS_PER_RANK, then cores on this node / ranks on this node.
// Collective over `world` (it counts the ranks that share a node).
#pragma once

#include <mpi.h>

namespace loom {

int default_threads_per_rank(MPI_Comm world);
// Applies the choice to libtorch (at::set_num_threads) and returns it.
int configure_threads(int requested, MPI_Comm world);

}  // namespace loom
