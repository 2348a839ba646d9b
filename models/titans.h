// Titans: neural long-term memory (Behrouz et al.) and the three ways of
// using it as a mixer.
//
// NeuralMemory: per head, an MLP M (depth 1 = a d x d matrix) learns at test
// time. k, v, q come from SiLU(short conv(x W)) with L2-normalised q, k. The
// inner loss is l_t(M) = ||M(k_t) - v_t||^2. Tokens are taken in chunks of b;
// inside chunk c every gradient is taken at the chunk's starting weights W_c:
//     u_t = theta_t grad l_t(W_c) (theta_t <= max_lr / b),  S_t = eta_t S_(t-1) - u_t,  W_t = (1 - alpha_t) W_(t-1) + S_t
// with data-dependent gates theta (learning rate), eta (momentum), alpha
// (forgetting). Retrieval for chunk c reads M with W_c (strictly causal). The
// inner gradient is derived by hand as batched matmuls, so the outer loss
// back-propagates through every update (second order through the memory).
// Within a chunk the recurrences have closed forms with cumulative gate
// products computed in log space (no division by small products).
//
// Across ranks, exactly:
//  * depth 1: a chunk maps X = [W | S] to X T + B, affine in the state. Each
//    rank composes its chunks' (T, B), one differentiable AllGather shares
//    them, and every rank forms the state entering its chunks (LASP-2 style).
//  * depth >= 2: the state is passed rank to rank (parallel/state_chain.h).
//
// Mixers (all [B, n, D] -> [B, n, D], sequence-parallel like every mixer):
//   M  MAL: memory as a layer, then sliding-window attention;
//   G  MAG: sliding-window attention and memory read, each RMS-normalised,
//      multiplied (the memory gates the attention);
//   X  MAC: per segment (= memory chunk), attention over [persistent tokens |
//      retrieved memory | segment] with causal masks on the last two, the
//      memory then learns from the attention output, and the output is gated
//      by a memory read. The attention sits inside the recurrence, so MAC's
//      state always travels rank to rank.
// Titans mixers need the layout's chunk length to be a multiple of
// model.memory_chunk (memory chunks never straddle ranks); other lengths are
// rejected with a message naming both numbers.
// Packed documents: the memory returns to its initial state at each document
// start (linear memory: the chunk's map becomes X -> X0 T + B; deep memory and
// MAC: the chain step resets the rows that start a document), which needs
// documents to start at multiples of model.memory_chunk.
#pragma once


#include "loom/models/layers.h"
#include "loom/models/mixers.h"
#include "loom/parallel/state_chain.h"

namespace loom::models {

class NeuralMemoryImpl : public torch::nn::Module {
 public:
  // own_projections = false: only the memory (initial weights, gates) for a
  // caller that makes q, k, v itself (MAC).
  explicit NeuralMemoryImpl(const pb::ModelConfig& config, bool own_projections = true);
  // Reads the memory at each token (with the weights of its chunk's start) while
  // it learns from the tokens of x; returns [B, n, D] (heads merged, projected).
  at::Tensor forward(const at::Tensor& x, const SequenceContext& ctx);

  int64_t heads() const { return heads_; }
  int64_t head_dim() const { return dim_; }
  int64_t depth() const { return depth_; }
  int64_t chunk() const { return chunk_; }
  // Depth 1 normally takes the affine AllGather path; this forces the serial
  // chain instead (the two must agree exactly: tests compare them).
  void force_state_chain(bool on) { force_chain_ = on; }

  // Building blocks shared with MAC.
  std::vector<at::Tensor> initial_weights() const;  // [1, H, out, in] per layer
  at::Tensor read(const std::vector<at::Tensor>& weights, const at::Tensor& q) const;  // q [B, H, n, d]
  // One chunk update of (weights, momentum) from k, v [B, H, b, d] and the
  // chunk's gate logits [B, b, 3H].
  void update(std::vector<at::Tensor>& weights, std::vector<at::Tensor>& momentum, const at::Tensor& k,
              const at::Tensor& v, const at::Tensor& gate_logits) const;
  at::Tensor gate_logits(const at::Tensor& x) { return gates_(x); }
  int64_t state_numel() const;  // per batch element: weights and momentum, all heads
  at::Tensor pack_state(const std::vector<at::Tensor>& w, const std::vector<at::Tensor>& s) const;
  void unpack_state(const at::Tensor& flat, std::vector<at::Tensor>& w, std::vector<at::Tensor>& s) const;
  at::Tensor initial_state_flat() const;  // [state_numel]: initial weights, zero momentum
  // Rows where reset [B] is nonzero go back to the initial weights and zero
  // momentum (a document starts), differentiably.
  void reset_where(const at::Tensor& reset, std::vector<at::Tensor>& weights, std::vector<at::Tensor>& momentum) const;

 private:
  at::Tensor project(const at::Tensor& x, Projection& proj, const at::Tensor& conv_weight,
                     const SequenceContext& ctx, bool normalise);
  at::Tensor forward_affine(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& gates,
                            const SequenceContext& ctx);
  at::Tensor forward_chain(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& gates,
                           const SequenceContext& ctx);

  int64_t model_dim_, heads_, dim_, hidden_, depth_, chunk_;
  bool force_chain_ = false;
  double max_lr_;
  std::vector<std::pair<int64_t, int64_t>> shapes_;  // (out, in) per layer
  Projection q_{nullptr}, k_{nullptr}, v_{nullptr}, gates_{nullptr}, o_{nullptr};
  at::Tensor conv_q_, conv_k_, conv_v_;
  at::Tensor init_;  // [H, sum(out * in)]
  std::shared_ptr<ChainStep> chain_step_;
};
TORCH_MODULE(NeuralMemory);

class TitansMALMixer : public MixerImpl {
 public:
  explicit TitansMALMixer(const pb::ModelConfig& config);
  at::Tensor forward(const at::Tensor& x, const SequenceContext& ctx) override;

 private:
  NeuralMemory memory_{nullptr};
  std::shared_ptr<SoftmaxAttentionMixer> attention_;
};

class TitansMAGMixer : public MixerImpl {
 public:
  explicit TitansMAGMixer(const pb::ModelConfig& config);
  at::Tensor forward(const at::Tensor& x, const SequenceContext& ctx) override;

 private:
  NeuralMemory memory_{nullptr};
  std::shared_ptr<SoftmaxAttentionMixer> attention_;
  RMSNorm attention_norm_{nullptr}, memory_norm_{nullptr};
  Projection o_{nullptr};
};

class TitansMACMixer : public MixerImpl {
 public:
  explicit TitansMACMixer(const pb::ModelConfig& config);
  at::Tensor forward(const at::Tensor& x, const SequenceContext& ctx) override;

 private:
  // One layout chunk: segments of memory_chunk tokens, state in/out.
  std::pair<at::Tensor, at::Tensor> run_chunk(const at::Tensor& inputs, const at::Tensor& state);

  int64_t dim_, heads_, head_dim_, persistent_;
  NeuralMemory memory_{nullptr};
  Projection attn_q_{nullptr}, attn_k_{nullptr}, attn_v_{nullptr}, attn_o_{nullptr};
  Projection mem_q_{nullptr}, mem_k_{nullptr}, mem_v_{nullptr}, o_{nullptr};
  at::Tensor persistent_tokens_;
  std::shared_ptr<ChainStep> chain_step_;
};

// Checks that the layout's chunks hold whole memory chunks.
void check_memory_chunking(const SequenceLayout& layout, int64_t memory_chunk);

// Documents: [B, n / memory_chunk], 1 where a memory chunk of this rank's
// tokens starts a document (undefined without documents). The memory returns
// to its initial state there. Documents must start at multiples of
// memory_chunk (memory chunks never straddle documents, so the result equals
// each document run alone); ConfigError names the first that does not.
at::Tensor memory_chunk_resets(const SequenceContext& ctx, int64_t memory_chunk, const at::TensorOptions& options);

}  // namespace loom::models
