// The NCCL backend is compiled and linked wherever the CUDA toolkit and NCCL
// are (CI included). Without a GPU it must fail cleanly, naming CUDA and the
// operation, instead of crashing; with one, the device check covers it.
#include <gtest/gtest.h>

#include "loom/runtime/core/build_config.h"
#include "loom/runtime/core/error.h"
#include "loom/runtime/comm/mpi_communicator.h"

#ifdef LOOM_HAVE_NCCL
#include "loom/runtime/comm/nccl_communicator.h"
#endif

namespace loom {
namespace {

#ifdef LOOM_HAVE_NCCL
TEST(NcclCommunicator, CreationWithoutAGpuFailsWithANamedError) {
  auto world = MpiCommunicator::world();
  try {
    auto nccl = NcclCommunicator::create(world, 0);
    EXPECT_EQ(nccl->backend_name(), "nccl");
    GTEST_SKIP() << "a GPU is present: the device check exercises the NCCL backend";
  } catch (const CommError& e) {
    EXPECT_NE(std::string(e.what()).find("CUDA error in operation 'create'"), std::string::npos) << e.what();
  }
}
#else
TEST(NcclCommunicator, NotBuiltHere) { GTEST_SKIP() << "built without LOOM_WITH_NCCL"; }
#endif

}  // namespace
}  // namespace loom
