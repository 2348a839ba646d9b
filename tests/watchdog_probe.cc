// A deliberately mismatched collective: rank 1 skips the second all_reduce.
// Run under mpirun with a short LOOM_COMM_TIMEOUT_S: the job must end with the
// watchdog's message instead of hanging (tests/CMakeLists.txt checks it).
//   loom_watchdog_probe              on the MPI communicator
//   loom_watchdog_probe c10d         on a c10d Gloo group (FileStore) over the same ranks
//   loom_watchdog_probe c10d-recv    rank 0 receives from rank 1, which never sends
//                                    (Gloo cannot poll a receive: it waits with the deadline)
#include <unistd.h>

#include <chrono>
#include <cstring>
#include <iostream>
#include <string>
#include <thread>

#include "loom/runtime/comm/mpi_communicator.h"
#include "loom/runtime/core/build_config.h"
#if LOOM_WITH_C10D
#include <torch/csrc/distributed/c10d/FileStore.hpp>

#include "loom/runtime/comm/c10d_communicator.h"
#endif

int main(int argc, char** argv) {
  loom::MpiEnvironment mpi(&argc, &argv);
  const std::string mode = argc > 1 ? argv[1] : "mpi";
  auto mpi_world = loom::MpiCommunicator::world();
  loom::CommPtr world = mpi_world;
  if (mode != "mpi") {
#if LOOM_WITH_C10D
    at::Tensor path = at::zeros({256}, at::kByte);
    if (mpi_world->rank() == 0) {
      const std::string name = "/tmp/loom-watchdog-probe-store-" + std::to_string(getpid());
      std::memcpy(path.data_ptr(), name.data(), name.size());
    }
    mpi_world->broadcast(path, 0)->wait();
    auto store = c10::make_intrusive<c10d::FileStore>(std::string(static_cast<const char*>(path.data_ptr())),
                                                      mpi_world->size());
    world = loom::C10dCommunicator::create_gloo(store, mpi_world->rank(), mpi_world->size(), "world");
    // Connected: the store file is not needed any more, and the abort below
    // would leave it behind.
    mpi_world->barrier()->wait();
    if (mpi_world->rank() == 0) ::unlink(static_cast<const char*>(path.data_ptr()));
#else
    std::cerr << "this build has no c10d backend" << std::endl;
    return 3;
#endif
  }
  at::Tensor t = at::ones({4});
  world->all_reduce(t)->wait();  // #1: everyone
  if (mode == "c10d-recv") {
    if (world->rank() == 0) world->irecv(t, 1, 0)->wait();  // #2: rank 1 never sends
    else std::this_thread::sleep_for(std::chrono::seconds(120));
  } else if (world->rank() != 1) {
    world->all_reduce(t)->wait();  // #2: rank 1 skips it...
  } else {
    std::this_thread::sleep_for(std::chrono::seconds(120));  // ...and is busy elsewhere
  }
  std::cout << "unreachable: the mismatched collective completed" << std::endl;
  return 0;
}
