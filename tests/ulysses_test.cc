// Ulysses (head-parallel all-to-all) and 2D USP sequence parallelism against
// single-rank float64 references:
//  * softmax Ulysses / USP: out, lse, dq, dk, dv vs naive attention within
//    1e-9, both layouts, MHA, GQA with KV heads that divide the group and KV
//    heads fewer than its ranks (replicated), window 0 and > 0, with and
//    without packed documents; USP at 4 ranks (2 x 2) and 6 (2 x 3, 3 x 2);
//  * the all-to-all bytes per rank equal the formula (ulysses.h);
//  * linear Ulysses equal to LASP-2 within 1e-9 for plain, decay, gated
//    linear attention and Gated DeltaNet, with and without documents;
//  * the whole model: loss and gradients at sp = 1 equal Ulysses and USP.
#include <ATen/CPUGeneratorImpl.h>
#include <gtest/gtest.h>
#include <torch/autograd.h>

#include <numeric>

#include "distributed_reference.h"
#include "loom/models/hybrid_lm.h"
#include "loom/parallel/gated_delta/gated_delta.h"
#include "loom/parallel/linear_attention/lasp.h"
#include "loom/parallel/softmax_attention/softmax_attention.h"
#include "loom/parallel/softmax_attention/ulysses.h"
#include "loom/runtime/comm/documents.h"
#include "loom/runtime/comm/mpi_communicator.h"
#include "loom/runtime/comm/process_mesh.h"
#include "loom/runtime/core/error.h"

namespace loom {
namespace {

namespace sa = softmax_attention;
namespace la = linear_attention;
using testing::ReferenceCheck;
using testing::seeded_randn;

constexpr double kTol = 1e-9;

// degree 0: Ulysses over the world; else USP with groups of `degree`.
struct SoftmaxCase {
  LayoutKind kind;
  int degree;
};

class UlyssesSoftmax : public ::testing::TestWithParam<SoftmaxCase> {};

TEST_P(UlyssesSoftmax, MatchesNaiveReference) {
  const auto [kind, degree] = GetParam();
  auto comm = MpiCommunicator::world();
  const int W = comm->size(), r = comm->rank();
  if (degree > 0 && (W % degree != 0 || degree == W || degree == 1))
    GTEST_SKIP() << "USP with groups of " << degree << " needs a proper multiple of " << degree << " ranks";
  const int U = degree > 0 ? degree : W;
  const auto method = degree > 0 ? sa::SoftmaxMethod::kUsp : sa::SoftmaxMethod::kUlysses;
  const int64_t B = 2, d = 4, n = 6 * W + 1;  // padded by every layout
  const SequenceLayout layout(kind, n, W);
  int cases = 0;
  // MHA; GQA with KV heads dividing U; GQA with one KV head (fewer than U, replicated).
  for (auto [hq, hkv] : {std::pair<int64_t, int64_t>{U, U}, std::pair<int64_t, int64_t>{2 * U, U},
                         std::pair<int64_t, int64_t>{2 * U, 1}})
    for (int64_t window : {int64_t(0), int64_t(4)})
      for (bool documents : {false, true}) {
        sa::AttentionSpec spec;
        spec.window = window;
        spec.block = 3;  // several blocks per chunk, partial last block
        const uint64_t seed = 10 * hq + hkv + window;
        const at::Tensor Q = seeded_randn({B, hq, n, d}, 100 + seed), K = seeded_randn({B, hkv, n, d}, 200 + seed),
                         V = seeded_randn({B, hkv, n, d}, 300 + seed), G = seeded_randn({B, hq, n, d}, 400 + seed);
        at::Tensor doc_start, local_docs;
        if (documents) {
          // Row 0: short documents, one across ranks; row 1: chunk-aligned ones.
          doc_start = document_starts_from_lengths(
              {testing::document_lengths(n, layout.chunk_len(), 4), testing::document_lengths(n, layout.chunk_len(), 2)},
              n);
          local_docs = shard_document_starts(doc_start, layout, r);
        }
        at::Tensor Qr = Q.clone().requires_grad_(true), Kr = K.clone().requires_grad_(true),
                   Vr = V.clone().requires_grad_(true);
        auto [ref, ref_lse] = sa::naive_attention(Qr, Kr, Vr, spec, doc_start);
        (ref * G).sum().backward();

        at::Tensor q = layout.shard(Q, r, 2).requires_grad_(true), k = layout.shard(K, r, 2).requires_grad_(true),
                   v = layout.shard(V, r, 2).requires_grad_(true);
        auto [out, lse] = sa::attention_with_lse(q, k, v, layout, comm, method, spec, nullptr, local_docs, degree);
        (out * layout.shard(G, r, 2)).sum().backward();
        EXPECT_TRUE(ReferenceCheck(r, kTol)
                        .sharded("out", out, ref, layout, 2)
                        .sharded("lse", lse, ref_lse, layout, 2)
                        .sharded("dq", q.grad(), Qr.grad(), layout, 2)
                        .sharded("dk", k.grad(), Kr.grad(), layout, 2)
                        .sharded("dv", v.grad(), Vr.grad(), layout, 2)
                        .verdict())
            << sa::method_name(method) << " U=" << U << " hq=" << hq << " hkv=" << hkv << " window=" << window
            << " documents=" << documents << " " << layout.describe();
        ++cases;
      }
  EXPECT_EQ(cases, 12);
}

TEST_P(UlyssesSoftmax, AllToAllBytesMatchTheFormula) {
  const auto [kind, degree] = GetParam();
  auto comm = MpiCommunicator::world();
  const int W = comm->size(), r = comm->rank();
  if (degree > 0 && (W % degree != 0 || degree == W || degree == 1))
    GTEST_SKIP() << "USP with groups of " << degree << " needs a proper multiple of " << degree << " ranks";
  const int U = degree > 0 ? degree : W;
  const auto method = degree > 0 ? sa::SoftmaxMethod::kUsp : sa::SoftmaxMethod::kUlysses;
  // The group whose stats count the all-to-alls: the world, or USP's group.
  const CommPtr group = degree > 0 ? ulysses_grid(comm, U).ulysses : CommPtr(comm);
  const int64_t B = 1, d = 4, n = 8 * W;
  const SequenceLayout layout(kind, n, W);
  const int64_t local = layout.local_len(), f4 = sizeof(float);
  for (auto [hq, hkv] : {std::pair<int64_t, int64_t>{2 * U, U}, std::pair<int64_t, int64_t>{2 * U, 1}}) {
    const int64_t hk = hkv % U == 0 ? hkv : hkv * (U / std::gcd<int64_t>(U, hkv));  // after replication
    at::Tensor q = layout.shard(seeded_randn({B, hq, n, d}, 1, at::kFloat), r, 2).requires_grad_(true);
    at::Tensor k = layout.shard(seeded_randn({B, hkv, n, d}, 2, at::kFloat), r, 2).requires_grad_(true);
    at::Tensor v = layout.shard(seeded_randn({B, hkv, n, d}, 3, at::kFloat), r, 2).requires_grad_(true);
    const CommStats before = group->stats();
    auto [out, lse] = sa::attention_with_lse(q, k, v, layout, comm, method, {}, nullptr, {}, degree);
    const CommStats forward = group->stats() - before;
    out.sum().backward();
    const CommStats backward = group->stats() - before - forward;
    // (U-1)/U of: q, k, v (KV heads as exchanged) and out; lse returns too (forward only).
    const int64_t activations = (hq + 2 * hk + hq) * B * local * d * f4, lse_bytes = hq * B * local * f4;
    EXPECT_EQ(forward[OpType::kAllToAll].bytes_sent, (U - 1) * (activations + lse_bytes) / U) << "hkv=" << hkv;
    EXPECT_EQ(forward[OpType::kAllToAll].bytes_received, (U - 1) * (activations + lse_bytes) / U) << "hkv=" << hkv;
    EXPECT_EQ(forward[OpType::kAllToAll].calls, 3);  // q,k,v together; out; lse
    EXPECT_EQ(backward[OpType::kAllToAll].bytes_sent, (U - 1) * activations / U) << "hkv=" << hkv;
    EXPECT_EQ(backward[OpType::kAllToAll].calls, 2);
    // Ulysses moves nothing else; USP's ring moves K,V between groups.
    if (degree == 0) EXPECT_EQ(forward.total_calls(), 3);
  }
}

TEST_P(UlyssesSoftmax, HeadsThatDoNotDivideAreNamed) {
  const auto [kind, degree] = GetParam();
  auto comm = MpiCommunicator::world();
  const int W = comm->size(), r = comm->rank();
  const int U = degree > 0 ? degree : W;
  if (U == 1 || W % U != 0) GTEST_SKIP() << "every head count divides one rank";
  const SequenceLayout layout(kind, 4 * W, W);
  const at::Tensor q = layout.shard(seeded_randn({1, U + 1, 4 * W, 2}, 1), r, 2);
  try {
    sa::attention(q, q, q, layout, comm, degree > 0 ? sa::SoftmaxMethod::kUsp : sa::SoftmaxMethod::kUlysses, {},
                  nullptr, {}, degree);
    FAIL() << "expected ConfigError";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("model.n_heads = " + std::to_string(U + 1)), std::string::npos) << e.what();
  }
}

INSTANTIATE_TEST_SUITE_P(Methods, UlyssesSoftmax,
                         ::testing::Values(SoftmaxCase{LayoutKind::kContiguous, 0}, SoftmaxCase{LayoutKind::kZigzag, 0},
                                           SoftmaxCase{LayoutKind::kContiguous, 2}, SoftmaxCase{LayoutKind::kZigzag, 2},
                                           SoftmaxCase{LayoutKind::kZigzag, 3}),
                         [](const ::testing::TestParamInfo<SoftmaxCase>& info) {
                           return std::string(layout_kind_name(info.param.kind)) +
                                  (info.param.degree == 0 ? std::string("_ulysses")
                                                          : "_usp" + std::to_string(info.param.degree));
                         });

// ---- linear families: Ulysses equals LASP-2 ----

struct Grads {
  at::Tensor out;
  std::vector<at::Tensor> grads;
};

// Runs `f` on fresh leaves cloned from `inputs`, backward of sum(out * G).
template <typename F>
Grads run_with_grads(const std::vector<at::Tensor>& inputs, const at::Tensor& G, F f) {
  std::vector<at::Tensor> leaves;
  for (const auto& x : inputs) leaves.push_back(x.clone().requires_grad_(true));
  Grads g;
  g.out = f(leaves);
  (g.out * G).sum().backward();
  for (const auto& x : leaves) g.grads.push_back(x.grad());
  return g;
}

class UlyssesLinear : public ::testing::TestWithParam<LayoutKind> {};

TEST_P(UlyssesLinear, EqualsLasp2ForEveryFamily) {
  const LayoutKind kind = GetParam();
  auto comm = MpiCommunicator::world();
  const int W = comm->size(), r = comm->rank();
  const int64_t B = 2, H = 2 * W, dk = 3, dv = 4, n = 5 * W + 2;
  const SequenceLayout layout(kind, n, W);
  auto shard = [&](const at::Tensor& x) { return layout.shard(x, r, 2); };
  const at::Tensor Q = seeded_randn({B, H, n, dk}, 1), K = seeded_randn({B, H, n, dk}, 2),
                   V = seeded_randn({B, H, n, dv}, 3), G = seeded_randn({B, H, n, dv}, 4);
  const at::Tensor log_gate = -at::rand({B, H, n}, at::detail::createCPUGenerator(5), at::kDouble);
  const at::Tensor docs = document_starts_from_lengths(
      {testing::document_lengths(n, layout.chunk_len(), 4), testing::document_lengths(n, layout.chunk_len(), 3)}, n);
  const at::Tensor local_docs = shard_document_starts(docs, layout, r);
  for (bool documents : {false, true}) {
    // plain, decay with normaliser, gated.
    for (int family = 0; family < 3; ++family) {
      auto run = [&](la::LinearAttentionMethod method) {
        std::vector<at::Tensor> inputs{shard(Q), shard(K), shard(V)};
        if (family == 2) inputs.push_back(shard(log_gate));
        return run_with_grads(inputs, shard(G), [&](const std::vector<at::Tensor>& x) {
          la::LinearAttentionOptions o;
          o.block_size = 3;
          if (documents) o.doc_start = local_docs;
          if (family == 1) {
            o.decay = at::linspace(0.5, 0.95, H, at::kDouble);
            o.normalize = true;
          }
          if (family == 2) o.log_gate = x[3];
          return la::sequence_parallel_linear_attention(x[0], x[1].abs(), x[2], layout, comm, method, o);
        });
      };
      const Grads ref = run(la::LinearAttentionMethod::kLasp2), got = run(la::LinearAttentionMethod::kUlysses);
      ReferenceCheck check(r, kTol);
      check.same("out", got.out, ref.out);
      for (size_t i = 0; i < ref.grads.size(); ++i) check.same("grad" + std::to_string(i), got.grads[i], ref.grads[i]);
      EXPECT_TRUE(check.verdict()) << "family " << family << " documents=" << documents << " " << layout.describe();
    }
    // Gated DeltaNet.
    const at::Tensor Kn = K / K.norm(2, -1, true), beta = at::sigmoid(seeded_randn({B, H, n}, 6)),
                     log_alpha = -at::rand({B, H, n}, at::detail::createCPUGenerator(7), at::kDouble);
    auto run = [&](la::LinearAttentionMethod method) {
      return run_with_grads({shard(Q), shard(Kn), shard(V), shard(beta), shard(log_alpha)}, shard(G),
                            [&](const std::vector<at::Tensor>& x) {
                              gated_delta::GatedDeltaOptions o;
                              o.block_size = 3;
                              if (documents) o.doc_start = local_docs;
                              return gated_delta::sequence_parallel_gated_delta_rule(x[0], x[1], x[2], x[3], x[4],
                                                                                     layout, comm, method, o);
                            });
    };
    const Grads ref = run(la::LinearAttentionMethod::kLasp2), got = run(la::LinearAttentionMethod::kUlysses);
    ReferenceCheck check(r, kTol);
    check.same("out", got.out, ref.out);
    for (size_t i = 0; i < ref.grads.size(); ++i) check.same("grad" + std::to_string(i), got.grads[i], ref.grads[i]);
    EXPECT_TRUE(check.verdict()) << "gated delta documents=" << documents << " " << layout.describe();
  }
}

TEST_P(UlyssesLinear, BytesMatchTheFormula) {
  const LayoutKind kind = GetParam();
  auto comm = MpiCommunicator::world();
  const int W = comm->size(), r = comm->rank();
  const int64_t B = 1, H = W, dk = 2, dv = 3, n = 4 * W;
  const SequenceLayout layout(kind, n, W);
  const at::Tensor q = layout.shard(seeded_randn({B, H, n, dk}, 1, at::kFloat), r, 2);
  const at::Tensor v = layout.shard(seeded_randn({B, H, n, dv}, 2, at::kFloat), r, 2);
  const CommStats before = comm->stats();
  la::sequence_parallel_linear_attention(q, q, v, layout, comm, la::LinearAttentionMethod::kUlysses, {});
  const CommStats used = comm->stats() - before;
  const int64_t local = layout.local_len(), f4 = sizeof(float);
  // (W-1)/W of q, k, v out and of the output back.
  EXPECT_EQ(used[OpType::kAllToAll].bytes_sent, (W - 1) * (B * H * local * (2 * dk + dv) * f4) / W +
                                                    (W - 1) * (B * H * local * dv * f4) / W);
  EXPECT_EQ(used.total_calls(), 2);
}

TEST(UlyssesLinearHeads, HeadsThatDoNotDivideAreNamed) {
  auto comm = MpiCommunicator::world();
  const int W = comm->size();
  if (W == 1) GTEST_SKIP() << "every head count divides one rank";
  const SequenceLayout layout(LayoutKind::kZigzag, 4 * W, W);
  const at::Tensor q = layout.shard(seeded_randn({1, W + 1, 4 * W, 2}, 1), comm->rank(), 2);
  EXPECT_THROW(la::sequence_parallel_linear_attention(q, q, q, layout, comm, la::LinearAttentionMethod::kUlysses, {}),
               ConfigError);
}

INSTANTIATE_TEST_SUITE_P(Layouts, UlyssesLinear, ::testing::Values(LayoutKind::kContiguous, LayoutKind::kZigzag),
                         [](const ::testing::TestParamInfo<LayoutKind>& info) {
                           return std::string(layout_kind_name(info.param));
                         });

// ---- the whole model ----

struct ModelRun {
  double loss;
  std::vector<at::Tensor> grads;
};

// One forward/backward, loss averaged over every token, gradients summed over ranks.
ModelRun run_model(models::HybridLM& model, const at::Tensor& tokens, const models::SequenceContext& ctx,
                   int64_t total_tokens) {
  const int r = ctx.comm->rank();
  const int64_t n = tokens.size(1) - 1;
  const at::Tensor input = ctx.layout.shard(tokens.narrow(1, 0, n), r, 1, 0);
  const at::Tensor labels = ctx.layout.shard(tokens.narrow(1, 1, n), r, 1, -100);
  model->zero_grad();
  const at::Tensor logits = model(input, ctx);
  at::Tensor loss = at::nll_loss(at::log_softmax(logits.reshape({-1, logits.size(-1)}), -1), labels.reshape({-1}), {},
                                 at::Reduction::Sum, -100) /
                    static_cast<double>(total_tokens);
  loss.backward();
  at::Tensor total = loss.detach().reshape({1}).clone();
  ctx.comm->all_reduce(total)->wait();
  ModelRun run{total.item<double>(), {}};
  for (auto& p : model->parameters()) {
    at::Tensor g = p.grad().defined() ? p.grad().clone() : at::zeros_like(p);
    ctx.comm->all_reduce(g)->wait();
    run.grads.push_back(g);
  }
  return run;
}

TEST(UlyssesModel, LossAndGradientsMatchOneRank) {
  auto comm = MpiCommunicator::world();
  auto self = comm->split(comm->rank(), 0);
  const int W = comm->size();
  pb::ModelConfig user;
  user.set_pattern("AWLKD");
  user.set_d_model(24);
  user.set_n_heads(12);  // divides 1, 2, 3, 4, 6 ranks
  user.set_n_kv_heads(3);  // GQA: sharded at 3 ranks, replicated at 2, 4 and 6
  user.set_d_ff(32);
  user.set_vocab_size(64);
  user.set_window(4);
  user.set_block_size(4);
  user.set_feature_dim(4);
  torch::manual_seed(42);
  models::HybridLM model(models::resolve_model_config(user));
  model->to(at::kDouble);
  const int64_t n = 8 * W;
  at::Generator gen = at::detail::createCPUGenerator(99);
  const at::Tensor tokens = at::randint(0, 64, {2, n + 1}, gen, at::kLong);
  // USP where the world is a proper grid: 2 x 2, 2 x 3, 3 x 2.
  std::vector<int> degrees{0};
  for (int u : {2, 3})
    if (W % u == 0 && W != u) degrees.push_back(u);
  for (auto kind : {LayoutKind::kContiguous, LayoutKind::kZigzag}) {
    const ModelRun ref = run_model(model, tokens, models::SequenceContext{SequenceLayout(kind, n, 1), self}, 2 * n);
    for (int degree : degrees) {
      models::SequenceContext ctx{SequenceLayout(kind, n, W), comm};
      ctx.softmax_method = degree > 0 ? sa::SoftmaxMethod::kUsp : sa::SoftmaxMethod::kUlysses;
      ctx.ulysses_degree = degree;
      ctx.linear_method = la::LinearAttentionMethod::kUlysses;
      const ModelRun got = run_model(model, tokens, ctx, 2 * n);
      ReferenceCheck check(comm->rank(), 1e-8);
      check.same("loss", at::tensor({got.loss}, at::kDouble), at::tensor({ref.loss}, at::kDouble));
      for (size_t i = 0; i < ref.grads.size(); ++i) check.same("grad" + std::to_string(i), got.grads[i], ref.grads[i]);
      EXPECT_TRUE(check.verdict()) << layout_kind_name(kind) << " sp=" << W << " ulysses_degree=" << degree;
    }
  }
}

}  // namespace
}  // namespace loom
