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

TEST(ProcessMesh, UlyssesGridGroupsConsecutiveRanksAndRingsAcrossThem) {
  auto world = MpiCommunicator::world();
  const int W = world->size();
  for (int U = 1; U <= W; ++U) {
    if (W % U != 0) continue;
    ProcessMesh mesh(world, 1, W, U);
    const UlyssesGrid& grid = mesh.ulysses_grid();
    const int s = mesh.sp_index();
    EXPECT_EQ(grid.degree, U);
    EXPECT_EQ(grid.ulysses->size(), U);
    EXPECT_EQ(grid.ulysses->rank(), s % U);
    EXPECT_EQ(grid.ring->size(), W / U);
    EXPECT_EQ(grid.ring->rank(), s / U);
    // Members: the group sums its sp ranks gU .. gU+U-1, the ring u, u+U, ...
    at::Tensor t = at::full({1}, static_cast<double>(s), at::kDouble);
    grid.ulysses->all_reduce(t)->wait();
    const int g = s / U;
    EXPECT_EQ(t.item<double>(), U * g * U + U * (U - 1) / 2.0);
    at::Tensor u = at::full({1}, static_cast<double>(s), at::kDouble);
    grid.ring->all_reduce(u)->wait();
    const int R = W / U;
    EXPECT_EQ(u.item<double>(), R * (s % U) + U * R * (R - 1) / 2.0);
    // Cached: the same communicators again, without a collective.
    EXPECT_EQ(ulysses_grid(mesh.sp(), U).ulysses.get(), grid.ulysses.get());
  }
  if (W > 1) {
    try {
      ProcessMesh(world, 1, W, W + 1);
      FAIL() << "expected ConfigError";
    } catch (const ConfigError& e) {
      EXPECT_NE(std::string(e.what()).find("parallel.ulysses_degree = " + std::to_string(W + 1)), std::string::npos)
          << e.what();
    }
  }
}

}  // namespace
}  // namespace loom
