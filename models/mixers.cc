#include "loom/models/mixers.h"

#include <cmath>

#include "loom/models/layers.h"
#include "loom/models/titans.h"
#include "loom/parallel/gated_delta/gated_delta.h"
#include "loom/parallel/linear_attention/decay.h"
#include "loom/parallel/linear_attention/lasp.h"
#include "loom/parallel/short_conv.h"
#include "loom/parallel/softmax_attention/blockwise_kernel.h"
#include "loom/parallel/softmax_attention/offload_attention.h"
#include "loom/parallel/softmax_attention/rotary.h"
#include "loom/runtime/core/error.h"

namespace loom::models {

at::Tensor split_heads(const at::Tensor& x, int64_t heads) {
  return x.reshape({x.size(0), x.size(1), heads, x.size(2) / heads}).transpose(1, 2);
}
at::Tensor merge_heads(const at::Tensor& x) {
  return x.transpose(1, 2).reshape({x.size(0), x.size(2), x.size(1) * x.size(3)});
}

namespace {
int64_t kv_heads_of(const pb::ModelConfig& c) { return c.n_kv_heads() > 0 ? c.n_kv_heads() : c.n_heads(); }
}  // namespace

at::Tensor MixerImpl::decode(const at::Tensor&, DecodeCache&, const DecodeContext&) {
  throw UnsupportedError(std::string("incremental decoding is not offered by the ") + name() +
                         " mixer (Titans memories update per chunk); generate by recomputing the prefix");
}

// ---- L ----
LinearAttentionMixer::LinearAttentionMixer(const pb::ModelConfig& c)
    : heads_(c.n_heads()),
      kv_heads_(kv_heads_of(c)),
      head_dim_(c.d_model() / c.n_heads()),
      feature_dim_(c.feature_dim() > 0 ? c.feature_dim() : c.d_model() / c.n_heads()),
      block_(c.block_size()),
      normalize_(c.linear_normalize()) {
  const int64_t D = c.d_model();
  q_ = register_module("q", make_projection(D, heads_ * feature_dim_));
  k_ = register_module("k", make_projection(D, kv_heads_ * feature_dim_));
  v_ = register_module("v", make_projection(D, kv_heads_ * head_dim_));
  o_ = register_module("o", make_projection(heads_ * head_dim_, D));
  feature_map_ = register_module("feature_map", FeatureMap(parse_feature_map(c.feature_map()), heads_, feature_dim_));
  if (c.linear_decay()) decay_ = linear_attention::default_decay(heads_);
}

at::Tensor LinearAttentionMixer::forward(const at::Tensor& x, const SequenceContext& ctx) {
  const int64_t group = heads_ / kv_heads_;
  at::Tensor q = feature_map_(split_heads(q_(x), heads_));
  // GQA: each key/value head serves `group` query heads. Without a per-head
  // decay or feature map the operator takes them unrepeated and exchanges
  // states per key/value head (lasp.h); otherwise each query head's state
  // differs and k, v are repeated here.
  at::Tensor k = split_heads(k_(x), kv_heads_), v = split_heads(v_(x), kv_heads_);
  if (decay_.defined() || feature_map_->per_head()) {
    k = softmax_attention::repeat_kv_heads(k, group);
    v = softmax_attention::repeat_kv_heads(v, group);
  }
  k = feature_map_(k);
  linear_attention::LinearAttentionOptions opt;
  opt.block_size = block_;
  opt.decay = decay_;
  opt.normalize = normalize_;
  opt.doc_start = ctx.doc_start;
  const at::Tensor out = linear_attention::sequence_parallel_linear_attention(q, k, v, ctx.layout, ctx.comm,
                                                                              ctx.linear_method, opt);
  return o_(merge_heads(out));
}

// S_t = lambda S_(t-1) + k_t v_t^T (v with a column of ones for the
// normaliser), o_t = q_t^T S_t: the recurrence the chunked kernel computes.
at::Tensor LinearAttentionMixer::decode(const at::Tensor& x, DecodeCache& cache, const DecodeContext& ctx) {
  const int64_t group = heads_ / kv_heads_;
  const at::Tensor q = feature_map_(split_heads(q_(x), heads_));
  const at::Tensor k = feature_map_(softmax_attention::repeat_kv_heads(split_heads(k_(x), kv_heads_), group));
  at::Tensor v = softmax_attention::repeat_kv_heads(split_heads(v_(x), kv_heads_), group);
  const int64_t dv = v.size(-1);
  if (normalize_) v = at::cat({v, at::ones({v.size(0), v.size(1), 1, 1}, v.options())}, -1);
  at::Tensor S = at::matmul(k.transpose(-1, -2), v);  // [S, H, f, dv(+1)]
  if (!cache.tensors.empty()) {
    at::Tensor prev = cache.tensors[0];
    // A sequence whose new token starts a document forgets its state.
    const at::Tensor starts = ctx.starts_document();
    if (starts.defined()) prev = prev * starts.logical_not().to(prev.scalar_type()).view({-1, 1, 1, 1});
    S = S + (decay_.defined() ? prev * decay_.to(prev.options()).view({1, heads_, 1, 1}) : prev);
  }
  cache.tensors = {S};
  at::Tensor out = at::matmul(q, S);
  if (normalize_) out = out.narrow(-1, 0, dv) / (out.narrow(-1, dv, 1) + linear_attention::LinearAttentionOptions().eps);
  return o_(merge_heads(out));
}

// ---- K ----
GatedLinearAttentionMixer::GatedLinearAttentionMixer(const pb::ModelConfig& c)
    : heads_(c.n_heads()),
      kv_heads_(kv_heads_of(c)),
      head_dim_(c.d_model() / c.n_heads()),
      key_dim_(c.feature_dim() > 0 ? c.feature_dim() : c.d_model() / c.n_heads()),
      block_(c.block_size()) {
  const int64_t D = c.d_model();
  q_ = register_module("q", make_projection(D, heads_ * key_dim_));
  k_ = register_module("k", make_projection(D, kv_heads_ * key_dim_));
  v_ = register_module("v", make_projection(D, kv_heads_ * head_dim_));
  gate_down_ = register_module("gate_down", make_projection(D, kGateRank));
  gate_up_ = register_module("gate_up", Projection(kGateRank, heads_, /*bias=*/true));
  output_gate_ = register_module("output_gate", make_projection(D, heads_ * head_dim_));
  o_ = register_module("o", make_projection(heads_ * head_dim_, D));
  out_norm_ = register_module("out_norm", RMSNorm(head_dim_, c.norm_eps()));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> GatedLinearAttentionMixer::project(const at::Tensor& x) {
  const int64_t group = heads_ / kv_heads_;
  const at::Tensor q = split_heads(q_(x), heads_) * (1.0 / std::sqrt(static_cast<double>(key_dim_)));
  // GQA: each key/value head serves `group` query heads.
  const at::Tensor k = softmax_attention::repeat_kv_heads(split_heads(k_(x), kv_heads_), group);
  const at::Tensor v = softmax_attention::repeat_kv_heads(split_heads(v_(x), kv_heads_), group);
  // log g = logsigmoid(z) / 16 = -softplus(-z) / 16 <= 0, computed stably.
  const at::Tensor log_gate = (-at::softplus(-gate_up_(gate_down_(x))) / kGateNormaliser).transpose(1, 2);
  return {q, k, v, log_gate.contiguous()};
}

at::Tensor GatedLinearAttentionMixer::output(const at::Tensor& attended, const at::Tensor& x) {
  const at::Tensor normed = out_norm_(attended.transpose(1, 2));  // [B, n, H, head_dim], per head
  const at::Tensor flat = normed.reshape({x.size(0), x.size(1), heads_ * head_dim_});
  return o_(flat * at::silu(output_gate_(x)));
}

at::Tensor GatedLinearAttentionMixer::forward(const at::Tensor& x, const SequenceContext& ctx) {
  auto [q, k, v, log_gate] = project(x);
  linear_attention::LinearAttentionOptions opt;
  opt.block_size = block_;
  opt.normalize = false;
  opt.log_gate = log_gate;
  opt.doc_start = ctx.doc_start;
  return output(
      linear_attention::sequence_parallel_linear_attention(q, k, v, ctx.layout, ctx.comm, ctx.linear_method, opt), x);
}

// S_t = g_t S_(t-1) + k_t v_t^T, o_t = q_t^T S_t: the recurrence the chunked
// kernel computes.
at::Tensor GatedLinearAttentionMixer::decode(const at::Tensor& x, DecodeCache& cache, const DecodeContext& ctx) {
  auto [q, k, v, log_gate] = project(x);
  at::Tensor S = at::matmul(k.transpose(-1, -2), v);  // [S, H, f, head_dim]
  if (!cache.tensors.empty()) {
    at::Tensor prev = cache.tensors[0];
    // A sequence whose new token starts a document forgets its state.
    const at::Tensor starts = ctx.starts_document();
    if (starts.defined()) prev = prev * starts.logical_not().to(prev.scalar_type()).view({-1, 1, 1, 1});
    S = S + prev * log_gate.exp().unsqueeze(-1);  // [S, H, 1, 1]
  }
  cache.tensors = {S};
  return output(at::matmul(q, S), x);
}

// ---- A, W ----
SoftmaxAttentionMixer::SoftmaxAttentionMixer(const pb::ModelConfig& c, int64_t window)
    : heads_(c.n_heads()),
      kv_heads_(kv_heads_of(c)),
      head_dim_(c.d_model() / c.n_heads()),
      window_(window),
      rope_theta_(c.rope_theta()),
      positions_per_document_(c.positions_per_document()) {
  const int64_t D = c.d_model();
  q_ = register_module("q", make_projection(D, heads_ * head_dim_));
  k_ = register_module("k", make_projection(D, kv_heads_ * head_dim_));
  v_ = register_module("v", make_projection(D, kv_heads_ * head_dim_));
  o_ = register_module("o", make_projection(heads_ * head_dim_, D));
  if (c.attention_output_gate()) gate_ = register_module("gate", make_projection(D, heads_ * head_dim_));
}

at::Tensor SoftmaxAttentionMixer::gated(const at::Tensor& attention, const at::Tensor& x) {
  const at::Tensor merged = merge_heads(attention);
  return o_(gate_ ? merged * at::sigmoid(gate_(x)) : merged);
}

at::Tensor SoftmaxAttentionMixer::forward(const at::Tensor& x, const SequenceContext& ctx) {
  const at::Tensor pos = ctx.positions();
  const at::Tensor q = softmax_attention::apply_rotary(split_heads(q_(x), heads_), pos, rope_theta_);
  const at::Tensor k = softmax_attention::apply_rotary(split_heads(k_(x), kv_heads_), pos, rope_theta_);
  const at::Tensor v = split_heads(v_(x), kv_heads_);
  softmax_attention::AttentionSpec spec;
  spec.window = window_;
  // At sp = 1 every method reduces to local attention.
  const auto method = ctx.layout.world_size() == 1 && ctx.softmax_method != softmax_attention::SoftmaxMethod::kOffload
                          ? softmax_attention::SoftmaxMethod::kLocal
                          : ctx.softmax_method;
  return gated(softmax_attention::attention(q, k, v, ctx.layout, ctx.comm, method, spec, ctx.offload, ctx.doc_start,
                                            ctx.ulysses_degree),
               x);
}

at::Tensor SoftmaxAttentionMixer::decode(const at::Tensor& x, DecodeCache& cache, const DecodeContext& ctx) {
  // Rotary position: in the row, or per sequence inside its document.
  const at::Tensor pos = positions_per_document_ && ctx.doc_start.defined()
                             ? (ctx.position - ctx.doc_start).view({-1, 1}).to(at::kLong)
                             : at::full({1}, ctx.position, at::kLong);
  const at::Tensor q = softmax_attention::apply_rotary(split_heads(q_(x), heads_), pos, rope_theta_);
  const at::Tensor k = softmax_attention::apply_rotary(split_heads(k_(x), kv_heads_), pos, rope_theta_);
  const at::Tensor v = split_heads(v_(x), kv_heads_);
  softmax_attention::AttentionSpec spec;
  if (window_ == 0 && ctx.offload)  // Lamina: the KV cache lives on the memory nodes
    return gated(softmax_attention::offload_decode_attention(q, k, v, *ctx.offload, ctx.layer, ctx.sequences, spec),
                 x);
  at::Tensor K = cache.tensors.empty() ? k : at::cat({cache.tensors[0], k}, 2);
  at::Tensor V = cache.tensors.empty() ? v : at::cat({cache.tensors[1], v}, 2);
  if (window_ > 0 && K.size(2) > window_) {  // the last `window` positions, itself included
    K = K.narrow(2, K.size(2) - window_, window_);
    V = V.narrow(2, V.size(2) - window_, window_);
  }
  at::Tensor visible;
  if (ctx.doc_start.defined()) {
    // Keys older than every sequence's document are never read again: drop
    // them; hide the remaining keys of an earlier document per sequence.
    const int64_t T = K.size(2), oldest = ctx.doc_start.min().item<int64_t>();
    const int64_t keep = std::min<int64_t>(T, ctx.position - oldest + 1);
    K = K.narrow(2, T - keep, keep);
    V = V.narrow(2, T - keep, keep);
    const at::Tensor key_pos = at::arange(ctx.position - keep + 1, ctx.position + 1, ctx.doc_start.options());
    visible = key_pos.unsqueeze(0).ge(ctx.doc_start.unsqueeze(1));
  }
  cache.tensors = {K, V};
  return gated(softmax_attention::attend_newest(q, K, V, spec, visible), x);
}

// ---- D ----
namespace {
int64_t positive_or(int64_t value, int64_t fallback) { return value > 0 ? value : fallback; }
// x / sqrt(sum x^2 + eps) over the last dimension (eps keeps a zero vector zero).
at::Tensor l2_normalize(const at::Tensor& x) { return x * at::rsqrt(x.pow(2).sum(-1, /*keepdim=*/true) + 1e-6); }
}  // namespace

GatedDeltaNetMixer::GatedDeltaNetMixer(const pb::ModelConfig& c)
    : key_heads_(positive_or(c.delta_key_heads(), c.n_heads())),
      value_heads_(positive_or(c.delta_value_heads(), key_heads_)),
      key_dim_(positive_or(c.delta_key_dim(), c.d_model() / c.n_heads())),
      value_dim_(positive_or(c.delta_value_dim(), key_dim_)),
      block_(c.block_size()),
      norm_eps_(c.norm_eps()) {
  if (value_heads_ % key_heads_ != 0)
    throw ConfigError("model.delta_value_heads = " + std::to_string(value_heads_) +
                      ": the Gated DeltaNet mixer (D) needs a multiple of model.delta_key_heads = " +
                      std::to_string(key_heads_) + " (each q/k head serves a whole group of value heads)");
  const int64_t D = c.d_model(), K = c.conv_kernel();
  const int64_t keys = key_heads_ * key_dim_, values = value_heads_ * value_dim_;
  q_ = register_module("q", make_projection(D, keys));
  k_ = register_module("k", make_projection(D, keys));
  v_ = register_module("v", make_projection(D, values));
  z_ = register_module("z", make_projection(D, values));
  b_ = register_module("b", make_projection(D, value_heads_));
  a_ = register_module("a", make_projection(D, value_heads_));
  o_ = register_module("o", make_projection(values, D));
  const at::TensorOptions opts = parameter_options();
  conv_weight_ = register_parameter("conv_weight", at::randn({2 * keys + values, K}, opts) / std::sqrt(double(K)));
  // Mamba2's initialisation: A in [1, 16], dt in [1e-3, 1e-1] log-uniformly,
  // dt_bias its inverse softplus.
  a_log_ = register_parameter("A_log", at::empty({value_heads_}, opts).uniform_(1, 16).log_());
  const at::Tensor dt =
      at::empty({value_heads_}, opts).uniform_(std::log(1e-3), std::log(1e-1)).exp_().clamp_min_(1e-4);
  dt_bias_ = register_parameter("dt_bias", dt + at::log(-at::expm1(-dt)));
  norm_weight_ = register_parameter("norm_weight", at::ones({value_dim_}, opts));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> GatedDeltaNetMixer::heads_of(const at::Tensor& conv) const {
  const int64_t keys = key_heads_ * key_dim_, group = value_heads_ / key_heads_;
  // GQA-style: key head h serves value heads h*group .. h*group + group-1.
  const at::Tensor q = l2_normalize(split_heads(conv.narrow(-1, 0, keys), key_heads_)) / std::sqrt(double(key_dim_));
  const at::Tensor k = l2_normalize(split_heads(conv.narrow(-1, keys, keys), key_heads_));
  const at::Tensor v = split_heads(conv.narrow(-1, 2 * keys, value_heads_ * value_dim_), value_heads_);
  return {softmax_attention::repeat_kv_heads(q, group), softmax_attention::repeat_kv_heads(k, group), v};
}

std::pair<at::Tensor, at::Tensor> GatedDeltaNetMixer::gates_of(const at::Tensor& x) {
  const at::Tensor beta = at::sigmoid(b_(x)).transpose(1, 2);  // [B, Hv, n]
  const at::Tensor log_alpha = (-a_log_.exp() * at::softplus(a_(x) + dt_bias_)).transpose(1, 2);
  return {beta, log_alpha};
}

at::Tensor GatedDeltaNetMixer::output_of(const at::Tensor& core, const at::Tensor& x) {
  const at::Tensor z = z_(x).unflatten(-1, {value_heads_, value_dim_});
  const at::Tensor normed = core * at::rsqrt(core.pow(2).mean(-1, /*keepdim=*/true) + norm_eps_) * norm_weight_;
  return o_((normed * at::silu(z)).flatten(-2));
}

at::Tensor GatedDeltaNetMixer::forward(const at::Tensor& x, const SequenceContext& ctx) {
  const at::Tensor mixed = at::cat({q_(x), k_(x), v_(x)}, -1);
  const at::Tensor conv =
      at::silu(causal_depthwise_conv(mixed, conv_weight_, at::Tensor(), ctx.layout, ctx.comm, ctx.doc_start));
  auto [q, k, v] = heads_of(conv);
  auto [beta, log_alpha] = gates_of(x);
  gated_delta::GatedDeltaOptions opt;
  opt.block_size = block_;
  opt.doc_start = ctx.doc_start;
  const at::Tensor core = gated_delta::sequence_parallel_gated_delta_rule(q, k, v, beta, log_alpha, ctx.layout,
                                                                          ctx.comm, ctx.linear_method, opt);
  return output_of(core.transpose(1, 2), x);
}

at::Tensor GatedDeltaNetMixer::decode(const at::Tensor& x, DecodeCache& cache, const DecodeContext& ctx) {
  const at::Tensor mixed = at::cat({q_(x), k_(x), v_(x)}, -1);  // [S, 1, channels]
  const int64_t K = conv_weight_.size(1);
  at::Tensor past = cache.tensors.empty() ? at::zeros({mixed.size(0), K - 1, mixed.size(2)}, mixed.options())
                                          : cache.tensors[0];
  at::Tensor state = cache.tensors.size() > 1 ? cache.tensors[1] : at::Tensor();
  // A new document: the conv reads zeros before it and the state starts at 0 (alpha = 0).
  const at::Tensor starts = ctx.starts_document();
  if (starts.defined()) {
    const at::Tensor keep = starts.logical_not().to(past.scalar_type());
    past = past * keep.view({-1, 1, 1});
    if (state.defined()) state = state * keep.view({-1, 1, 1, 1});
  }
  const at::Tensor window = at::cat({past, mixed}, 1);  // [S, K, channels]
  const at::Tensor conv = at::silu((window * conv_weight_.t().unsqueeze(0)).sum(1, /*keepdim=*/true));
  auto [q, k, v] = heads_of(conv);  // [S, Hv, 1, d]
  auto [beta, log_alpha] = gates_of(x);  // [S, Hv, 1]
  const at::Tensor core = gated_delta::gated_delta_step(q.squeeze(2), k.squeeze(2), v.squeeze(2), beta.squeeze(2),
                                                        log_alpha.squeeze(2), state);  // [S, Hv, d_v]
  cache.tensors = {window.narrow(1, 1, K - 1), state};
  return output_of(core.unsqueeze(1), x);
}

// ---- C ----
BaseConvMixer::BaseConvMixer(const pb::ModelConfig& c) : dim_(c.d_model()) {
  in_proj_ = register_module("in_proj", make_projection(dim_, 4 * dim_));
  out_proj_ = register_module("out_proj", make_projection(2 * dim_, dim_));
  const int64_t kernel = c.conv_kernel();
  conv_weight_ = register_parameter("conv_weight", at::randn({2 * dim_, kernel}, parameter_options()) / std::sqrt(double(kernel)));
  conv_bias_ = register_parameter("conv_bias", at::zeros({2 * dim_}, parameter_options()));
}

at::Tensor BaseConvMixer::forward(const at::Tensor& x, const SequenceContext& ctx) {
  const at::Tensor u = in_proj_(x);
  const at::Tensor u1 = u.narrow(-1, 0, 2 * dim_), u2 = u.narrow(-1, 2 * dim_, 2 * dim_);
  const at::Tensor conv = causal_depthwise_conv(u1, conv_weight_, conv_bias_, ctx.layout, ctx.comm, ctx.doc_start);
  return out_proj_(at::silu(conv) * u2);
}

bool is_titans_mixer(char letter) { return letter == 'M' || letter == 'G' || letter == 'X'; }

// y_t = bias + sum_i weight[:, i] * u1_(t-K+1+i): the window of the last K inputs.
at::Tensor BaseConvMixer::decode(const at::Tensor& x, DecodeCache& cache, const DecodeContext& ctx) {
  const at::Tensor u = in_proj_(x);
  const at::Tensor u1 = u.narrow(-1, 0, 2 * dim_), u2 = u.narrow(-1, 2 * dim_, 2 * dim_);
  const int64_t K = conv_weight_.size(1);
  at::Tensor past = cache.tensors.empty() ? at::zeros({u1.size(0), K - 1, 2 * dim_}, u1.options())
                                          : cache.tensors[0];
  // A new document reads zeros before its first token, as at the row start.
  const at::Tensor starts = ctx.starts_document();
  if (starts.defined()) past = past * starts.logical_not().to(past.scalar_type()).view({-1, 1, 1});
  const at::Tensor window = at::cat({past, u1}, 1);  // [S, K, 2D]
  cache.tensors = {window.narrow(1, 1, K - 1)};
  at::Tensor conv = (window * conv_weight_.t().unsqueeze(0)).sum(1, /*keepdim=*/true);
  if (conv_bias_.defined()) conv = conv + conv_bias_;
  return out_proj_(at::silu(conv) * u2);
}

Mixer make_mixer(char letter, const pb::ModelConfig& c) {
  switch (letter) {
    case 'L': return std::make_shared<LinearAttentionMixer>(c);
    case 'A': return std::make_shared<SoftmaxAttentionMixer>(c, 0);
    case 'W': return std::make_shared<SoftmaxAttentionMixer>(c, c.window());
    case 'C': return std::make_shared<BaseConvMixer>(c);
    case 'K': return std::make_shared<GatedLinearAttentionMixer>(c);
    case 'M': return std::make_shared<TitansMALMixer>(c);
    case 'G': return std::make_shared<TitansMAGMixer>(c);
    case 'X': return std::make_shared<TitansMACMixer>(c);
    case 'D': return std::make_shared<GatedDeltaNetMixer>(c);
    default: break;
  }
  throw ConfigError(std::string("model.pattern: letter '") + letter + "' is not a mixer (allowed: L A W C M G X K D)");
}

}  // namespace loom::models
