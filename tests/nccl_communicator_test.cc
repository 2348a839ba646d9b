// The NCCL backend is compiled and linked wherever the CUDA toolkit and NCCL
// are (CI included). Without a GPU it must fail cleanly, naming CUDA and the
// operation, instead of crashing; with one, the device check covers it.
#include <gtest/gtest.h>

#include "loom/runtime/core/build_config.h"
#include "loom/runtime/core/error.h"
#include "loom/runtime/comm/mpi_communicator.h"

#ifdef LOOM_HAVE_NCCL
#include <torch/cuda.h>

#include "loom/parallel/linear_attention/decay.h"
#include "loom/parallel/linear_attention/lasp.h"
#include "loom/parallel/softmax_attention/softmax_attention.h"
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

// On a GPU: the collectives at one rank (the device check runs the MPI singleton), values and the
// byte counters, and LASP-2 and ring attention over the NCCL communicator against the CPU over MPI.
TEST(NcclCommunicator, OneRankCollectivesAndOperatorsOnTheGpu) {
  if (!torch::cuda::is_available()) GTEST_SKIP() << "no CUDA device visible";
  auto world = MpiCommunicator::world();
  if (world->size() != 1) GTEST_SKIP() << "one rank per GPU machine here";
  auto nccl = NcclCommunicator::create(world, 0);
  EXPECT_EQ(nccl->backend_name(), "nccl");
  const auto cuda = at::TensorOptions().dtype(at::kFloat).device(at::kCUDA);
  const at::Tensor x = at::randn({3, 5}, cuda);
  at::Tensor reduced = x.clone();
  nccl->all_reduce(reduced)->wait();
  EXPECT_TRUE(at::equal(reduced.cpu(), x.cpu()));
  at::Tensor gathered = at::empty({3, 5}, cuda);
  nccl->all_gather(gathered, x)->wait();
  EXPECT_TRUE(at::equal(gathered.cpu(), x.cpu()));
  at::Tensor root = x.clone();
  nccl->broadcast(root, 0)->wait();
  EXPECT_TRUE(at::equal(root.cpu(), x.cpu()));

  const SequenceLayout layout(LayoutKind::kZigzag, 96, 1);
  const auto cpu64 = at::TensorOptions().dtype(at::kDouble);
  const at::Tensor q = at::randn({1, 2, 96, 8}, cpu64), k = at::randn({1, 2, 96, 8}, cpu64).abs(),
                   v = at::randn({1, 2, 96, 8}, cpu64);
  const CommPtr cpu_comm = world->split(0, 0);
  linear_attention::LinearAttentionOptions lin;
  lin.block_size = 16;
  lin.decay = linear_attention::default_decay(2);
  const at::Tensor lin_cpu = linear_attention::sequence_parallel_linear_attention(
      q, k, v, layout, cpu_comm, linear_attention::LinearAttentionMethod::kLasp2, lin);
  const at::Tensor lin_gpu = linear_attention::sequence_parallel_linear_attention(
      q.cuda(), k.cuda(), v.cuda(), layout, nccl, linear_attention::LinearAttentionMethod::kLasp2, lin);
  EXPECT_TRUE(at::allclose(lin_gpu.cpu(), lin_cpu, 1e-9, 1e-9)) << "LASP-2 over NCCL";
  softmax_attention::AttentionSpec spec;
  spec.block = 32;
  const at::Tensor att_cpu =
      softmax_attention::attention(q, k, v, layout, cpu_comm, softmax_attention::SoftmaxMethod::kRing, spec);
  const at::Tensor att_gpu = softmax_attention::attention(q.cuda(), k.cuda(), v.cuda(), layout, nccl,
                                                          softmax_attention::SoftmaxMethod::kRing, spec);
  EXPECT_TRUE(at::allclose(att_gpu.cpu(), att_cpu, 1e-9, 1e-9)) << "ring attention over NCCL";
}
#else
TEST(NcclCommunicator, NotBuiltHere) { GTEST_SKIP() << "built without LOOM_WITH_NCCL"; }
#endif

}  // namespace
}  // namespace loom
