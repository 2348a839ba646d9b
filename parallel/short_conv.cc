#include "loom/parallel/short_conv.h"

#include "loom/runtime/comm/differentiable_collectives.h"

namespace loom {
namespace {
// [B, L+K-1, C] -> [B, L, C] by a valid depthwise conv.
at::Tensor conv_valid(const at::Tensor& x_ext, const at::Tensor& weight, const at::Tensor& bias) {
  const int64_t channels = weight.size(0);
  const std::vector<int64_t> one{1}, zero{0};
  return at::conv1d(x_ext.transpose(1, 2), weight.unsqueeze(1), bias, /*stride=*/at::IntArrayRef(one),
                    /*padding=*/at::IntArrayRef(zero), /*dilation=*/at::IntArrayRef(one), /*groups=*/channels)
      .transpose(1, 2);
}
void check(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.dim() == 3, "short conv: x must be [B, n, C], got ", x.sizes());
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) == x.size(2), "short conv: weight must be [C=", x.size(2),
              ", K], got ", weight.sizes());
}
}  // namespace

at::Tensor causal_depthwise_conv(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                 const SequenceLayout& layout, const CommPtr& comm) {
  check(x, weight);
  const int64_t K = weight.size(1), L = layout.chunk_len(), halo = K - 1;
  TORCH_CHECK(halo <= L, "short conv: kernel ", K, " needs ", halo, " tokens of the previous chunk but chunks hold ",
              L, " (", layout.describe(), ")");
  const at::Tensor h = halo_exchange(x, layout, halo, comm, 1);
  std::vector<at::Tensor> outs;
  for (int64_t i = 0; i < layout.chunks_per_rank(); ++i)
    outs.push_back(conv_valid(at::cat({h.narrow(1, i * halo, halo), x.narrow(1, i * L, L)}, 1), weight, bias));
  return at::cat(outs, 1);
}

at::Tensor naive_causal_depthwise_conv(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  check(x, weight);
  const int64_t K = weight.size(1);
  return conv_valid(at::constant_pad_nd(x, {0, 0, K - 1, 0}), weight, bias);
}

}  // namespace loom
