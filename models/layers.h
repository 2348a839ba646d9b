// Common layers of Loom's models: RMSNorm and the SwiGLU MLP. Token
// embedding and the LM head are torch::nn::Embedding / a (possibly tied)
// projection in hybrid_lm.h; rotary lives with attention
// (parallel/softmax_attention/rotary.h) since it needs global positions.
// All act on [B, n, D] token tensors and are position-wise, so they run
// unchanged on a rank's shard of the sequence.
#pragma once

#include <torch/nn/module.h>
#include <torch/nn/modules/linear.h>
#include <torch/nn/pimpl.h>

namespace loom::models {

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
  torch::nn::Linear gate_{nullptr}, up_{nullptr}, down_{nullptr};
};
TORCH_MODULE(SwiGLU);

// A bias-free linear layer (the projections of every mixer).
torch::nn::Linear make_projection(int64_t in, int64_t out);

// Hidden size of the MLP when the config leaves it at 0: 8/3 d rounded up to 64.
int64_t default_mlp_hidden(int64_t dim);

}  // namespace loom::models
