#include "loom/models/hybrid_lm.h"

#include <google/protobuf/text_format.h>
#include <torch/autograd.h>

#include <cstring>
#include <map>
#include <optional>
#include <sstream>
#include <unordered_map>

#include "loom/models/chunked_loss.h"
#include "loom/models/titans.h"
#include "loom/parallel/softmax_attention/offload_attention.h"
#include "loom/parallel/softmax_attention/ulysses.h"
#include "loom/runtime/comm/comm_order.h"
#include "loom/runtime/core/dtypes.h"
#include "loom/runtime/core/error.h"
#include "loom/runtime/core/profile.h"

namespace loom::models {
namespace {

// Backward timing of a block (--profile): identity markers at the block's
// output and input. The CPU autograd engine runs one node at a time, so the
// output marker's backward runs when the block's backward starts and the input
// marker's when it ends (every user of the block's input, the residual too,
// has delivered its gradient). Both pass the gradient through untouched.
std::unordered_map<int64_t, profile::Clock::time_point>& block_backward_starts() {
  static std::unordered_map<int64_t, profile::Clock::time_point> starts;
  return starts;
}

struct BlockBackwardStartMarker : public torch::autograd::Function<BlockBackwardStartMarker> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, int64_t block) {
    ctx->saved_data["block"] = block;
    return x;
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    block_backward_starts()[ctx->saved_data["block"].toInt()] = profile::Clock::now();
    return {grads[0], at::Tensor()};
  }
};

struct BlockBackwardEndMarker : public torch::autograd::Function<BlockBackwardEndMarker> {
  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& x, int64_t block,
                            int64_t kind) {
    ctx->saved_data["block"] = block;
    ctx->saved_data["kind"] = kind;  // the mixer letter
    return x;
  }
  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto it = block_backward_starts().find(ctx->saved_data["block"].toInt());
    if (it != block_backward_starts().end()) {
      profile::global().add(std::string("backward ") + static_cast<char>(ctx->saved_data["kind"].toInt()),
                            profile::seconds_since(it->second));
      block_backward_starts().erase(it);
    }
    return {grads[0], at::Tensor(), at::Tensor()};
  }
};

// BASED 360M: linear attention at layers 1,6,11,16,21, sliding window at
// 2,7,12,17,22 (1-based), BaseConv elsewhere, 27 layers.
std::string based_pattern(int layers, const std::vector<int>& linear, const std::vector<int>& window) {
  std::string p(layers, 'C');
  for (int i : linear) p[i - 1] = 'L';
  for (int i : window) p[i - 1] = 'W';
  return p;
}

std::string repeat(const std::string& unit, int times) {
  std::string s;
  for (int i = 0; i < times; ++i) s += unit;
  return s;
}

const std::map<std::string, std::string>& presets() {
  static const std::map<std::string, std::string> table = {
      {"based-360m",
       "pattern: '" + based_pattern(27, {1, 6, 11, 16, 21}, {2, 7, 12, 17, 22}) +
           "' vocab_size: 50264 d_model: 1024 n_heads: 16 d_ff: 2048 feature_dim: 16 feature_map: 'taylor' "
           "linear_normalize: true window: 64 conv_kernel: 3 tie_embeddings: true"},
      {"linear-llama3-1b",
       "pattern: '" + repeat("L", 16) +
           "' vocab_size: 128256 d_model: 2048 n_heads: 32 n_kv_heads: 8 d_ff: 8192 feature_dim: 0 "
           "feature_map: 'identity' linear_normalize: false tie_embeddings: true rope_theta: 500000"},
      {"linear-llama3-1b-hybrid",
       "pattern: '" + repeat("LLLA", 4) +
           "' vocab_size: 128256 d_model: 2048 n_heads: 32 n_kv_heads: 8 d_ff: 8192 feature_dim: 0 "
           "feature_map: 'identity' linear_normalize: false tie_embeddings: true rope_theta: 500000"},
      // GLA 1.3B (Yang et al. 2024; fla-hub/gla-1.3B-100B): 24 layers, d 2048, 4 heads, keys
      // half the width (feature_dim 256 per head), SwiGLU 5632, 32000 tokens, untied.
      // Loom's gate is one scalar per head (GLA's is per key channel).
      {"gla-1.3b", "pattern: '" + repeat("K", 24) +
                       "' vocab_size: 32000 d_model: 2048 n_heads: 4 d_ff: 5632 feature_dim: 256 "
                       "tie_embeddings: false norm_eps: 1e-6"},
      {"titans-mac", "pattern: '" + repeat("X", 12) +
                         "' vocab_size: 32000 d_model: 768 n_heads: 12 d_ff: 2048 memory_depth: 2 memory_chunk: 64 "
                         "persistent_tokens: 16 window: 512"},
      {"titans-mag", "pattern: '" + repeat("G", 12) +
                         "' vocab_size: 32000 d_model: 768 n_heads: 12 d_ff: 2048 memory_depth: 2 memory_chunk: 64 "
                         "window: 512"},
      {"titans-mal", "pattern: '" + repeat("M", 12) +
                         "' vocab_size: 32000 d_model: 768 n_heads: 12 d_ff: 2048 memory_depth: 2 memory_chunk: 64 "
                         "window: 512"},
      // Qwen3-Next-style hybrid (3 Gated DeltaNet : 1 gated GQA softmax
      // attention) at the size of Qwen3.5-27B, the dense published model of
      // that family (Qwen3-Next-80B-A3B is MoE; Loom has no MoE): hidden 5120,
      // 64 layers, SwiGLU 17408, vocabulary 248320 untied; Gated DeltaNet with
      // 16 q/k heads and 48 value heads of 128, conv 4. Loom's attention has
      // head dim d_model / n_heads, so its 24 heads of 256 become 20 heads of
      // 256 (4 KV heads): 26.64B parameters against the published 27B.
      {"qwen35-27b",
       "pattern: '" + repeat("DDDA", 16) +
           "' vocab_size: 248320 d_model: 5120 n_heads: 20 n_kv_heads: 4 d_ff: 17408 tie_embeddings: false "
           "rope_theta: 10000000 norm_eps: 1e-6 conv_kernel: 4 delta_key_heads: 16 delta_value_heads: 48 "
           "delta_key_dim: 128 delta_value_dim: 128 attention_output_gate: true block_size: 64"},
      // Tiny versions for tests and the demo.
      {"tiny-based",
       "pattern: 'LWC' vocab_size: 256 d_model: 32 n_heads: 2 d_ff: 64 feature_dim: 4 feature_map: 'taylor' "
       "linear_normalize: true window: 4 conv_kernel: 3 block_size: 4"},
      {"tiny-linear-llama",
       "pattern: 'LL' vocab_size: 256 d_model: 32 n_heads: 4 n_kv_heads: 2 d_ff: 64 feature_dim: 0 "
       "feature_map: 'elu' linear_normalize: true block_size: 4"},
      {"tiny-linear-llama-hybrid",
       "pattern: 'LLLA' vocab_size: 256 d_model: 32 n_heads: 4 n_kv_heads: 2 d_ff: 64 feature_dim: 0 "
       "feature_map: 'elu' linear_normalize: true block_size: 4"},
      {"tiny-gla",
       "pattern: 'KK' vocab_size: 256 d_model: 32 n_heads: 2 d_ff: 64 feature_dim: 8 tie_embeddings: false "
       "block_size: 4"},
      {"tiny-qwen35",
       "pattern: 'DDDA' vocab_size: 256 d_model: 32 n_heads: 4 n_kv_heads: 2 d_ff: 64 conv_kernel: 4 "
       "delta_key_heads: 2 delta_value_heads: 4 delta_key_dim: 8 delta_value_dim: 6 attention_output_gate: true "
       "block_size: 4"},
      {"tiny-titans-mac",
       "pattern: 'XL' vocab_size: 256 d_model: 16 n_heads: 2 d_ff: 32 memory_depth: 2 memory_chunk: 2 "
       "persistent_tokens: 2 window: 4 feature_dim: 4 feature_map: 'elu' block_size: 4"},
      {"tiny-titans-mag",
       "pattern: 'GC' vocab_size: 256 d_model: 16 n_heads: 2 d_ff: 32 memory_depth: 1 memory_chunk: 2 window: 4"},
      {"tiny-titans-mal",
       "pattern: 'MC' vocab_size: 256 d_model: 16 n_heads: 2 d_ff: 32 memory_depth: 2 memory_chunk: 2 window: 4"},
  };
  return table;
}

int64_t kv_heads(const pb::ModelConfig& c) { return c.n_kv_heads() > 0 ? c.n_kv_heads() : c.n_heads(); }

int64_t memory_params(const pb::ModelConfig& c, bool own_projections) {
  const int64_t D = c.d_model(), H = c.n_heads(), d = D / H, hidden = c.memory_expansion() * d, K = c.conv_kernel();
  int64_t weights = 0, in = d;
  for (int64_t l = 0; l < c.memory_depth(); ++l) {
    const int64_t out = l + 1 == c.memory_depth() ? d : hidden;
    weights += out * in;
    in = out;
  }
  int64_t n = H * weights + D * 3 * H + 3 * H;
  if (own_projections) n += 4 * D * D + 3 * D * K;
  return n;
}

int64_t attention_params(const pb::ModelConfig& c) {
  const int64_t D = c.d_model(), H = c.n_heads(), d = D / H;
  return D * H * d + 2 * D * kv_heads(c) * d + H * d * D;
}

// q, k, v, z (output gate), b, a projections, the short conv over q, k, v,
// A_log and dt_bias per value head, the norm weight, the output projection.
int64_t gated_delta_params(const pb::ModelConfig& c) {
  const int64_t D = c.d_model(), keys = c.delta_key_heads() * c.delta_key_dim(),
                values = c.delta_value_heads() * c.delta_value_dim(), heads = c.delta_value_heads();
  return D * (2 * keys + 2 * values) + 2 * D * heads + (2 * keys + values) * c.conv_kernel() + 2 * heads +
         c.delta_value_dim() + values * D;
}

int64_t mixer_params(char letter, const pb::ModelConfig& c) {
  const int64_t D = c.d_model(), H = c.n_heads(), d = D / H, f = c.feature_dim();
  switch (letter) {
    case 'L': {
      int64_t n = D * H * f + D * kv_heads(c) * f + D * kv_heads(c) * d + H * d * D;
      if (c.feature_map() == "hedgehog") n += H * f * f;
      return n;
    }
    case 'K': {
      const int64_t rank = GatedLinearAttentionMixer::kGateRank;
      return D * H * f + D * kv_heads(c) * f + D * kv_heads(c) * d  // q, k, v
             + D * rank + rank * H + H                             // gate: low rank with bias
             + D * H * d + H * d * D + d;                          // output gate, o, per-head norm
    }
    case 'A':
    case 'W': return attention_params(c) + (c.attention_output_gate() ? D * H * d : 0);
    case 'D': return gated_delta_params(c);
    case 'C': return 4 * D * D + 2 * D * D + 2 * D * c.conv_kernel() + 2 * D;
    case 'M': return memory_params(c, true) + attention_params(c);
    case 'G': return memory_params(c, true) + attention_params(c) + 2 * D + D * D;
    case 'X': return memory_params(c, false) + 8 * D * D + std::max<int64_t>(c.persistent_tokens(), 1) * D;
    default: break;
  }
  throw ConfigError(std::string("model.pattern: letter '") + letter + "' is not a mixer");
}

}  // namespace

std::vector<std::string> preset_names() {
  std::vector<std::string> names;
  for (const auto& [name, text] : presets()) names.push_back(name);
  return names;
}

pb::ModelConfig resolve_model_config(const pb::ModelConfig& user) {
  pb::ModelConfig c;
  if (!user.preset().empty()) {
    auto it = presets().find(user.preset());
    if (it == presets().end()) {
      std::string known;
      for (const auto& n : preset_names()) known += (known.empty() ? "" : ", ") + n;
      throw ConfigError("model.preset = '" + user.preset() + "': allowed values are " + known);
    }
    if (!google::protobuf::TextFormat::ParseFromString(it->second, &c))
      throw ConfigError("internal error: preset '" + user.preset() + "' does not parse");
  }
  c.MergeFrom(user);  // fields the user set win over the preset
  if (c.n_kv_heads() == 0) c.set_n_kv_heads(c.n_heads());
  if (c.d_ff() == 0) c.set_d_ff(default_mlp_hidden(c.d_model()));
  if (c.feature_dim() == 0) c.set_feature_dim(c.d_model() / c.n_heads());
  if (c.delta_key_heads() == 0) c.set_delta_key_heads(c.n_heads());
  if (c.delta_value_heads() == 0) c.set_delta_value_heads(c.delta_key_heads());
  if (c.delta_key_dim() == 0) c.set_delta_key_dim(c.d_model() / c.n_heads());
  if (c.delta_value_dim() == 0) c.set_delta_value_dim(c.delta_key_dim());
  return c;
}

int64_t count_parameters(const pb::ModelConfig& c) {
  const int64_t D = c.d_model(), V = c.vocab_size();
  int64_t n = V * D + D + (c.tie_embeddings() ? 0 : V * D);
  for (char letter : c.pattern()) n += mixer_params(letter, c) + 2 * D + 3 * D * c.d_ff();
  return n;
}

HybridLMImpl::HybridLMImpl(const pb::ModelConfig& c, at::TensorOptions options) : config_(c) {
  ParameterScope scope(options);
  TORCH_CHECK(c.n_kv_heads() > 0 && c.d_ff() > 0 && c.feature_dim() > 0,
              "HybridLM: pass a config through resolve_model_config() first");
  const int64_t D = c.d_model();
  embedding_ = register_module("embedding", TokenEmbedding(c.vocab_size(), D));
  {
    torch::NoGradGuard no_grad;
    embedding_->weight.normal_(0, 0.02);
  }
  for (size_t i = 0; i < c.pattern().size(); ++i) {
    const std::string id = std::to_string(i);
    mixer_norms_.push_back(register_module("block" + id + "_mixer_norm", RMSNorm(D, c.norm_eps())));
    mixers_.push_back(register_module("block" + id + "_mixer", make_mixer(c.pattern()[i], c)));
    mixer_weights_.push_back(mixers_.back()->parameters().front());
    mlp_norms_.push_back(register_module("block" + id + "_mlp_norm", RMSNorm(D, c.norm_eps())));
    mlps_.push_back(register_module("block" + id + "_mlp", SwiGLU(D, c.d_ff())));
  }
  final_norm_ = register_module("final_norm", RMSNorm(D, c.norm_eps()));
  if (!c.tie_embeddings()) head_ = register_module("head", make_projection(D, c.vocab_size()));
}

at::Tensor HybridLMImpl::forward(const at::Tensor& tokens, const SequenceContext& ctx) {
  const at::Tensor x = hidden(tokens, ctx);
  return head_ ? head_(x) : at::matmul(x, embedding_->weight.t());
}

at::Tensor HybridLMImpl::block_forward(size_t i, const at::Tensor& input, const SequenceContext& ctx) {
  // A mixer kept in another dtype (set_precision) works in its own.
  const at::Tensor mixed = mixer_norms_[i](input);
  const auto own = mixer_weights_[i].scalar_type();
  const at::Tensor mixer_out = own == input.scalar_type()
                                   ? mixers_[i]->forward(mixed, ctx)
                                   : mixers_[i]->forward(mixed.to(own), ctx).to(input.scalar_type());
  const at::Tensor x = input + mixer_out;
  return x + mlps_[i](mlp_norms_[i](x));
}

std::vector<at::Tensor> HybridLMImpl::block_parameters(size_t i) {
  std::vector<at::Tensor> params;
  for (torch::nn::Module* m : std::initializer_list<torch::nn::Module*>{mixer_norms_[i].get(), mixers_[i].get(),
                                                                       mlp_norms_[i].get(), mlps_[i].get()})
    for (const auto& p : m->parameters()) params.push_back(p);
  return params;
}

at::Tensor HybridLMImpl::hidden(const at::Tensor& tokens, const SequenceContext& given) {
  TORCH_CHECK(tokens.dim() == 2 && tokens.size(1) == given.layout.local_len(), "HybridLM: tokens ", tokens.sizes(),
              " must be [B, ", given.layout.local_len(), "] for ", given.layout.describe());
  if (given.doc_start.defined()) check_document_starts(given.doc_start, tokens, 1, "HybridLM");
  if (recompute_ != RecomputeMode::kNone && given.offload)
    throw UnsupportedError(
        "train.recompute with parallel.softmax_method = OFFLOAD: a recomputed block would send its keys and values "
        "to the memory nodes again; use train.recompute = NONE with offload");
  // Where rotary positions restart is a property of the model (its config).
  SequenceContext ctx = given;
  ctx.positions_per_document = config_.positions_per_document();
  CommOrder::reset();  // this forward's communications form one ordered chain
  if (ctx.offload) ctx.offload->close_calls(ctx.comm);  // the previous step's K,V on the memory nodes
  at::Tensor x = embedding_(tokens);
  // --profile: per-kind forward timers and backward markers; nothing when off.
  const bool profiled = profile::layers_active();
  const bool mark_backward = profiled && at::GradMode::is_enabled() && x.requires_grad();
  for (size_t i = 0; i < mixers_.size(); ++i) {
    const profile::ScopedTimer forward_timer(profiled ? std::string("forward ") + config_.pattern()[i] : std::string(),
                                             profiled);
    if (mark_backward)
      x = BlockBackwardEndMarker::apply(x, static_cast<int64_t>(i), static_cast<int64_t>(config_.pattern()[i]));
    if (recompute_ == RecomputeMode::kNone)
      x = block_forward(i, x, ctx);
    else
      x = recompute_block([this, i, ctx](const at::Tensor& input) { return block_forward(i, input, ctx); }, x,
                          block_parameters(i), recompute_);
    if (mark_backward) x = BlockBackwardStartMarker::apply(x, static_cast<int64_t>(i));
  }
  // The loss must reach the last communication on every rank (CommOrder).
  return CommOrder::close(final_norm_(x));
}

const at::Tensor& HybridLMImpl::head_weight() const { return head_ ? head_->weight : embedding_->weight; }
at::Tensor HybridLMImpl::head_bias() const { return head_ ? head_->bias : at::Tensor(); }

at::Tensor HybridLMImpl::decode_step(const at::Tensor& tokens, std::vector<DecodeCache>& caches, DecodeContext ctx) {
  TORCH_CHECK(tokens.dim() == 2 && tokens.size(1) == 1, "HybridLM::decode_step: tokens ", tokens.sizes(),
              " must be [sequences, 1]");
  caches.resize(mixers_.size());
  if (ctx.doc_start.defined()) {
    TORCH_CHECK(ctx.doc_start.dim() == 1 && ctx.doc_start.size(0) == tokens.size(0) &&
                    ctx.doc_start.scalar_type() == at::kLong,
                "HybridLM::decode_step: doc_start must be int64 [sequences = ", tokens.size(0), "], got ",
                ctx.doc_start.sizes());
    TORCH_CHECK(ctx.doc_start.le(ctx.position).all().item<bool>(),
                "HybridLM::decode_step: a document starts after the new token's position ", ctx.position);
    if (ctx.offload) {
      // The memory nodes' caches of sequences that start a document now are
      // closed (every layer); the next DECODE opens fresh ones.
      const at::Tensor starts = ctx.starts_document().cpu();
      std::vector<int64_t> closing;
      for (int64_t s = 0; s < starts.size(0); ++s)
        if (starts[s].item<bool>() && ctx.position > 0) closing.push_back(ctx.sequences.at(static_cast<size_t>(s)));
      if (!closing.empty()) ctx.offload->close_sequences(closing);
    }
  }
  at::Tensor x = embedding_(tokens);
  for (size_t i = 0; i < mixers_.size(); ++i) {
    ctx.layer = static_cast<int64_t>(i);
    const at::Tensor mixed = mixer_norms_[i](x);
    const auto own = mixer_weights_[i].scalar_type();
    x = x + mixers_[i]->decode(mixed.to(own), caches[i], ctx).to(x.scalar_type());
    x = x + mlps_[i](mlp_norms_[i](x));
  }
  x = final_norm_(x);
  return head_ ? head_(x) : at::matmul(x, embedding_->weight.t());
}

std::vector<std::vector<int64_t>> generate_incremental(HybridLMImpl& model,
                                                       const std::vector<std::vector<int64_t>>& prompts,
                                                       int64_t new_tokens, offload::OffloadClient* offload,
                                                       int64_t first_sequence, const GenerationProgress& progress) {
  TORCH_CHECK(!prompts.empty() && !prompts[0].empty(), "generate: no prompt");
  for (const auto& p : prompts)
    TORCH_CHECK(p.size() == prompts[0].size(), "generate: batched prompts must have the same length, got ",
                p.size(), " and ", prompts[0].size());
  at::NoGradGuard no_grad;
  const int64_t S = static_cast<int64_t>(prompts.size()), n = static_cast<int64_t>(prompts[0].size());
  const at::Device device = model.parameters().front().device();
  DecodeContext ctx;
  ctx.offload = offload;
  for (int64_t s = 0; s < S; ++s) ctx.sequences.push_back(first_sequence + s);
  std::vector<DecodeCache> caches;
  std::vector<std::vector<int64_t>> out = prompts;
  at::Tensor logits;
  for (int64_t t = 0; t < n + new_tokens - 1; ++t) {
    at::Tensor column = at::empty({S, 1}, at::kLong);
    for (int64_t s = 0; s < S; ++s) column[s][0] = out[s][t];
    ctx.position = t;
    logits = model.decode_step(column.to(device), caches, ctx);
    if (t + 1 >= n) {
      const at::Tensor next = logits.select(1, 0).argmax(-1).cpu();
      for (int64_t s = 0; s < S; ++s) out[s].push_back(next[s].item<int64_t>());
      if (progress) progress(t + 2 - n);
    }
  }
  if (offload) offload->close_sequences(ctx.sequences);
  return out;
}

void HybridLMImpl::set_precision(at::ScalarType dtype) {
  to(dtype);
  if (!is_reduced_precision(dtype)) return;
  for (size_t i = 0; i < mixers_.size(); ++i)
    if (is_titans_mixer(config_.pattern()[i])) mixers_[i]->to(at::kFloat);
}

SequenceContext make_context(const pb::ParallelConfig& p, const SequenceLayout& layout, const CommPtr& sp,
                             offload::OffloadClient* offload) {
  SequenceContext ctx{layout, sp};
  ctx.offload = offload;
  switch (p.linear_method()) {
    case pb::LASP2: ctx.linear_method = linear_attention::LinearAttentionMethod::kLasp2; break;
    case pb::LASP2_ALLSCAN: ctx.linear_method = linear_attention::LinearAttentionMethod::kLasp2AllScan; break;
    case pb::LASP1: ctx.linear_method = linear_attention::LinearAttentionMethod::kLasp1; break;
    case pb::LINEAR_ULYSSES: ctx.linear_method = linear_attention::LinearAttentionMethod::kUlysses; break;
    default:
      throw UnsupportedError("parallel.linear_method = " + pb::LinearAttentionMethod_Name(p.linear_method()) +
                             " is not supported by this build");
  }
  switch (p.softmax_method()) {
    case pb::LOCAL: ctx.softmax_method = softmax_attention::SoftmaxMethod::kLocal; break;
    case pb::RING: ctx.softmax_method = softmax_attention::SoftmaxMethod::kRing; break;
    case pb::ALLGATHER: ctx.softmax_method = softmax_attention::SoftmaxMethod::kAllGather; break;
    case pb::OFFLOAD: ctx.softmax_method = softmax_attention::SoftmaxMethod::kOffload; break;
    case pb::ULYSSES: ctx.softmax_method = softmax_attention::SoftmaxMethod::kUlysses; break;
    case pb::USP:
      ctx.softmax_method = softmax_attention::SoftmaxMethod::kUsp;
      ctx.ulysses_degree = p.ulysses_degree();
      break;
    default:
      throw UnsupportedError("parallel.softmax_method = " + pb::SoftmaxMethod_Name(p.softmax_method()) +
                             " is not supported by this build");
  }
  return ctx;
}

namespace {
bool has_any(const std::string& pattern, const std::string& letters) {
  return pattern.find_first_of(letters) != std::string::npos;
}
// Tokens a chunk must hold at least, and the multiple it must be.
std::pair<int64_t, int64_t> chunk_requirements(const pb::ModelConfig& m) {
  int64_t min_len = 1, multiple = 1;
  if (has_any(m.pattern(), "WMG")) min_len = std::max<int64_t>(min_len, m.window() - 1);
  if (has_any(m.pattern(), "CMGD")) min_len = std::max<int64_t>(min_len, m.conv_kernel() - 1);
  if (has_any(m.pattern(), "MGX")) multiple = m.memory_chunk();
  return {min_len, multiple};
}
}  // namespace

void check_sequence_length(const pb::ModelConfig& m, const SequenceLayout& layout) {
  const auto [min_len, multiple] = chunk_requirements(m);
  if (layout.chunk_len() < min_len || layout.chunk_len() % multiple != 0) {
    const int64_t good = admissible_length(m, layout.kind(), layout.world_size(), layout.global_len());
    throw ConfigError("train.seq_len = " + std::to_string(layout.global_len()) + ": the " + layout.describe() +
                      " gives chunks of " + std::to_string(layout.chunk_len()) + " tokens, but model '" + m.pattern() +
                      "' needs chunks of at least " + std::to_string(min_len) + " tokens (window/convolution halos)" +
                      (multiple > 1 ? " and a multiple of model.memory_chunk = " + std::to_string(multiple) : "") +
                      "; the next length that works is " + std::to_string(good));
  }
}

std::string check_parallel_methods(const pb::ModelConfig& m, const pb::ParallelConfig& p, int sp) {
  std::ostringstream out;
  const bool softmax_layers = has_any(m.pattern(), "AW"), linear_layers = has_any(m.pattern(), "LKD");
  out << "sequence parallelism over " << sp << " ranks:";
  if (softmax_layers) {
    out << " softmax " << pb::SoftmaxMethod_Name(p.softmax_method());
    if (p.softmax_method() == pb::ULYSSES || p.softmax_method() == pb::USP) {
      const int U = p.softmax_method() == pb::USP && p.ulysses_degree() > 0 ? p.ulysses_degree() : sp;
      if (sp % U != 0)
        throw ConfigError("parallel.ulysses_degree = " + std::to_string(U) + ": must divide the sequence-parallel size " +
                          std::to_string(sp) + " (sp = ulysses_degree x ring degree)");
      if (m.n_heads() % U != 0)
        throw ConfigError("model.n_heads = " + std::to_string(m.n_heads()) + ": parallel.softmax_method = " +
                          pb::SoftmaxMethod_Name(p.softmax_method()) + " shards the heads over all-to-all groups of " +
                          std::to_string(U) + " ranks, which must divide it");
      const int64_t kv = m.n_kv_heads() > 0 ? m.n_kv_heads() : m.n_heads();
      const int64_t f = softmax_attention::ulysses_kv_replication(kv, U);
      if (sp / U > 1)
        out << " (all-to-all groups of " << U << " ranks, ring across " << sp / U << " groups";
      else
        out << " (one all-to-all group of " << U << " ranks, no ring";
      if (f > 1) out << "; " << kv << " KV heads repeated " << f << "x to divide among " << U << " ranks";
      out << ")";
    }
  }
  if (linear_layers) {
    out << (softmax_layers ? "," : "") << " linear " << pb::LinearAttentionMethod_Name(p.linear_method());
    if (p.linear_method() == pb::LINEAR_ULYSSES) {
      if (has_any(m.pattern(), "LK") && m.n_heads() % sp != 0)
        throw ConfigError("model.n_heads = " + std::to_string(m.n_heads()) +
                          ": parallel.linear_method = LINEAR_ULYSSES shards the heads over the " + std::to_string(sp) +
                          " sequence-parallel ranks, which must divide it");
      const int64_t key_heads = m.delta_key_heads() > 0 ? m.delta_key_heads() : m.n_heads();
      const int64_t value_heads = m.delta_value_heads() > 0 ? m.delta_value_heads() : key_heads;
      if (has_any(m.pattern(), "D") && value_heads % sp != 0)
        throw ConfigError("model.delta_value_heads = " + std::to_string(value_heads) +
                          ": parallel.linear_method = LINEAR_ULYSSES shards the Gated DeltaNet heads over the " +
                          std::to_string(sp) + " sequence-parallel ranks, which must divide it");
      out << " (all-to-all over " << sp << " ranks)";
    }
  }
  if (!softmax_layers && !linear_layers) out << " no attention layers";
  return out.str();
}

int64_t admissible_length(const pb::ModelConfig& m, LayoutKind kind, int sp, int64_t n) {
  const auto [min_len, multiple] = chunk_requirements(m);
  const int64_t chunks = static_cast<int64_t>(sp) * (kind == LayoutKind::kZigzag ? 2 : 1);
  const int64_t chunk = std::max(min_len, (n + chunks - 1) / chunks);
  return ((chunk + multiple - 1) / multiple) * multiple * chunks;
}

RecomputeMode recompute_mode(pb::TrainConfig::Recompute recompute) {
  switch (recompute) {
    case pb::TrainConfig::NONE: return RecomputeMode::kNone;
    case pb::TrainConfig::BLOCK: return RecomputeMode::kBlock;
    case pb::TrainConfig::SELECTIVE: return RecomputeMode::kSelective;
    default: break;
  }
  throw UnsupportedError("train.recompute = " + pb::TrainConfig::Recompute_Name(recompute) +
                         " is not supported by this build");
}

LossFn language_model_loss(const pb::ParallelConfig& parallel, offload::OffloadClient* offload) {
  return [parallel, offload](torch::nn::Module& module, const Batch& local, const SequenceLayout& layout,
                             const CommPtr& sp) {
    auto& model = dynamic_cast<HybridLMImpl&>(module);
    SequenceContext ctx = make_context(parallel, layout, sp, offload);
    ctx.doc_start = local.doc_start;
    const at::Tensor hidden = model.hidden(local.inputs, ctx);
    // Block by block of tokens, log-softmax in float32 at least (chunked_loss.h).
    return chunked_cross_entropy(hidden.reshape({-1, hidden.size(-1)}), model.head_weight(), model.head_bias(),
                                 local.labels.reshape({-1}));
  };
}

std::vector<int64_t> generate_greedy(HybridLMImpl& model, const std::vector<int64_t>& prompt, int64_t new_tokens,
                                     const pb::ParallelConfig& parallel, const CommPtr& sp,
                                     offload::OffloadClient* offload, const GenerationProgress& progress) {
  TORCH_CHECK(!prompt.empty(), "generate: the prompt is empty");
  const LayoutKind kind = parallel.layout() == pb::ZIGZAG ? LayoutKind::kZigzag : LayoutKind::kContiguous;
  at::NoGradGuard no_grad;
  std::vector<int64_t> tokens = prompt;
  const at::Device device = model.parameters().front().device();
  for (int64_t i = 0; i < new_tokens; ++i) {
    // Recompute the whole prefix, padded (after the real tokens) to a length
    // every mixer accepts; causality makes the padding invisible.
    const int64_t n = static_cast<int64_t>(tokens.size());
    const int64_t padded = admissible_length(model.config(), kind, sp->size(), n);
    at::Tensor seq = at::zeros({1, padded}, at::kLong);
    std::memcpy(seq.data_ptr<int64_t>(), tokens.data(), n * sizeof(int64_t));
    const SequenceLayout layout(kind, padded, sp->size());
    const at::Tensor local = layout.shard(seq, sp->rank(), 1).to(device);
    const at::Tensor logits = model.forward(local, make_context(parallel, layout, sp, offload));
    const at::Tensor all = layout.gather(logits, *sp, 1);
    tokens.push_back(all[0][n - 1].argmax().item<int64_t>());
    if (progress) progress(i + 1);
  }
  return tokens;
}

int64_t HybridLMImpl::parameter_count() {
  int64_t n = 0;
  for (const auto& p : parameters()) n += p.numel();
  return n;
}

}  // namespace loom::models
