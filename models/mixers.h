// Mixers: the sequence-mixing half of a block, one class per pattern letter.
//
//   L  LinearAttentionMixer   feature-mapped linear attention via LASP-2 /
//                             all-scan / LASP-1 (BASED: Taylor, dim 16, normalised)
//   A  SoftmaxAttentionMixer  GQA softmax attention with rotary on global
//                             positions, via local / ring / all-gather
//   W  SoftmaxAttentionMixer  the same with a sliding window, via the halo
//   C  BaseConvMixer          BASED's gated short convolution, via the halo
//   M, G, X                   Titans mixers (titans.h)
//
// Every mixer maps this rank's shard x [B, n, D] to [B, n, D] and runs
// unchanged at sp = 1 and sp > 1: the SequenceContext says how the sequence is
// split and the parallel/ operator does the rest. Collective over ctx.comm, in
// the same order on every rank (forward and backward).
#pragma once

#include <torch/nn/module.h>
#include "loom/models/layers.h"

#include <memory>

#include "loom/models/feature_maps.h"
#include "loom/models/sequence_context.h"
#include "loom/runtime/core/proto/loom.pb.h"

namespace loom::models {

// Incremental decoding (generation), one new token per sequence at a time.
// What a mixer keeps between tokens (L: the state S; A, W: cached keys and
// values, or nothing when the memory nodes hold them; C: the last K-1 inputs).
struct DecodeCache {
  std::vector<at::Tensor> tensors;
};
struct DecodeContext {
  int64_t position = 0;  // global position of the new token (the same for the whole batch)
  int64_t layer = 0;     // the mixer's layer index
  offload::OffloadClient* offload = nullptr;  // full-attention KV caches on memory nodes when set
  std::vector<int64_t> sequences;             // the batch's sequence ids (memory-node caches)
  // Packed documents: the global position of each sequence's current
  // document start, int64 [S] (on the model's device). The new token starts a
  // document when its entry equals `position`; the mixers then forget that
  // sequence's past (L: state to 0, C: window to 0, A/W: earlier keys hidden,
  // memory-node caches closed by HybridLM::decode_step). Undefined: one
  // document from position 0, today's decoding.
  at::Tensor doc_start;
  // [S] bool: the new token starts a document; undefined without doc_start.
  at::Tensor starts_document() const {
    return doc_start.defined() ? doc_start.eq(position) : at::Tensor();
  }
};

class MixerImpl : public torch::nn::Module {
 public:
  virtual at::Tensor forward(const at::Tensor& x, const SequenceContext& ctx) = 0;
  // x [S, 1, D]: the new token of S sequences; equals forward() on the whole
  // prefix at that position. Mixers without it throw UnsupportedError.
  virtual at::Tensor decode(const at::Tensor& x, DecodeCache& cache, const DecodeContext& ctx);
};
using Mixer = std::shared_ptr<MixerImpl>;

// The mixer for one pattern letter, sized from a resolved model config.
Mixer make_mixer(char letter, const pb::ModelConfig& config);
// M, G, X: the mixers with a Titans neural memory.
bool is_titans_mixer(char letter);

class LinearAttentionMixer : public MixerImpl {
 public:
  explicit LinearAttentionMixer(const pb::ModelConfig& config);
  at::Tensor forward(const at::Tensor& x, const SequenceContext& ctx) override;
  at::Tensor decode(const at::Tensor& x, DecodeCache& cache, const DecodeContext& ctx) override;

 private:
  int64_t heads_, kv_heads_, head_dim_, feature_dim_, block_;
  bool normalize_;
  at::Tensor decay_;  // [H] or undefined
  Projection q_{nullptr}, k_{nullptr}, v_{nullptr}, o_{nullptr};
  FeatureMap feature_map_{nullptr};
};

class SoftmaxAttentionMixer : public MixerImpl {
 public:
  // window 0: full causal attention.
  SoftmaxAttentionMixer(const pb::ModelConfig& config, int64_t window);
  at::Tensor forward(const at::Tensor& x, const SequenceContext& ctx) override;
  at::Tensor decode(const at::Tensor& x, DecodeCache& cache, const DecodeContext& ctx) override;

 private:
  int64_t heads_, kv_heads_, head_dim_, window_;
  double rope_theta_;
  bool positions_per_document_;
  Projection q_{nullptr}, k_{nullptr}, v_{nullptr}, o_{nullptr};
};

// BaseConv: in_proj D -> 4D split into u1, u2 (2D each); y = out_proj(SiLU(conv(u1)) * u2).
class BaseConvMixer : public MixerImpl {
 public:
  explicit BaseConvMixer(const pb::ModelConfig& config);
  at::Tensor forward(const at::Tensor& x, const SequenceContext& ctx) override;
  at::Tensor decode(const at::Tensor& x, DecodeCache& cache, const DecodeContext& ctx) override;

 private:
  int64_t dim_;
  Projection in_proj_{nullptr}, out_proj_{nullptr};
  at::Tensor conv_weight_, conv_bias_;
};

// [B, n, H*d] <-> [B, H, n, d]
at::Tensor split_heads(const at::Tensor& x, int64_t heads);
at::Tensor merge_heads(const at::Tensor& x);

}  // namespace loom::models
