// Softmax attention across ranks (ring, all-gather, halo sliding window) and
// the halo short convolution, against naive single-rank float64 references:
// outputs, LSE and dQ, dK, dV, for both layouts, MHA and GQA, with and without
// window, lengths not divisible by 2W.
#include <gtest/gtest.h>
#include <torch/autograd.h>

#include "distributed_reference.h"
#include "loom/parallel/linear_attention/cpu_blas.h"
#include "loom/parallel/short_conv.h"
#include "loom/parallel/softmax_attention/rotary.h"
#include "loom/parallel/softmax_attention/softmax_attention.h"
#include "loom/runtime/comm/documents.h"
#include "loom/runtime/core/error.h"
#include "loom/runtime/comm/mpi_communicator.h"

namespace loom {
namespace {

namespace sa = softmax_attention;
using testing::ReferenceCheck;
using testing::seeded_randn;

constexpr double kTol = 1e-9;

struct Case {
  LayoutKind kind;
  sa::SoftmaxMethod method;
};

class SoftmaxAttentionAcrossRanks : public ::testing::TestWithParam<Case> {};

TEST_P(SoftmaxAttentionAcrossRanks, MatchesNaiveReference) {
  const auto [kind, method] = GetParam();
  auto comm = MpiCommunicator::world();
  const int W = comm->size(), r = comm->rank();
  const int64_t B = 1, d = 4;
  int cases = 0;
  for (auto heads : {std::pair<int64_t, int64_t>{2, 2}, std::pair<int64_t, int64_t>{4, 2}}) {  // MHA, GQA
    const auto [hq, hkv] = heads;
    for (int64_t window : {int64_t(0), int64_t(3)}) {
      for (int64_t n : {int64_t(6 * W + 1), int64_t(4 * W * 2 + 3), int64_t(17)}) {
        const SequenceLayout layout(kind, n, W);
        if (window > 0 && window - 1 > layout.chunk_len()) continue;
        sa::AttentionSpec spec;
        spec.window = window;
        spec.block = 3;  // several blocks per chunk, partial last block
        const at::Tensor Q = seeded_randn({B, hq, n, d}, 100 + n), K = seeded_randn({B, hkv, n, d}, 200 + n),
                         V = seeded_randn({B, hkv, n, d}, 300 + n), G = seeded_randn({B, hq, n, d}, 400 + n);
        at::Tensor Qr = Q.clone().requires_grad_(true), Kr = K.clone().requires_grad_(true),
                   Vr = V.clone().requires_grad_(true);
        auto [ref, ref_lse] = sa::naive_attention(Qr, Kr, Vr, spec);
        (ref * G).sum().backward();

        at::Tensor q = layout.shard(Q, r, 2).requires_grad_(true), k = layout.shard(K, r, 2).requires_grad_(true),
                   v = layout.shard(V, r, 2).requires_grad_(true);
        auto [out, lse] = sa::attention_with_lse(q, k, v, layout, comm, method, spec);
        (out * layout.shard(G, r, 2)).sum().backward();
        EXPECT_TRUE(ReferenceCheck(r, kTol)
                        .sharded("out", out, ref, layout, 2)
                        .sharded("lse", lse, ref_lse, layout, 2)
                        .sharded("dq", q.grad(), Qr.grad(), layout, 2)
                        .sharded("dk", k.grad(), Kr.grad(), layout, 2)
                        .sharded("dv", v.grad(), Vr.grad(), layout, 2)
                        .verdict())
            << "hq=" << hq << " hkv=" << hkv << " window=" << window << " " << layout.describe();
        ++cases;
      }
    }
  }
  EXPECT_GE(cases, 6);
}

TEST_P(SoftmaxAttentionAcrossRanks, LargeLogitsDoNotOverflow) {
  const auto [kind, method] = GetParam();
  auto comm = MpiCommunicator::world();
  const int W = comm->size(), r = comm->rank();
  const int64_t n = 5 * W + 2;
  const SequenceLayout layout(kind, n, W);
  sa::AttentionSpec spec;
  spec.scale = 1.0;
  // Scores around 1e4: exp would overflow anything without the online max.
  const at::Tensor Q = seeded_randn({1, 2, n, 4}, 1) * 50, K = seeded_randn({1, 2, n, 4}, 2) * 50,
                   V = seeded_randn({1, 2, n, 4}, 3);
  auto [ref, ref_lse] = sa::naive_attention(Q, K, V, spec);
  ASSERT_GT(ref_lse.abs().max().item<double>(), 1e3);
  at::Tensor q = layout.shard(Q, r, 2).requires_grad_(true);
  auto [out, lse] = sa::attention_with_lse(q, layout.shard(K, r, 2), layout.shard(V, r, 2), layout, comm, method, spec);
  out.sum().backward();
  EXPECT_TRUE(at::isfinite(out).all().item<bool>());
  EXPECT_TRUE(at::isfinite(q.grad()).all().item<bool>());
  EXPECT_TRUE(ReferenceCheck(r, kTol).sharded("out", out, ref, layout, 2).sharded("lse", lse, ref_lse, layout, 2).verdict());
}

TEST_P(SoftmaxAttentionAcrossRanks, CountedBytesMatchTheFormula) {
  const auto [kind, method] = GetParam();
  auto comm = MpiCommunicator::world();
  const int W = comm->size(), r = comm->rank();
  const int64_t n = 16 * W, hkv = 2, d = 4;
  const SequenceLayout layout(kind, n, W);
  at::Tensor q = layout.shard(seeded_randn({1, 4, n, d}, 1, at::kFloat), r, 2);
  at::Tensor k = layout.shard(seeded_randn({1, hkv, n, d}, 2, at::kFloat), r, 2);
  const CommStats before = comm->stats();
  sa::attention(q, k, k, layout, comm, method, {});
  const CommStats d_fwd = comm->stats() - before;
  // (W-1) * 2 * (N/W) * H_kv * d * sizeof(float), in W-1 sends (ring) or one all-gather.
  const int64_t expected = (W - 1) * 2 * (n / W) * hkv * d * int64_t(sizeof(float));
  EXPECT_EQ(d_fwd.total_bytes_received(), expected);
  if (method == sa::SoftmaxMethod::kRing) {
    EXPECT_EQ(d_fwd[OpType::kRecv].calls, W - 1);
  } else {
    EXPECT_EQ(d_fwd.total_calls(), 1);
  }
}

INSTANTIATE_TEST_SUITE_P(Methods, SoftmaxAttentionAcrossRanks,
                         ::testing::Values(Case{LayoutKind::kContiguous, sa::SoftmaxMethod::kRing},
                                           Case{LayoutKind::kZigzag, sa::SoftmaxMethod::kRing},
                                           Case{LayoutKind::kContiguous, sa::SoftmaxMethod::kAllGather},
                                           Case{LayoutKind::kZigzag, sa::SoftmaxMethod::kAllGather}),
                         [](const ::testing::TestParamInfo<Case>& info) {
                           return std::string(layout_kind_name(info.param.kind)) + "_" +
                                  sa::method_name(info.param.method);
                         });

TEST(SoftmaxAttentionLocal, BlockwiseMatchesNaiveAndRejectsSplitSequences) {
  auto comm = MpiCommunicator::world();
  for (int64_t n : {1, 7, 33}) {
    auto single = comm->split(comm->rank(), 0);  // a group of one
    const at::Tensor Q = seeded_randn({2, 4, n, 8}, 1), K = seeded_randn({2, 1, n, 8}, 2), V = seeded_randn({2, 1, n, 8}, 3);
    at::Tensor q = Q.clone().requires_grad_(true), k = K.clone().requires_grad_(true), v = V.clone().requires_grad_(true);
    sa::AttentionSpec spec;
    spec.block = 4;
    auto [out, lse] = sa::attention_with_lse(q, k, v, SequenceLayout(LayoutKind::kContiguous, n, 1), single,
                                             sa::SoftmaxMethod::kLocal, spec);
    out.pow(2).sum().backward();
    at::Tensor qr = Q.clone().requires_grad_(true), kr = K.clone().requires_grad_(true), vr = V.clone().requires_grad_(true);
    auto [ref, ref_lse] = sa::naive_attention(qr, kr, vr, spec);
    ref.pow(2).sum().backward();
    EXPECT_TRUE(ReferenceCheck(0, kTol)
                    .same("out", out, ref)
                    .same("lse", lse, ref_lse)
                    .same("dq", q.grad(), qr.grad())
                    .same("dk", k.grad(), kr.grad())
                    .same("dv", v.grad(), vr.grad())
                    .verdict());
  }
  if (comm->size() > 1) {
    const SequenceLayout split(LayoutKind::kContiguous, 8 * comm->size(), comm->size());
    at::Tensor x = at::zeros({1, 1, split.local_len(), 4}, at::kDouble);
    EXPECT_THROW(sa::attention(x, x, x, split, comm, sa::SoftmaxMethod::kLocal, {}), ConfigError);
  }
}

TEST(SoftmaxAttentionLocal, BackwardIntoStridedGradientsMatchesContiguous) {
  // dK, dV that no [B*Hkv, L, d] view can address (here transposed views of a
  // [B, L, Hkv, d] buffer) are accumulated in a copy and written back: the same
  // values as contiguous gradients, added to what they held (GQA, 4 over 2 heads).
  const int64_t n = 19;
  const at::Tensor q = seeded_randn({2, 4, n, 8}, 1), k = seeded_randn({2, 2, n, 8}, 2), v = seeded_randn({2, 2, n, 8}, 3);
  const at::Tensor dout = seeded_randn({2, 4, n, 8}, 4);
  sa::AttentionSpec spec;
  spec.block = 4;
  const sa::Partial p = sa::attend_pair(q, 0, k, v, 0, spec);
  const at::Tensor delta = (dout * p.out).sum(-1);
  at::Tensor dq = at::zeros_like(q), dk = seeded_randn({2, 2, n, 8}, 5), dv = seeded_randn({2, 2, n, 8}, 6);
  at::Tensor dq_s = at::zeros_like(q), dk_s = dk.transpose(1, 2).contiguous().transpose(1, 2),
             dv_s = dv.transpose(1, 2).contiguous().transpose(1, 2);
  ASSERT_FALSE(dk_s.is_contiguous());
  sa::attend_pair_backward(q, 0, k, v, 0, spec, p.lse, dout, delta, dq, dk, dv);
  sa::attend_pair_backward(q, 0, k, v, 0, spec, p.lse, dout, delta, dq_s, dk_s, dv_s);
  EXPECT_TRUE(ReferenceCheck(0, kTol).same("dq", dq_s, dq).same("dk", dk_s, dk).same("dv", dv_s, dv).verdict());
}

TEST(SoftmaxAttentionLocal, BlasPathMatchesAtenPath) {
  // The CPU float32/float64 pair kernels call BLAS per block (cpu_blas.h); the
  // ATen path is what other devices and bfloat16 run. Both on the same pairs:
  // the diagonal pair, an earlier key chunk with a halo before position 0,
  // a window, documents, GQA (4 query heads over 2), partial blocks, Lq != Lk,
  // and gradients that are strided views, accumulated onto what they held.
  if (!cpu_blas::available()) GTEST_SKIP() << "built without a CBLAS: only the ATen path exists";
  struct Restore {
    ~Restore() {
      cpu_blas::set_enabled(true);
      cpu_blas::set_small_kernels_enabled(true);
    }
  } restore;
  const int64_t lq = 19, lk = 23, d = 8;
  const at::Tensor q = seeded_randn({2, 4, lq, d}, 1), k = seeded_randn({2, 2, lk, d}, 2), v = seeded_randn({2, 2, lk, d}, 3);
  const at::Tensor dout = seeded_randn({2, 4, lq, d}, 4);
  const at::Tensor all_docs = document_starts_from_lengths({{9, 20, 21}, {30, 20}}, 50);
  struct Case {
    const char* name;
    int64_t q_start, k_start, window;
    bool documents;
  };
  const std::vector<Case> cases{{"diagonal", 0, 0, 0, false},
                                {"earlier keys with a halo", 20, -4, 0, false},
                                {"window", 25, 10, 12, false},
                                {"documents", 25, 10, 0, true},
                                {"documents and window", 25, 10, 12, true}};
  for (const Case& c : cases)
    for (at::ScalarType dtype : {at::kDouble, at::kFloat}) {
      const auto t = [&](const at::Tensor& x) { return x.to(dtype); };
      sa::AttentionSpec spec;
      spec.block = 4;
      spec.window = c.window;
      const at::Tensor docs = c.documents ? all_docs.narrow(1, c.q_start, lq).contiguous() : at::Tensor();
      std::vector<at::Tensor> got[3];  // ATen, libxsmm (with CBLAS where it has no kernel), CBLAS alone
      for (const int path : {0, 1, 2}) {
        cpu_blas::set_enabled(path > 0);
        cpu_blas::set_small_kernels_enabled(path == 1);
        const uint64_t calls_before = cpu_blas::small_kernel_calls();
        const sa::Partial p = sa::attend_pair(t(q), c.q_start, t(k), t(v), c.k_start, spec, docs);
        const at::Tensor delta = (t(dout) * p.out).sum(-1);
        at::Tensor dq = t(seeded_randn({2, 4, lq, d}, 5));
        at::Tensor dk = t(seeded_randn({2, 2, lk, d}, 6)).transpose(1, 2).contiguous().transpose(1, 2);
        at::Tensor dv = t(seeded_randn({2, 2, lk, d}, 7)).transpose(1, 2).contiguous().transpose(1, 2);
        sa::attend_pair_backward(t(q), c.q_start, t(k), t(v), c.k_start, spec, p.lse, t(dout), delta, dq, dk, dv, docs);
        got[path] = {p.out, p.lse, dq, dk, dv};
        if (path == 1 && cpu_blas::small_kernels_usable())  // the route really ran
          EXPECT_GT(cpu_blas::small_kernel_calls(), calls_before) << "libxsmm ran no product";
      }
      const double tol = dtype == at::kDouble ? kTol : 1e-5;
      const char* what[] = {"out", "lse", "dq", "dk", "dv"};
      for (const int path : {1, 2})
        for (size_t i = 0; i < 5; ++i) {
          ASSERT_EQ(got[path][i].scalar_type(), dtype);
          // lse is -inf where a row sees nothing: compare where finite, and that it is the same rows.
          const at::Tensor finite = at::isfinite(got[0][i]);
          ASSERT_TRUE(at::equal(finite, at::isfinite(got[path][i]))) << c.name << " " << what[i];
          EXPECT_TRUE(testing::tensors_close(got[path][i].masked_fill(finite.logical_not(), 0).to(at::kDouble),
                                             got[0][i].masked_fill(finite.logical_not(), 0).to(at::kDouble), tol,
                                             what[i]))
              << c.name << ", " << at::toString(dtype) << (path == 1 ? ", libxsmm" : ", CBLAS");
        }
    }
}

TEST(SoftmaxAttentionWindow, LongerThanChunkIsRejected) {
  auto comm = MpiCommunicator::world();
  const SequenceLayout layout(LayoutKind::kZigzag, 4 * comm->size(), comm->size());
  at::Tensor x = at::zeros({1, 1, layout.local_len(), 4}, at::kDouble);
  sa::AttentionSpec spec;
  spec.window = layout.chunk_len() + 2;
  try {
    sa::attention(x, x, x, layout, comm, sa::SoftmaxMethod::kRing, spec);
    FAIL() << "expected an error";
  } catch (const c10::Error& e) {
    EXPECT_NE(std::string(e.what()).find("sliding-window attention: window"), std::string::npos) << e.what();
  }
  EXPECT_THROW(sa::attention(x, x, x, layout, comm, sa::SoftmaxMethod::kOffload, {}), ConfigError);
}

TEST(SoftmaxAttentionRotary, UsesGlobalPositions) {
  // Rotating each rank's shard with its global positions equals sharding the
  // globally rotated tensor.
  auto comm = MpiCommunicator::world();
  const int W = comm->size(), r = comm->rank();
  const int64_t n = 6 * W + 1;
  const SequenceLayout layout(LayoutKind::kZigzag, n, W);
  const at::Tensor X = seeded_randn({1, 2, n, 8}, 9);
  const at::Tensor global = sa::apply_rotary(X, at::arange(n, at::kLong));
  const at::Tensor local = sa::apply_rotary(layout.shard(X, r, 2), layout.global_positions(r));
  EXPECT_TRUE(ReferenceCheck(r, 1e-12).sharded("rotary", local, global, layout, 2).verdict());
  // Relative: q(m) . k(n) depends on m - n only.
  const at::Tensor q = seeded_randn({1, 1, 1, 8}, 1), k = seeded_randn({1, 1, 1, 8}, 2);
  auto dot = [&](int64_t m, int64_t p) {
    return (sa::apply_rotary(q, at::full({1}, m, at::kLong)) * sa::apply_rotary(k, at::full({1}, p, at::kLong)))
        .sum()
        .item<double>();
  };
  EXPECT_NEAR(dot(5, 2), dot(1005, 1002), 1e-9);
}

TEST(ShortConvAcrossRanks, MatchesNaiveConvolution) {
  auto comm = MpiCommunicator::world();
  const int W = comm->size(), r = comm->rank();
  for (auto kind : {LayoutKind::kContiguous, LayoutKind::kZigzag}) {
    for (int64_t n : {int64_t(4 * W + 1), int64_t(6 * W), int64_t(13)}) {
      for (int64_t K : {1, 3}) {
        const SequenceLayout layout(kind, n, W);
        if (K - 1 > layout.chunk_len()) continue;
        const at::Tensor X = seeded_randn({2, n, 5}, 1 + n), Wt = seeded_randn({5, K}, 2), Bs = seeded_randn({5}, 3),
                         G = seeded_randn({2, n, 5}, 4 + n);
        at::Tensor Xr = X.clone().requires_grad_(true), wr = Wt.clone().requires_grad_(true),
                   br = Bs.clone().requires_grad_(true);
        at::Tensor ref = naive_causal_depthwise_conv(Xr, wr, br);
        (ref * G).sum().backward();
        at::Tensor x = layout.shard(X, r, 1).requires_grad_(true);
        at::Tensor w = Wt.clone().requires_grad_(true), b = Bs.clone().requires_grad_(true);
        at::Tensor out = causal_depthwise_conv(x, w, b, layout, comm);
        (out * layout.shard(G, r, 1)).sum().backward();
        // Parameters see every rank's tokens: their gradients sum over ranks.
        at::Tensor dw = w.grad().clone(), db = b.grad().clone();
        comm->all_reduce(dw)->wait();
        comm->all_reduce(db)->wait();
        EXPECT_TRUE(ReferenceCheck(r, kTol)
                        .sharded("out", out, ref, layout, 1)
                        .sharded("dx", x.grad(), Xr.grad(), layout, 1)
                        .same("dweight", dw, wr.grad())
                        .same("dbias", db, br.grad())
                        .verdict())
            << layout.describe() << " K=" << K;
      }
    }
  }
}

}  // namespace
}  // namespace loom
