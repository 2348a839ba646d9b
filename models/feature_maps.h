// Feature maps phi for linear attention, applied per head and token before the
// linear-attention operator (parallel/linear_attention/lasp.h):
//   identity   phi(x) = x
//   elu        phi(x) = elu(x) + 1
//   relu       phi(x) = relu(x)
//   taylor     BASED's second-order Taylor map, symmetric form with
//              1 + d + d(d+1)/2 features so that
//              phi(x).phi(y) = 1 + x.y/sqrt(d) + (x.y)^2 / (2 d):
//              [1, x / d^(1/4), x_i^2 / (sqrt(2) sqrt(d)), x_i x_j / sqrt(d) (i < j)]
//              The 1/sqrt(d) scale is explicit (kTaylorScale...), never implied.
//   hedgehog   learnable per-head map [softmax(x W_h), softmax(-x W_h)] with
//              W_h a d x m matrix (2m features), as in Hedgehog.
// x: [B, H, N, d] -> [B, H, N, output_dim()].
#pragma once

#include <torch/nn/module.h>
#include <torch/nn/pimpl.h>

#include <string>

namespace loom::models {

enum class FeatureMapKind { kIdentity, kElu, kRelu, kTaylor, kHedgehog };
// "identity", "elu", "relu", "taylor", "hedgehog"; throws ConfigError otherwise.
FeatureMapKind parse_feature_map(const std::string& name);
const char* feature_map_name(FeatureMapKind kind);

class FeatureMapImpl : public torch::nn::Module {
 public:
  // hedgehog_dim: m for hedgehog (0: m = head_dim); ignored by the others.
  FeatureMapImpl(FeatureMapKind kind, int64_t num_heads, int64_t head_dim, int64_t hedgehog_dim = 0);
  at::Tensor forward(const at::Tensor& x);
  int64_t output_dim() const;
  FeatureMapKind kind() const { return kind_; }
  // Whether the map differs per head (Hedgehog's weights). The fixed maps take
  // any head count (GQA key heads), a per-head map exactly num_heads.
  bool per_head() const { return kind_ == FeatureMapKind::kHedgehog; }
  // Hedgehog's [H, d, m] weight (undefined for the fixed maps).
  const at::Tensor& hedgehog_weight() const { return hedgehog_weight_; }

 private:
  FeatureMapKind kind_;
  int64_t heads_, dim_, hedgehog_dim_;
  at::Tensor hedgehog_weight_;
  at::Tensor taylor_pairs_;   // [P] flat indices i*d+j of the i <= j pairs
  at::Tensor taylor_scales_;  // [P] 1/(sqrt(2) sqrt(d)) on the diagonal, 1/sqrt(d) off it
};
TORCH_MODULE(FeatureMap);

}  // namespace loom::models
