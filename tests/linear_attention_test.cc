// Linear attention: the chunked kernel, LASP-2, LASP-2 all-scan and LASP-1
// against the naive O(N^2) masked formula in float64, outputs and gradients of
// q, k, v (and of Hedgehog's weights), for both layouts, with and without
// decay and normaliser, every feature map, lengths that do not divide.
#include <gtest/gtest.h>

#include <array>
#include <torch/autograd.h>

#include "distributed_reference.h"
#include "loom/models/feature_maps.h"
#include "loom/parallel/linear_attention/chunked_kernel.h"
#include "loom/parallel/linear_attention/cpu_blas.h"
#include "loom/parallel/linear_attention/decay.h"
#include "loom/parallel/linear_attention/lasp.h"
#include "loom/runtime/comm/differentiable_collectives.h"
#include "loom/runtime/comm/documents.h"
#include "loom/runtime/comm/mpi_communicator.h"

namespace loom {
namespace {

namespace la = linear_attention;
using models::FeatureMap;
using models::FeatureMapKind;
using testing::ReferenceCheck;
using testing::seeded_randn;

constexpr double kTol = 1e-9;
constexpr int64_t kBlock = 8;
constexpr int64_t B = 2, H = 2, D = 4, DV = 3;

la::LinearAttentionOptions options(bool decay, bool normalize) {
  la::LinearAttentionOptions o;
  o.block_size = kBlock;
  if (decay) o.decay = at::tensor({0.9, 0.6}, at::kDouble);
  o.normalize = normalize;
  return o;
}

FeatureMap make_feature_map(FeatureMapKind kind) {
  FeatureMap fm(kind, H, D);
  if (kind == FeatureMapKind::kHedgehog) {
    // Identical on every rank, in float64.
    torch::NoGradGuard no_grad;
    fm->to(at::kDouble);
    const_cast<at::Tensor&>(fm->hedgehog_weight()).copy_(seeded_randn({H, D, D}, 5));
  } else {
    fm->to(at::kDouble);
  }
  return fm;
}

TEST(LinearAttentionKernel, ChunkedMatchesNaiveOnOneRank) {
  for (int64_t n : {1, 7, 8, 9, 29, 64}) {
    for (bool decay : {false, true}) {
      for (int64_t block : {1, 3, 8, 100}) {
        const at::Tensor q0 = seeded_randn({B, H, n, D}, 1), k0 = seeded_randn({B, H, n, D}, 2),
                         v0 = seeded_randn({B, H, n, DV}, 3), g = seeded_randn({B, H, n, DV}, 4);
        auto o = options(decay, false);
        o.block_size = block;
        at::Tensor q = q0.clone().requires_grad_(true), k = k0.clone().requires_grad_(true),
                   v = v0.clone().requires_grad_(true);
        at::Tensor out = la::linear_attention(q, k, v, o);
        (out * g).sum().backward();
        at::Tensor qr = q0.clone().requires_grad_(true), kr = k0.clone().requires_grad_(true),
                   vr = v0.clone().requires_grad_(true);
        at::Tensor ref = la::naive_linear_attention(qr, kr, vr, o);
        (ref * g).sum().backward();
        EXPECT_TRUE(ReferenceCheck(0, kTol)
                        .same("out", out, ref)
                        .same("dq", q.grad(), qr.grad())
                        .same("dk", k.grad(), kr.grad())
                        .same("dv", v.grad(), vr.grad())
                        .verdict())
            << "n=" << n << " decay=" << decay << " block=" << block;
      }
    }
  }
}

TEST(LinearAttentionKernel, SegmentsOfBlocksMatchNaive) {
  // Blocks processed a few at a time, with the state and its gradient carried
  // across segments, must give the same result as one segment.
  const int64_t n = 45;
  const at::Tensor q = seeded_randn({B, H, n, D}, 1), k = seeded_randn({B, H, n, D}, 2),
                   v = seeded_randn({B, H, n, DV}, 3), g = seeded_randn({B, H, n, DV}, 4);
  at::Tensor qr = q.clone().requires_grad_(true), kr = k.clone().requires_grad_(true), vr = v.clone().requires_grad_(true);
  auto o = options(true, false);
  const at::Tensor decay = o.decay;
  at::Tensor ref = la::naive_linear_attention(qr, kr, vr, o);
  (ref * g).sum().backward();
  for (int64_t segment : {1, 2, 3, 100}) {
    auto fwd = la::chunk_forward(q, k, v, decay, 4, segment);
    auto [dq, dk, dv] = la::chunk_backward(q, k, v, decay, 4, fwd.block_states, g, segment);
    EXPECT_TRUE(ReferenceCheck(0, kTol)
                    .same("out", fwd.out, ref)
                    .same("dq", dq, qr.grad())
                    .same("dk", dk, kr.grad())
                    .same("dv", dv, vr.grad())
                    .verdict())
        << "segment " << segment;
  }
}

TEST(LinearAttentionKernel, NoDecayStridedInputsAndTheOpByOpScanMatchNaive) {
  // Without decay the kernel applies no factor at all; inputs that are views
  // of a [B, n, H, d] buffer go through the contiguous block slabs; segments
  // carry the state across. Then the same in bfloat16, whose state recurrence
  // takes the op-by-op path (the fused scan is for float32/float64 on the CPU).
  const int64_t n = 45;
  const at::Tensor q = seeded_randn({B, n, H, D}, 1).transpose(1, 2), k = seeded_randn({B, n, H, D}, 2).transpose(1, 2),
                   v = seeded_randn({B, n, H, DV}, 3).transpose(1, 2), g = seeded_randn({B, H, n, DV}, 4);
  ASSERT_FALSE(q.is_contiguous());
  at::Tensor qr = q.clone().requires_grad_(true), kr = k.clone().requires_grad_(true), vr = v.clone().requires_grad_(true);
  at::Tensor ref = la::naive_linear_attention(qr, kr, vr, options(false, false));
  (ref * g).sum().backward();
  for (int64_t segment : {1, 3, 100}) {
    auto fwd = la::chunk_forward(q, k, v, at::Tensor(), 4, segment);
    auto [dq, dk, dv] = la::chunk_backward(q, k, v, at::Tensor(), 4, fwd.block_states, g, segment);
    EXPECT_TRUE(ReferenceCheck(0, kTol)
                    .same("out", fwd.out, ref)
                    .same("dq", dq, qr.grad())
                    .same("dk", dk, kr.grad())
                    .same("dv", dv, vr.grad())
                    .verdict())
        << "segment " << segment;
  }
  const at::Tensor decay = options(true, false).decay;
  auto exact = la::chunk_forward(q, k, v, decay, 4, 3);
  auto [dq, dk, dv] = la::chunk_backward(q, k, v, decay, 4, exact.block_states, g, 3);
  const auto bf = [](const at::Tensor& x) { return x.to(at::kBFloat16); };
  auto low = la::chunk_forward(bf(q), bf(k), bf(v), decay, 4, 3);
  auto [dq16, dk16, dv16] = la::chunk_backward(bf(q), bf(k), bf(v), decay, 4, low.block_states, bf(g), 3);
  const auto close = [](const at::Tensor& got, const at::Tensor& want) {
    return (got.to(at::kDouble) - want).abs().max().item<double>() <= 0.05 * want.abs().max().item<double>();
  };
  EXPECT_TRUE(close(low.out, exact.out));
  EXPECT_TRUE(close(low.block_states, exact.block_states));
  EXPECT_TRUE(close(dq16, dq));
  EXPECT_TRUE(close(dk16, dk));
  EXPECT_TRUE(close(dv16, dv));
}

TEST(LinearAttentionKernel, BlasPathMatchesAtenPath) {
  // The CPU float32/float64 kernel calls BLAS per block (cpu_blas.h: libxsmm's
  // kernels, or CBLAS alone); the ATen path (bmm per segment) is what every
  // other device and dtype runs. All three on
  // the same inputs: decay on and off, gates (with and without decay),
  // documents (with a first position past 0, as a LASP rank has), a length
  // that needs padding, B = 2, H = 3, dk != dv, two segment sizes.
  if (!cpu_blas::available()) GTEST_SKIP() << "built without a CBLAS: only the ATen path exists";
  struct Restore {
    ~Restore() {
      cpu_blas::set_enabled(true);
      cpu_blas::set_small_kernels_enabled(true);
    }
  } restore;
  const int64_t b = 2, h = 3, n = 45, dk = 5, dv = 3, block = 8;
  const at::Tensor q = seeded_randn({b, h, n, dk}, 11), k = seeded_randn({b, h, n, dk}, 12),
                   v = seeded_randn({b, h, n, dv}, 13), g = seeded_randn({b, h, n, dv}, 14);
  const at::Tensor decay = at::tensor({0.9, 0.7, 0.5}, at::kDouble);
  const at::Tensor log_gate = -at::softplus(seeded_randn({b, h, n}, 15));
  const at::Tensor docs = document_starts_from_lengths({{10, 20, 15}, {3, 42}}, n);
  struct Case {
    const char* name;
    at::Tensor decay, docs, gates;
    int64_t first_position;
  };
  const std::vector<Case> cases{{"no decay", {}, {}, {}, 0},
                                {"decay", decay, {}, {}, 0},
                                {"gates", {}, {}, log_gate, 0},
                                {"gates and decay", decay, {}, log_gate, 0},
                                {"documents", {}, docs, {}, 0},
                                {"documents, decay, first position 5", decay, docs + 5, {}, 5},
                                {"documents and gates", {}, docs, log_gate, 0}};
  for (const Case& c : cases)
    for (int64_t segment : {1, 3}) {
      for (at::ScalarType dtype : {at::kDouble, at::kFloat}) {
        const auto t = [&](const at::Tensor& x) { return x.to(dtype); };
        std::vector<at::Tensor> got[3];  // ATen, libxsmm (with CBLAS where it has no kernel), CBLAS alone
        for (const int path : {0, 1, 2}) {
          cpu_blas::set_enabled(path > 0);
          cpu_blas::set_small_kernels_enabled(path == 1);
          const uint64_t calls_before = cpu_blas::small_kernel_calls();
          auto fwd = la::chunk_forward(t(q), t(k), t(v), c.decay, block, segment, c.docs, c.first_position, c.gates);
          auto [dq, dk_, dv_] = la::chunk_backward(t(q), t(k), t(v), c.decay, block, fwd.block_states, t(g), segment,
                                                  c.docs, c.first_position, c.gates);
          got[path] = {fwd.out, fwd.block_states, dq, dk_, dv_};
          if (path == 1 && cpu_blas::small_kernels_usable())  // the route really ran
            EXPECT_GT(cpu_blas::small_kernel_calls(), calls_before) << "libxsmm ran no product";
        }
        const double tol = dtype == at::kDouble ? kTol : 1e-5;
        const char* what[] = {"out", "block_states", "dq", "dk", "dv"};
        for (const int path : {1, 2})
          for (size_t i = 0; i < 5; ++i) {
            ASSERT_EQ(got[path][i].scalar_type(), dtype);
            EXPECT_TRUE(testing::tensors_close(got[path][i].to(at::kDouble), got[0][i].to(at::kDouble), tol, what[i]))
                << c.name << ", segment " << segment << ", " << at::toString(dtype)
                << (path == 1 ? ", libxsmm" : ", CBLAS");
          }
      }
    }
}

TEST(LinearAttentionKernel, CpuGemmMatchesTheProductOnBothRoutes) {
  // cpu_blas::gemm itself, against a float64 ATen product: both transposes,
  // beta 0 and 1, leading dimensions wider than the matrices (the padding
  // columns untouched), float and double, shapes from 1 x 1 x 1 through the
  // kernels' (64, Taylor's 273) to past libxsmm's side cap (1025: CBLAS).
  // The libxsmm route must really run where libxsmm can generate code.
  if (!cpu_blas::available()) GTEST_SKIP() << "built without a CBLAS";
  struct Restore {
    ~Restore() { cpu_blas::set_small_kernels_enabled(true); }
  } restore;
  const std::vector<std::array<int64_t, 3>> shapes{{1, 1, 1},   {63, 64, 5},  {64, 64, 64}, {273, 16, 64},
                                                   {64, 64, 273}, {1025, 3, 2}, {8, 1025, 4}};
  for (const bool small : {true, false}) {
    cpu_blas::set_small_kernels_enabled(small);
    const uint64_t calls_before = cpu_blas::small_kernel_calls();
    for (const at::ScalarType dtype : {at::kDouble, at::kFloat})
      for (const auto& [m, n, k] : shapes)
        for (const bool ta : {false, true})
          for (const bool tb : {false, true})
            for (const double beta : {0.0, 1.0}) {
              const int64_t lda = (ta ? m : k) + 3, ldb = (tb ? k : n) + 2, ldc = n + 1;
              const at::Tensor a = seeded_randn({ta ? k : m, lda}, 21).to(dtype);
              const at::Tensor b = seeded_randn({tb ? n : k, ldb}, 22).to(dtype);
              const at::Tensor c0 = seeded_randn({m, ldc}, 23).to(dtype);
              at::Tensor c = c0.clone();
              const at::Tensor av = a.narrow(1, 0, ta ? m : k), bv = b.narrow(1, 0, tb ? k : n);
              const at::Tensor want = at::matmul((ta ? av.t() : av).to(at::kDouble), (tb ? bv.t() : bv).to(at::kDouble)) +
                                      beta * c0.narrow(1, 0, n).to(at::kDouble);
              if (dtype == at::kDouble)
                cpu_blas::gemm(ta, tb, m, n, k, 1.0, a.data_ptr<double>(), lda, b.data_ptr<double>(), ldb, beta,
                               c.data_ptr<double>(), ldc);
              else
                cpu_blas::gemm(ta, tb, m, n, k, 1.0f, a.data_ptr<float>(), lda, b.data_ptr<float>(), ldb,
                               static_cast<float>(beta), c.data_ptr<float>(), ldc);
              const double tol = dtype == at::kDouble ? 1e-12 * k : 1e-5 * k;
              const std::string what = std::string(small ? "libxsmm route" : "CBLAS") + " " + at::toString(dtype) +
                                       " m " + std::to_string(m) + " n " + std::to_string(n) + " k " +
                                       std::to_string(k) + (ta ? " A^T" : "") + (tb ? " B^T" : "") + " beta " +
                                       std::to_string(beta);
              EXPECT_LE((c.narrow(1, 0, n).to(at::kDouble) - want).abs().max().item<double>(), tol) << what;
              EXPECT_TRUE(at::equal(c.narrow(1, n, 1), c0.narrow(1, n, 1))) << what << ": padding written";
            }
    const uint64_t calls = cpu_blas::small_kernel_calls() - calls_before;
    if (!small || !cpu_blas::small_kernels_usable())
      EXPECT_EQ(calls, 0u) << "libxsmm ran with its route switched off or unusable";
    else
      EXPECT_GT(calls, 0u) << "libxsmm is usable here but ran no product";
  }
}

TEST(LinearAttentionKernel, SavedMemoryIsLinear) {
  // What backward keeps: q, k, v and N/C block states, nothing N x N.
  const int64_t n = 512;
  at::Tensor q = at::randn({1, 1, n, 16}, at::kDouble).requires_grad_(true);
  auto r = la::chunk_forward(q, q, q, at::Tensor(), 64);
  EXPECT_EQ(r.block_states.sizes(), (std::vector<int64_t>{1, 1, n / 64, 16, 16}));
}

struct Case {
  LayoutKind kind;
  la::LinearAttentionMethod method;
};

class LinearAttentionSequenceParallel : public ::testing::TestWithParam<Case> {};

TEST_P(LinearAttentionSequenceParallel, MatchesNaiveReference) {
  const auto [kind, method] = GetParam();
  auto comm = MpiCommunicator::world();
  const int W = comm->size(), r = comm->rank();
  const std::vector<int64_t> lengths{kBlock - 1, kBlock, 3 * kBlock + 5, 2 * kBlock * W + 1};
  int cases = 0;
  for (auto fmk : {FeatureMapKind::kIdentity, FeatureMapKind::kElu, FeatureMapKind::kRelu, FeatureMapKind::kTaylor,
                   FeatureMapKind::kHedgehog}) {
    for (bool decay : {false, true}) {
      for (bool normalize : {false, true}) {
        // The normaliser needs non-negative feature products.
        if (normalize && fmk == FeatureMapKind::kIdentity) continue;
        for (int64_t n : lengths) {
          const SequenceLayout layout(kind, n, W);
          const auto opt = options(decay, normalize);
          const at::Tensor Q = seeded_randn({B, H, n, D}, 10 + n), K = seeded_randn({B, H, n, D}, 20 + n),
                           V = seeded_randn({B, H, n, DV}, 30 + n), G = seeded_randn({B, H, n, DV}, 40 + n);

          // Reference: the whole sequence on this rank, naive.
          FeatureMap fm_ref = make_feature_map(fmk);
          at::Tensor Qr = Q.clone().requires_grad_(true), Kr = K.clone().requires_grad_(true),
                     Vr = V.clone().requires_grad_(true);
          at::Tensor ref = la::naive_linear_attention(fm_ref(Qr), fm_ref(Kr), Vr, opt);
          (ref * G).sum().backward();

          // Distributed: this rank's shard only.
          FeatureMap fm = make_feature_map(fmk);
          at::Tensor q = layout.shard(Q, r, 2).requires_grad_(true), k = layout.shard(K, r, 2).requires_grad_(true),
                     v = layout.shard(V, r, 2).requires_grad_(true);
          at::Tensor out = la::sequence_parallel_linear_attention(fm(q), fm(k), v, layout, comm, method, opt);
          (out * layout.shard(G, r, 2)).sum().backward();

          ReferenceCheck check(r, kTol);
          check.sharded("out", out, ref, layout, 2)
              .sharded("dq", q.grad(), Qr.grad(), layout, 2)
              .sharded("dk", k.grad(), Kr.grad(), layout, 2)
              .sharded("dv", v.grad(), Vr.grad(), layout, 2);
          if (fmk == FeatureMapKind::kHedgehog) {
            at::Tensor w_grad = fm->hedgehog_weight().grad().clone();
            comm->all_reduce(w_grad)->wait();  // each rank saw its own tokens
            check.same("d hedgehog_weight", w_grad, fm_ref->hedgehog_weight().grad());
          }
          EXPECT_TRUE(check.verdict()) << models::feature_map_name(fmk) << " decay=" << decay
                                       << " normalize=" << normalize << " " << layout.describe();
          ++cases;
        }
      }
    }
  }
  EXPECT_EQ(cases, 4 * 4 * 4 + 2 * 4);
}

TEST_P(LinearAttentionSequenceParallel, IsCausal) {
  const auto [kind, method] = GetParam();
  auto comm = MpiCommunicator::world();
  const int W = comm->size(), r = comm->rank();
  const int64_t n = 4 * W + 3;
  const SequenceLayout layout(kind, n, W);
  const auto opt = options(true, true);
  const at::Tensor Q = seeded_randn({1, H, n, D}, 1).exp(), K = seeded_randn({1, H, n, D}, 2).exp(),
                   V = seeded_randn({1, H, n, DV}, 3);
  auto run = [&](const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
    at::Tensor out = la::sequence_parallel_linear_attention(layout.shard(q, r, 2), layout.shard(k, r, 2),
                                                            layout.shard(v, r, 2), layout, comm, method, opt);
    return layout.gather(out, *comm, 2);
  };
  const at::Tensor base = run(Q, K, V);
  for (int64_t j : {int64_t(0), n / 2, n - 1}) {
    at::Tensor Q2 = Q.clone(), K2 = K.clone(), V2 = V.clone();
    Q2.narrow(2, j, 1).mul_(3);
    K2.narrow(2, j, 1).mul_(3);
    V2.narrow(2, j, 1).add_(1);
    const at::Tensor changed = run(Q2, K2, V2);
    EXPECT_TRUE(at::equal(changed.narrow(2, 0, j), base.narrow(2, 0, j))) << "token " << j << " leaked backwards";
    EXPECT_FALSE(at::equal(changed.narrow(2, j, 1), base.narrow(2, j, 1))) << "token " << j << " had no effect";
  }
}

INSTANTIATE_TEST_SUITE_P(
    Methods, LinearAttentionSequenceParallel,
    ::testing::Values(Case{LayoutKind::kContiguous, la::LinearAttentionMethod::kLasp2},
                      Case{LayoutKind::kZigzag, la::LinearAttentionMethod::kLasp2},
                      Case{LayoutKind::kContiguous, la::LinearAttentionMethod::kLasp2AllScan},
                      Case{LayoutKind::kZigzag, la::LinearAttentionMethod::kLasp2AllScan},
                      Case{LayoutKind::kContiguous, la::LinearAttentionMethod::kLasp1},
                      Case{LayoutKind::kZigzag, la::LinearAttentionMethod::kLasp1}),
    [](const ::testing::TestParamInfo<Case>& info) {
      return std::string(layout_kind_name(info.param.kind)) + "_" + la::method_name(info.param.method);
    });

// LASP-2's communication claims, counted by the communicator.
TEST(LinearAttentionCommunication, Lasp2OneCollectiveEachWayBytesIndependentOfN) {
  auto comm = MpiCommunicator::world();
  const int W = comm->size(), r = comm->rank();
  for (auto kind : {LayoutKind::kContiguous, LayoutKind::kZigzag}) {
    std::vector<CommStats> forward, backward;
    for (int64_t n : {int64_t(64 * W), int64_t(256 * W)}) {
      const SequenceLayout layout(kind, n, W);
      at::Tensor q = layout.shard(seeded_randn({1, H, n, D}, 1), r, 2).requires_grad_(true);
      at::Tensor v = layout.shard(seeded_randn({1, H, n, DV}, 2), r, 2).requires_grad_(true);
      const CommStats s0 = comm->stats();
      at::Tensor out = la::sequence_parallel_linear_attention(q, q, v, layout, comm,
                                                              la::LinearAttentionMethod::kLasp2, options(true, false));
      const CommStats s1 = comm->stats();
      out.sum().backward();
      const CommStats s2 = comm->stats();
      forward.push_back(s1 - s0);
      backward.push_back(s2 - s1);
    }
    const int64_t cpr = kind == LayoutKind::kZigzag ? 2 : 1;
    const int64_t expected_bytes = (W - 1) * cpr * 1 * H * D * DV * sizeof(double);
    for (size_t i = 0; i < forward.size(); ++i) {
      EXPECT_EQ(forward[i].total_calls(), 1);
      EXPECT_EQ(forward[i][OpType::kAllGather].calls, 1);
      EXPECT_EQ(backward[i].total_calls(), 1);
      EXPECT_EQ(backward[i][OpType::kAllGather].calls, 1);
      EXPECT_EQ(forward[i].total_bytes_received(), expected_bytes);
      EXPECT_EQ(backward[i].total_bytes_received(), expected_bytes);
    }
  }
}

// GQA: k and v with fewer heads than q (each serving a group of query heads)
// equal the reference on repeated k, v, outputs and gradients; the decay case
// takes the repeat-first path, the others exchange states per key/value head.
TEST_P(LinearAttentionSequenceParallel, GroupedKeyValueHeadsMatchRepeatedReference) {
  const auto [kind, method] = GetParam();
  auto comm = MpiCommunicator::world();
  const int W = comm->size(), r = comm->rank();
  constexpr int64_t kQueryHeads = 4;
  int cases = 0;
  for (int64_t kv_heads : {int64_t(1), int64_t(2)}) {
    for (bool decay : {false, true}) {
      for (bool normalize : {false, true}) {
        for (int64_t n : {int64_t(kBlock - 1), int64_t(2 * kBlock * W + 3)}) {
          const SequenceLayout layout(kind, n, W);
          la::LinearAttentionOptions opt;
          opt.block_size = kBlock;
          opt.normalize = normalize;
          if (decay) opt.decay = at::tensor({0.9, 0.6, 0.8, 0.7}, at::kDouble);
          // exp keeps feature products positive for the normaliser.
          const at::Tensor Q = seeded_randn({B, kQueryHeads, n, D}, 50 + n).exp(),
                           K = seeded_randn({B, kv_heads, n, D}, 60 + n).exp(),
                           V = seeded_randn({B, kv_heads, n, DV}, 70 + n),
                           G = seeded_randn({B, kQueryHeads, n, DV}, 80 + n);
          at::Tensor Qr = Q.clone().requires_grad_(true), Kr = K.clone().requires_grad_(true),
                     Vr = V.clone().requires_grad_(true);
          const int64_t group = kQueryHeads / kv_heads;
          const at::Tensor ref = la::naive_linear_attention(Qr, Kr.repeat_interleave(group, 1),
                                                            Vr.repeat_interleave(group, 1), opt);
          (ref * G).sum().backward();

          at::Tensor q = layout.shard(Q, r, 2).requires_grad_(true), k = layout.shard(K, r, 2).requires_grad_(true),
                     v = layout.shard(V, r, 2).requires_grad_(true);
          const at::Tensor out = la::sequence_parallel_linear_attention(q, k, v, layout, comm, method, opt);
          (out * layout.shard(G, r, 2)).sum().backward();
          ReferenceCheck check(r, kTol);
          check.sharded("out", out, ref, layout, 2)
              .sharded("dq", q.grad(), Qr.grad(), layout, 2)
              .sharded("dk", k.grad(), Kr.grad(), layout, 2)
              .sharded("dv", v.grad(), Vr.grad(), layout, 2);
          EXPECT_TRUE(check.verdict()) << kv_heads << " kv heads, decay=" << decay << " normalize=" << normalize
                                       << " " << layout.describe();
          ++cases;
        }
      }
    }
  }
  EXPECT_EQ(cases, 16);
}

// With grouped key/value heads LASP-2 exchanges states per key/value head:
// the bytes are those of Hkv heads, forward and backward.
TEST(LinearAttentionCommunication, Lasp2GroupedHeadsExchangeKeyValueHeadStates) {
  auto comm = MpiCommunicator::world();
  const int W = comm->size(), r = comm->rank();
  constexpr int64_t kQueryHeads = 4, kKvHeads = 1;
  for (auto kind : {LayoutKind::kContiguous, LayoutKind::kZigzag}) {
    const int64_t n = 64 * W;
    const SequenceLayout layout(kind, n, W);
    at::Tensor q = layout.shard(seeded_randn({1, kQueryHeads, n, D}, 1), r, 2).requires_grad_(true);
    at::Tensor k = layout.shard(seeded_randn({1, kKvHeads, n, D}, 2), r, 2).requires_grad_(true);
    at::Tensor v = layout.shard(seeded_randn({1, kKvHeads, n, DV}, 3), r, 2).requires_grad_(true);
    const CommStats s0 = comm->stats();
    at::Tensor out = la::sequence_parallel_linear_attention(q, k, v, layout, comm, la::LinearAttentionMethod::kLasp2,
                                                            options(false, false));
    const CommStats s1 = comm->stats();
    out.sum().backward();
    const CommStats forward = s1 - s0, backward = comm->stats() - s1;
    const int64_t cpr = kind == LayoutKind::kZigzag ? 2 : 1;
    const int64_t expected_bytes = (W - 1) * cpr * kKvHeads * D * DV * int64_t(sizeof(double));
    EXPECT_EQ(forward.total_calls(), 1);
    EXPECT_EQ(backward.total_calls(), 1);
    EXPECT_EQ(forward.total_bytes_received(), expected_bytes) << layout.describe();
    EXPECT_EQ(backward.total_bytes_received(), expected_bytes) << layout.describe();
  }
}

TEST(LinearAttentionCommunication, AllScanVolumeIndependentOfWorldSize) {
  auto comm = MpiCommunicator::world();
  const int W = comm->size(), r = comm->rank();
  const int64_t n = 16 * W;
  const SequenceLayout layout(LayoutKind::kContiguous, n, W);
  at::Tensor q = layout.shard(seeded_randn({1, H, n, D}, 1), r, 2);
  const CommStats s0 = comm->stats();
  la::sequence_parallel_linear_attention(q, q, q, layout, comm, la::LinearAttentionMethod::kLasp2AllScan,
                                         options(true, false));
  const CommStats d = comm->stats() - s0;
  EXPECT_EQ(d.total_calls(), 1);
  EXPECT_EQ(d[OpType::kExscan].calls, 1);
  // One element (decays + state) at most, whatever W is.
  EXPECT_LE(d.total_bytes_received(), (H + H * D * D) * int64_t(sizeof(double)));
}

}  // namespace
}  // namespace loom
