// SequenceLayout: chunk ownership, padding, positions, and shard/unshard
// round trips for both layouts, for lengths that do and do not divide.
#include <gtest/gtest.h>

#include "distributed_reference.h"
#include "loom/runtime/core/error.h"
#include "loom/runtime/comm/mpi_communicator.h"
#include "loom/runtime/comm/sequence_layout.h"

namespace loom {
namespace {

TEST(SequenceLayout, ZigzagOwnership) {
  const SequenceLayout z(LayoutKind::kZigzag, 16, 4);
  EXPECT_EQ(z.num_chunks(), 8);
  EXPECT_EQ(z.chunk_len(), 2);
  EXPECT_EQ(z.chunks_of(0), (std::vector<int64_t>{0, 7}));
  EXPECT_EQ(z.chunks_of(3), (std::vector<int64_t>{3, 4}));
  for (int64_t c = 0; c < 8; ++c) {
    const int owner = z.owner_of(c);
    EXPECT_EQ(z.chunks_of(owner)[z.local_index_of(c)], c);
  }
  EXPECT_TRUE(at::equal(z.global_positions(1), at::tensor({2, 3, 12, 13}, at::kLong)));
}

TEST(SequenceLayout, PadsAndMasksInsteadOfTruncating) {
  const SequenceLayout c(LayoutKind::kContiguous, 10, 3);
  EXPECT_EQ(c.chunk_len(), 4);
  EXPECT_EQ(c.padded_len(), 12);
  EXPECT_EQ(c.padding(), 2);
  EXPECT_TRUE(at::equal(c.valid_mask(2), at::tensor({1, 1, 0, 0}).to(at::kBool)));
  EXPECT_TRUE(at::equal(c.valid_mask(0), at::ones({4}, at::kBool)));
}

TEST(SequenceLayout, RejectPolicyNamesTheNumbers) {
  try {
    SequenceLayout(LayoutKind::kZigzag, 10, 3, PadPolicy::kReject);
    FAIL() << "expected ConfigError";
  } catch (const ConfigError& e) {
    const std::string what = e.what();
    EXPECT_NE(what.find("sequence length 10 does not divide into the 6 chunks of the zigzag layout over 3 ranks"),
              std::string::npos)
        << what;
  }
  EXPECT_NO_THROW(SequenceLayout(LayoutKind::kZigzag, 12, 3, PadPolicy::kReject));
  EXPECT_THROW(parse_layout_kind("diagonal"), ConfigError);
  EXPECT_EQ(parse_layout_kind("ZigZag"), LayoutKind::kZigzag);
}

TEST(SequenceLayout, ShardUnshardRoundTripsEveryShape) {
  for (auto kind : {LayoutKind::kContiguous, LayoutKind::kZigzag}) {
    for (int W = 1; W <= 5; ++W) {
      for (int64_t N : {1, 7, 8, 24, 31, 64, 97}) {
        const SequenceLayout layout(kind, N, W);
        const at::Tensor x = testing::seeded_randn({2, N, 3}, N * 10 + W);
        std::vector<at::Tensor> locals;
        int64_t real_tokens = 0;
        for (int r = 0; r < W; ++r) {
          locals.push_back(layout.shard(x, r));
          EXPECT_EQ(locals.back().size(1), layout.local_len());
          real_tokens += layout.valid_mask(r).sum().item<int64_t>();
        }
        EXPECT_EQ(real_tokens, N) << layout.describe();
        EXPECT_TRUE(at::equal(layout.unshard(locals), x)) << layout.describe();
      }
    }
  }
}

TEST(SequenceLayout, GatherAcrossRanks) {
  auto comm = MpiCommunicator::world();
  for (auto kind : {LayoutKind::kContiguous, LayoutKind::kZigzag}) {
    for (int64_t N : {5, 16, 29}) {
      const SequenceLayout layout(kind, N, comm->size());
      const at::Tensor x = testing::seeded_randn({3, N, 2}, 7 + N);
      const at::Tensor local = layout.shard(x, comm->rank());
      EXPECT_TRUE(at::equal(layout.gather(local, *comm), x)) << layout.describe();
    }
  }
}

}  // namespace
}  // namespace loom
