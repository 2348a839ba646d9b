// Embedding Loom in your own program: MPI, a communicator, a differentiable
// all-gather, and its gradient. Run: mpirun -np 2 ./embed_allgather
#include <loom/runtime/comm/differentiable_collectives.h>
#include <loom/runtime/comm/mpi_communicator.h>

#include <iostream>

int main(int argc, char** argv) {
  loom::MpiEnvironment mpi(&argc, &argv);
  auto world = loom::MpiCommunicator::world();
  const int W = world->size(), r = world->rank();
  // Each rank holds one row [r, r]; the gather yields every rank's row.
  at::Tensor x = at::full({1, 2}, static_cast<double>(r), at::kDouble).requires_grad_(true);
  at::Tensor all = loom::all_gather(x, world, 0);
  all.sum().backward();  // every rank's loss uses x once per rank: grad = W
  bool ok = all.size(0) == W && x.grad().eq(W).all().item<bool>();
  for (int q = 0; q < W; ++q) ok = ok && all[q].eq(q).all().item<bool>();
  std::cout << "rank " << r << " of " << W << ": all_gather " << (ok ? "ok" : "WRONG") << std::endl;
  return ok ? 0 : 1;
}
