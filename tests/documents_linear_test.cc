// Linear attention over packed documents: the chunked kernel and LASP-2,
// all-scan and LASP-1 with doc_start, against the DESIGN.md reference: each
// document run alone (naive, one rank) and the outputs concatenated; outputs
// and gradients of q, k, v in float64, both layouts, decay and normaliser on
// and off, document patterns with documents of length 1, aligned with chunks,
// across two ranks and across every rank. Also: without doc_start the
// operator equals one document, and LASP-2's bytes do not grow with the
// number of documents.
#include <gtest/gtest.h>
#include <torch/autograd.h>

#include "distributed_reference.h"
#include "loom/parallel/linear_attention/lasp.h"
#include "loom/runtime/comm/documents.h"
#include "loom/runtime/comm/mpi_communicator.h"

namespace loom {
namespace {

namespace la = linear_attention;
using testing::document_lengths;
using testing::ReferenceCheck;
using testing::seeded_randn;

constexpr double kTol = 1e-9;
constexpr int64_t kBlock = 4, H = 2, D = 3, DV = 2;

la::LinearAttentionOptions options(bool decay, bool normalize) {
  la::LinearAttentionOptions o;
  o.block_size = kBlock;
  if (decay) o.decay = at::tensor({0.9, 0.6}, at::kDouble);
  o.normalize = normalize;
  return o;
}

// Each document of each row alone through the naive operator, concatenated.
at::Tensor per_document_reference(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const std::vector<std::vector<int64_t>>& lengths, la::LinearAttentionOptions opt) {
  opt.doc_start = at::Tensor();
  std::vector<at::Tensor> rows;
  for (size_t b = 0; b < lengths.size(); ++b) {
    std::vector<at::Tensor> docs;
    int64_t start = 0;
    for (int64_t len : lengths[b]) {
      auto slice = [&](const at::Tensor& x) { return x.narrow(0, b, 1).narrow(2, start, len); };
      docs.push_back(la::naive_linear_attention(slice(q), slice(k), slice(v), opt));
      start += len;
    }
    rows.push_back(at::cat(docs, 2));
  }
  return at::cat(rows, 0);
}

struct Case {
  LayoutKind kind;
  la::LinearAttentionMethod method;
};

class LinearAttentionDocuments : public ::testing::TestWithParam<Case> {};

TEST_P(LinearAttentionDocuments, EachDocumentAsIfAlone) {
  const auto [kind, method] = GetParam();
  auto comm = MpiCommunicator::world();
  const int W = comm->size(), r = comm->rank();
  int cases = 0;
  for (int64_t n : {int64_t(2 * kBlock * W + 3), int64_t(5 * W)}) {
    const SequenceLayout layout(kind, n, W);
    for (int pattern = 0; pattern < testing::kDocumentPatterns; ++pattern) {
      // Two rows with different documents.
      const std::vector<std::vector<int64_t>> lengths{document_lengths(n, layout.chunk_len(), pattern),
                                                      document_lengths(n, layout.chunk_len(), (pattern + 2) % 5)};
      const at::Tensor docs = document_starts_from_lengths(lengths, n);
      for (bool decay : {false, true}) {
        for (bool normalize : {false, true}) {
          const auto opt = options(decay, normalize);
          const uint64_t seed = 100 * n + 10 * pattern;
          // exp: positive features keep the normaliser away from 0.
          const at::Tensor Q = seeded_randn({2, H, n, D}, seed + 1).exp(), K = seeded_randn({2, H, n, D}, seed + 2).exp(),
                           V = seeded_randn({2, H, n, DV}, seed + 3), G = seeded_randn({2, H, n, DV}, seed + 4);
          at::Tensor Qr = Q.clone().requires_grad_(true), Kr = K.clone().requires_grad_(true),
                     Vr = V.clone().requires_grad_(true);
          const at::Tensor ref = per_document_reference(Qr, Kr, Vr, lengths, opt);
          (ref * G).sum().backward();

          // The naive operator with doc_start is the same definition.
          auto whole = opt;
          whole.doc_start = docs;
          ASSERT_TRUE(ReferenceCheck(r, kTol).same("naive with doc_start", la::naive_linear_attention(Q, K, V, whole), ref).verdict());

          // One rank, chunked kernel, whole row.
          at::Tensor q1 = Q.clone().requires_grad_(true), k1 = K.clone().requires_grad_(true),
                     v1 = V.clone().requires_grad_(true);
          at::Tensor out1 = la::linear_attention(q1, k1, v1, whole);
          (out1 * G).sum().backward();
          EXPECT_TRUE(ReferenceCheck(r, kTol)
                          .same("chunked out", out1, ref)
                          .same("chunked dq", q1.grad(), Qr.grad())
                          .same("chunked dk", k1.grad(), Kr.grad())
                          .same("chunked dv", v1.grad(), Vr.grad())
                          .verdict())
              << "pattern " << pattern << " n=" << n << " decay=" << decay << " normalize=" << normalize;

          // Sequence parallel: this rank's shard.
          auto local = opt;
          local.doc_start = shard_document_starts(docs, layout, r);
          at::Tensor q = layout.shard(Q, r, 2).requires_grad_(true), k = layout.shard(K, r, 2).requires_grad_(true),
                     v = layout.shard(V, r, 2).requires_grad_(true);
          at::Tensor out = la::sequence_parallel_linear_attention(q, k, v, layout, comm, method, local);
          (out * layout.shard(G, r, 2)).sum().backward();
          EXPECT_TRUE(ReferenceCheck(r, kTol)
                          .sharded("out", out, ref, layout, 2)
                          .sharded("dq", q.grad(), Qr.grad(), layout, 2)
                          .sharded("dk", k.grad(), Kr.grad(), layout, 2)
                          .sharded("dv", v.grad(), Vr.grad(), layout, 2)
                          .verdict())
              << "pattern " << pattern << " n=" << n << " decay=" << decay << " normalize=" << normalize << " "
              << layout.describe();
          ++cases;
        }
      }
    }
  }
  EXPECT_EQ(cases, 2 * testing::kDocumentPatterns * 4);
}

TEST_P(LinearAttentionDocuments, OneDocumentEqualsNoDocuments) {
  const auto [kind, method] = GetParam();
  auto comm = MpiCommunicator::world();
  const int W = comm->size(), r = comm->rank();
  const int64_t n = 3 * kBlock * W + 1;
  const SequenceLayout layout(kind, n, W);
  auto opt = options(true, true);
  const at::Tensor Q = layout.shard(seeded_randn({2, H, n, D}, 1).exp(), r, 2),
                   K = layout.shard(seeded_randn({2, H, n, D}, 2).exp(), r, 2), V = layout.shard(seeded_randn({2, H, n, DV}, 3), r, 2);
  const at::Tensor plain = la::sequence_parallel_linear_attention(Q, K, V, layout, comm, method, opt);
  opt.doc_start = shard_document_starts(at::zeros({2, n}, at::kLong), layout, r);
  const at::Tensor one = la::sequence_parallel_linear_attention(Q, K, V, layout, comm, method, opt);
  EXPECT_TRUE(ReferenceCheck(r, 1e-12).sharded("one document", one, layout.gather(plain, *comm, 2), layout, 2).verdict());
}

INSTANTIATE_TEST_SUITE_P(
    Methods, LinearAttentionDocuments,
    ::testing::Values(Case{LayoutKind::kContiguous, la::LinearAttentionMethod::kLasp2},
                      Case{LayoutKind::kZigzag, la::LinearAttentionMethod::kLasp2},
                      Case{LayoutKind::kContiguous, la::LinearAttentionMethod::kLasp2AllScan},
                      Case{LayoutKind::kZigzag, la::LinearAttentionMethod::kLasp2AllScan},
                      Case{LayoutKind::kContiguous, la::LinearAttentionMethod::kLasp1},
                      Case{LayoutKind::kZigzag, la::LinearAttentionMethod::kLasp1}),
    [](const ::testing::TestParamInfo<Case>& info) {
      return std::string(layout_kind_name(info.param.kind)) + "_" + la::method_name(info.param.method);
    });

// LASP-2 with documents: still one AllGather each way, and the bytes are the
// state plus one decay per row and head per chunk, whatever the number of
// documents.
TEST(LinearAttentionDocumentsCommunication, Lasp2BytesIndependentOfDocuments) {
  auto comm = MpiCommunicator::world();
  const int W = comm->size(), r = comm->rank();
  const int64_t n = 32 * W;
  for (auto kind : {LayoutKind::kContiguous, LayoutKind::kZigzag}) {
    const SequenceLayout layout(kind, n, W);
    const int64_t cpr = layout.chunks_per_rank();
    for (int64_t doc_len : {n, int64_t(7), int64_t(1)}) {
      std::vector<int64_t> lens;
      for (int64_t left = n; left > 0; left -= std::min(left, doc_len)) lens.push_back(std::min(left, doc_len));
      auto opt = options(true, false);
      opt.doc_start = shard_document_starts(document_starts_from_lengths({lens}, n), layout, r);
      at::Tensor q = layout.shard(seeded_randn({1, H, n, D}, 1), r, 2).requires_grad_(true);
      at::Tensor v = layout.shard(seeded_randn({1, H, n, DV}, 2), r, 2).requires_grad_(true);
      const CommStats s0 = comm->stats();
      at::Tensor out = la::sequence_parallel_linear_attention(q, q, v, layout, comm, la::LinearAttentionMethod::kLasp2, opt);
      const CommStats s1 = comm->stats();
      out.sum().backward();
      const CommStats s2 = comm->stats();
      const int64_t expected = (W - 1) * cpr * (H * D * DV + H) * int64_t(sizeof(double));
      EXPECT_EQ((s1 - s0)[OpType::kAllGather].calls, 1);
      EXPECT_EQ((s1 - s0).total_calls(), 1);
      EXPECT_EQ((s2 - s1).total_calls(), 1);
      EXPECT_EQ((s1 - s0).total_bytes_received(), expected) << "documents of " << doc_len;
      EXPECT_EQ((s2 - s1).total_bytes_received(), expected) << "documents of " << doc_len;
    }
  }
}

}  // namespace
}  // namespace loom
