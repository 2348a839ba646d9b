#include "loom/models/mixers.h"

#include <cmath>

#include "loom/models/layers.h"
#include "loom/models/titans.h"
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
  // GQA: each key/value head serves `group` query heads.
  at::Tensor k = softmax_attention::repeat_kv_heads(split_heads(k_(x), kv_heads_), group);
  at::Tensor v = softmax_attention::repeat_kv_heads(split_heads(v_(x), kv_heads_), group);
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
  return o_(merge_heads(
      softmax_attention::attention(q, k, v, ctx.layout, ctx.comm, method, spec, ctx.offload, ctx.doc_start)));
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
    return o_(merge_heads(
        softmax_attention::offload_decode_attention(q, k, v, *ctx.offload, ctx.layer, ctx.sequences, spec)));
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
  return o_(merge_heads(softmax_attention::attend_newest(q, K, V, spec, visible)));
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
    case 'M': return std::make_shared<TitansMALMixer>(c);
    case 'G': return std::make_shared<TitansMAGMixer>(c);
    case 'X': return std::make_shared<TitansMACMixer>(c);
    default: break;
  }
  throw ConfigError(std::string("model.pattern: letter '") + letter + "' is not a mixer (allowed: L A W C M G X)");
}

}  // namespace loom::models
