#include "loom/models/chunked_loss.h"

#include <torch/autograd.h>

#include <algorithm>

namespace loom::models {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

constexpr int64_t kIgnoredLabel = -100;

// float32 at least: float64 stays float64, everything else is computed in float32.
at::ScalarType loss_dtype(at::ScalarType hidden) { return hidden == at::kDouble ? at::kDouble : at::kFloat; }

// One block's logits in the working dtype: the head in the hidden states'
// dtype (as the plain head computes them), then cast.
at::Tensor block_logits(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& bias) {
  const at::Tensor z = at::linear(hidden, weight, bias);
  return z.to(loss_dtype(hidden.scalar_type()));
}

struct ChunkedCrossEntropy : public torch::autograd::Function<ChunkedCrossEntropy> {
  // bias: an empty tensor for "no bias" (autograd functions take defined tensors).
  static variable_list forward(AutogradContext* ctx, const at::Tensor& hidden, const at::Tensor& weight,
                               const at::Tensor& bias, const at::Tensor& labels, int64_t block) {
    const at::Tensor b = bias.numel() > 0 ? bias : at::Tensor();
    const int64_t N = hidden.size(0);
    const at::ScalarType dtype = loss_dtype(hidden.scalar_type());
    at::Tensor loss = at::zeros({}, hidden.options().dtype(dtype));
    at::Tensor lse = at::empty({N}, hidden.options().dtype(dtype));
    for (int64_t start = 0; start < N; start += block) {
      const int64_t len = std::min(block, N - start);
      const at::Tensor z = block_logits(hidden.narrow(0, start, len), weight, b);
      const at::Tensor row_lse = at::logsumexp(z, -1);
      lse.narrow(0, start, len).copy_(row_lse);
      const at::Tensor y = labels.narrow(0, start, len);
      const at::Tensor valid = y.ne(kIgnoredLabel);
      const at::Tensor picked = z.gather(1, at::where(valid, y, at::zeros_like(y)).unsqueeze(1)).squeeze(1);
      loss.add_(at::where(valid, row_lse - picked, at::zeros_like(row_lse)).sum());
    }
    ctx->save_for_backward({hidden, weight, bias, labels, lse});
    ctx->saved_data["block"] = block;
    return {loss};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &hidden = saved[0], &weight = saved[1], &labels = saved[3], &lse = saved[4];
    const at::Tensor b = saved[2].numel() > 0 ? saved[2] : at::Tensor();
    const int64_t block = ctx->saved_data["block"].toInt(), N = hidden.size(0);
    const at::ScalarType dtype = loss_dtype(hidden.scalar_type());
    const at::Tensor g = grads[0].defined() ? grads[0].to(dtype) : at::zeros({}, hidden.options().dtype(dtype));
    at::Tensor d_hidden = at::empty_like(hidden);
    // Accumulated over blocks in the working dtype (float32 for bf16 weights), cast at the end.
    at::Tensor d_weight = at::zeros(weight.sizes(), weight.options().dtype(loss_dtype(weight.scalar_type())));
    at::Tensor d_bias = b.defined() ? at::zeros(b.sizes(), b.options().dtype(loss_dtype(b.scalar_type())))
                                    : at::Tensor();
    for (int64_t start = 0; start < N; start += block) {
      const int64_t len = std::min(block, N - start);
      const at::Tensor h = hidden.narrow(0, start, len);
      at::Tensor dz = block_logits(h, weight, b);
      dz.sub_(lse.narrow(0, start, len).unsqueeze(1)).exp_();  // softmax
      const at::Tensor y = labels.narrow(0, start, len);
      const at::Tensor valid = y.ne(kIgnoredLabel);
      dz.scatter_add_(1, at::where(valid, y, at::zeros_like(y)).unsqueeze(1), at::full({len, 1}, -1.0, dz.options()));
      dz.mul_((valid.to(dtype) * g).unsqueeze(1));  // ignored rows: no gradient
      const at::Tensor dz_model = dz.to(hidden.scalar_type());
      d_hidden.narrow(0, start, len).copy_(at::matmul(dz_model, weight));
      d_weight.add_(at::matmul(dz_model.t(), h));
      if (d_bias.defined()) d_bias.add_(dz.sum(0));
    }
    return {d_hidden, d_weight.to(weight.scalar_type()),
            d_bias.defined() ? d_bias.to(b.scalar_type()) : at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

int64_t loss_block_tokens(int64_t vocab) {
  TORCH_CHECK(vocab > 0, "loss_block_tokens: vocabulary size must be positive, got ", vocab);
  return std::clamp<int64_t>(kLossBlockBytes / (vocab * int64_t(sizeof(float))), 128, 4096);
}

at::Tensor chunked_cross_entropy(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& bias,
                                 const at::Tensor& labels, int64_t block_tokens) {
  TORCH_CHECK(hidden.dim() == 2 && weight.dim() == 2 && hidden.size(1) == weight.size(1),
              "chunked_cross_entropy: hidden ", hidden.sizes(), " and head weight ", weight.sizes(),
              " must be [N, D] and [V, D]");
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == hidden.size(0) && labels.scalar_type() == at::kLong,
              "chunked_cross_entropy: labels must be int64 [", hidden.size(0), "], got ", labels.scalar_type(), " ",
              labels.sizes());
  TORCH_CHECK(!bias.defined() || (bias.dim() == 1 && bias.size(0) == weight.size(0)),
              "chunked_cross_entropy: bias ", bias.sizes(), " must be [", weight.size(0), "]");
  const int64_t V = weight.size(0);
  if (labels.numel() > 0) {
    const at::Tensor bad = labels.ne(kIgnoredLabel).logical_and(labels.lt(0).logical_or(labels.ge(V)));
    TORCH_CHECK(!bad.any().item<bool>(), "chunked_cross_entropy: a label is outside [0, ", V,
                ") and is not the ignored label -100");
  }
  const int64_t block = block_tokens > 0 ? block_tokens : loss_block_tokens(V);
  const at::Tensor no_bias = at::empty({0}, weight.options());
  return ChunkedCrossEntropy::apply(hidden, weight, bias.defined() ? bias : no_bias, labels.to(hidden.device()),
                                    block)[0];
}

}  // namespace loom::models
