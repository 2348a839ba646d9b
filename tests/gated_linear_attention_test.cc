// Gated linear attention (data-dependent log gates per token and head):
//   S_t = g_t S_(t-1) + k_t v_t^T,  o_t = q_t^T S_t,  g_t = exp(log_gate_t)
// The chunked kernel, the naive matrix form and LASP-2 / all-scan / LASP-1
// against a token-by-token recurrence written here (autograd through the
// loop gives the reference gradients), in float64: out, dq, dk, dv and
// d(log_gate), both layouts, lengths that do not divide the block or the
// layout, gates near 0 (log g = -30), near 1 (log g = -1e-6) and mixed, with
// and without packed documents. Also LASP-2's one collective each way with
// bytes flat in N; the K mixer across ranks (with documents: each document as
// if alone) and its incremental decoding against the full forward.
#include <gtest/gtest.h>
#include <torch/autograd.h>

#include "distributed_reference.h"
#include "loom/models/hybrid_lm.h"
#include "loom/models/mixers.h"
#include "loom/parallel/linear_attention/chunked_kernel.h"
#include "loom/parallel/linear_attention/decay.h"
#include "loom/parallel/linear_attention/lasp.h"
#include "loom/runtime/comm/documents.h"
#include "loom/runtime/comm/mpi_communicator.h"

namespace loom {
namespace {

namespace la = linear_attention;
using testing::ReferenceCheck;
using testing::seeded_randn;

constexpr double kTol = 1e-9;
constexpr int64_t kBlock = 4;
constexpr int64_t B = 2, H = 2, D = 3, DV = 2;

// Gate regimes of the tests.
enum class Gates { kRandom, kNearZero, kNearOne, kMixed };
const char* gates_name(Gates g) {
  switch (g) {
    case Gates::kRandom: return "random";
    case Gates::kNearZero: return "near0";
    case Gates::kNearOne: return "near1";
    case Gates::kMixed: return "mixed";
  }
  return "?";
}
constexpr Gates kAllGates[] = {Gates::kRandom, Gates::kNearZero, Gates::kNearOne, Gates::kMixed};

// log_gate [b, H, n] <= 0, identical on every rank.
at::Tensor make_log_gate(int64_t b, int64_t n, Gates kind, uint64_t seed) {
  const at::Tensor x = seeded_randn({b, H, n}, seed);
  switch (kind) {
    case Gates::kRandom: return -at::softplus(x);  // g in (0, 1), mostly 0.2 .. 0.8
    case Gates::kNearZero: return at::full({b, H, n}, -30.0, at::kDouble);
    case Gates::kNearOne: return at::full({b, H, n}, -1e-6, at::kDouble);
    case Gates::kMixed: {  // each token at random: near 0, near 1, or in between
      const at::Tensor u = seeded_randn({b, H, n}, seed + 1);
      return at::where(u.gt(0.6), at::full_like(x, -30.0), at::where(u.lt(-0.6), at::full_like(x, -1e-6), -at::softplus(x)));
    }
  }
  return {};
}

// The definition, one token at a time (independent of the chunked and matrix
// forms): the state is multiplied by the gate, or reset at a document start
// (doc_start[t] == t), then the token's k v^T is added; the output reads it.
// With `normalize`, o_t = q_t^T S_t / (q_t^T z_t + eps), z the gated sum of k.
at::Tensor recurrence(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& log_gate,
                      const at::Tensor& doc_start, bool normalize, double eps = 1e-6) {
  const int64_t b = q.size(0), n = q.size(2);
  at::Tensor S = at::zeros({b, H, q.size(3), v.size(3)}, q.options());
  at::Tensor z = at::zeros({b, H, q.size(3)}, q.options());
  std::vector<at::Tensor> outs;
  for (int64_t t = 0; t < n; ++t) {
    at::Tensor g = log_gate.select(2, t).exp();  // [b, H]
    if (doc_start.defined()) g = g * doc_start.select(1, t).ne(t).to(g.options()).unsqueeze(1);
    const at::Tensor kt = k.select(2, t), vt = v.select(2, t), qt = q.select(2, t);
    S = S * g.unsqueeze(-1).unsqueeze(-1) + kt.unsqueeze(-1) * vt.unsqueeze(-2);
    z = z * g.unsqueeze(-1) + kt;
    at::Tensor o = at::matmul(qt.unsqueeze(-2), S).squeeze(-2);  // [b, H, dv]
    if (normalize) o = o / ((qt * z).sum(-1, /*keepdim=*/true) + eps);
    outs.push_back(o);
  }
  return at::stack(outs, 2);
}

struct Grads {
  at::Tensor out, dq, dk, dv, dgate;
};

// out and the gradients of sum(out * G) for any operator f(q, k, v, log_gate).
template <typename F>
Grads run(F f, const at::Tensor& Q, const at::Tensor& K, const at::Tensor& V, const at::Tensor& LG, const at::Tensor& G) {
  at::Tensor q = Q.clone().requires_grad_(true), k = K.clone().requires_grad_(true), v = V.clone().requires_grad_(true),
             lg = LG.clone().requires_grad_(true);
  at::Tensor out = f(q, k, v, lg);
  (out * G).sum().backward();
  return {out.detach(), q.grad(), k.grad(), v.grad(), lg.grad()};
}

::testing::AssertionResult same_grads(const Grads& got, const Grads& ref, int rank = 0) {
  return ReferenceCheck(rank, kTol)
      .same("out", got.out, ref.out)
      .same("dq", got.dq, ref.dq)
      .same("dk", got.dk, ref.dk)
      .same("dv", got.dv, ref.dv)
      .same("dlog_gate", got.dgate, ref.dgate)
      .verdict();
}

la::LinearAttentionOptions options(int64_t block, const at::Tensor& log_gate, const at::Tensor& doc_start,
                                   bool normalize = false) {
  la::LinearAttentionOptions o;
  o.block_size = block;
  o.log_gate = log_gate;
  o.doc_start = doc_start;
  o.normalize = normalize;
  return o;
}

// Two rows of documents over n tokens (or none).
at::Tensor documents(int64_t n, int64_t chunk, int pattern) {
  return document_starts_from_lengths(
      {testing::document_lengths(n, chunk, pattern), testing::document_lengths(n, chunk, (pattern + 2) % 5)}, n);
}

TEST(GatedLinearAttentionKernel, ChunkedAndNaiveMatchTheRecurrence) {
  int cases = 0;
  for (int64_t n : {1, 7, 8, 9, 29}) {
    for (Gates gates : kAllGates) {
      for (bool docs : {false, true}) {
        const uint64_t seed = 1000 * n + 10 * static_cast<int>(gates);
        const at::Tensor Q = seeded_randn({B, H, n, D}, seed + 1), K = seeded_randn({B, H, n, D}, seed + 2),
                         V = seeded_randn({B, H, n, DV}, seed + 3), G = seeded_randn({B, H, n, DV}, seed + 4);
        const at::Tensor LG = make_log_gate(B, n, gates, seed + 5);
        const at::Tensor doc_start = docs ? documents(n, 3, 4) : at::Tensor();
        const Grads ref = run([&](auto& q, auto& k, auto& v, auto& lg) { return recurrence(q, k, v, lg, doc_start, false); },
                              Q, K, V, LG, G);
        const Grads naive = run(
            [&](auto& q, auto& k, auto& v, auto& lg) {
              return la::naive_linear_attention(q, k, v, options(kBlock, lg, doc_start));
            },
            Q, K, V, LG, G);
        EXPECT_TRUE(same_grads(naive, ref)) << "naive n=" << n << " gates=" << gates_name(gates) << " docs=" << docs;
        for (int64_t block : {1, 3, 8, 100}) {
          const Grads got = run(
              [&](auto& q, auto& k, auto& v, auto& lg) {
                return la::linear_attention(q, k, v, options(block, lg, doc_start));
              },
              Q, K, V, LG, G);
          EXPECT_TRUE(same_grads(got, ref))
              << "chunked n=" << n << " block=" << block << " gates=" << gates_name(gates) << " docs=" << docs;
          ++cases;
        }
      }
    }
  }
  EXPECT_EQ(cases, 5 * 4 * 2 * 4);
}

TEST(GatedLinearAttentionKernel, GatesWithDecayAndNormaliser) {
  // A per-head decay with gates multiplies them; the normaliser is the same
  // machinery with a column of ones (positive features keep it away from 0).
  const int64_t n = 13;
  const at::Tensor Q = seeded_randn({B, H, n, D}, 1).exp(), K = seeded_randn({B, H, n, D}, 2).exp(),
                   V = seeded_randn({B, H, n, DV}, 3), G = seeded_randn({B, H, n, DV}, 4);
  const at::Tensor LG = make_log_gate(B, n, Gates::kRandom, 5);
  const at::Tensor decay = at::tensor({0.9, 0.6}, at::kDouble);
  const Grads ref = run(
      [&](auto& q, auto& k, auto& v, auto& lg) {
        return recurrence(q, k, v, lg + decay.log().view({1, H, 1}), at::Tensor(), true);
      },
      Q, K, V, LG, G);
  const Grads got = run(
      [&](auto& q, auto& k, auto& v, auto& lg) {
        auto o = options(kBlock, lg, at::Tensor(), true);
        o.decay = decay;
        return la::linear_attention(q, k, v, o);
      },
      Q, K, V, LG, G);
  EXPECT_TRUE(same_grads(got, ref));
}

TEST(GatedLinearAttentionKernel, SegmentsOfBlocksAndTheGateIdentity) {
  // The raw kernel with the state (and its gradient) carried across segments
  // of blocks; d(log_gate) from dq, dk by log_gate_grad.
  const int64_t n = 45;
  const at::Tensor Q = seeded_randn({B, H, n, D}, 1), K = seeded_randn({B, H, n, D}, 2),
                   V = seeded_randn({B, H, n, DV}, 3), G = seeded_randn({B, H, n, DV}, 4);
  const at::Tensor LG = make_log_gate(B, n, Gates::kMixed, 5);
  const Grads ref = run([&](auto& q, auto& k, auto& v, auto& lg) { return recurrence(q, k, v, lg, {}, false); }, Q, K,
                        V, LG, G);
  for (int64_t segment : {1, 2, 3, 100}) {
    auto fwd = la::chunk_forward(Q, K, V, at::Tensor(), 4, segment, {}, 0, LG);
    auto [dq, dk, dv] = la::chunk_backward(Q, K, V, at::Tensor(), 4, fwd.block_states, G, segment, {}, 0, LG);
    EXPECT_TRUE(same_grads({fwd.out, dq, dk, dv, la::log_gate_grad(Q, dq, K, dk)}, ref)) << "segment " << segment;
  }
}

TEST(GatedLinearAttentionKernel, LongBlocksWithGatesNearZeroStayFinite) {
  // 256-token blocks at log g = -30: the cumulative log reaches -7680, whose
  // exp (and exp of its negative) is far outside float64; only differences
  // <= 0 are exponentiated, so nothing overflows.
  const int64_t n = 300;
  const at::Tensor Q = seeded_randn({1, H, n, D}, 1), K = seeded_randn({1, H, n, D}, 2),
                   V = seeded_randn({1, H, n, DV}, 3), G = seeded_randn({1, H, n, DV}, 4);
  at::Tensor LG = at::full({1, H, n}, -30.0, at::kDouble);
  LG.narrow(2, 100, 50).fill_(-1e-6);  // a stretch of remembering in between
  const Grads ref = run([&](auto& q, auto& k, auto& v, auto& lg) { return recurrence(q, k, v, lg, {}, false); }, Q, K,
                        V, LG, G);
  const Grads got = run(
      [&](auto& q, auto& k, auto& v, auto& lg) { return la::linear_attention(q, k, v, options(256, lg, {})); }, Q, K,
      V, LG, G);
  EXPECT_TRUE(at::isfinite(got.out).all().item<bool>() && at::isfinite(got.dgate).all().item<bool>());
  EXPECT_TRUE(same_grads(got, ref));
}

TEST(GatedLinearAttentionKernel, RefusesBadGates) {
  const at::Tensor q = at::randn({1, H, 5, D}, at::kDouble), v = at::randn({1, H, 5, DV}, at::kDouble);
  EXPECT_THROW(la::linear_attention(q, q, v, options(kBlock, at::full({1, H, 5}, 0.1, at::kDouble), {})), c10::Error);
  EXPECT_THROW(la::linear_attention(q, q, v, options(kBlock, at::zeros({1, H, 4}, at::kDouble), {})), c10::Error);
  at::Tensor nan = at::zeros({1, H, 5}, at::kDouble);
  nan[0][1][2] = std::nan("");
  EXPECT_THROW(la::linear_attention(q, q, v, options(kBlock, nan, {})), c10::Error);
}

struct Case {
  LayoutKind kind;
  la::LinearAttentionMethod method;
};

class GatedLinearAttentionSequenceParallel : public ::testing::TestWithParam<Case> {};

TEST_P(GatedLinearAttentionSequenceParallel, MatchesTheRecurrence) {
  const auto [kind, method] = GetParam();
  auto comm = MpiCommunicator::world();
  const int W = comm->size(), r = comm->rank();
  int cases = 0;
  for (int64_t n : {kBlock - 1, kBlock, 3 * kBlock + 5, 2 * kBlock * W + 1}) {
    const SequenceLayout layout(kind, n, W);
    for (Gates gates : kAllGates) {
      for (int docs : {-1, 3, 4}) {  // -1: no documents, else a document pattern
        for (bool normalize : {false, true}) {
          if (normalize && gates != Gates::kRandom) continue;
          const uint64_t seed = 1000 * n + 100 * (docs + 1) + 10 * static_cast<int>(gates);
          at::Tensor Q = seeded_randn({B, H, n, D}, seed + 1), K = seeded_randn({B, H, n, D}, seed + 2);
          if (normalize) Q = Q.exp(), K = K.exp();
          const at::Tensor V = seeded_randn({B, H, n, DV}, seed + 3), G = seeded_randn({B, H, n, DV}, seed + 4);
          const at::Tensor LG = make_log_gate(B, n, gates, seed + 5);
          const at::Tensor doc_start = docs >= 0 ? documents(n, layout.chunk_len(), docs) : at::Tensor();
          const Grads ref = run(
              [&](auto& q, auto& k, auto& v, auto& lg) { return recurrence(q, k, v, lg, doc_start, normalize); }, Q, K,
              V, LG, G);

          // This rank's shard only.
          at::Tensor q = layout.shard(Q, r, 2).requires_grad_(true), k = layout.shard(K, r, 2).requires_grad_(true),
                     v = layout.shard(V, r, 2).requires_grad_(true), lg = layout.shard(LG, r, 2).requires_grad_(true);
          const auto opt = options(kBlock, lg, shard_document_starts(doc_start, layout, r), normalize);
          at::Tensor out = la::sequence_parallel_linear_attention(q, k, v, layout, comm, method, opt);
          (out * layout.shard(G, r, 2)).sum().backward();
          EXPECT_TRUE(ReferenceCheck(r, kTol)
                          .sharded("out", out, ref.out, layout, 2)
                          .sharded("dq", q.grad(), ref.dq, layout, 2)
                          .sharded("dk", k.grad(), ref.dk, layout, 2)
                          .sharded("dv", v.grad(), ref.dv, layout, 2)
                          .sharded("dlog_gate", lg.grad(), ref.dgate, layout, 2)
                          .verdict())
              << "n=" << n << " gates=" << gates_name(gates) << " docs=" << docs << " normalize=" << normalize << " "
              << layout.describe();
          ++cases;
        }
      }
    }
  }
  EXPECT_EQ(cases, 4 * 3 * 5);
}

TEST_P(GatedLinearAttentionSequenceParallel, NoGatesIsUngated) {
  // log g = 0 everywhere is the plain operator, bit for bit up to rounding.
  const auto [kind, method] = GetParam();
  auto comm = MpiCommunicator::world();
  const int W = comm->size(), r = comm->rank();
  const int64_t n = 3 * kBlock * W + 1;
  const SequenceLayout layout(kind, n, W);
  const at::Tensor q = layout.shard(seeded_randn({B, H, n, D}, 1), r, 2), v = layout.shard(seeded_randn({B, H, n, DV}, 2), r, 2);
  const at::Tensor plain =
      la::sequence_parallel_linear_attention(q, q, v, layout, comm, method, options(kBlock, {}, {}));
  const at::Tensor gated = la::sequence_parallel_linear_attention(
      q, q, v, layout, comm, method, options(kBlock, at::zeros({B, H, layout.local_len()}, at::kDouble), {}));
  EXPECT_TRUE(ReferenceCheck(r, 1e-12).same("log g = 0", gated, plain).verdict());
}

INSTANTIATE_TEST_SUITE_P(
    Methods, GatedLinearAttentionSequenceParallel,
    ::testing::Values(Case{LayoutKind::kContiguous, la::LinearAttentionMethod::kLasp2},
                      Case{LayoutKind::kZigzag, la::LinearAttentionMethod::kLasp2},
                      Case{LayoutKind::kContiguous, la::LinearAttentionMethod::kLasp2AllScan},
                      Case{LayoutKind::kZigzag, la::LinearAttentionMethod::kLasp2AllScan},
                      Case{LayoutKind::kContiguous, la::LinearAttentionMethod::kLasp1},
                      Case{LayoutKind::kZigzag, la::LinearAttentionMethod::kLasp1}),
    [](const ::testing::TestParamInfo<Case>& info) {
      return std::string(layout_kind_name(info.param.kind)) + "_" + la::method_name(info.param.method);
    });

// LASP-2 with gates: one AllGather each way; each chunk sends its state and
// its decay per row and head, (W-1) * chunks_per_rank * (B H d_k d_v + B H)
// numbers received per rank and direction, the same at every N.
TEST(GatedLinearAttentionCommunication, Lasp2OneCollectiveEachWayBytesFlatInN) {
  auto comm = MpiCommunicator::world();
  const int W = comm->size(), r = comm->rank();
  for (auto kind : {LayoutKind::kContiguous, LayoutKind::kZigzag}) {
    for (int64_t n : {int64_t(16 * W), int64_t(64 * W), int64_t(256 * W + 3)}) {
      const SequenceLayout layout(kind, n, W);
      at::Tensor q = layout.shard(seeded_randn({B, H, n, D}, 1), r, 2).requires_grad_(true);
      at::Tensor v = layout.shard(seeded_randn({B, H, n, DV}, 2), r, 2).requires_grad_(true);
      at::Tensor lg = layout.shard(make_log_gate(B, n, Gates::kRandom, 3), r, 2).requires_grad_(true);
      const CommStats s0 = comm->stats();
      at::Tensor out = la::sequence_parallel_linear_attention(q, q, v, layout, comm, la::LinearAttentionMethod::kLasp2,
                                                              options(kBlock, lg, {}));
      const CommStats s1 = comm->stats();
      out.sum().backward();
      const CommStats s2 = comm->stats();
      const int64_t expected = (W - 1) * layout.chunks_per_rank() * (B * H * D * DV + B * H) * int64_t(sizeof(double));
      EXPECT_EQ((s1 - s0).total_calls(), 1);
      EXPECT_EQ((s1 - s0)[OpType::kAllGather].calls, 1);
      EXPECT_EQ((s2 - s1).total_calls(), 1);
      EXPECT_EQ((s2 - s1)[OpType::kAllGather].calls, 1);
      EXPECT_EQ((s1 - s0).total_bytes_received(), expected) << layout.describe();
      EXPECT_EQ((s2 - s1).total_bytes_received(), expected) << layout.describe();
      EXPECT_TRUE(lg.grad().defined());
    }
  }
}

// ---- the K mixer (GLA-style layer) ----

pb::ModelConfig tiny_gla_config() {
  pb::ModelConfig c;
  c.set_d_model(16);
  c.set_n_heads(2);
  c.set_n_kv_heads(2);
  c.set_feature_dim(4);
  c.set_block_size(4);
  return c;
}

std::vector<at::Tensor> gradients_of(torch::nn::Module& m) {
  std::vector<at::Tensor> g;
  for (auto& p : m.parameters()) {
    g.push_back(p.grad().defined() ? p.grad().clone() : at::zeros_like(p));
    p.mutable_grad().reset();
  }
  return g;
}

// Every rank's shard against the whole sequence on one rank, and with
// documents against each document run alone on one rank: outputs, dx and
// every parameter's gradient (summed over ranks), for both layouts.
TEST(GatedLinearAttentionMixer, AcrossRanksAndDocumentsMatchOneRank) {
  auto comm = MpiCommunicator::world();
  auto self = comm->split(comm->rank(), 0);
  const int W = comm->size(), r = comm->rank();
  for (auto kind : {LayoutKind::kContiguous, LayoutKind::kZigzag}) {
    for (int64_t n : {int64_t(12 * W), int64_t(12 * W + 5)}) {
      for (bool docs : {false, true}) {
        torch::manual_seed(7);
        models::Mixer mixer = models::make_mixer('K', tiny_gla_config());
        mixer->to(at::kDouble);
        const SequenceLayout layout(kind, n, W);
        const at::Tensor X = seeded_randn({2, n, 16}, 11), G = seeded_randn({2, n, 16}, 12);
        const std::vector<std::vector<int64_t>> lengths{testing::document_lengths(n, layout.chunk_len(), docs ? 4 : 0),
                                                        testing::document_lengths(n, layout.chunk_len(), docs ? 3 : 0)};
        // Reference: each document of each row alone on one rank.
        at::Tensor Xr = X.clone().requires_grad_(true);
        std::vector<at::Tensor> rows;
        for (int64_t b = 0; b < 2; ++b) {
          std::vector<at::Tensor> parts;
          int64_t start = 0;
          for (int64_t len : lengths[b]) {
            const models::SequenceContext one{SequenceLayout(LayoutKind::kContiguous, len, 1), self};
            parts.push_back(mixer->forward(Xr.narrow(0, b, 1).narrow(1, start, len), one));
            start += len;
          }
          rows.push_back(at::cat(parts, 1));
        }
        const at::Tensor ref = at::cat(rows, 0);
        (ref * G).sum().backward();
        const std::vector<at::Tensor> ref_grads = gradients_of(*mixer);

        models::SequenceContext ctx{layout, comm};
        if (docs) ctx.doc_start = shard_document_starts(document_starts_from_lengths(lengths, n), layout, r);
        at::Tensor x = layout.shard(X, r, 1).requires_grad_(true);
        at::Tensor out = mixer->forward(x, ctx);
        (out * layout.shard(G, r, 1)).sum().backward();
        ReferenceCheck check(r, 1e-9);
        check.sharded("out", out, ref, layout, 1).sharded("dx", x.grad(), Xr.grad(), layout, 1);
        std::vector<at::Tensor> grads = gradients_of(*mixer);
        for (size_t i = 0; i < grads.size(); ++i) {
          comm->all_reduce(grads[i])->wait();
          check.same("dparam" + std::to_string(i), grads[i], ref_grads[i]);
        }
        EXPECT_TRUE(check.verdict()) << layout.describe() << " documents=" << docs;
      }
    }
  }
}

// decode_step at every position equals forward() on the whole sequence, and
// greedy generation with the state equals generation by recomputation.
TEST(GatedLinearAttentionDecode, MatchesTheFullForward) {
  auto self = MpiCommunicator::world()->split(MpiCommunicator::world()->rank(), 0);
  pb::ModelConfig user;
  user.set_preset("tiny-gla");
  torch::manual_seed(42);
  models::HybridLM model(models::resolve_model_config(user));
  model->to(at::kDouble);
  const int64_t n = 24;
  at::Generator gen = at::detail::createCPUGenerator(12);
  const at::Tensor tokens = at::randint(0, 256, {2, n}, gen, at::kLong);
  torch::NoGradGuard no_grad;
  const at::Tensor full = model(tokens, models::SequenceContext{SequenceLayout(LayoutKind::kContiguous, n, 1), self});
  std::vector<models::DecodeCache> caches;
  models::DecodeContext ctx;
  for (int64_t t = 0; t < n; ++t) {
    ctx.position = t;
    const at::Tensor step = model->decode_step(tokens.narrow(1, t, 1), caches, ctx);
    EXPECT_TRUE(testing::tensors_close(step, full.narrow(1, t, 1), 1e-10, "logits at " + std::to_string(t)));
  }
  const std::vector<int64_t> prompt{72, 101, 108, 108, 111};
  EXPECT_EQ(models::generate_incremental(*model, {prompt}, 12)[0],
            models::generate_greedy(*model, prompt, 12, pb::ParallelConfig(), self));
}

}  // namespace
}  // namespace loom
