// Every Communicator operation, in every supported dtype, against values
// computed by hand; counted calls and bytes against the documented sizes. The
// same suite runs on every CPU backend: MPI (instantiations without a prefix
// naming the backend) and, when built, c10d over a Gloo group on a FileStore
// (C10dGloo*: the ranks of mpirun share a store file that rank 0 names).
#include <gtest/gtest.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <thread>

#include "distributed_reference.h"
#include "loom/runtime/core/build_config.h"
#include "loom/runtime/core/error.h"
#include "loom/runtime/comm/mpi_communicator.h"
#if LOOM_WITH_C10D
#include <torch/csrc/distributed/c10d/FileStore.hpp>

#include "loom/runtime/comm/c10d_communicator.h"
#endif

namespace loom {
namespace {

enum class Backend { kMpi, kC10dGloo };

std::string backend_label(Backend backend) { return backend == Backend::kMpi ? "Mpi" : "C10dGloo"; }

#if LOOM_WITH_C10D
// A Gloo group over all of mpirun's ranks, on a FileStore whose path rank 0
// picks and broadcasts; every call makes a new store file and group.
std::shared_ptr<C10dCommunicator> c10d_gloo_world() {
  static std::atomic<int> groups{0};
  auto mpi = MpiCommunicator::world();
  at::Tensor path = at::zeros({256}, at::kByte);
  if (mpi->rank() == 0) {
    const std::string name = ::testing::TempDir() + "loom-c10d-store-" + std::to_string(getpid()) + "-" +
                             std::to_string(groups++);
    std::memcpy(path.data_ptr(), name.data(), name.size());
  }
  mpi->broadcast(path, 0)->wait();
  auto store = c10::make_intrusive<c10d::FileStore>(std::string(static_cast<const char*>(path.data_ptr())), mpi->size());
  return C10dCommunicator::create_gloo(store, mpi->rank(), mpi->size(), "world");
}
#endif

CommPtr make_world(Backend backend) {
#if LOOM_WITH_C10D
  if (backend == Backend::kC10dGloo) return c10d_gloo_world();
#endif
  if (backend != Backend::kMpi) throw UnsupportedError("this build has no c10d backend");
  return MpiCommunicator::world();
}

std::vector<Backend> built_backends() {
#if LOOM_WITH_C10D
  return {Backend::kMpi, Backend::kC10dGloo};
#else
  return {Backend::kMpi};
#endif
}

class CommunicatorTest : public ::testing::TestWithParam<std::tuple<Backend, at::ScalarType>> {
 protected:
  void SetUp() override {
    comm = make_world(std::get<0>(GetParam()));
    W = comm->size();
    r = comm->rank();
  }
  at::ScalarType dtype() const { return std::get<1>(GetParam()); }
  at::TensorOptions opts() const { return at::TensorOptions().dtype(dtype()); }
  int64_t esize() const { return at::elementSize(dtype()); }
  // Small integers are exact in every dtype, bfloat16 included.
  at::Tensor ints(at::IntArrayRef sizes, int64_t offset) const {
    int64_t n = 1;
    for (auto s : sizes) n *= s;
    return (at::arange(n, at::kLong) + offset).reshape(sizes).to(dtype());
  }
  static void expect_equal(const at::Tensor& a, const at::Tensor& b) {
    EXPECT_TRUE(at::equal(a.to(at::kDouble), b.to(at::kDouble))) << "got\n" << a << "\nexpected\n" << b;
  }
  CommPtr comm;
  int W = 1, r = 0;
};

TEST_P(CommunicatorTest, AllGatherConcatenatesRankBlocks) {
  const at::Tensor in = ints({2, 3}, 10 * r);
  at::Tensor out = at::empty({2 * W, 3}, opts());
  comm->all_gather(out, in)->wait();
  for (int q = 0; q < W; ++q) expect_equal(out.narrow(0, 2 * q, 2), ints({2, 3}, 10 * q));
  const auto& c = comm->stats()[OpType::kAllGather];
  EXPECT_EQ(c.calls, 1);
  EXPECT_EQ(c.bytes_received, (W - 1) * 6 * esize());
  EXPECT_EQ(c.bytes_sent, (W - 1) * 6 * esize());
}

TEST_P(CommunicatorTest, AllReduceEveryOp) {
  const at::Tensor base = ints({5}, 0);
  at::Tensor t = ints({5}, r + 1);
  comm->all_reduce(t, ReduceOp::kSum)->wait();
  expect_equal(t, base * W + W * (W + 1) / 2);
  t = ints({5}, r + 1);
  comm->all_reduce(t, ReduceOp::kMax)->wait();
  expect_equal(t, base + W);
  t = ints({5}, r + 1);
  comm->all_reduce(t, ReduceOp::kMin)->wait();
  expect_equal(t, base + 1);
  t = at::full({5}, r + 1, opts());
  comm->all_reduce(t, ReduceOp::kProd)->wait();
  int64_t factorial = 1;
  for (int q = 1; q <= W; ++q) factorial *= q;
  expect_equal(t, at::full({5}, factorial, opts()));
  const auto& c = comm->stats()[OpType::kAllReduce];
  EXPECT_EQ(c.calls, 4);
  EXPECT_EQ(c.bytes_sent, 4 * (2 * (W - 1) * 5 * esize() / W));
}

TEST_P(CommunicatorTest, ReduceScatterSumsBlocks) {
  // Rank q holds, in block b, the values q + b + i; rank r receives
  // sum_q (q + r + i) = W(W-1)/2 + W (r + i).
  at::Tensor in = at::empty({W, 4}, opts());
  for (int b = 0; b < W; ++b) in[b].copy_(ints({4}, r + b));
  at::Tensor out = at::empty({1, 4}, opts());
  comm->reduce_scatter(out, in)->wait();
  expect_equal(out.reshape({4}), ints({4}, 0) * W + W * (W - 1) / 2 + W * r);
  const auto& c = comm->stats()[OpType::kReduceScatter];
  EXPECT_EQ(c.calls, 1);
  EXPECT_EQ(c.bytes_received, (W - 1) * 4 * esize());
}

TEST_P(CommunicatorTest, BroadcastFromLastRank) {
  const int root = W - 1;
  at::Tensor t = r == root ? ints({3, 2}, 7) : at::zeros({3, 2}, opts());
  comm->broadcast(t, root)->wait();
  expect_equal(t, ints({3, 2}, 7));
  const auto& c = comm->stats()[OpType::kBroadcast];
  EXPECT_EQ(c.bytes_sent, r == root ? (W - 1) * 6 * esize() : 0);
  EXPECT_EQ(c.bytes_received, r == root ? 0 : 6 * esize());
}

TEST_P(CommunicatorTest, ExscanSum) {
  const at::Tensor in = at::full({2, 2}, r + 1, opts());
  at::Tensor out = at::full({2, 2}, -1, opts());
  comm->exscan(out, in, sum_scan_op())->wait();
  expect_equal(out, at::full({2, 2}, r * (r + 1) / 2, opts()));
  const auto& c = comm->stats()[OpType::kExscan];
  EXPECT_EQ(c.calls, 1);
  EXPECT_EQ(c.bytes_received, r > 0 ? 4 * esize() : 0);
  EXPECT_EQ(c.bytes_sent, r < W - 1 ? 4 * esize() : 0);
}

TEST_P(CommunicatorTest, AllToAllTransposesBlocks) {
  // Rank q sends block b (value q * W + b) to rank b.
  at::Tensor in = at::empty({W, 2}, opts());
  for (int b = 0; b < W; ++b) in[b].fill_(r * W + b);
  at::Tensor out = at::empty({W, 2}, opts());
  comm->all_to_all(out, in)->wait();
  for (int q = 0; q < W; ++q) expect_equal(out[q], at::full({2}, q * W + r, opts()));
  EXPECT_EQ(comm->stats()[OpType::kAllToAll].bytes_received, (W - 1) * 2 * esize());
}

TEST_P(CommunicatorTest, AllToAllUnevenSplits) {
  // Rank q sends rows(q, p) = (q + 2p) % 3 rows to rank p (some blocks empty,
  // the one to itself included); row i of that block holds 100q + 10p + i.
  auto rows = [](int q, int p) -> int64_t { return (q + 2 * p) % 3; };
  std::vector<int64_t> input_splits, output_splits;
  std::vector<at::Tensor> blocks;
  for (int p = 0; p < W; ++p) {
    input_splits.push_back(rows(r, p));
    output_splits.push_back(rows(p, r));
    for (int64_t i = 0; i < rows(r, p); ++i) blocks.push_back(at::full({1, 2}, 100 * r + 10 * p + i, opts()));
  }
  int64_t in_rows = 0, out_rows = 0, sent_rows = 0, received_rows = 0;
  for (int p = 0; p < W; ++p) {
    in_rows += input_splits[p];
    out_rows += output_splits[p];
    if (p != r) sent_rows += input_splits[p], received_rows += output_splits[p];
  }
  const at::Tensor in = in_rows > 0 ? at::cat(blocks) : at::empty({0, 2}, opts());
  at::Tensor out = at::full({out_rows, 2}, -1, opts());
  comm->all_to_all(out, in, output_splits, input_splits)->wait();
  int64_t row = 0;
  for (int q = 0; q < W; ++q)
    for (int64_t i = 0; i < rows(q, r); ++i, ++row) expect_equal(out[row], at::full({2}, 100 * q + 10 * r + i, opts()));
  const auto& c = comm->stats()[OpType::kAllToAll];
  EXPECT_EQ(c.calls, 1);
  EXPECT_EQ(c.bytes_sent, sent_rows * 2 * esize());
  EXPECT_EQ(c.bytes_received, received_rows * 2 * esize());
}

TEST_P(CommunicatorTest, AllToAllUnevenSplitsAreChecked) {
  const std::vector<int64_t> ones(W, 1);
  at::Tensor in = at::zeros({W, 2}, opts()), out = at::zeros({W, 2}, opts());
  // Sum of splits differs from the rows; wrong number of splits; rows differ.
  EXPECT_THROW(comm->all_to_all(out, in, ones, std::vector<int64_t>(W, 2)), c10::Error);
  EXPECT_THROW(comm->all_to_all(out, in, ones, std::vector<int64_t>(W + 1, 1)), c10::Error);
  EXPECT_THROW(comm->all_to_all(at::zeros({W, 3}, opts()), in, ones, ones), c10::Error);
  // A rejected call is neither counted nor posted.
  EXPECT_EQ(comm->stats()[OpType::kAllToAll].calls, 0);
}

TEST_P(CommunicatorTest, RingSendRecv) {
  const int next = (r + 1) % W, prev = (r - 1 + W) % W;
  at::Tensor out = at::empty({6}, opts());
  auto recv = comm->irecv(out, prev, 5);
  auto send = comm->isend(ints({6}, r), next, 5);
  recv->wait();
  send->wait();
  expect_equal(out, ints({6}, prev));
  EXPECT_EQ(comm->stats()[OpType::kSend].bytes_sent, 6 * esize());
  EXPECT_EQ(comm->stats()[OpType::kRecv].bytes_received, 6 * esize());
}

TEST_P(CommunicatorTest, NonContiguousTensorsAreStaged) {
  const at::Tensor in = ints({3, 2}, 10 * r).t();  // [2, 3], not contiguous
  ASSERT_FALSE(in.is_contiguous());
  at::Tensor storage = at::zeros({3, 2 * W}, opts());
  at::Tensor out = storage.t();  // [2W, 3], not contiguous
  comm->all_gather(out, in)->wait();
  for (int q = 0; q < W; ++q) expect_equal(out.narrow(0, 2 * q, 2), ints({3, 2}, 10 * q).t());
}

const auto kDtypes = ::testing::Values(at::kFloat, at::kDouble, at::kBFloat16, at::kLong);
std::string dtype_name(const ::testing::TestParamInfo<std::tuple<Backend, at::ScalarType>>& info) {
  return std::string(c10::toString(std::get<1>(info.param)));
}
INSTANTIATE_TEST_SUITE_P(Dtypes, CommunicatorTest, ::testing::Combine(::testing::Values(Backend::kMpi), kDtypes),
                         dtype_name);
#if LOOM_WITH_C10D
INSTANTIATE_TEST_SUITE_P(C10dGlooDtypes, CommunicatorTest,
                         ::testing::Combine(::testing::Values(Backend::kC10dGloo), kDtypes), dtype_name);
#endif

// The tests below run once per backend: Backends/<Suite>.<Test>/Mpi, .../C10dGloo.
class CommunicatorBackend : public ::testing::TestWithParam<Backend> {
 protected:
  CommPtr world() const { return make_world(GetParam()); }
};
using CommunicatorScan = CommunicatorBackend;
using CommunicatorSplit = CommunicatorBackend;
using CommunicatorStats = CommunicatorBackend;
using CommunicatorErrors = CommunicatorBackend;
using CommunicatorRegistry = CommunicatorBackend;
std::string backend_name(const ::testing::TestParamInfo<Backend>& info) { return backend_label(info.param); }

TEST_P(CommunicatorScan, UserOperationIsOrderedAndNonCommutative) {
  // Matrix product is associative but not commutative: rank r must receive
  // M_0 M_1 ... M_{r-1} (identity on rank 0).
  auto comm = world();
  const int r = comm->rank();
  ScanOp matmul_op;
  matmul_op.name = "matmul";
  matmul_op.combine = [](const at::Tensor& earlier, at::Tensor& later) { later.copy_(at::matmul(earlier, later)); };
  matmul_op.identity = [](at::Tensor& out) { out.copy_(at::eye(3, out.options())); };
  at::Tensor out = at::empty({3, 3}, at::kDouble);
  comm->exscan(out, testing::seeded_randn({3, 3}, 100 + r), matmul_op)->wait();
  at::Tensor expected = at::eye(3, at::kDouble);
  for (int q = 0; q < r; ++q) expected = at::matmul(expected, testing::seeded_randn({3, 3}, 100 + q));
  EXPECT_TRUE(testing::tensors_close(out, expected, 1e-12, "exscan(matmul)"));
}

TEST_P(CommunicatorScan, Bf16UserOperation) {
  auto comm = world();
  at::Tensor out = at::empty({4}, at::kBFloat16);
  comm->exscan(out, at::full({4}, 2.0, at::kBFloat16), sum_scan_op())->wait();
  EXPECT_TRUE(at::equal(out.to(at::kFloat), at::full({4}, 2.0f * comm->rank())));
}

TEST_P(CommunicatorSplit, SubgroupsReduceAmongThemselves) {
  auto comm = world();
  const int W = comm->size(), r = comm->rank();
  auto sub = comm->split(r % 2, r);
  ASSERT_NE(sub, nullptr);
  EXPECT_EQ(sub->size(), (W + 1 - r % 2) / 2);
  EXPECT_EQ(sub->rank(), r / 2);
  at::Tensor t = at::full({1}, static_cast<double>(r), at::kDouble);
  sub->all_reduce(t)->wait();
  double expected = 0;
  for (int q = r % 2; q < W; q += 2) expected += q;
  EXPECT_EQ(t.item<double>(), expected);
  // Counters belong to the communicator they were counted on.
  EXPECT_EQ(sub->stats()[OpType::kAllReduce].calls, 1);
  EXPECT_EQ(comm->stats()[OpType::kAllReduce].calls, 0);
  auto none = comm->split(r == 0 ? 0 : -1, 0);
  EXPECT_EQ(none == nullptr, r != 0);
}

TEST_P(CommunicatorStats, ResetAndDifference) {
  auto comm = world();
  comm->barrier()->wait();
  const CommStats before = comm->stats();
  at::Tensor t = at::ones({8}, at::kFloat);
  comm->all_reduce(t)->wait();
  const CommStats delta = comm->stats() - before;
  EXPECT_EQ(delta[OpType::kAllReduce].calls, 1);
  EXPECT_EQ(delta[OpType::kBarrier].calls, 0);
  EXPECT_EQ(delta.total_calls(), 1);
  comm->reset_stats();
  EXPECT_EQ(comm->stats().total_calls(), 0);
}

// The base class times every backend's Work::wait() into stats(): a rank that
// waits for a late peer counts the wait under the operation (MPI and c10d
// Gloo alike; a backend whose Works bypassed the wrapper would count 0).
TEST_P(CommunicatorStats, WaitSecondsPerOperation) {
  auto comm = world();
  if (comm->size() < 2) GTEST_SKIP() << "needs a peer to wait for";
  comm->barrier()->wait();
  const CommStats before = comm->stats();
  // Rank 0 arrives 200 ms late: every other rank blocks in wait() that long.
  if (comm->rank() == 0) std::this_thread::sleep_for(std::chrono::milliseconds(200));
  at::Tensor t = at::ones({8}, at::kFloat);
  WorkPtr work = comm->all_reduce(t);
  work->wait();
  const double first = (comm->stats() - before)[OpType::kAllReduce].wait_seconds;
  work->wait();  // idempotent: adds nothing
  CommStats delta = comm->stats() - before;
  EXPECT_EQ(delta[OpType::kAllReduce].wait_seconds, first);
  if (comm->rank() != 0) EXPECT_GE(first, 0.15);
  EXPECT_LT(first, 30.0);
  // Point-to-point: rank 1 receives what rank 0 sends 200 ms late.
  at::Tensor received = at::zeros({4}, at::kFloat);
  if (comm->rank() == 0) {
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    comm->send(at::ones({4}, at::kFloat), 1, 7);
  } else if (comm->rank() == 1) {
    comm->recv(received, 0, 7);
    EXPECT_EQ(received.sum().item<float>(), 4.0f);
  }
  comm->barrier()->wait();
  delta = comm->stats() - before;
  if (comm->rank() == 1) EXPECT_GE(delta[OpType::kRecv].wait_seconds, 0.15);
  if (comm->rank() == 0) EXPECT_EQ(delta[OpType::kSend].calls, 1);
  EXPECT_GE(delta.total_wait_seconds(), delta[OpType::kAllReduce].wait_seconds);
}

TEST_P(CommunicatorErrors, WrongDtypeAndShapeAreNamed) {
  auto comm = world();
  at::Tensor half = at::ones({2}, at::kHalf);
  try {
    comm->all_reduce(half);
    FAIL() << "expected an error for float16";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find("does not support dtype Half"), std::string::npos) << e.what();
  }
  at::Tensor out = at::empty({comm->size() + 1}, at::kFloat);
  EXPECT_THROW(comm->all_gather(out, at::ones({1}, at::kFloat)), c10::Error);
  EXPECT_THROW(comm->isend(at::ones({1}), comm->size(), 0), c10::Error);
}

// A backend that implements nothing: every operation must name it.
class NothingCommunicator final : public Communicator {
 public:
  int rank() const override { return 0; }
  int size() const override { return 1; }
  std::string backend_name() const override { return "nothing"; }
};

TEST(CommunicatorInterface, UnsupportedOperationNamesBackend) {
  NothingCommunicator c;
  try {
    c.all_to_all(at::ones({1}), at::ones({1}));
    FAIL() << "expected CommError";
  } catch (const CommError& e) {
    EXPECT_NE(std::string(e.what()).find("'all_to_all' is not supported by the nothing communicator"),
              std::string::npos)
        << e.what();
  }
}

TEST_P(CommunicatorRegistry, FindsLiveCommunicatorsOnly) {
  int64_t id = 0;
  {
    auto comm = world();
    id = comm->id();
    EXPECT_EQ(Communicator::by_id(id).get(), comm.get());
  }
  EXPECT_THROW(Communicator::by_id(id), CommError);
}

INSTANTIATE_TEST_SUITE_P(Backends, CommunicatorScan, ::testing::ValuesIn(built_backends()), backend_name);
INSTANTIATE_TEST_SUITE_P(Backends, CommunicatorSplit, ::testing::ValuesIn(built_backends()), backend_name);
INSTANTIATE_TEST_SUITE_P(Backends, CommunicatorStats, ::testing::ValuesIn(built_backends()), backend_name);
INSTANTIATE_TEST_SUITE_P(Backends, CommunicatorErrors, ::testing::ValuesIn(built_backends()), backend_name);
INSTANTIATE_TEST_SUITE_P(Backends, CommunicatorRegistry, ::testing::ValuesIn(built_backends()), backend_name);

}  // namespace
}  // namespace loom
