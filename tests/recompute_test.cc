// Issue 17: the chunked cross-entropy and activation recompute.
// - ChunkedLoss: loss and gradients equal the plain full-logits loss in
//   float64 (1e-12) with ignored labels, a token count that is not a multiple
//   of the block, with and without a bias; language_model_loss equals the
//   plain loss of the model's logits for tied and untied heads at sp = 1-4;
//   a step's peak memory with a large vocabulary drops (MemoryTracker).
// - Recompute: BLOCK and SELECTIVE give the loss and every parameter gradient
//   of NONE (float64, 1e-12) for every tiny preset (together every mixer
//   letter), both layouts, at the registered rank counts; SELECTIVE issues
//   exactly the collectives of NONE (communicator statistics), BLOCK more.
#include <gtest/gtest.h>
#include <torch/autograd.h>
#include <torch/utils.h>

#include <cctype>

#include "distributed_reference.h"
#include "loom/models/chunked_loss.h"
#include "loom/models/hybrid_lm.h"
#include "loom/runtime/comm/documents.h"
#include "loom/runtime/comm/mpi_communicator.h"
#include "loom/runtime/core/config.h"
#include "loom/runtime/core/error.h"
#include "loom/runtime/core/memory_tracker.h"

namespace loom::models {
namespace {

using loom::testing::ReferenceCheck;
using loom::testing::seeded_randn;

constexpr double kExact = 1e-12;

at::Tensor plain_loss(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& bias,
                      const at::Tensor& labels) {
  const at::Tensor z = at::linear(hidden, weight, bias);
  return at::nll_loss(at::log_softmax(z.scalar_type() == at::kDouble ? z : z.to(at::kFloat), -1), labels, {},
                      at::Reduction::Sum, -100);
}

// Labels in [0, V) with every third one ignored (-100).
at::Tensor some_labels(int64_t n, int64_t vocab, uint64_t seed) {
  at::Generator gen = at::detail::createCPUGenerator(seed);
  at::Tensor labels = at::randint(0, vocab, {n}, gen, at::kLong);
  labels.index_put_({at::arange(0, n, 3)}, -100);
  return labels;
}

TEST(ChunkedLoss, EqualsThePlainLossAndGradients) {
  const int64_t N = 37, D = 8, V = 11;
  for (const bool with_bias : {false, true}) {
    for (const int64_t block : {int64_t(1), int64_t(5), int64_t(16), int64_t(37), int64_t(100)}) {
      const at::Tensor labels = some_labels(N, V, 3);
      const at::Tensor h0 = seeded_randn({N, D}, 1), w0 = seeded_randn({V, D}, 2), b0 = seeded_randn({V}, 4);
      const at::Tensor g = seeded_randn({}, 5);
      auto run = [&](bool chunked) {
        at::Tensor h = h0.clone().requires_grad_(true), w = w0.clone().requires_grad_(true);
        at::Tensor b = with_bias ? b0.clone().requires_grad_(true) : at::Tensor();
        const at::Tensor loss = chunked ? chunked_cross_entropy(h, w, b, labels, block) : plain_loss(h, w, b, labels);
        (loss * g).backward();
        std::vector<at::Tensor> out{loss.detach(), h.grad(), w.grad()};
        if (with_bias) out.push_back(b.grad());
        return out;
      };
      const auto ref = run(false), got = run(true);
      ReferenceCheck check(0, kExact);
      const char* names[] = {"loss", "d hidden", "d weight", "d bias"};
      for (size_t i = 0; i < ref.size(); ++i) check.same(names[i], got[i], ref[i]);
      EXPECT_TRUE(check.verdict()) << "block " << block << (with_bias ? " with bias" : " without bias");
    }
  }
}

TEST(ChunkedLoss, IgnoresEveryLabelWhenAllAreIgnored) {
  const at::Tensor h = seeded_randn({6, 4}, 1).requires_grad_(true), w = seeded_randn({5, 4}, 2).requires_grad_(true);
  const at::Tensor loss = chunked_cross_entropy(h, w, at::Tensor(), at::full({6}, -100, at::kLong), 4);
  loss.backward();
  EXPECT_EQ(loss.item<double>(), 0.0);
  EXPECT_EQ(h.grad().abs().max().item<double>(), 0.0);
  EXPECT_EQ(w.grad().abs().max().item<double>(), 0.0);
}

TEST(ChunkedLoss, RefusesALabelOutsideTheVocabulary) {
  const at::Tensor h = seeded_randn({3, 4}, 1), w = seeded_randn({5, 4}, 2);
  EXPECT_THROW(chunked_cross_entropy(h, w, at::Tensor(), at::tensor({0, 5, 1}, at::kLong)), c10::Error);
  EXPECT_THROW(chunked_cross_entropy(h, w, at::Tensor(), at::tensor({0, -1, 1}, at::kLong)), c10::Error);
}

TEST(ChunkedLoss, BlockSizeFollowsTheVocabulary) {
  EXPECT_EQ(loss_block_tokens(256), 4096);
  EXPECT_EQ(loss_block_tokens(32000), kLossBlockBytes / (32000 * 4));
  EXPECT_EQ(loss_block_tokens(1 << 22), 128);
}

TEST(ChunkedLoss, PeakMemoryOfALargeVocabularyDrops) {
  MemoryTracker::install();
  const int64_t N = 1024, D = 16, V = 8192;  // plain: [N, V] float32 logits are 32 MiB
  const at::Tensor labels = some_labels(N, V, 7);
  const at::Tensor h0 = seeded_randn({N, D}, 1, at::kFloat), w0 = seeded_randn({V, D}, 2, at::kFloat);
  auto peak_of = [&](bool chunked) {
    at::Tensor h = h0.clone().requires_grad_(true), w = w0.clone().requires_grad_(true);
    MemoryTracker::reset_peak();
    const int64_t base = MemoryTracker::current_bytes();
    at::Tensor loss = chunked ? chunked_cross_entropy(h, w, at::Tensor(), labels, 64)
                              : plain_loss(h, w, at::Tensor(), labels);
    loss.backward();
    return MemoryTracker::peak_bytes() - base;
  };
  const int64_t plain = peak_of(false), chunked = peak_of(true);
  const int64_t logits_bytes = N * V * 4;
  EXPECT_GE(plain, logits_bytes) << "the plain loss holds the [N, V] logits";
  // Chunked: a few blocks of 64 x V (2 MiB each) plus d weight (V x D) and the hidden gradient.
  EXPECT_LT(chunked, logits_bytes / 4) << "plain " << plain << " bytes, chunked " << chunked << " bytes";
}

// ---- the model ----

HybridLM build(const std::string& preset) {
  pb::ModelConfig user;
  user.set_preset(preset);
  torch::manual_seed(42);
  HybridLM model(resolve_model_config(user));
  model->to(at::kDouble);
  return model;
}

struct Step {
  double loss;
  std::vector<at::Tensor> grads;  // summed over the sp group
  CommStats comm;                 // what this rank's forward and backward communicated
};

// One forward/backward of language_model_loss on `tokens` [B, n + 1], loss
// and gradients summed over the group.
Step run_step(HybridLM& model, const at::Tensor& tokens, LayoutKind kind, const pb::ParallelConfig& parallel,
              const CommPtr& comm, bool plain_head = false) {
  const int64_t n = tokens.size(1) - 1;
  const SequenceLayout layout(kind, n, comm->size());
  Batch local;
  local.inputs = layout.shard(tokens.narrow(1, 0, n), comm->rank(), 1, 0);
  local.labels = layout.shard(tokens.narrow(1, 1, n), comm->rank(), 1, -100);
  model->zero_grad();
  const CommStats before = comm->stats();
  at::Tensor loss;
  if (plain_head) {  // the full logits and nll_loss, as before the chunked loss
    const at::Tensor logits = model->forward(local.inputs, make_context(parallel, layout, comm));
    loss = at::nll_loss(at::log_softmax(logits.reshape({-1, logits.size(-1)}), -1), local.labels.reshape({-1}), {},
                        at::Reduction::Sum, -100);
  } else {
    loss = language_model_loss(parallel)(*model, local, layout, comm);
  }
  loss.backward();
  Step step{0, {}, comm->stats() - before};
  at::Tensor total = loss.detach().reshape({1}).clone();
  comm->all_reduce(total)->wait();
  step.loss = total.item<double>();
  for (auto& p : model->parameters()) {
    at::Tensor g = p.grad().defined() ? p.grad().clone() : at::zeros_like(p);
    comm->all_reduce(g)->wait();
    step.grads.push_back(g);
  }
  return step;
}

at::Tensor random_tokens(int64_t rows, int64_t n, uint64_t seed) {
  at::Generator gen = at::detail::createCPUGenerator(seed);
  return at::randint(0, 256, {rows, n + 1}, gen, at::kLong);
}

::testing::AssertionResult same_step(const Step& got, const Step& ref, int rank, const std::string& what) {
  ReferenceCheck check(rank, kExact);
  check.same(what + " loss", at::tensor({got.loss}, at::kDouble), at::tensor({ref.loss}, at::kDouble));
  for (size_t i = 0; i < ref.grads.size(); ++i)
    check.same(what + " grad" + std::to_string(i), got.grads[i], ref.grads[i]);
  return check.verdict();
}

class ChunkedLossModel : public ::testing::TestWithParam<std::string> {};

TEST_P(ChunkedLossModel, EqualsThePlainLossOfTheLogits) {
  auto comm = MpiCommunicator::world();
  HybridLM model = build(GetParam());
  const at::Tensor tokens = random_tokens(2, 24 * comm->size(), 99);
  pb::ParallelConfig parallel;
  const Step ref = run_step(model, tokens, LayoutKind::kZigzag, parallel, comm, /*plain_head=*/true);
  const Step got = run_step(model, tokens, LayoutKind::kZigzag, parallel, comm);
  EXPECT_TRUE(same_step(got, ref, comm->rank(), "chunked")) << GetParam() << " sp=" << comm->size();
}

// tiny-linear-llama ties the head to the embedding, tiny-gla does not.
INSTANTIATE_TEST_SUITE_P(Heads, ChunkedLossModel, ::testing::Values("tiny-linear-llama", "tiny-gla"),
                         loom::testing::preset_test_name);

struct RecomputeCase {
  std::string preset;
  pb::SoftmaxMethod softmax = pb::RING;
  pb::LinearAttentionMethod linear = pb::LASP2;
};

class RecomputeExact : public ::testing::TestWithParam<RecomputeCase> {};

TEST_P(RecomputeExact, GradientsAndCollectivesMatchNoRecompute) {
  const RecomputeCase c = GetParam();
  auto comm = MpiCommunicator::world();
  HybridLM model = build(c.preset);
  pb::ParallelConfig parallel;
  parallel.set_softmax_method(c.softmax);
  parallel.set_linear_method(c.linear);
  const int64_t n = 24 * comm->size();  // whole memory chunks in every layout chunk
  const at::Tensor tokens = random_tokens(2, n, 5);
  for (auto kind : {LayoutKind::kContiguous, LayoutKind::kZigzag}) {
    const std::string where = c.preset + " " + layout_kind_name(kind) + " sp=" + std::to_string(comm->size());
    model->set_recompute(RecomputeMode::kNone);
    const Step none = run_step(model, tokens, kind, parallel, comm);
    model->set_recompute(RecomputeMode::kBlock);
    const Step block = run_step(model, tokens, kind, parallel, comm);
    model->set_recompute(RecomputeMode::kSelective);
    const Step selective = run_step(model, tokens, kind, parallel, comm);
    EXPECT_TRUE(same_step(block, none, comm->rank(), "BLOCK")) << where;
    EXPECT_TRUE(same_step(selective, none, comm->rank(), "SELECTIVE")) << where;
    // SELECTIVE's reruns replay what the first runs received: the step
    // communicates exactly as without recompute.
    EXPECT_EQ(selective.comm.total_calls(), none.comm.total_calls())
        << where << "\nNONE:\n" << none.comm.to_string() << "SELECTIVE:\n" << selective.comm.to_string();
    EXPECT_EQ(selective.comm.total_bytes_sent(), none.comm.total_bytes_sent()) << where;
    // BLOCK's reruns issue the forward collectives again.
    if (comm->size() > 1) EXPECT_GT(block.comm.total_calls(), none.comm.total_calls()) << where;
  }
  model->set_recompute(RecomputeMode::kNone);
}

std::vector<RecomputeCase> recompute_cases() {
  std::vector<RecomputeCase> cases;
  for (const auto& preset : loom::testing::tiny_presets()) cases.push_back({preset});
  // The other methods of the communicating operators.
  cases.push_back({"tiny-linear-llama-hybrid", pb::ALLGATHER, pb::LASP2_ALLSCAN});
  cases.push_back({"tiny-qwen35", pb::ALLGATHER, pb::LASP1});
  return cases;
}

INSTANTIATE_TEST_SUITE_P(Presets, RecomputeExact, ::testing::ValuesIn(recompute_cases()),
                         [](const ::testing::TestParamInfo<RecomputeCase>& info) {
                           std::string name = info.param.preset + "_" + pb::SoftmaxMethod_Name(info.param.softmax) +
                                              "_" + pb::LinearAttentionMethod_Name(info.param.linear);
                           for (char& ch : name)
                             if (!std::isalnum(static_cast<unsigned char>(ch))) ch = '_';
                           return name;
                         });

TEST(RecomputeExact, WithDocumentsMatchesNoRecompute) {
  auto comm = MpiCommunicator::world();
  HybridLM model = build("tiny-based");
  pb::ParallelConfig parallel;
  const int64_t n = 24 * comm->size();
  const at::Tensor tokens = random_tokens(1, n, 8);
  const SequenceLayout layout(LayoutKind::kZigzag, n, comm->size());
  // Documents of lengths 5, 3, then the rest.
  const at::Tensor doc_start = document_starts_from_lengths({{5, 3, n - 8}}, n);
  auto run = [&](RecomputeMode mode) {
    model->set_recompute(mode);
    Batch local;
    local.inputs = layout.shard(tokens.narrow(1, 0, n), comm->rank(), 1, 0);
    local.labels = layout.shard(tokens.narrow(1, 1, n), comm->rank(), 1, -100);
    local.doc_start = shard_document_starts(doc_start, layout, comm->rank());
    model->zero_grad();
    const at::Tensor loss = language_model_loss(parallel)(*model, local, layout, comm);
    loss.backward();
    Step step{0, {}, {}};
    at::Tensor total = loss.detach().reshape({1}).clone();
    comm->all_reduce(total)->wait();
    step.loss = total.item<double>();
    for (auto& p : model->parameters()) {
      at::Tensor g = p.grad().defined() ? p.grad().clone() : at::zeros_like(p);
      comm->all_reduce(g)->wait();
      step.grads.push_back(g);
    }
    return step;
  };
  const Step none = run(RecomputeMode::kNone);
  EXPECT_TRUE(same_step(run(RecomputeMode::kBlock), none, comm->rank(), "BLOCK"));
  EXPECT_TRUE(same_step(run(RecomputeMode::kSelective), none, comm->rank(), "SELECTIVE"));
}

TEST(RecomputeExact, EvaluationUnderNoGradRunsThePlainForward) {
  auto comm = MpiCommunicator::world();
  HybridLM model = build("tiny-linear-llama-hybrid");
  const int64_t n = 24 * comm->size();
  const SequenceLayout layout(LayoutKind::kZigzag, n, comm->size());
  const at::Tensor input = layout.shard(random_tokens(1, n, 2).narrow(1, 0, n), comm->rank(), 1, 0);
  torch::NoGradGuard no_grad;
  const at::Tensor plain = model->forward(input, make_context(pb::ParallelConfig(), layout, comm));
  model->set_recompute(RecomputeMode::kSelective);
  const at::Tensor selective = model->forward(input, make_context(pb::ParallelConfig(), layout, comm));
  EXPECT_TRUE(ReferenceCheck(comm->rank(), 0.0).same("logits", selective, plain).verdict());
}

TEST(RecomputeExact, ConfigAcceptsTheModesButNotWithOffload) {
  pb::LoomConfig c;
  for (auto mode : {pb::TrainConfig::BLOCK, pb::TrainConfig::SELECTIVE}) {
    c.mutable_train()->set_recompute(mode);
    EXPECT_NO_THROW(validate_config(c)) << pb::TrainConfig::Recompute_Name(mode);
  }
  c.mutable_parallel()->set_softmax_method(pb::OFFLOAD);
  c.mutable_offload()->set_memory_ranks(1);
  try {
    validate_config(c);
    FAIL() << "expected ConfigError for train.recompute with OFFLOAD";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("train.recompute = SELECTIVE with parallel.softmax_method = OFFLOAD"),
              std::string::npos)
        << e.what();
  }
  EXPECT_EQ(recompute_mode(pb::TrainConfig::BLOCK), RecomputeMode::kBlock);
  EXPECT_EQ(recompute_mode(pb::TrainConfig::SELECTIVE), RecomputeMode::kSelective);
}

}  // namespace
}  // namespace loom::models
