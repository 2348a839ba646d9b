// Packed documents through the models: every mixer letter (L K A W C M G X,
// Titans memories linear and deep) and the whole HybridLM, at 1-4 ranks and
// both layouts, against each document run alone on one rank (outputs, input
// gradients and every parameter gradient within 1e-9, float64); and
// incremental decoding over packed rows against the full forward.
// Rows (documents_reference.h): documents of length 1, starting at a chunk's
// first token, ending at its last, spanning two ranks, spanning all ranks, a
// row that is one document, random lengths. Titans memories reset only at
// memory-chunk boundaries, so their rows are those rows scaled by
// model.memory_chunk (and memory_chunk = 1 runs the unscaled rows).
#include <gtest/gtest.h>
#include <torch/nn/module.h>

#include "distributed_reference.h"
#include "documents_reference.h"
#include "loom/models/hybrid_lm.h"
#include "loom/models/mixers.h"
#include "loom/runtime/comm/comm_order.h"
#include "loom/runtime/comm/documents.h"
#include "loom/runtime/comm/mpi_communicator.h"

namespace loom::models {
namespace {

using loom::testing::document_rows;
using loom::testing::DocumentRows;
using loom::testing::each_document_alone;
using loom::testing::ReferenceCheck;
using loom::testing::seeded_randn;

constexpr double kTol = 1e-9;

pb::ModelConfig tiny_config() {
  pb::ModelConfig c;
  c.set_d_model(16);
  c.set_n_heads(2);
  c.set_n_kv_heads(1);  // GQA
  c.set_d_ff(32);
  c.set_feature_dim(4);
  c.set_feature_map("taylor");
  c.set_window(5);
  c.set_block_size(4);
  c.set_conv_kernel(3);
  c.set_memory_chunk(2);
  c.set_memory_depth(1);
  c.set_persistent_tokens(2);
  c.set_vocab_size(64);
  c.set_positions_per_document(true);
  return c;
}

std::vector<at::Tensor> parameter_grads(torch::nn::Module& m, bool reset) {
  std::vector<at::Tensor> grads;
  for (auto& p : m.parameters()) {
    grads.push_back(p.grad().defined() ? p.grad().clone() : at::zeros_like(p));
    if (reset) p.mutable_grad().reset();
  }
  return grads;
}

// The document rows of `layout`; with `scale` > 1 every length is multiplied
// by it (the rows of a layout `scale` times shorter), so that documents start
// at multiples of `scale`.
std::vector<DocumentRows> rows_for(LayoutKind kind, int64_t n, int world, int64_t scale) {
  if (scale == 1) return document_rows(SequenceLayout(kind, n, world), 5);
  auto rows = document_rows(SequenceLayout(kind, n / scale, world), 5);
  for (auto& r : rows)
    for (auto& row : r.lengths)
      for (auto& len : row) len *= scale;
  return rows;
}

SequenceContext alone_context(int64_t len, const CommPtr& self) {
  return SequenceContext{SequenceLayout(LayoutKind::kContiguous, len, 1), self};
}

SequenceContext documents_context(LayoutKind kind, int64_t n, const CommPtr& comm,
                                  const std::vector<std::vector<int64_t>>& lengths) {
  SequenceContext ctx{SequenceLayout(kind, n, comm->size()), comm};
  ctx.doc_start = shard_document_starts(document_starts_from_lengths(lengths, n), ctx.layout, comm->rank());
  ctx.positions_per_document = true;
  return ctx;
}

struct MixerCase {
  char letter;
  int64_t depth;         // Titans memory depth
  int64_t memory_chunk;  // Titans: documents start at its multiples
};

class DocumentsMixerAcrossRanks : public ::testing::TestWithParam<MixerCase> {};

TEST_P(DocumentsMixerAcrossRanks, MatchesEachDocumentAlone) {
  const auto [letter, depth, memory_chunk] = GetParam();
  auto comm = MpiCommunicator::world();
  auto self = comm->split(comm->rank(), 0);
  const int W = comm->size(), r = comm->rank();
  pb::ModelConfig c = tiny_config();
  c.set_memory_depth(depth);
  c.set_memory_chunk(memory_chunk);
  const bool titans = is_titans_mixer(letter);
  for (auto kind : {LayoutKind::kContiguous, LayoutKind::kZigzag}) {
    // Titans chunks hold whole memory chunks; the others also get a length
    // the layout pads.
    std::vector<int64_t> lengths{12 * W};
    if (!titans) lengths.push_back(12 * W + 5);
    for (int64_t n : lengths) {
      for (const auto& rows : rows_for(kind, n, W, titans ? memory_chunk : 1)) {
        torch::manual_seed(7);
        Mixer mixer = make_mixer(letter, c);
        mixer->to(at::kDouble);
        const at::Tensor X = seeded_randn({2, n, 16}, 11).requires_grad_(true), G = seeded_randn({2, n, 16}, 12);
        // Reference: each document alone on one rank.
        const at::Tensor ref = each_document_alone(rows.lengths, {X}, 1, [&](const std::vector<at::Tensor>& in) {
          CommOrder::reset();
          return std::vector<at::Tensor>{CommOrder::close(mixer->forward(in[0], alone_context(in[0].size(1), self)))};
        })[0];
        (ref * G).sum().backward();
        const at::Tensor ref_dx = X.grad().clone();
        const auto ref_grads = parameter_grads(*mixer, /*reset=*/true);
        // Distributed, packed.
        const auto ctx = documents_context(kind, n, comm, rows.lengths);
        at::Tensor x = ctx.layout.shard(X.detach(), r, 1).requires_grad_(true);
        CommOrder::reset();
        const at::Tensor out = CommOrder::close(mixer->forward(x, ctx));
        (out * ctx.layout.shard(G, r, 1)).sum().backward();
        ReferenceCheck check(r, kTol);
        check.sharded("out", out, ref.detach(), ctx.layout, 1).sharded("dx", x.grad(), ref_dx, ctx.layout, 1);
        const auto grads = parameter_grads(*mixer, false);
        for (size_t i = 0; i < grads.size(); ++i) {
          comm->all_reduce(grads[i])->wait();
          check.same("dparam" + std::to_string(i), grads[i], ref_grads[i]);
        }
        EXPECT_TRUE(check.verdict()) << "mixer " << letter << " depth " << depth << " memory_chunk " << memory_chunk
                                     << " " << ctx.layout.describe() << " rows " << rows.name << " "
                                     << loom::testing::describe_lengths(rows.lengths);
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    Letters, DocumentsMixerAcrossRanks,
    ::testing::Values(MixerCase{'L', 1, 2}, MixerCase{'K', 1, 2}, MixerCase{'A', 1, 2}, MixerCase{'W', 1, 2}, MixerCase{'C', 1, 2},
                      MixerCase{'M', 1, 2}, MixerCase{'M', 2, 2}, MixerCase{'M', 1, 1}, MixerCase{'G', 1, 2},
                      MixerCase{'G', 2, 2}, MixerCase{'X', 1, 2}, MixerCase{'X', 2, 2}, MixerCase{'X', 1, 1},
                      MixerCase{'D', 1, 2}),
    [](const ::testing::TestParamInfo<MixerCase>& info) {
      return std::string(1, info.param.letter) + "_depth" + std::to_string(info.param.depth) + "_chunk" +
             std::to_string(info.param.memory_chunk);
    });

// ---- the whole model ----

// Labels of packed rows: the next token inside the document; -100 at each
// document's last token (it would predict the next document).
at::Tensor document_labels(const at::Tensor& tokens, const std::vector<std::vector<int64_t>>& lengths) {
  at::Tensor labels = at::full_like(tokens, -100);
  for (size_t b = 0; b < lengths.size(); ++b) {
    int64_t start = 0;
    for (int64_t len : lengths[b]) {
      if (len > 1)
        labels[static_cast<int64_t>(b)].narrow(0, start, len - 1).copy_(
            tokens[static_cast<int64_t>(b)].narrow(0, start + 1, len - 1));
      start += len;
    }
  }
  return labels;
}

at::Tensor summed_loss(const at::Tensor& logits, const at::Tensor& labels) {
  return at::nll_loss(at::log_softmax(logits.reshape({-1, logits.size(-1)}), -1), labels.reshape({-1}), {},
                      at::Reduction::Sum, -100);
}

struct ModelCase {
  std::string pattern;
  int64_t memory_chunk;
  pb::LinearAttentionMethod linear;
  pb::SoftmaxMethod softmax;
};

class DocumentsWholeModel : public ::testing::TestWithParam<ModelCase> {};

TEST_P(DocumentsWholeModel, LossAndEveryGradientMatchEachDocumentAlone) {
  const ModelCase mc = GetParam();
  auto comm = MpiCommunicator::world();
  auto self = comm->split(comm->rank(), 0);
  const int W = comm->size(), r = comm->rank();
  pb::ModelConfig user = tiny_config();
  user.set_pattern(mc.pattern);
  user.set_memory_chunk(mc.memory_chunk);
  torch::manual_seed(42);
  HybridLM model(resolve_model_config(user));
  model->to(at::kDouble);
  const bool titans = mc.pattern.find_first_of("MGX") != std::string::npos;
  pb::ParallelConfig parallel;
  parallel.set_linear_method(mc.linear);
  parallel.set_softmax_method(mc.softmax);
  for (auto kind : {LayoutKind::kContiguous, LayoutKind::kZigzag}) {
    const int64_t n = titans ? 12 * W : 12 * W + 5;
    for (const auto& rows : rows_for(kind, n, W, titans ? mc.memory_chunk : 1)) {
      at::Generator gen = at::detail::createCPUGenerator(99);
      const at::Tensor tokens = at::randint(0, 64, {2, n}, gen, at::kLong);
      const at::Tensor labels = document_labels(tokens, rows.lengths);
      const double count = static_cast<double>(labels.ne(-100).sum().item<int64_t>());
      // Reference: each document alone, losses summed.
      model->zero_grad();
      const at::Tensor ref_logits = each_document_alone(rows.lengths, {tokens}, 1, [&](const std::vector<at::Tensor>& in) {
        return std::vector<at::Tensor>{model(in[0], alone_context(in[0].size(1), self))};
      })[0];
      at::Tensor ref_loss = summed_loss(ref_logits, labels);
      ref_loss = ref_loss / count;
      ref_loss.backward();
      const auto ref_grads = parameter_grads(*model, true);
      // Packed, across ranks, through the training loss function.
      const SequenceLayout layout(kind, n, W);
      Batch local{layout.shard(tokens, r, 1, 0), layout.shard(labels, r, 1, -100),
                  shard_document_starts(document_starts_from_lengths(rows.lengths, n), layout, r)};
      model->zero_grad();
      at::Tensor loss = language_model_loss(parallel)(*model, local, layout, comm) / count;
      loss.backward();
      at::Tensor total = loss.detach().reshape({1}).clone();
      comm->all_reduce(total)->wait();
      ReferenceCheck check(r, kTol);
      check.same("loss", total, ref_loss.detach().reshape({1}));
      const auto grads = parameter_grads(*model, false);
      size_t i = 0;
      for (const auto& item : model->named_parameters()) {
        comm->all_reduce(grads[i])->wait();
        check.same("d " + item.key(), grads[i], ref_grads[i]);
        ++i;
      }
      EXPECT_TRUE(check.verdict()) << mc.pattern << " " << layout.describe() << " rows " << rows.name << " "
                                   << loom::testing::describe_lengths(rows.lengths);
    }
  }
}

INSTANTIATE_TEST_SUITE_P(
    Patterns, DocumentsWholeModel,
    ::testing::Values(ModelCase{"LAWCK", 2, pb::LASP2, pb::RING}, ModelCase{"LAWCK", 2, pb::LASP2_ALLSCAN, pb::ALLGATHER},
                      ModelCase{"LAWCK", 2, pb::LASP1, pb::RING}, ModelCase{"LAWCMGX", 2, pb::LASP2, pb::RING},
                      ModelCase{"DDAD", 2, pb::LASP2, pb::RING}, ModelCase{"DDAD", 2, pb::LASP1, pb::ALLGATHER}),
    [](const ::testing::TestParamInfo<ModelCase>& info) {
      return info.param.pattern + "_" + pb::LinearAttentionMethod_Name(info.param.linear) + "_" +
             pb::SoftmaxMethod_Name(info.param.softmax);
    });

// Without documents the packed entry points change nothing: an undefined
// doc_start and a doc_start of one document per row give the same bits.
TEST(DocumentsWholeModelOneDocument, EqualsNoDocuments) {
  auto comm = MpiCommunicator::world();
  const int W = comm->size(), r = comm->rank();
  pb::ModelConfig user = tiny_config();
  user.set_pattern("LAWC");
  torch::manual_seed(1);
  HybridLM model(resolve_model_config(user));
  model->to(at::kDouble);
  const int64_t n = 12 * W + 3;
  const SequenceLayout layout(LayoutKind::kZigzag, n, W);
  at::Generator gen = at::detail::createCPUGenerator(4);
  const at::Tensor tokens = at::randint(0, 64, {2, n}, gen, at::kLong);
  torch::NoGradGuard no_grad;
  SequenceContext plain{layout, comm};
  SequenceContext one = plain;
  one.doc_start = shard_document_starts(at::zeros({2, n}, at::kLong), layout, r);
  const at::Tensor local = layout.shard(tokens, r, 1, 0);
  const at::Tensor valid = layout.valid_mask(r).nonzero().reshape({-1});
  EXPECT_TRUE(at::allclose(model(local, plain).index_select(1, valid), model(local, one).index_select(1, valid), 0,
                           1e-12));
}

// ---- incremental decoding over packed rows ----

class DocumentsDecoding : public ::testing::TestWithParam<bool> {};

TEST_P(DocumentsDecoding, EveryPositionMatchesThePackedForward) {
  auto self = MpiCommunicator::world()->split(MpiCommunicator::world()->rank(), 0);
  pb::ModelConfig user = tiny_config();
  user.set_pattern("LAWCAKD");
  user.set_positions_per_document(GetParam());
  torch::manual_seed(3);
  HybridLM model(resolve_model_config(user));
  model->to(at::kDouble);
  const int64_t n = 23;
  for (const auto& rows : document_rows(SequenceLayout(LayoutKind::kContiguous, n, 2), 9)) {
    at::Generator gen = at::detail::createCPUGenerator(12);
    const at::Tensor tokens = at::randint(0, 64, {2, n}, gen, at::kLong);
    const at::Tensor doc_start = document_starts_from_lengths(rows.lengths, n);
    torch::NoGradGuard no_grad;
    SequenceContext ctx = alone_context(n, self);
    ctx.doc_start = doc_start;
    const at::Tensor full = model(tokens, ctx);
    std::vector<DecodeCache> caches;
    DecodeContext step;
    for (int64_t t = 0; t < n; ++t) {
      step.position = t;
      step.doc_start = doc_start.select(1, t).contiguous();
      const at::Tensor logits = model->decode_step(tokens.narrow(1, t, 1), caches, step);
      ASSERT_TRUE(loom::testing::tensors_close(logits, full.narrow(1, t, 1), 1e-10,
                                               rows.name + " logits at " + std::to_string(t)));
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Positions, DocumentsDecoding, ::testing::Values(false, true),
                         [](const ::testing::TestParamInfo<bool>& info) {
                           return info.param ? "per_document" : "per_row";
                         });

}  // namespace
}  // namespace loom::models


