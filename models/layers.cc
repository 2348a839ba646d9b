#include "models/layers.h"

namespace loom::models {

RMSNormImpl::RMSNormImpl(int64_t dim, double eps) : eps_(eps) {
  weight_ = register_parameter("weight", at::ones({dim}));
}

at::Tensor RMSNormImpl::forward(const at::Tensor& x) {
  // Statistics in at least float32, whatever the activations' dtype.
  const auto acc = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor xf = x.to(acc);
  const at::Tensor normed = xf * at::rsqrt(xf.pow(2).mean(-1, /*keepdim=*/true) + eps_);
  return (normed * weight_.to(acc)).to(x.scalar_type());
}

torch::nn::Linear make_projection(int64_t in, int64_t out) {
  return torch::nn::Linear(torch::nn::LinearOptions(in, out).bias(false));
}

SwiGLUImpl::SwiGLUImpl(int64_t dim, int64_t hidden) {
  gate_ = register_module("gate", make_projection(dim, hidden));
  up_ = register_module("up", make_projection(dim, hidden));
  down_ = register_module("down", make_projection(hidden, dim));
}

at::Tensor SwiGLUImpl::forward(const at::Tensor& x) { return down_(at::silu(gate_(x)) * up_(x)); }

int64_t default_mlp_hidden(int64_t dim) { return ((8 * dim / 3 + 63) / 64) * 64; }

}  // namespace loom::models
