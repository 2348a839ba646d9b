// A deliberately mismatched collective: rank 1 skips the second all_reduce.
// Run under mpirun with a short LOOM_COMM_TIMEOUT_S: the job must end with the
// watchdog's message instead of hanging (tests/CMakeLists.txt checks it).
#include <chrono>
#include <iostream>
#include <thread>

#include "loom/runtime/comm/mpi_communicator.h"

int main(int argc, char** argv) {
  loom::MpiEnvironment mpi(&argc, &argv);
  auto world = loom::MpiCommunicator::world();
  at::Tensor t = at::ones({4});
  world->all_reduce(t)->wait();  // #1: everyone
  if (world->rank() != 1) {
    world->all_reduce(t)->wait();  // #2: rank 1 skips it...
  } else {
    std::this_thread::sleep_for(std::chrono::seconds(120));  // ...and is busy elsewhere
  }
  std::cout << "unreachable: the mismatched collective completed" << std::endl;
  return 0;
}
