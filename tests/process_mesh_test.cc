// ProcessMesh: dp x sp factoring, sub-communicators, and the error for a world
// size that does not factor.
#include <gtest/gtest.h>

#include "loom/runtime/core/error.h"
#include "loom/runtime/comm/mpi_communicator.h"
#include "loom/runtime/comm/process_mesh.h"

namespace loom {
namespace {

TEST(ProcessMesh, AllSequenceParallelByDefault) {
  auto world = MpiCommunicator::world();
  ProcessMesh mesh(world, 1, 0);
  EXPECT_EQ(mesh.sp_size(), world->size());
  EXPECT_EQ(mesh.sp()->size(), world->size());
  EXPECT_EQ(mesh.sp()->rank(), world->rank());
  EXPECT_EQ(mesh.dp()->size(), 1);
}

TEST(ProcessMesh, TwoByHalfGroupsReduceWithinThemselves) {
  auto world = MpiCommunicator::world();
  const int W = world->size();
  if (W % 2 != 0) GTEST_SKIP() << "needs an even world size";
  ProcessMesh mesh(world, 2, W / 2);
  EXPECT_EQ(mesh.dp_index(), world->rank() / (W / 2));
  EXPECT_EQ(mesh.sp_index(), world->rank() % (W / 2));
  at::Tensor t = at::full({1}, static_cast<double>(world->rank()), at::kDouble);
  mesh.sp()->all_reduce(t)->wait();
  double expected = 0;
  for (int q = 0; q < W / 2; ++q) expected += mesh.dp_index() * (W / 2) + q;
  EXPECT_EQ(t.item<double>(), expected);
  at::Tensor u = at::full({1}, static_cast<double>(world->rank()), at::kDouble);
  mesh.dp()->all_reduce(u)->wait();
  EXPECT_EQ(u.item<double>(), 2.0 * mesh.sp_index() + W / 2);
}

TEST(ProcessMesh, RejectsWorldThatDoesNotFactor) {
  auto world = MpiCommunicator::world();
  const int W = world->size();
  try {
    ProcessMesh(world, 1, W + 1);
    FAIL() << "expected ConfigError";
  } catch (const ConfigError& e) {
    const std::string expected = "world size " + std::to_string(W) + " does not factor as parallel.dp x parallel.sp = 1 x " +
                                 std::to_string(W + 1);
    EXPECT_NE(std::string(e.what()).find(expected), std::string::npos) << e.what();
  }
  EXPECT_THROW(ProcessMesh(world, W + 1, 0), ConfigError);
}

}  // namespace
}  // namespace loom
