#include "loom/parallel/short_conv.h"

#include "loom/runtime/comm/differentiable_collectives.h"
#include "loom/runtime/comm/documents.h"

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

// The same with documents: x_ext's first token sits at global position
// `ext_start`, doc_start [B, L] belongs to the outputs. Each output's window
// of K inputs is masked to its own document, so the windows are unfolded
// ([B, L, C, K], K is small) instead of going through conv1d.
at::Tensor conv_valid_in_documents(const at::Tensor& x_ext, const at::Tensor& weight, const at::Tensor& bias,
                                   int64_t ext_start, const at::Tensor& doc_start) {
  const int64_t K = weight.size(1), L = x_ext.size(1) - (K - 1);
  const at::Tensor windows = x_ext.unfold(1, K, 1);  // [B, L, C, K]: windows[b, t, c, i] = x_ext[b, t + i, c]
  // Input i of output t sits at ext_start + t + i.
  const at::Tensor input_pos = at::arange(ext_start, ext_start + L, doc_start.options()).unsqueeze(1) +
                               at::arange(K, doc_start.options()).unsqueeze(0);  // [L, K]
  const at::Tensor same_document = input_pos.unsqueeze(0).ge(doc_start.unsqueeze(-1));  // [B, L, K]
  // masked_fill, not a product with the mask: a non-finite input of another document stays out.
  const at::Tensor masked = windows.masked_fill(same_document.logical_not().unsqueeze(2), 0);
  at::Tensor y = (masked * weight).sum(-1);  // [B, L, C]
  if (bias.defined()) y = y + bias;
  return y;
}

void check(const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.dim() == 3, "short conv: x must be [B, n, C], got ", x.sizes());
  TORCH_CHECK(weight.dim() == 2 && weight.size(0) == x.size(2), "short conv: weight must be [C=", x.size(2),
              ", K], got ", weight.sizes());
}
}  // namespace

at::Tensor causal_depthwise_conv(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                 const SequenceLayout& layout, const CommPtr& comm, const at::Tensor& doc_start) {
  check(x, weight);
  check_document_starts(doc_start, x, 1, "short conv");
  const int64_t K = weight.size(1), L = layout.chunk_len(), halo = K - 1;
  // A single chunk has no previous one: its halo is the zeros before the
  // sequence, whatever its length.
  const bool single = layout.num_chunks() == 1;
  TORCH_CHECK(halo <= L || single, "short conv: kernel ", K, " needs ", halo,
              " tokens of the previous chunk but chunks hold ", L, " (", layout.describe(), ")");
  // The halo travels with or without documents: the same messages on every rank.
  const at::Tensor h = single ? at::zeros({x.size(0), halo, x.size(2)}, x.options())
                              : halo_exchange(x, layout, halo, comm, 1);
  const auto chunks = layout.chunks_of(comm->rank());
  std::vector<at::Tensor> outs;
  for (int64_t i = 0; i < layout.chunks_per_rank(); ++i) {
    const at::Tensor x_ext = at::cat({h.narrow(1, i * halo, halo), x.narrow(1, i * L, L)}, 1);
    if (doc_start.defined()) {
      outs.push_back(conv_valid_in_documents(x_ext, weight, bias, layout.chunk_start(chunks[i]) - halo,
                                             doc_start.narrow(1, i * L, L)));
    } else {
      outs.push_back(conv_valid(x_ext, weight, bias));
    }
  }
  return at::cat(outs, 1);
}

at::Tensor naive_causal_depthwise_conv(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                       const at::Tensor& doc_start) {
  check(x, weight);
  check_document_starts(doc_start, x, 1, "naive short conv");
  const int64_t K = weight.size(1);
  const at::Tensor padded = at::constant_pad_nd(x, {0, 0, K - 1, 0});
  if (doc_start.defined()) return conv_valid_in_documents(padded, weight, bias, -(K - 1), doc_start);
  return conv_valid(padded, weight, bias);
}

}  // namespace loom
