// GoogleTest main for Loom's tests, run under mpirun (1..4 ranks) or alone.
//
// Every rank runs the same tests in the same order. Rank 0 prints the usual
// gtest output; other ranks print only their failures, prefixed with the rank.
// After each test the ranks exchange pass/fail, and rank 0 names the ranks on
// which it failed; the exit code is non-zero on every rank if any rank failed
// any test, so mpirun (and CTest) report the failure.
#include <gtest/gtest.h>
#include <mpi.h>

#include <iostream>
#include <sstream>

#include "loom/runtime/comm/comm_order.h"
#include "loom/runtime/comm/mpi_communicator.h"
#include "loom/runtime/core/config.h"
#include "loom/runtime/core/threads.h"

namespace {

int world_rank() {
  int r = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &r);
  return r;
}
int world_size() {
  int s = 1;
  MPI_Comm_size(MPI_COMM_WORLD, &s);
  return s;
}

// Prints assertion failures of a non-zero rank, since its default printer is off.
class RankFailurePrinter : public ::testing::EmptyTestEventListener {
 public:
  void OnTestPartResult(const ::testing::TestPartResult& result) override {
    if (!result.failed()) return;
    std::ostringstream out;
    out << "[rank " << world_rank() << "] " << (result.file_name() ? result.file_name() : "?") << ":"
        << result.line_number() << ": failure\n"
        << result.summary() << "\n";
    std::cerr << out.str() << std::flush;
  }
};

// Agrees after each test on which ranks failed it; every test starts a new
// chain of ordered communications.
class CrossRankVerdict : public ::testing::EmptyTestEventListener {
 public:
  void OnTestStart(const ::testing::TestInfo&) override { loom::CommOrder::reset(); }
  void OnTestEnd(const ::testing::TestInfo& info) override {
    const int failed = info.result()->Failed() ? 1 : 0;
    std::vector<int> all(world_size(), 0);
    MPI_Allgather(&failed, 1, MPI_INT, all.data(), 1, MPI_INT, MPI_COMM_WORLD);
    if (world_rank() != 0) return;
    std::string ranks;
    for (int r = 0; r < static_cast<int>(all.size()); ++r)
      if (all[r]) ranks += (ranks.empty() ? "" : ", ") + std::to_string(r);
    if (!ranks.empty())
      std::cout << "[  RANKS   ] " << info.test_suite_name() << "." << info.name() << " failed on rank(s) " << ranks
                << " of " << all.size() << std::endl;
  }
};

}  // namespace

int main(int argc, char** argv) {
  loom::MpiEnvironment mpi(&argc, &argv);
  ::testing::InitGoogleTest(&argc, argv);
  {
    loom::pb::LoomConfig environment;  // LOOM_THREADS_PER_RANK, as loom-train reads it
    loom::apply_environment(&environment);
    loom::configure_threads(environment.parallel().threads_per_rank(), MPI_COMM_WORLD);
  }
  auto& listeners = ::testing::UnitTest::GetInstance()->listeners();
  if (world_rank() != 0) {
    delete listeners.Release(listeners.default_result_printer());
    listeners.Append(new RankFailurePrinter);
  }
  listeners.Append(new CrossRankVerdict);
  int failed = RUN_ALL_TESTS() != 0 ? 1 : 0;
  MPI_Allreduce(MPI_IN_PLACE, &failed, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  return failed;
}
