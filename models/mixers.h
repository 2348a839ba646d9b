// Mixers: the sequence-mixing half of a block, one class per pattern letter.
//
//   L  LinearAttentionMixer   feature-mapped linear attention via LASP-2 /
//                             all-scan / LASP-1 (BASED: Taylor, dim 16, normalised)
//   A  SoftmaxAttentionMixer  GQA softmax attention with rotary on global
//                             positions, via local / ring / all-gather
//   W  SoftmaxAttentionMixer  the same with a sliding window, via the halo
//   C  BaseConvMixer          BASED's gated short convolution, via the halo
//   K  GatedLinearAttentionMixer  GLA-style gated linear attention (scalar
//                             data-dependent gate per token and head) via
//                             LASP-2 / all-scan / LASP-1
//   M, G, X                   Titans mixers (titans.h)
//   D  GatedDeltaNetMixer     Gated DeltaNet (Qwen3-Next's linear layer) via
//                             LASP-2 / all-scan / LASP-1 of its chunk maps
//
// Every mixer maps this rank's shard x [B, n, D] to [B, n, D] and runs
// unchanged at sp = 1 and sp > 1: the SequenceContext says how the sequence is
// split and the parallel/ operator does the rest. Collective over ctx.comm, in
// the same order on every rank (forward and backward).
#pragma once

#include <torch/nn/module.h>
#include "loom/models/layers.h"

#include <memory>
#include <tuple>
#include <utility>

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
  // model.attention_output_gate: out = o(attention * sigmoid(g(x))), per head and channel.
  at::Tensor gated(const at::Tensor& attention, const at::Tensor& x);
  int64_t heads_, kv_heads_, head_dim_, window_;
  double rope_theta_;
  bool positions_per_document_;
  Projection q_{nullptr}, k_{nullptr}, v_{nullptr}, o_{nullptr}, gate_{nullptr};
};

// Gated DeltaNet, the layer of the paper as Qwen3-Next ships it: q, k, v
// projections, a causal short conv over them (conv_kernel, no bias) and SiLU;
// q and k L2-normalised per head (q also scaled by 1/sqrt(d_k));
// beta = sigmoid(W_b x); log alpha = -exp(A_log) softplus(W_a x + dt_bias)
// (Mamba2's gate); the delta rule per value head
// (parallel/gated_delta/gated_delta.h); each head's output RMS-normalised
// (one weight over d_v shared by the heads) and gated by SiLU(W_z x); the
// output projection. Value heads may exceed key heads (a multiple of them:
// each q/k head serves delta_value_heads / delta_key_heads consecutive value
// heads); anything else is a ConfigError. Documents: the conv and the state
// both stop at a document start.
class GatedDeltaNetMixer : public MixerImpl {
 public:
  explicit GatedDeltaNetMixer(const pb::ModelConfig& config);
  at::Tensor forward(const at::Tensor& x, const SequenceContext& ctx) override;
  // Cache: the last conv_kernel - 1 conv inputs and the state [S, Hv, d_k, d_v].
  at::Tensor decode(const at::Tensor& x, DecodeCache& cache, const DecodeContext& ctx) override;

 private:
  // q, k [B, Hv, n, d_k] (normalised, repeated to the value heads), v [B, Hv, n, d_v]
  // from the conv output [B, n, 2 Hk d_k + Hv d_v].
  std::tuple<at::Tensor, at::Tensor, at::Tensor> heads_of(const at::Tensor& conv) const;
  // beta and log alpha [B, Hv, n] from x [B, n, D].
  std::pair<at::Tensor, at::Tensor> gates_of(const at::Tensor& x);
  // core [B, n, Hv, d_v] -> [B, n, D]: gated RMSNorm and the output projection.
  at::Tensor output_of(const at::Tensor& core, const at::Tensor& x);

  int64_t key_heads_, value_heads_, key_dim_, value_dim_, block_;
  double norm_eps_;
  Projection q_{nullptr}, k_{nullptr}, v_{nullptr}, z_{nullptr}, b_{nullptr}, a_{nullptr}, o_{nullptr};
  at::Tensor conv_weight_, a_log_, dt_bias_, norm_weight_;
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

// K: gated linear attention as GLA's layer (Yang et al. 2024), with one
// scalar gate per token and head (as Mamba2 / "simple GLA"):
//   q = x W_q / sqrt(f), k = x W_k  (f = feature_dim per head, no feature map)
//   v = x W_v                       (head_dim per head; k, v may be GQA heads)
//   log g = logsigmoid(x W_1 W_2 + b) / 16   (low rank 16, GLA's gate normaliser)
//   o = RMSNorm_per_head(attention) * SiLU(x W_g),  y = o W_o
// no normaliser. Incremental decoding keeps the state S [S, H, f, head_dim].
class GatedLinearAttentionMixer : public MixerImpl {
 public:
  explicit GatedLinearAttentionMixer(const pb::ModelConfig& config);
  at::Tensor forward(const at::Tensor& x, const SequenceContext& ctx) override;
  at::Tensor decode(const at::Tensor& x, DecodeCache& cache, const DecodeContext& ctx) override;
  // Rank of the gate projection and the divisor of its log-sigmoid (GLA's values).
  static constexpr int64_t kGateRank = 16;
  static constexpr double kGateNormaliser = 16.0;

 private:
  // q, k, v [B, H, n, *] and the log gates [B, H, n] of x [B, n, D].
  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> project(const at::Tensor& x);
  // The attention output [B, H, n, head_dim] -> y [B, n, D].
  at::Tensor output(const at::Tensor& attended, const at::Tensor& x);

  int64_t heads_, kv_heads_, head_dim_, key_dim_, block_;
  Projection q_{nullptr}, k_{nullptr}, v_{nullptr}, gate_down_{nullptr}, gate_up_{nullptr}, output_gate_{nullptr},
      o_{nullptr};
  RMSNorm out_norm_{nullptr};
};

// [B, n, H*d] <-> [B, H, n, d]
at::Tensor split_heads(const at::Tensor& x, int64_t heads);
at::Tensor merge_heads(const at::Tensor& x);

}  // namespace loom::models
