// Packed documents in softmax attention (local, ring, all-gather, sliding
// window through the halo) and in the halo short convolution: the reference
// is each document run alone on one rank with the naive float64 operator,
// outputs concatenated. Checked: out, lse, dq, dk, dv (conv: out, dx,
// dweight, dbias) within 1e-9 for both layouts, MHA and GQA, window 0 and > 0,
// lengths that do not divide the layout, with documents of length 1, starting
// at a chunk's first token, ending at its last, spanning two ranks, spanning
// all ranks, and a row that is one document. Also: an undefined doc_start is
// exactly one document [0, N); documents change no byte of communication; key
// blocks before the query block's documents are skipped.
#include <gtest/gtest.h>

#include "distributed_reference.h"
#include "documents_reference.h"
#include "loom/parallel/short_conv.h"
#include "loom/parallel/softmax_attention/softmax_attention.h"
#include "loom/runtime/comm/documents.h"
#include "loom/runtime/comm/mpi_communicator.h"

namespace loom {
namespace {

namespace sa = softmax_attention;
using testing::document_rows;
using testing::each_document_alone;
using testing::ReferenceCheck;
using testing::seeded_randn;

constexpr double kTol = 1e-9;

struct Case {
  LayoutKind kind;
  sa::SoftmaxMethod method;
};

// The group a method runs on: local attention sees one rank (a group of one
// per rank, the whole sequence), the others the world.
struct Group {
  CommPtr comm;
  int size() const { return comm->size(); }
  int rank() const { return comm->rank(); }
};
Group group_for(sa::SoftmaxMethod method) {
  auto world = MpiCommunicator::world();
  if (method == sa::SoftmaxMethod::kLocal) return {world->split(world->rank(), 0)};
  return {world};
}

// Real tokens of two local tensors are bit-for-bit equal (sequence on `dim`).
::testing::AssertionResult same_bits(const char* what, const at::Tensor& a, const at::Tensor& b,
                                     const SequenceLayout& layout, int rank, int64_t dim) {
  const at::Tensor valid = layout.valid_mask(rank).nonzero().reshape({-1});
  if (at::equal(a.index_select(dim, valid), b.index_select(dim, valid))) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure()
         << what << " differs: max |diff| "
         << (a.index_select(dim, valid) - b.index_select(dim, valid)).abs().max().item<double>();
}

class SoftmaxAttentionDocuments : public ::testing::TestWithParam<Case> {};

TEST_P(SoftmaxAttentionDocuments, EachDocumentAloneMatches) {
  const auto [kind, method] = GetParam();
  const Group g = group_for(method);
  const int W = g.size(), r = g.rank();
  const int64_t B = 2, d = 4;
  int cases = 0;
  for (auto [hq, hkv] : {std::pair<int64_t, int64_t>{2, 2}, std::pair<int64_t, int64_t>{4, 2}})  // MHA, GQA
    for (int64_t window : {int64_t(0), int64_t(3)})
      for (int64_t n : {int64_t(6 * W + 1), int64_t(8 * W + 3), int64_t(17)}) {
        const SequenceLayout layout(kind, n, W);
        if (window > 0 && window - 1 > layout.chunk_len()) continue;
        sa::AttentionSpec spec;
        spec.window = window;
        spec.block = 2;  // several blocks per chunk, partial last blocks
        for (const auto& rows : document_rows(layout, 7 + n)) {
          const at::Tensor Q = seeded_randn({B, hq, n, d}, 100 + n), K = seeded_randn({B, hkv, n, d}, 200 + n),
                           V = seeded_randn({B, hkv, n, d}, 300 + n), G = seeded_randn({B, hq, n, d}, 400 + n);
          at::Tensor Qr = Q.clone().requires_grad_(true), Kr = K.clone().requires_grad_(true),
                     Vr = V.clone().requires_grad_(true);
          const auto ref = each_document_alone(rows.lengths, {Qr, Kr, Vr}, 2, [&](const std::vector<at::Tensor>& x) {
            auto [o, l] = sa::naive_attention(x[0], x[1], x[2], spec);
            return std::vector<at::Tensor>{o, l};
          });
          (ref[0] * G).sum().backward();

          const at::Tensor doc_start = shard_document_starts(document_starts_from_lengths(rows.lengths, n), layout, r);
          at::Tensor q = layout.shard(Q, r, 2).requires_grad_(true), k = layout.shard(K, r, 2).requires_grad_(true),
                     v = layout.shard(V, r, 2).requires_grad_(true);
          auto [out, lse] = sa::attention_with_lse(q, k, v, layout, g.comm, method, spec, nullptr, doc_start);
          (out * layout.shard(G, r, 2)).sum().backward();
          EXPECT_TRUE(ReferenceCheck(r, kTol)
                          .sharded("out", out, ref[0], layout, 2)
                          .sharded("lse", lse, ref[1], layout, 2)
                          .sharded("dq", q.grad(), Qr.grad(), layout, 2)
                          .sharded("dk", k.grad(), Kr.grad(), layout, 2)
                          .sharded("dv", v.grad(), Vr.grad(), layout, 2)
                          .verdict())
              << rows.name << " " << testing::describe_lengths(rows.lengths) << " hq=" << hq << " hkv=" << hkv
              << " window=" << window << " " << layout.describe();
          ++cases;
        }
      }
  EXPECT_GE(cases, 18);
}

TEST_P(SoftmaxAttentionDocuments, UndefinedIsExactlyOneDocument) {
  const auto [kind, method] = GetParam();
  const Group g = group_for(method);
  const int W = g.size(), r = g.rank();
  for (int64_t window : {int64_t(0), int64_t(3)})
    for (int64_t n : {int64_t(6 * W + 1), int64_t(8 * W)}) {
      const SequenceLayout layout(kind, n, W);
      if (window > 0 && window - 1 > layout.chunk_len()) continue;
      sa::AttentionSpec spec;
      spec.window = window;
      spec.block = 3;
      const at::Tensor Q = seeded_randn({2, 4, n, 4}, 1 + n), K = seeded_randn({2, 2, n, 4}, 2 + n),
                       V = seeded_randn({2, 2, n, 4}, 3 + n), G = seeded_randn({2, 4, n, 4}, 4 + n);
      const at::Tensor one_document = shard_document_starts(at::zeros({2, n}, at::kLong), layout, r);
      auto run = [&](const at::Tensor& doc_start) {
        at::Tensor q = layout.shard(Q, r, 2).requires_grad_(true), k = layout.shard(K, r, 2).requires_grad_(true),
                   v = layout.shard(V, r, 2).requires_grad_(true);
        auto [out, lse] = sa::attention_with_lse(q, k, v, layout, g.comm, method, spec, nullptr, doc_start);
        (out * layout.shard(G, r, 2)).sum().backward();
        return std::vector<at::Tensor>{out.detach(), lse, q.grad(), k.grad(), v.grad()};
      };
      const auto plain = run(at::Tensor()), documented = run(one_document);
      const char* names[] = {"out", "lse", "dq", "dk", "dv"};
      for (size_t i = 0; i < plain.size(); ++i)
        EXPECT_TRUE(same_bits(names[i], documented[i], plain[i], layout, r, 2))
            << "window=" << window << " " << layout.describe();
    }
}

TEST_P(SoftmaxAttentionDocuments, CommunicationDoesNotDependOnDocuments) {
  const auto [kind, method] = GetParam();
  if (method == sa::SoftmaxMethod::kLocal) GTEST_SKIP() << "local attention does not communicate";
  const Group g = group_for(method);
  const int W = g.size(), r = g.rank();
  const int64_t n = 8 * W;
  const SequenceLayout layout(kind, n, W);
  // Every token its own document: every pair of different chunks is skipped,
  // yet the same messages travel.
  const at::Tensor doc_start =
      shard_document_starts(at::arange(n, at::kLong).unsqueeze(0).expand({1, n}).contiguous(), layout, r);
  const at::Tensor Q = seeded_randn({1, 2, n, 4}, 1), K = seeded_randn({1, 2, n, 4}, 2);
  auto traffic = [&](const at::Tensor& docs) {
    at::Tensor q = layout.shard(Q, r, 2).requires_grad_(true), k = layout.shard(K, r, 2).requires_grad_(true);
    const CommStats before = g.comm->stats();
    sa::attention(q, k, k, layout, g.comm, method, {}, nullptr, docs).sum().backward();
    return g.comm->stats() - before;
  };
  const CommStats plain = traffic(at::Tensor()), documented = traffic(doc_start);
  EXPECT_EQ(documented.total_bytes_sent(), plain.total_bytes_sent());
  EXPECT_EQ(documented.total_bytes_received(), plain.total_bytes_received());
  EXPECT_EQ(documented.total_calls(), plain.total_calls());
  if (W > 1) EXPECT_GT(plain.total_bytes_received(), 0);  // the comparison compared something
}

INSTANTIATE_TEST_SUITE_P(Methods, SoftmaxAttentionDocuments,
                         ::testing::Values(Case{LayoutKind::kContiguous, sa::SoftmaxMethod::kLocal},
                                           Case{LayoutKind::kContiguous, sa::SoftmaxMethod::kRing},
                                           Case{LayoutKind::kZigzag, sa::SoftmaxMethod::kRing},
                                           Case{LayoutKind::kContiguous, sa::SoftmaxMethod::kAllGather},
                                           Case{LayoutKind::kZigzag, sa::SoftmaxMethod::kAllGather}),
                         [](const ::testing::TestParamInfo<Case>& info) {
                           return std::string(layout_kind_name(info.param.kind)) + "_" +
                                  sa::method_name(info.param.method);
                         });

TEST(SoftmaxAttentionDocumentsKernel, SkipsKeyBlocksBeforeTheDocuments) {
  sa::AttentionSpec spec;
  // Queries 8..11, keys 0..3: visible without documents.
  EXPECT_FALSE(sa::pair_fully_masked(8, 4, 0, 4, spec));
  EXPECT_FALSE(sa::pair_fully_masked(8, 4, 0, 4, spec, 0));
  EXPECT_FALSE(sa::pair_fully_masked(8, 4, 0, 4, spec, 3));  // key 3 is in the earliest query's document
  EXPECT_TRUE(sa::pair_fully_masked(8, 4, 0, 4, spec, 4));   // every key before every document
  EXPECT_TRUE(sa::pair_fully_masked(8, 4, 12, 4, spec, 0));  // future keys stay skipped
  EXPECT_EQ(sa::smallest_document_start(at::Tensor()), 0);
  EXPECT_EQ(sa::smallest_document_start(at::tensor({5, 7, 9}, at::kLong).reshape({1, 3})), 5);
}

TEST(SoftmaxAttentionDocumentsKernel, NaiveWithDocumentsIsEachDocumentAlone) {
  // naive_attention's own doc_start option against running each document alone.
  const int64_t n = 11;
  const std::vector<std::vector<int64_t>> lengths{{1, 4, 6}, {11}};
  const at::Tensor Q = seeded_randn({2, 4, n, 4}, 1), K = seeded_randn({2, 2, n, 4}, 2),
                   V = seeded_randn({2, 2, n, 4}, 3);
  for (int64_t window : {int64_t(0), int64_t(3)}) {
    sa::AttentionSpec spec;
    spec.window = window;
    const auto ref = each_document_alone(lengths, {Q, K, V}, 2, [&](const std::vector<at::Tensor>& x) {
      auto [o, l] = sa::naive_attention(x[0], x[1], x[2], spec);
      return std::vector<at::Tensor>{o, l};
    });
    auto [out, lse] = sa::naive_attention(Q, K, V, spec, document_starts_from_lengths(lengths, n));
    EXPECT_TRUE(ReferenceCheck(0, 1e-12).same("out", out, ref[0]).same("lse", lse, ref[1]).verdict())
        << "window=" << window;
  }
}

TEST(SoftmaxAttentionDocumentsKernel, RejectsMisshapenDocumentStarts) {
  auto single = MpiCommunicator::world()->split(MpiCommunicator::world()->rank(), 0);
  const SequenceLayout layout(LayoutKind::kContiguous, 8, 1);
  const at::Tensor x = at::zeros({1, 2, 8, 4}, at::kDouble);
  for (const at::Tensor& bad :
       {at::zeros({1, 7}, at::kLong), at::zeros({1, 8}, at::kInt), at::zeros({2, 8}, at::kLong)}) {
    try {
      sa::attention(x, x, x, layout, single, sa::SoftmaxMethod::kLocal, {}, nullptr, bad);
      ADD_FAILURE() << "accepted doc_start " << bad.sizes() << " " << bad.scalar_type();
    } catch (const c10::Error& e) {
      EXPECT_NE(std::string(e.what()).find("softmax attention: doc_start"), std::string::npos) << e.what();
    }
  }
}

TEST(ShortConvDocuments, EachDocumentAloneMatches) {
  auto comm = MpiCommunicator::world();
  const int W = comm->size(), r = comm->rank();
  int cases = 0;
  for (auto kind : {LayoutKind::kContiguous, LayoutKind::kZigzag})
    for (int64_t n : {int64_t(4 * W + 1), int64_t(6 * W), int64_t(13)})
      for (int64_t K : {1, 3, 4}) {
        const SequenceLayout layout(kind, n, W);
        if (K - 1 > layout.chunk_len()) continue;
        for (const auto& rows : document_rows(layout, 3 + n + K)) {
          const at::Tensor X = seeded_randn({2, n, 5}, 1 + n), Wt = seeded_randn({5, K}, 2), Bs = seeded_randn({5}, 3),
                           G = seeded_randn({2, n, 5}, 4 + n);
          at::Tensor Xr = X.clone().requires_grad_(true), wr = Wt.clone().requires_grad_(true),
                     br = Bs.clone().requires_grad_(true);
          const auto ref = each_document_alone(rows.lengths, {Xr}, 1, [&](const std::vector<at::Tensor>& x) {
            return std::vector<at::Tensor>{naive_causal_depthwise_conv(x[0], wr, br)};
          });
          (ref[0] * G).sum().backward();
          // The naive conv's own doc_start option agrees with it.
          const at::Tensor global_doc_start = document_starts_from_lengths(rows.lengths, n);
          const at::Tensor naive = naive_causal_depthwise_conv(X, Wt, Bs, global_doc_start);

          at::Tensor x = layout.shard(X, r, 1).requires_grad_(true);
          at::Tensor w = Wt.clone().requires_grad_(true), b = Bs.clone().requires_grad_(true);
          at::Tensor out =
              causal_depthwise_conv(x, w, b, layout, comm, shard_document_starts(global_doc_start, layout, r));
          (out * layout.shard(G, r, 1)).sum().backward();
          at::Tensor dw = w.grad().clone(), db = b.grad().clone();
          comm->all_reduce(dw)->wait();
          comm->all_reduce(db)->wait();
          EXPECT_TRUE(ReferenceCheck(r, kTol)
                          .same("naive", naive, ref[0].detach())
                          .sharded("out", out, ref[0], layout, 1)
                          .sharded("dx", x.grad(), Xr.grad(), layout, 1)
                          .same("dweight", dw, wr.grad())
                          .same("dbias", db, br.grad())
                          .verdict())
              << rows.name << " " << testing::describe_lengths(rows.lengths) << " " << layout.describe() << " K=" << K;
          ++cases;
        }
      }
  EXPECT_GE(cases, 12);
}

TEST(ShortConvDocuments, UndefinedIsExactlyOneDocument) {
  // One document [0, N) through the masked path equals the plain conv1d path
  // (to rounding: the masked path sums the K products itself).
  auto comm = MpiCommunicator::world();
  const int W = comm->size(), r = comm->rank();
  const int64_t n = 6 * W + 1;
  const SequenceLayout layout(LayoutKind::kZigzag, n, W);
  const at::Tensor x = layout.shard(seeded_randn({2, n, 5}, 1), r, 1), w = seeded_randn({5, 3}, 2),
                   b = seeded_randn({5}, 3);
  const at::Tensor plain = causal_depthwise_conv(x, w, b, layout, comm);
  const at::Tensor documented =
      causal_depthwise_conv(x, w, b, layout, comm, shard_document_starts(at::zeros({2, n}, at::kLong), layout, r));
  EXPECT_TRUE(ReferenceCheck(r, 1e-12)
                  .same("out", documented.index_select(1, layout.valid_mask(r).nonzero().reshape({-1})),
                        plain.index_select(1, layout.valid_mask(r).nonzero().reshape({-1})))
                  .verdict());
}

}  // namespace
}  // namespace loom
