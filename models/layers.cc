#include "loom/models/layers.h"

#include <cmath>

namespace loom::models {

namespace {
thread_local at::TensorOptions g_parameter_options = at::TensorOptions().dtype(at::kFloat);
}  // namespace

at::TensorOptions parameter_options() { return g_parameter_options; }

ParameterScope::ParameterScope(at::TensorOptions options) : previous_(g_parameter_options) {
  at::TensorOptions merged = previous_;
  if (options.has_device()) merged = merged.device(options.device());
  if (options.has_dtype()) merged = merged.dtype(options.dtype());
  g_parameter_options = merged;
}
ParameterScope::~ParameterScope() { g_parameter_options = previous_; }

ProjectionImpl::ProjectionImpl(int64_t in, int64_t out, bool with_bias) {
  TORCH_CHECK(in >= 1 && out >= 1, "Projection: sizes must be >= 1, got ", in, " -> ", out);
  const double bound = 1.0 / std::sqrt(static_cast<double>(in));
  torch::NoGradGuard no_grad;
  weight = register_parameter("weight", at::empty({out, in}, parameter_options()).uniform_(-bound, bound));
  if (with_bias) bias = register_parameter("bias", at::empty({out}, parameter_options()).uniform_(-bound, bound));
}

TokenEmbeddingImpl::TokenEmbeddingImpl(int64_t vocab, int64_t dim) {
  TORCH_CHECK(vocab >= 1 && dim >= 1, "TokenEmbedding: sizes must be >= 1, got ", vocab, " x ", dim);
  torch::NoGradGuard no_grad;
  weight = register_parameter("weight", at::empty({vocab, dim}, parameter_options()).normal_(0, 1));
}

RMSNormImpl::RMSNormImpl(int64_t dim, double eps) : eps_(eps) {
  weight_ = register_parameter("weight", at::ones({dim}, parameter_options()));
}

at::Tensor RMSNormImpl::forward(const at::Tensor& x) {
  // Statistics in at least float32, whatever the activations' dtype.
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor xf = x.to(acc);
  const at::Tensor normed = xf * at::rsqrt(xf.pow(2).mean(-1, /*keepdim=*/true) + eps_);
  return (normed * weight_.to(acc)).to(x.scalar_type());
}

Projection make_projection(int64_t in, int64_t out) { return Projection(in, out); }

SwiGLUImpl::SwiGLUImpl(int64_t dim, int64_t hidden) {
  gate_ = register_module("gate", make_projection(dim, hidden));
  up_ = register_module("up", make_projection(dim, hidden));
  down_ = register_module("down", make_projection(hidden, dim));
}

at::Tensor SwiGLUImpl::forward(const at::Tensor& x) { return down_(at::silu(gate_(x)) * up_(x)); }

int64_t default_mlp_hidden(int64_t dim) { return ((8 * dim / 3 + 63) / 64) * 64; }

}  // namespace loom::models
