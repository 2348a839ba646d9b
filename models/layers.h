// Common layers of Loom's models: RMSNorm, the SwiGLU MLP, projections and
// the token embedding. The LM head is a projection or the tied embedding
// (hybrid_lm.h); rotary lives with attention
// (parallel/softmax_attention/rotary.h) since it needs global positions.
// All act on [B, n, D] token tensors and are position-wise, so they run
// unchanged on a rank's shard of the sequence.
#pragma once

#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>

namespace loom::models {

// Factory options (device, dtype) of the parameters that Loom's modules create
// while a ParameterScope is alive on this thread. A model is built directly
// on its device (CUDA, or `meta` in the device test: libtorch cannot move a
// parameter from the CPU to meta) instead of on the CPU and copied.
// Default: float32 on the CPU.
at::TensorOptions parameter_options();
class ParameterScope {
 public:
  explicit ParameterScope(at::TensorOptions options);
  ~ParameterScope();
  ParameterScope(const ParameterScope&) = delete;
  ParameterScope& operator=(const ParameterScope&) = delete;

 private:
  at::TensorOptions previous_;
};

// y = x W^T (+ b): torch::nn::Linear's parameter names and initialisation
// (uniform in +-1/sqrt(in), weight then bias), created with parameter_options().
class ProjectionImpl : public torch::nn::Module {
 public:
  ProjectionImpl(int64_t in, int64_t out, bool bias = false);
  at::Tensor forward(const at::Tensor& x) { return at::linear(x, weight, bias); }
  at::Tensor weight, bias;  // bias undefined without one
};
TORCH_MODULE(Projection);

// Token ids [B, n] -> vectors [B, n, D]; weight initialised N(0, 1) like
// torch::nn::Embedding.
class TokenEmbeddingImpl : public torch::nn::Module {
 public:
  TokenEmbeddingImpl(int64_t vocab, int64_t dim);
  at::Tensor forward(const at::Tensor& tokens) { return at::embedding(weight, tokens); }
  at::Tensor weight;
};
TORCH_MODULE(TokenEmbedding);

class RMSNormImpl : public torch::nn::Module {
 public:
  RMSNormImpl(int64_t dim, double eps = 1e-5);
  at::Tensor forward(const at::Tensor& x);

 private:
  double eps_;
  at::Tensor weight_;
};
TORCH_MODULE(RMSNorm);

// out = W_down (SiLU(W_gate x) * W_up x), no biases.
class SwiGLUImpl : public torch::nn::Module {
 public:
  SwiGLUImpl(int64_t dim, int64_t hidden);
  at::Tensor forward(const at::Tensor& x);

 private:
  Projection gate_{nullptr}, up_{nullptr}, down_{nullptr};
};
TORCH_MODULE(SwiGLU);

// A bias-free projection (every mixer's q, k, v, o).
Projection make_projection(int64_t in, int64_t out);

// Hidden size of the MLP when the config leaves it at 0: 8/3 d rounded up to 64.
int64_t default_mlp_hidden(int64_t dim);

}  // namespace loom::models
