// Loss by position bucket (runtime/train/position_loss.h): the buckets the
// main job prints, and the bucketed loss of sequence-parallel shards (zigzag
// and contiguous, lengths that do and do not divide, every rank count of the
// run) summed over the ranks equals the single-rank computation in float64,
// for given per-token losses and for a small model of the demo's pattern.
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "distributed_reference.h"
#include "loom/models/hybrid_lm.h"
#include "loom/runtime/comm/mpi_communicator.h"
#include "loom/runtime/comm/sequence_layout.h"
#include "loom/runtime/train/position_loss.h"

namespace loom {
namespace {

TEST(PositionLoss, BucketEdgesAndLabelsAreThePrintedOnes) {
  const std::vector<int64_t> edges = position_bucket_edges(8192);
  EXPECT_EQ(edges, (std::vector<int64_t>{0, 64, 128, 256, 512, 1024, 2048, 4096, 8192}));
  std::vector<std::string> labels;
  for (size_t k = 0; k + 1 < edges.size(); ++k) labels.push_back(bucket_label(edges[k], edges[k + 1]));
  EXPECT_EQ(labels, (std::vector<std::string>{"0-64", "64-128", "128-256", "256-512", "512-1K", "1K-2K", "2K-4K",
                                              "4K-8K"}));
  EXPECT_EQ(position_bucket_edges(1000), (std::vector<int64_t>{0, 64, 128, 256, 512, 1000}));
  EXPECT_EQ(position_bucket_edges(64), (std::vector<int64_t>{0, 64}));
  EXPECT_EQ(position_bucket_edges(10), (std::vector<int64_t>{0, 10}));
  EXPECT_EQ(bucket_label(512, 1000), "512-1000");
  EXPECT_THROW(PositionLoss({0, 64, 64}), c10::Error);
  EXPECT_THROW(PositionLoss({1, 64}), c10::Error);
}

TEST(PositionLoss, TokenCrossEntropyMatchesTheSummedLoss) {
  const at::Tensor logits = testing::seeded_randn({2, 33, 11}, 5);
  at::Tensor labels = testing::seeded_randn({2, 33}, 6).abs().mul(4).to(at::kLong).clamp_max(10);
  labels.index_put_({0, at::indexing::Slice(3, 9)}, -100);
  const at::Tensor per_token = token_cross_entropy(logits, labels);
  const at::Tensor expected = at::cross_entropy_loss(logits.reshape({-1, 11}), labels.reshape({-1}), {},
                                                     at::Reduction::None, -100);
  EXPECT_TRUE(testing::tensors_close(per_token.reshape({-1}), expected, 1e-12, "per-token loss"));
  EXPECT_EQ(per_token.index({0, at::indexing::Slice(3, 9)}).abs().sum().item<double>(), 0.0);
}

// Reference: one rank, the whole rows, every position bucketed by a plain loop.
void reference_buckets(const at::Tensor& loss, const at::Tensor& labels, const std::vector<int64_t>& edges,
                       std::vector<double>& sums, std::vector<double>& counts) {
  sums.assign(edges.size() - 1, 0.0);
  counts.assign(edges.size() - 1, 0.0);
  const auto l = loss.accessor<double, 2>();
  const auto y = labels.accessor<int64_t, 2>();
  for (int64_t b = 0; b < loss.size(0); ++b)
    for (int64_t p = 0; p < loss.size(1); ++p) {
      if (y[b][p] == -100) continue;
      size_t k = 0;
      while (!(p >= edges[k] && p < edges[k + 1])) ++k;
      sums[k] += l[b][p];
      counts[k] += 1;
    }
}

TEST(PositionLoss, ShardsSummedOverRanksEqualOneRank) {
  auto world = MpiCommunicator::world();
  const int W = world->size(), r = world->rank();
  for (auto kind : {LayoutKind::kZigzag, LayoutKind::kContiguous}) {
    for (int64_t N : {int64_t{8192}, int64_t{1000}}) {
      const SequenceLayout layout(kind, N, W);
      // The same rows on every rank: losses, and labels with ignored stretches.
      const at::Tensor loss = testing::seeded_randn({3, N}, 40 + N).abs();
      at::Tensor labels = testing::seeded_randn({3, N}, 41 + N).gt(-1.0).to(at::kLong);
      labels.masked_fill_(labels.eq(0), -100);
      labels.index_put_({1, at::indexing::Slice(100, 3000 < N ? 3000 : N)}, -100);
      const std::vector<int64_t> edges = position_bucket_edges(N);
      std::vector<double> sums, counts;
      reference_buckets(loss, labels, edges, sums, counts);

      PositionLoss bucketed(edges);
      bucketed.add(layout.shard(loss, r, 1, 0), layout.shard(labels, r, 1, -100), layout, r);
      bucketed.reduce(*world);
      ASSERT_EQ(bucketed.buckets(), sums.size());
      for (size_t k = 0; k < sums.size(); ++k) {
        SCOPED_TRACE(std::string(layout_kind_name(kind)) + " N " + std::to_string(N) + " bucket " +
                     bucket_label(edges[k], edges[k + 1]) + " rank " + std::to_string(r));
        EXPECT_EQ(bucketed.count(k), counts[k]);
        EXPECT_NEAR(bucketed.sum(k), sums[k], 1e-12 * std::max(1.0, std::abs(sums[k])));
        EXPECT_NEAR(bucketed.mean(k), sums[k] / counts[k], 1e-12);
      }
      // Taking the local index for the position would be wrong on a zigzag
      // layout over 2 or more ranks: the test can tell.
      if (kind == LayoutKind::kZigzag && W > 1) {
        const SequenceLayout local_as_global(LayoutKind::kContiguous, layout.local_len(), 1);
        PositionLoss naive(position_bucket_edges(std::max(N, layout.local_len())));
        naive.add(layout.shard(loss, r, 1, 0), layout.shard(labels, r, 1, -100), local_as_global, 0);
        naive.reduce(*world);
        double differs = 0;
        for (size_t k = 0; k < naive.buckets() && k < sums.size(); ++k) differs += std::abs(naive.count(k) - counts[k]);
        EXPECT_GT(differs, 0);
      }
    }
  }
}

// The whole path of loom-train --position-loss-rows: a model of the demo's
// pattern (LWCM, float64) run sequence-parallel on every rank, per-token loss
// of each shard, bucketed and summed over the ranks, against the same model on
// one rank over the whole rows.
TEST(PositionLoss, OfADemoPatternModelAcrossRanksEqualsOneRank) {
  auto world = MpiCommunicator::world();
  auto self = world->split(world->rank(), 0);
  const int W = world->size(), r = world->rank();
  pb::ModelConfig user;
  user.set_pattern("LWCM");
  user.set_vocab_size(32);
  user.set_d_model(16);
  user.set_n_heads(2);
  user.set_d_ff(32);
  user.set_feature_dim(4);
  user.set_feature_map("taylor");
  user.set_window(4);
  user.set_conv_kernel(3);
  user.set_block_size(4);
  user.set_memory_chunk(2);
  user.set_memory_depth(1);
  torch::manual_seed(5);
  models::HybridLM model(models::resolve_model_config(user));
  model->to(at::kDouble);
  at::NoGradGuard no_grad;
  const int64_t n = 96 * W;  // whole memory chunks in every layout chunk; buckets 0-64, 64-128, ...
  at::Generator gen = at::detail::createCPUGenerator(17);
  const at::Tensor tokens = at::randint(0, 32, {2, n + 1}, gen, at::kLong);
  const at::Tensor inputs = tokens.narrow(1, 0, n);
  at::Tensor labels = tokens.narrow(1, 1, n).clone();
  labels.index_put_({0, at::indexing::Slice(10, 70)}, -100);
  const std::vector<int64_t> edges = position_bucket_edges(n);
  // One rank, whole rows.
  const SequenceLayout one(LayoutKind::kContiguous, n, 1);
  PositionLoss reference(edges);
  const at::Tensor logits1 = model->forward(inputs, models::SequenceContext{one, self});
  reference.add(token_cross_entropy(logits1, labels), labels, one, 0);
  for (auto kind : {LayoutKind::kZigzag, LayoutKind::kContiguous}) {
    const SequenceLayout layout(kind, n, W);
    const at::Tensor local_labels = layout.shard(labels, r, 1, -100);
    const at::Tensor logits = model->forward(layout.shard(inputs, r, 1, 0), models::SequenceContext{layout, world});
    PositionLoss bucketed(edges);
    bucketed.add(token_cross_entropy(logits, local_labels), local_labels, layout, r);
    bucketed.reduce(*world);
    for (size_t k = 0; k < reference.buckets(); ++k) {
      SCOPED_TRACE(std::string(layout_kind_name(kind)) + " bucket " + bucket_label(edges[k], edges[k + 1]) +
                   " rank " + std::to_string(r));
      EXPECT_EQ(bucketed.count(k), reference.count(k));
      EXPECT_NEAR(bucketed.mean(k), reference.mean(k), 1e-10);
    }
  }
}

}  // namespace
}  // namespace loom
