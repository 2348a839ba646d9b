// Gated DeltaNet: the chunked WY kernel on one rank and the sequence-parallel
// operator (LASP-2, all-scan, LASP-1; contiguous and zigzag) against a
// token-by-token recurrence written here, in float64: outputs and the
// gradients of q, k, v, beta and the log gates, with gates and beta near 0
// and near 1, lengths that do not divide the blocks or the chunks, and packed
// documents. Plus LASP-2's communication: one AllGather each way, bytes by
// the formula and flat in N; and the D mixer with packed documents across
// ranks against each document run alone.
#include <gtest/gtest.h>
#include <torch/autograd.h>

#include "distributed_reference.h"
#include "loom/models/mixers.h"
#include "loom/parallel/gated_delta/gated_delta.h"
#include "loom/runtime/comm/documents.h"
#include "loom/runtime/comm/mpi_communicator.h"

namespace loom {
namespace {

namespace gd = gated_delta;
using testing::ReferenceCheck;
using testing::seeded_randn;

constexpr double kTol = 1e-9;
constexpr int64_t kBlock = 4;
constexpr int64_t B = 2, H = 2, DK = 4, DV = 3;

// The definition, one token at a time, with the explicit (I - beta k k^T)
// matrix: S_t = alpha_t (I - beta_t k_t k_t^T) S_(t-1) + beta_t k_t v_t^T,
// o_t = S_t^T q_t, alpha_t = 0 at a document's first token.
at::Tensor recurrence(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& beta,
                      const at::Tensor& log_alpha, const at::Tensor& doc_start = {}) {
  const int64_t n = q.size(2), dk = q.size(3), dv = v.size(3);
  at::Tensor S = at::zeros({q.size(0), q.size(1), dk, dv}, q.options());
  const at::Tensor I = at::eye(dk, q.options());
  std::vector<at::Tensor> outs;
  for (int64_t t = 0; t < n; ++t) {
    at::Tensor alpha = log_alpha.select(2, t).exp();  // [B, H]
    if (doc_start.defined()) alpha = alpha * doc_start.select(1, t).ne(t).to(q.options()).unsqueeze(1);
    const at::Tensor kt = k.select(2, t), b = beta.select(2, t).unsqueeze(-1).unsqueeze(-1);
    const at::Tensor P = I - b * at::matmul(kt.unsqueeze(-1), kt.unsqueeze(-2));
    S = alpha.unsqueeze(-1).unsqueeze(-1) * at::matmul(P, S) +
        b * at::matmul(kt.unsqueeze(-1), v.select(2, t).unsqueeze(-2));
    outs.push_back(at::matmul(q.select(2, t).unsqueeze(-2), S).squeeze(-2));
  }
  return at::stack(outs, 2);
}

enum class Level { kTypical, kNearZero, kNearOne };
const char* level_name(Level l) { return l == Level::kTypical ? "typical" : l == Level::kNearZero ? "near0" : "near1"; }

struct Inputs {
  at::Tensor q, k, v, beta, log_alpha, grad;
};

// Identical on every rank. k is L2-normalised; beta in (0, 1); alpha in (0, 1].
Inputs make_inputs(int64_t n, uint64_t seed, Level gate, Level beta) {
  Inputs x;
  x.q = seeded_randn({B, H, n, DK}, seed);
  const at::Tensor k = seeded_randn({B, H, n, DK}, seed + 1);
  x.k = k / k.norm(2, -1, /*keepdim=*/true);
  x.v = seeded_randn({B, H, n, DV}, seed + 2);
  const at::Tensor u = at::sigmoid(seeded_randn({B, H, n}, seed + 3));  // (0, 1)
  x.beta = beta == Level::kTypical ? u : beta == Level::kNearZero ? 1e-7 * u : 1 - 1e-7 * u;
  const at::Tensor z = seeded_randn({B, H, n}, seed + 4);
  x.log_alpha = gate == Level::kTypical    ? -at::softplus(z)
                : gate == Level::kNearZero ? -25 - 5 * at::sigmoid(z)  // alpha ~ 1e-11
                                           : -1e-7 * at::sigmoid(z);
  x.grad = seeded_randn({B, H, n, DV}, seed + 5);
  return x;
}

struct Leaves {
  at::Tensor q, k, v, beta, log_alpha;
};
Leaves leaves(const Inputs& x) {
  return {x.q.clone().requires_grad_(true), x.k.clone().requires_grad_(true), x.v.clone().requires_grad_(true),
          x.beta.clone().requires_grad_(true), x.log_alpha.clone().requires_grad_(true)};
}

const std::vector<std::pair<Level, Level>>& regimes() {  // (gate, beta)
  static const std::vector<std::pair<Level, Level>> r{
      {Level::kTypical, Level::kTypical},  {Level::kNearZero, Level::kTypical}, {Level::kNearOne, Level::kTypical},
      {Level::kTypical, Level::kNearZero}, {Level::kTypical, Level::kNearOne},  {Level::kNearZero, Level::kNearOne},
      {Level::kNearOne, Level::kNearOne},  {Level::kNearOne, Level::kNearZero}, {Level::kNearZero, Level::kNearZero}};
  return r;
}

TEST(GatedDeltaKernel, ChunkedMatchesRecurrenceOnOneRank) {
  int cases = 0;
  for (const auto& [gate, beta] : regimes()) {
    for (int64_t n : {1, 5, 8, 13, 29}) {
      for (int64_t block : {1, 3, 8, 64}) {
        const Inputs x = make_inputs(n, 100 + n, gate, beta);
        Leaves a = leaves(x), r = leaves(x);
        gd::GatedDeltaOptions o;
        o.block_size = block;
        const at::Tensor out = gd::gated_delta_rule(a.q, a.k, a.v, a.beta, a.log_alpha, o);
        (out * x.grad).sum().backward();
        const at::Tensor ref = recurrence(r.q, r.k, r.v, r.beta, r.log_alpha);
        (ref * x.grad).sum().backward();
        EXPECT_TRUE(ReferenceCheck(0, kTol)
                        .same("out", out, ref)
                        .same("dq", a.q.grad(), r.q.grad())
                        .same("dk", a.k.grad(), r.k.grad())
                        .same("dv", a.v.grad(), r.v.grad())
                        .same("dbeta", a.beta.grad(), r.beta.grad())
                        .same("dlog_alpha", a.log_alpha.grad(), r.log_alpha.grad())
                        .verdict())
            << "n=" << n << " block=" << block << " gate " << level_name(gate) << " beta " << level_name(beta);
        ++cases;
      }
    }
  }
  EXPECT_EQ(cases, 9 * 5 * 4);
}

TEST(GatedDeltaKernel, DocumentStartsForgetTheState) {
  // One rank, blocks smaller than the documents and larger: each document
  // starts from a zero state, as the recurrence with alpha = 0 at its first token.
  const int64_t n = 23;
  for (int pattern = 0; pattern < testing::kDocumentPatterns; ++pattern) {
    const at::Tensor docs =
        document_starts_from_lengths({testing::document_lengths(n, 6, pattern), testing::document_lengths(n, 5, 4)}, n);
    for (int64_t block : {3, 8}) {
      const Inputs x = make_inputs(n, 7 + pattern, Level::kTypical, Level::kTypical);
      Leaves a = leaves(x), r = leaves(x);
      gd::GatedDeltaOptions o;
      o.block_size = block;
      o.doc_start = docs;
      const at::Tensor out = gd::gated_delta_rule(a.q, a.k, a.v, a.beta, a.log_alpha, o);
      (out * x.grad).sum().backward();
      const at::Tensor ref = recurrence(r.q, r.k, r.v, r.beta, r.log_alpha, docs);
      (ref * x.grad).sum().backward();
      EXPECT_TRUE(ReferenceCheck(0, kTol)
                      .same("out", out, ref)
                      .same("dq", a.q.grad(), r.q.grad())
                      .same("dk", a.k.grad(), r.k.grad())
                      .same("dv", a.v.grad(), r.v.grad())
                      .same("dbeta", a.beta.grad(), r.beta.grad())
                      .same("dlog_alpha", a.log_alpha.grad(), r.log_alpha.grad())
                      .verdict())
          << "pattern " << pattern << " block " << block;
    }
  }
}

TEST(GatedDeltaKernel, DecodingStepEqualsTheRecurrence) {
  const int64_t n = 9;
  const Inputs x = make_inputs(n, 3, Level::kTypical, Level::kTypical);
  const at::Tensor ref = recurrence(x.q, x.k, x.v, x.beta, x.log_alpha);
  at::Tensor state;
  for (int64_t t = 0; t < n; ++t) {
    const at::Tensor o = gd::gated_delta_step(x.q.select(2, t), x.k.select(2, t), x.v.select(2, t),
                                              x.beta.select(2, t), x.log_alpha.select(2, t), state);
    EXPECT_TRUE(testing::tensors_close(o, ref.select(2, t), kTol, "token " + std::to_string(t)));
  }
}

struct Case {
  LayoutKind kind;
  gd::LinearAttentionMethod method;
};

class GatedDeltaSequenceParallel : public ::testing::TestWithParam<Case> {};

// Runs the distributed operator on this rank's shard and checks its outputs
// and gradients against the recurrence on the whole sequence.
::testing::AssertionResult check_against_recurrence(const Inputs& x, const SequenceLayout& layout,
                                                    const CommPtr& comm, gd::LinearAttentionMethod method,
                                                    const at::Tensor& doc_start) {
  const int r = comm->rank();
  // [out, dq, dk, dv, dbeta, dlog_alpha] of the recurrence on the whole sequence.
  const auto ref = testing::reference_on_root(comm, {x.v, x.q, x.k, x.v, x.beta, x.log_alpha}, [&] {
    Leaves in = leaves(x);
    const at::Tensor out = recurrence(in.q, in.k, in.v, in.beta, in.log_alpha, doc_start);
    (out * x.grad).sum().backward();
    return std::vector<at::Tensor>{out, in.q.grad(), in.k.grad(), in.v.grad(), in.beta.grad(), in.log_alpha.grad()};
  });

  auto shard = [&](const at::Tensor& t) { return layout.shard(t, r, 2).requires_grad_(true); };
  at::Tensor q = shard(x.q), k = shard(x.k), v = shard(x.v), beta = shard(x.beta), log_alpha = shard(x.log_alpha);
  gd::GatedDeltaOptions o;
  o.block_size = kBlock;
  o.doc_start = shard_document_starts(doc_start, layout, r);
  const at::Tensor out = gd::sequence_parallel_gated_delta_rule(q, k, v, beta, log_alpha, layout, comm, method, o);
  (out * layout.shard(x.grad, r, 2)).sum().backward();
  return ReferenceCheck(r, kTol)
      .sharded("out", out, ref[0], layout, 2)
      .sharded("dq", q.grad(), ref[1], layout, 2)
      .sharded("dk", k.grad(), ref[2], layout, 2)
      .sharded("dv", v.grad(), ref[3], layout, 2)
      .sharded("dbeta", beta.grad(), ref[4], layout, 2)
      .sharded("dlog_alpha", log_alpha.grad(), ref[5], layout, 2)
      .verdict();
}

TEST_P(GatedDeltaSequenceParallel, MatchesRecurrence) {
  const auto [kind, method] = GetParam();
  auto comm = MpiCommunicator::world();
  const int W = comm->size();
  // Shorter than a block, one block, chunks that do not divide into blocks, padding.
  const std::vector<int64_t> lengths{kBlock - 1, kBlock, 3 * kBlock + 5, 2 * kBlock * W + 1, 6 * kBlock * W + 3};
  int cases = 0;
  for (const auto& [gate, beta] : regimes()) {
    for (int64_t n : lengths) {
      const SequenceLayout layout(kind, n, W);
      EXPECT_TRUE(check_against_recurrence(make_inputs(n, 10 + n, gate, beta), layout, comm, method, at::Tensor()))
          << layout.describe() << " gate " << level_name(gate) << " beta " << level_name(beta);
      ++cases;
    }
  }
  EXPECT_EQ(cases, 9 * 5);
}

TEST_P(GatedDeltaSequenceParallel, DocumentsAcrossRanks) {
  const auto [kind, method] = GetParam();
  auto comm = MpiCommunicator::world();
  const int W = comm->size();
  for (int64_t n : {6 * kBlock * W + 3, 2 * kBlock * W}) {
    const SequenceLayout layout(kind, n, W);
    for (int pattern = 0; pattern < testing::kDocumentPatterns; ++pattern) {
      const at::Tensor docs = document_starts_from_lengths(
          {testing::document_lengths(n, layout.chunk_len(), pattern), testing::document_lengths(n, layout.chunk_len(), 4)},
          n);
      EXPECT_TRUE(check_against_recurrence(make_inputs(n, 50 + pattern, Level::kTypical, Level::kTypical), layout,
                                           comm, method, docs))
          << layout.describe() << " document pattern " << pattern;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    Methods, GatedDeltaSequenceParallel,
    ::testing::Values(Case{LayoutKind::kContiguous, gd::LinearAttentionMethod::kLasp2},
                      Case{LayoutKind::kZigzag, gd::LinearAttentionMethod::kLasp2},
                      Case{LayoutKind::kContiguous, gd::LinearAttentionMethod::kLasp2AllScan},
                      Case{LayoutKind::kZigzag, gd::LinearAttentionMethod::kLasp2AllScan},
                      Case{LayoutKind::kContiguous, gd::LinearAttentionMethod::kLasp1},
                      Case{LayoutKind::kZigzag, gd::LinearAttentionMethod::kLasp1}),
    [](const ::testing::TestParamInfo<Case>& info) {
      return std::string(layout_kind_name(info.param.kind)) + "_" + linear_attention::method_name(info.param.method);
    });

// LASP-2's communication, counted by the communicator: one AllGather forward
// and one backward, each received bytes (W-1) x chunks_per_rank x B x H x
// (d_k^2 + d_k d_v) x 8, the same at two lengths.
TEST(GatedDeltaCommunication, Lasp2OneCollectiveEachWayBytesByTheFormula) {
  auto comm = MpiCommunicator::world();
  const int W = comm->size(), r = comm->rank();
  for (auto kind : {LayoutKind::kContiguous, LayoutKind::kZigzag}) {
    const int64_t cpr = kind == LayoutKind::kZigzag ? 2 : 1;
    const int64_t expected = (W - 1) * cpr * B * H * (DK * DK + DK * DV) * int64_t(sizeof(double));
    for (int64_t n : {int64_t(16 * W), int64_t(64 * W)}) {
      const SequenceLayout layout(kind, n, W);
      const Inputs x = make_inputs(n, 5, Level::kTypical, Level::kTypical);
      auto shard = [&](const at::Tensor& t) { return layout.shard(t, r, 2).requires_grad_(true); };
      at::Tensor q = shard(x.q), k = shard(x.k), v = shard(x.v), beta = shard(x.beta), g = shard(x.log_alpha);
      gd::GatedDeltaOptions o;
      o.block_size = kBlock;
      const CommStats s0 = comm->stats();
      const at::Tensor out =
          gd::sequence_parallel_gated_delta_rule(q, k, v, beta, g, layout, comm, gd::LinearAttentionMethod::kLasp2, o);
      const CommStats s1 = comm->stats();
      out.sum().backward();
      const CommStats forward = s1 - s0, backward = comm->stats() - s1;
      for (const CommStats* s : {&forward, &backward}) {
        EXPECT_EQ(s->total_calls(), 1) << layout.describe();
        EXPECT_EQ((*s)[OpType::kAllGather].calls, 1) << layout.describe();
        EXPECT_EQ(s->total_bytes_received(), expected) << layout.describe() << " n=" << n;
        EXPECT_EQ(s->total_bytes_sent(), expected) << layout.describe() << " n=" << n;
      }
    }
  }
}

TEST(GatedDeltaCommunication, AllScanOneScanPerDirectionContiguous) {
  auto comm = MpiCommunicator::world();
  const int W = comm->size(), r = comm->rank();
  const int64_t n = 8 * W;
  const SequenceLayout layout(LayoutKind::kContiguous, n, W);
  const Inputs x = make_inputs(n, 6, Level::kTypical, Level::kTypical);
  auto shard = [&](const at::Tensor& t) { return layout.shard(t, r, 2).requires_grad_(true); };
  at::Tensor q = shard(x.q), k = shard(x.k), v = shard(x.v), beta = shard(x.beta), g = shard(x.log_alpha);
  gd::GatedDeltaOptions o;
  o.block_size = kBlock;
  const CommStats s0 = comm->stats();
  const at::Tensor out = gd::sequence_parallel_gated_delta_rule(q, k, v, beta, g, layout, comm,
                                                                gd::LinearAttentionMethod::kLasp2AllScan, o);
  const CommStats forward = comm->stats() - s0;
  EXPECT_EQ(forward.total_calls(), 1);
  EXPECT_EQ(forward[OpType::kExscan].calls, 1);
  // At most one element (a map and a state), whatever W is.
  EXPECT_LE(forward.total_bytes_received(), B * H * (DK * DK + DK * DV) * int64_t(sizeof(double)));
  out.sum().backward();  // the backward scan runs over comm->reversed(), counted there
}

// The whole D mixer (short conv, gates, delta rule, gated norm) with packed
// documents at sp = W equals each document run alone on one rank, outputs and
// the gradients of the input and of every parameter.
TEST(GatedDeltaMixer, DocumentsAcrossRanksEachAsIfAlone) {
  auto comm = MpiCommunicator::world();
  auto self = comm->split(comm->rank(), 0);
  const int W = comm->size(), r = comm->rank();
  pb::ModelConfig c;
  c.set_d_model(16);
  c.set_n_heads(2);
  c.set_conv_kernel(3);
  c.set_block_size(4);
  c.set_delta_key_heads(1);
  c.set_delta_value_heads(2);
  c.set_delta_key_dim(4);
  c.set_delta_value_dim(5);
  torch::manual_seed(7);
  models::Mixer mixer = models::make_mixer('D', c);
  mixer->to(at::kDouble);
  const int64_t n = 12 * W + 5;
  for (auto kind : {LayoutKind::kContiguous, LayoutKind::kZigzag}) {
    const SequenceLayout layout(kind, n, W);
    const std::vector<int64_t> lengths = testing::document_lengths(n, layout.chunk_len(), 4);
    const at::Tensor X = seeded_randn({1, n, 16}, 31), G = seeded_randn({1, n, 16}, 32);
    // Reference: each document alone, from a fresh state, on one rank.
    std::vector<at::Tensor> ref_out, ref_dx;
    int64_t start = 0;
    for (int64_t len : lengths) {
      // Zeros after a short document give the conv its halo; they come after
      // every real token and carry no gradient.
      const int64_t padded = std::max<int64_t>(len, c.conv_kernel());
      const models::SequenceContext one{SequenceLayout(LayoutKind::kContiguous, padded, 1), self};
      at::Tensor x = at::constant_pad_nd(X.narrow(1, start, len), {0, 0, 0, padded - len}).requires_grad_(true);
      const at::Tensor out = mixer->forward(x, one);
      (out * at::constant_pad_nd(G.narrow(1, start, len), {0, 0, 0, padded - len})).sum().backward();
      ref_out.push_back(out.detach().narrow(1, 0, len));
      ref_dx.push_back(x.grad().narrow(1, 0, len));
      start += len;
    }
    std::vector<at::Tensor> ref_grads;
    for (auto& p : mixer->parameters()) {
      ref_grads.push_back(p.grad().clone());
      p.mutable_grad().reset();
    }
    // Distributed, the row packed.
    models::SequenceContext ctx{layout, comm};
    ctx.doc_start = shard_document_starts(document_starts_from_lengths({lengths}, n), layout, r);
    at::Tensor x = layout.shard(X, r, 1).requires_grad_(true);
    const at::Tensor out = mixer->forward(x, ctx);
    (out * layout.shard(G, r, 1)).sum().backward();
    ReferenceCheck check(r, 1e-9);
    check.sharded("out", out, at::cat(ref_out, 1), layout, 1).sharded("dx", x.grad(), at::cat(ref_dx, 1), layout, 1);
    int i = 0;
    for (auto& p : mixer->parameters()) {
      at::Tensor g = p.grad().clone();
      comm->all_reduce(g)->wait();
      check.same("d" + std::to_string(i), g, ref_grads[i]);
      p.mutable_grad().reset();
      ++i;
    }
    EXPECT_TRUE(check.verdict()) << layout.describe();
  }
}

}  // namespace
}  // namespace loom
