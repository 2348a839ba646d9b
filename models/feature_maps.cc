#include "loom/models/feature_maps.h"

#include <cmath>

#include "loom/models/layers.h"
#include "loom/runtime/core/error.h"

namespace loom::models {

FeatureMapKind parse_feature_map(const std::string& name) {
  if (name == "identity") return FeatureMapKind::kIdentity;
  if (name == "elu") return FeatureMapKind::kElu;
  if (name == "relu") return FeatureMapKind::kRelu;
  if (name == "taylor") return FeatureMapKind::kTaylor;
  if (name == "hedgehog") return FeatureMapKind::kHedgehog;
  throw ConfigError("feature map '" + name + "': allowed values are identity, elu, relu, taylor, hedgehog");
}

const char* feature_map_name(FeatureMapKind kind) {
  switch (kind) {
    case FeatureMapKind::kIdentity: return "identity";
    case FeatureMapKind::kElu: return "elu";
    case FeatureMapKind::kRelu: return "relu";
    case FeatureMapKind::kTaylor: return "taylor";
    case FeatureMapKind::kHedgehog: return "hedgehog";
  }
  return "?";
}

FeatureMapImpl::FeatureMapImpl(FeatureMapKind kind, int64_t num_heads, int64_t head_dim, int64_t hedgehog_dim)
    : kind_(kind), heads_(num_heads), dim_(head_dim), hedgehog_dim_(hedgehog_dim > 0 ? hedgehog_dim : head_dim) {
  TORCH_CHECK(num_heads >= 1 && head_dim >= 1, "FeatureMap: heads and head_dim must be >= 1, got ", num_heads, ", ",
              head_dim);
  if (kind_ == FeatureMapKind::kTaylor) {
    std::vector<int64_t> pairs;
    std::vector<double> scales;
    const double sqrt_d = std::sqrt(static_cast<double>(head_dim));
    for (int64_t i = 0; i < head_dim; ++i)
      for (int64_t j = i; j < head_dim; ++j) {
        pairs.push_back(i * head_dim + j);
        scales.push_back(i == j ? 1.0 / (std::sqrt(2.0) * sqrt_d) : 1.0 / sqrt_d);
      }
    // Constants, not module state: Module::to(dtype) must not convert the indices.
    taylor_pairs_ = at::tensor(pairs, at::kLong);
    taylor_scales_ = at::tensor(scales, at::kDouble);
  }
  if (kind_ == FeatureMapKind::kHedgehog) {
    // Start near the identity map with a little noise, per head.
    at::Tensor w = at::eye(head_dim, hedgehog_dim_, parameter_options()).expand({num_heads, head_dim, hedgehog_dim_}).clone();
    w.add_(at::randn_like(w).mul_(0.02));
    hedgehog_weight_ = register_parameter("hedgehog_weight", w);
  }
}

int64_t FeatureMapImpl::output_dim() const {
  switch (kind_) {
    case FeatureMapKind::kTaylor: return 1 + dim_ + dim_ * (dim_ + 1) / 2;
    case FeatureMapKind::kHedgehog: return 2 * hedgehog_dim_;
    default: return dim_;
  }
}

at::Tensor FeatureMapImpl::forward(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 4 && (x.size(1) == heads_ || !per_head()) && x.size(3) == dim_, "FeatureMap(",
              feature_map_name(kind_), "): expected [B, ", per_head() ? std::to_string(heads_) : std::string("H"),
              ", N, ", dim_, "], got ", x.sizes());
  switch (kind_) {
    case FeatureMapKind::kIdentity: return x;
    case FeatureMapKind::kElu: return at::elu(x) + 1;
    case FeatureMapKind::kRelu: return at::relu(x);
    case FeatureMapKind::kTaylor: {
      const double linear_scale = 1.0 / std::pow(static_cast<double>(dim_), 0.25);
      const at::Tensor outer = (x.unsqueeze(-1) * x.unsqueeze(-2)).flatten(-2);
      const at::Tensor quadratic =
          outer.index_select(-1, taylor_pairs_.to(x.device())) * taylor_scales_.to(x.options());
      return at::cat({at::ones_like(x.narrow(-1, 0, 1)), x * linear_scale, quadratic}, -1);
    }
    case FeatureMapKind::kHedgehog: {
      const at::Tensor proj = at::matmul(x, hedgehog_weight_.to(x.scalar_type()).unsqueeze(0));
      return at::cat({at::softmax(proj, -1), at::softmax(-proj, -1)}, -1);
    }
  }
  return x;
}

}  // namespace loom::models
