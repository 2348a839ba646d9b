// Differentiable collectives against single-rank float64 references: each
// rank builds all ranks' inputs from seeds, computes the naive global result
// with autograd, and compares its own output and input gradient. The backward
// of each collective is thereby checked against the analytic adjoint.
#include <gtest/gtest.h>
#include <torch/autograd.h>

#include "distributed_reference.h"
#include "loom/runtime/comm/differentiable_collectives.h"
#include "loom/runtime/core/error.h"
#include "loom/runtime/comm/mpi_communicator.h"

namespace loom {
namespace {

using testing::ReferenceCheck;
using testing::seeded_randn;

constexpr double kTol = 1e-12;

class DifferentiableCollectives : public ::testing::Test {
 protected:
  void SetUp() override {
    comm = MpiCommunicator::world();
    W = comm->size();
    r = comm->rank();
  }
  // Upstream gradient of rank q's output: every rank can build every rank's.
  static at::Tensor upstream(at::IntArrayRef sizes, int q) { return seeded_randn(sizes, 9000 + q); }
  CommPtr comm;
  int W = 1, r = 0;
};

TEST_F(DifferentiableCollectives, AllGatherBackwardIsReduceScatter) {
  for (int64_t dim : {0, 1}) {
    // Global X [3, 2W, 4] along `dim` ... each rank owns block r of size 2 along dim.
    std::vector<int64_t> gshape{3, 4, 5};
    gshape[dim] = 2 * W;
    const at::Tensor X = seeded_randn(gshape, 11);
    at::Tensor x = X.narrow(dim, 2 * r, 2).clone().requires_grad_(true);
    at::Tensor y = all_gather(x, comm, dim);
    (y * upstream(gshape, r)).sum().backward();

    at::Tensor Xref = X.clone().requires_grad_(true);
    at::Tensor loss = at::zeros({}, at::kDouble);
    for (int q = 0; q < W; ++q) loss = loss + (Xref * upstream(gshape, q)).sum();
    loss.backward();
    EXPECT_TRUE(ReferenceCheck(r, kTol)
                    .same("all_gather output", y, X)
                    .same("all_gather grad", x.grad(), Xref.grad().narrow(dim, 2 * r, 2))
                    .verdict());
  }
}

TEST_F(DifferentiableCollectives, ReduceScatterBackwardIsAllGather) {
  const int64_t dim = 1;
  const std::vector<int64_t> in_shape{2, 3 * W, 4}, out_shape{2, 3, 4};
  std::vector<at::Tensor> Xs;
  for (int q = 0; q < W; ++q) Xs.push_back(seeded_randn(in_shape, 20 + q).requires_grad_(true));
  at::Tensor x = Xs[r].detach().clone().requires_grad_(true);
  at::Tensor y = reduce_scatter(x, comm, dim);
  (y * upstream(out_shape, r)).sum().backward();

  at::Tensor loss = at::zeros({}, at::kDouble);
  at::Tensor sum = Xs[0];
  for (int q = 1; q < W; ++q) sum = sum + Xs[q];
  for (int q = 0; q < W; ++q) loss = loss + (sum.narrow(dim, 3 * q, 3) * upstream(out_shape, q)).sum();
  loss.backward();
  EXPECT_TRUE(ReferenceCheck(r, kTol)
                  .same("reduce_scatter output", y, sum.narrow(dim, 3 * r, 3))
                  .same("reduce_scatter grad", x.grad(), Xs[r].grad())
                  .verdict());
}

TEST_F(DifferentiableCollectives, AllReduceBackwardIsAllReduce) {
  const std::vector<int64_t> shape{4, 3};
  std::vector<at::Tensor> Xs;
  for (int q = 0; q < W; ++q) Xs.push_back(seeded_randn(shape, 30 + q).requires_grad_(true));
  at::Tensor x = Xs[r].detach().clone().requires_grad_(true);
  at::Tensor y = all_reduce(x, comm);
  (y * y * upstream(shape, r)).sum().backward();  // nonlinear downstream

  at::Tensor sum = Xs[0];
  for (int q = 1; q < W; ++q) sum = sum + Xs[q];
  at::Tensor loss = at::zeros({}, at::kDouble);
  for (int q = 0; q < W; ++q) loss = loss + (sum * sum * upstream(shape, q)).sum();
  loss.backward();
  EXPECT_TRUE(ReferenceCheck(r, kTol)
                  .same("all_reduce output", y, sum)
                  .same("all_reduce grad", x.grad(), Xs[r].grad())
                  .verdict());
}

TEST_F(DifferentiableCollectives, RingShiftBackwardShiftsBack) {
  const std::vector<int64_t> shape{2, 5};
  for (int shift : {1, 2, -1}) {
    std::vector<at::Tensor> Xs;
    for (int q = 0; q < W; ++q) Xs.push_back(seeded_randn(shape, 40 + q).requires_grad_(true));
    at::Tensor x = Xs[r].detach().clone().requires_grad_(true);
    at::Tensor y = ring_shift(x, comm, shift);
    (y * upstream(shape, r)).sum().backward();

    auto from = [&](int q) { return ((q - shift) % W + W) % W; };
    at::Tensor loss = at::zeros({}, at::kDouble);
    for (int q = 0; q < W; ++q) loss = loss + (Xs[from(q)] * upstream(shape, q)).sum();
    loss.backward();
    EXPECT_TRUE(ReferenceCheck(r, kTol)
                    .same("ring_shift output", y, Xs[from(r)])
                    .same("ring_shift grad", x.grad(), Xs[r].grad())
                    .verdict())
        << "shift " << shift;
  }
}

TEST_F(DifferentiableCollectives, AllToAllBackwardIsReverseAllToAll) {
  // Ulysses' shape change: rank q holds X_q [2, 2W, 3, 2] (heads x its tokens);
  // rank r receives heads 2r, 2r+1 of every rank's tokens, in rank order.
  const std::vector<int64_t> in_shape{2, 2 * W, 3, 2}, out_shape{2, 2, 3 * W, 2};
  std::vector<at::Tensor> Xs;
  for (int q = 0; q < W; ++q) Xs.push_back(seeded_randn(in_shape, 60 + q).requires_grad_(true));
  at::Tensor x = Xs[r].detach().clone().requires_grad_(true);
  at::Tensor y = all_to_all(x, comm, /*scatter_dim=*/1, /*gather_dim=*/2);
  (y * y * upstream(out_shape, r)).sum().backward();

  auto expected = [&](int p) {
    std::vector<at::Tensor> parts;
    for (int q = 0; q < W; ++q) parts.push_back(Xs[q].narrow(1, 2 * p, 2));
    return at::cat(parts, 2);
  };
  at::Tensor loss = at::zeros({}, at::kDouble);
  for (int p = 0; p < W; ++p) {
    const at::Tensor e = expected(p);
    loss = loss + (e * e * upstream(out_shape, p)).sum();
  }
  loss.backward();
  EXPECT_TRUE(ReferenceCheck(r, kTol)
                  .same("all_to_all output", y, expected(r))
                  .same("all_to_all grad", x.grad(), Xs[r].grad())
                  .verdict());
  // And back: the reverse exchange restores the input.
  EXPECT_TRUE(at::equal(all_to_all(y.detach(), comm, 2, 1), Xs[r].detach()));
}

TEST_F(DifferentiableCollectives, AllToAllUnevenBackwardSwapsSplits) {
  // rows(q, p) = (2q + p) % 3 + (p == q ? 0 : 1) rows go from rank q to rank p.
  auto rows = [](int q, int p) -> int64_t { return (2 * q + p) % 3 + (p == q ? 0 : 1); };
  auto total_rows = [&](int q) {
    int64_t n = 0;
    for (int p = 0; p < W; ++p) n += rows(q, p);
    return n;
  };
  std::vector<at::Tensor> Xs;
  for (int q = 0; q < W; ++q) Xs.push_back(seeded_randn({total_rows(q), 3}, 70 + q).requires_grad_(true));
  // Block of rank q's rows addressed to rank p.
  auto block = [&](int q, int p) {
    int64_t start = 0;
    for (int s = 0; s < p; ++s) start += rows(q, s);
    return Xs[q].narrow(0, start, rows(q, p));
  };
  auto expected = [&](int p) {
    std::vector<at::Tensor> parts;
    for (int q = 0; q < W; ++q) parts.push_back(block(q, p));
    return at::cat(parts);
  };
  std::vector<int64_t> input_splits, output_splits;
  for (int p = 0; p < W; ++p) {
    input_splits.push_back(rows(r, p));
    output_splits.push_back(rows(p, r));
  }
  at::Tensor x = Xs[r].detach().clone().requires_grad_(true);
  at::Tensor y = all_to_all_uneven(x, comm, output_splits, input_splits);
  (y.sin() * upstream(y.sizes(), r)).sum().backward();
  at::Tensor loss = at::zeros({}, at::kDouble);
  for (int p = 0; p < W; ++p) {
    const at::Tensor e = expected(p);
    loss = loss + (e.sin() * upstream(e.sizes(), p)).sum();
  }
  loss.backward();
  EXPECT_TRUE(ReferenceCheck(r, kTol)
                  .same("all_to_all_uneven output", y, expected(r))
                  .same("all_to_all_uneven grad", x.grad(), Xs[r].grad())
                  .verdict());
}

// Naive halo of one rank: for each of its chunks, the `halo` tokens before the
// chunk's start in the padded global sequence (zeros before position 0).
at::Tensor naive_halo(const at::Tensor& X_padded, const SequenceLayout& layout, int rank, int64_t halo) {
  std::vector<at::Tensor> parts;
  const at::Tensor front = at::zeros({X_padded.size(0), halo, X_padded.size(2)}, X_padded.options());
  const at::Tensor with_front = at::cat({front, X_padded}, 1);
  for (int64_t c : layout.chunks_of(rank)) parts.push_back(with_front.narrow(1, layout.chunk_start(c), halo));
  return at::cat(parts, 1);
}

TEST_F(DifferentiableCollectives, HaloExchangeBothLayouts) {
  for (auto kind : {LayoutKind::kContiguous, LayoutKind::kZigzag}) {
    for (int64_t N : {int64_t(4 * W), int64_t(6 * W + 1), int64_t(13)}) {
      const SequenceLayout layout(kind, N, W);
      for (int64_t halo : {int64_t(1), std::min<int64_t>(3, layout.chunk_len())}) {
        const at::Tensor X = seeded_randn({2, N, 3}, 50 + N);
        at::Tensor x = layout.shard(X, r).requires_grad_(true);
        at::Tensor h = halo_exchange(x, layout, halo, comm, 1);
        const std::vector<int64_t> hshape{2, layout.chunks_per_rank() * halo, 3};
        (h * upstream(hshape, r)).sum().backward();

        at::Tensor Xref = layout.shard(X, 0).new_zeros({2, layout.padded_len(), 3});
        Xref.narrow(1, 0, N).copy_(X);
        Xref.requires_grad_(true);
        at::Tensor loss = at::zeros({}, at::kDouble);
        for (int q = 0; q < W; ++q) loss = loss + (naive_halo(Xref, layout, q, halo) * upstream(hshape, q)).sum();
        loss.backward();
        EXPECT_TRUE(ReferenceCheck(r, kTol)
                        .same("halo output", h, naive_halo(Xref, layout, r, halo))
                        .same("halo grad", x.grad(), layout.shard(Xref.grad(), r))
                        .verdict())
            << layout.describe() << ", halo " << halo;
      }
    }
  }
}

TEST_F(DifferentiableCollectives, HaloLongerThanChunkIsRejected) {
  const SequenceLayout layout(LayoutKind::kZigzag, 4 * W, W);
  at::Tensor x = at::zeros({1, layout.local_len(), 2}, at::kDouble);
  try {
    halo_exchange(x, layout, layout.chunk_len() + 1, comm, 1);
    FAIL() << "expected an error";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find("exceeds the chunk length"), std::string::npos) << e.what();
  }
}

TEST_F(DifferentiableCollectives, GradcheckAgainstFiniteDifferences) {
  // Finite differences of the distributed function itself: perturb one input
  // entry on one rank at a time and compare the change of the global loss with
  // the autograd gradient (every rank joins every evaluation).
  const SequenceLayout layout(LayoutKind::kZigzag, 3 * W + 1, W);
  const at::Tensor X = seeded_randn({1, 3 * W + 1, 2}, 77);
  const at::Tensor base = layout.shard(X, r);
  auto global_loss = [&](const at::Tensor& local) {
    at::Tensor g = all_gather(local, comm, 1);
    at::Tensor h = halo_exchange(local, layout, 1, comm, 1);
    at::Tensor s = ring_shift(local, comm, 1);
    at::Tensor l = (g * g).sum() + (h * upstream(h.sizes(), r)).sum() + (s.sin()).sum();
    return all_reduce(l.reshape({1}), comm).sum();
  };
  // Autograd differentiates the sum over ranks of every rank's loss; each rank
  // holds the same all-reduced value, so that total is W times it.
  at::Tensor x = base.clone().requires_grad_(true);
  global_loss(x).backward();
  const double eps = 1e-6;
  for (int owner = 0; owner < W; ++owner) {
    for (int64_t i = 0; i < base.numel(); ++i) {
      at::Tensor plus = base.clone(), minus = base.clone();
      if (r == owner) {
        plus.view({-1})[i] += eps;
        minus.view({-1})[i] -= eps;
      }
      const double fd = W * (global_loss(plus).item<double>() - global_loss(minus).item<double>()) / (2 * eps);
      if (r == owner) EXPECT_NEAR(x.grad().view({-1})[i].item<double>(), fd, 1e-5) << "entry " << i;
    }
  }
}

}  // namespace
}  // namespace loom
