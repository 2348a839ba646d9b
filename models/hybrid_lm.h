// HybridLM: embedding -> blocks -> RMSNorm -> LM head (optionally tied).
// Block i: x += mixer_i(norm(x)); x += SwiGLU(norm(x)), with mixer_i chosen by
// the i-th letter of model.pattern (mixers.h, titans.h).
//
// forward() takes this rank's shard of token ids [B, n] under ctx.layout and
// returns logits [B, n, vocab]; every mixer runs sequence-parallel through
// ctx. hidden() returns the final-normed states [B, n, D] before the LM head
// (head_weight()/head_bias()), which the chunked loss (chunked_loss.h) takes
// instead of the logits; both are closed onto the CommOrder chain.
// set_recompute(): each block (mixer and MLP with their norms) runs through
// recompute_block (runtime/comm/recompute.h) in the given mode; not with
// attention offload (UnsupportedError in forward). Parameters are replicated on every rank; their gradients from one
// backward are this rank's share and must be all-reduced over dp x sp (the
// trainer does it).
//
// resolve_model_config() applies a named preset (model.preset) under the
// fields the user set, and fills derived defaults (n_kv_heads, d_ff,
// feature_dim). count_parameters() gives the count of a config without
// building it (a 1B model is not allocated to print its size).
#pragma once

#include <torch/nn/module.h>
#include <torch/nn/modules/container/modulelist.h>

#include <functional>
#include <string>
#include <vector>

#include "loom/models/layers.h"
#include "loom/models/mixers.h"
#include "loom/models/sequence_context.h"
#include "loom/runtime/core/proto/loom.pb.h"
#include "loom/runtime/comm/recompute.h"
#include "loom/runtime/data/loss_function.h"

namespace loom::models {

// Names of the built-in presets.
std::vector<std::string> preset_names();
// Preset under the user's explicitly set fields, with derived defaults filled.
// Throws ConfigError for an unknown preset (listing the known ones).
pb::ModelConfig resolve_model_config(const pb::ModelConfig& user);
int64_t count_parameters(const pb::ModelConfig& resolved);

class HybridLMImpl : public torch::nn::Module {
 public:
  // Parameters are created with `options` (device, dtype; default float32 on
  // the CPU), see ParameterScope.
  explicit HybridLMImpl(const pb::ModelConfig& resolved, at::TensorOptions options = {});
  at::Tensor forward(const at::Tensor& tokens, const SequenceContext& ctx);
  // The final-normed hidden states [B, n, D] (forward() is head(hidden())).
  at::Tensor hidden(const at::Tensor& tokens, const SequenceContext& ctx);
  // The LM head: the embedding when tied; bias undefined without one.
  const at::Tensor& head_weight() const;
  at::Tensor head_bias() const;
  void set_recompute(RecomputeMode mode) { recompute_ = mode; }
  RecomputeMode recompute() const { return recompute_; }
  // Incremental decoding: tokens [S, 1] at ctx.position -> logits [S, 1, V];
  // `caches` (one per layer) carry the mixers' state between calls.
  at::Tensor decode_step(const at::Tensor& tokens, std::vector<DecodeCache>& caches, DecodeContext ctx);
  const pb::ModelConfig& config() const { return config_; }
  // Casts the parameters for training in `dtype`. bfloat16/float16: every
  // parameter in that dtype except the Titans mixers', which stay float32 so
  // that the memory's inner updates accumulate in float32 (forward casts at
  // their boundary); float32/float64: everything.
  void set_precision(at::ScalarType dtype);
  int64_t parameter_count();

 private:
  pb::ModelConfig config_;
  TokenEmbedding embedding_{nullptr};
  std::vector<Mixer> mixers_;
  // One parameter of each mixer: Module::to() converts it in place, so its
  // dtype is always the mixer's current one.
  std::vector<at::Tensor> mixer_weights_;
  std::vector<RMSNorm> mixer_norms_, mlp_norms_;
  std::vector<SwiGLU> mlps_;
  RMSNorm final_norm_{nullptr};
  Projection head_{nullptr};  // null when tied to the embedding
  RecomputeMode recompute_ = RecomputeMode::kNone;
  // Block i's forward: x + mixer(norm(x)), then + MLP(norm(.)).
  at::Tensor block_forward(size_t i, const at::Tensor& x, const SequenceContext& ctx);
  std::vector<at::Tensor> block_parameters(size_t i);
};
TORCH_MODULE(HybridLM);

// The SequenceContext that a config's parallel section asks for.
// `offload`: the job's memory nodes when parallel.softmax_method is OFFLOAD.
SequenceContext make_context(const pb::ParallelConfig& parallel, const SequenceLayout& layout, const CommPtr& sp,
                             offload::OffloadClient* offload = nullptr);
// Checks that every chunk of `layout` can carry the model: sliding-window and
// convolution halos fit in a chunk, Titans chunks align. ConfigError otherwise,
// naming the numbers and a length that works.
void check_sequence_length(const pb::ModelConfig& model, const SequenceLayout& layout);
// Checks the head-parallel methods (softmax ULYSSES / USP, LINEAR_ULYSSES)
// against the model's head counts at `sp` ranks (ConfigError naming the field
// and the count) and returns a line describing the sequence-parallel methods
// (all-to-all group, ring degree, KV-head replication) for --dry-run and the log.
std::string check_parallel_methods(const pb::ModelConfig& model, const pb::ParallelConfig& parallel, int sp);
// The smallest length >= n that check_sequence_length accepts for `sp` ranks.
int64_t admissible_length(const pb::ModelConfig& model, LayoutKind kind, int sp, int64_t n);
// The recompute mode of train.recompute.
RecomputeMode recompute_mode(pb::TrainConfig::Recompute recompute);
// LossFn of a HybridLM: summed cross-entropy of the shard's labels, by the
// chunked loss (never [N, vocab] logits at once).
LossFn language_model_loss(const pb::ParallelConfig& parallel,
                                    offload::OffloadClient* offload = nullptr);
// Called after each generated token with the number generated so far (the
// launcher prints progress with it); may be empty.
using GenerationProgress = std::function<void(int64_t generated)>;

// Greedy continuation of `prompt` by `new_tokens` tokens, computed by the sp
// group together (every rank returns the same tokens).
std::vector<int64_t> generate_greedy(HybridLMImpl& model, const std::vector<int64_t>& prompt, int64_t new_tokens,
                                     const pb::ParallelConfig& parallel, const CommPtr& sp,
                                     offload::OffloadClient* offload = nullptr,
                                     const GenerationProgress& progress = nullptr);

// Greedy continuation of several prompts of equal length, one token at a time
// with per-layer caches, on this rank alone (no sequence parallelism). With
// `offload`, the full-attention layers' KV caches live on the memory nodes
// (Lamina), as sequences first_sequence, first_sequence + 1, ..., closed at
// the end. Mixers without incremental decoding (Titans) throw UnsupportedError.
std::vector<std::vector<int64_t>> generate_incremental(HybridLMImpl& model,
                                                       const std::vector<std::vector<int64_t>>& prompts,
                                                       int64_t new_tokens, offload::OffloadClient* offload = nullptr,
                                                       int64_t first_sequence = 0,
                                                       const GenerationProgress& progress = nullptr);

}  // namespace loom::models
