#include "loom/parallel/linear_attention/decay.h"

#include <cmath>
#include <limits>

namespace loom::linear_attention {

at::Tensor default_decay(int64_t num_heads) {
  TORCH_CHECK(num_heads >= 1, "default_decay: num_heads must be >= 1, got ", num_heads);
  const at::Tensor h = at::arange(1, num_heads + 1, at::kDouble);
  return at::exp(-at::pow(2.0, -8.0 * h / static_cast<double>(num_heads)));
}

at::Tensor decay_powers(const at::Tensor& decay, int64_t num_heads, const at::Tensor& exponents,
                        const at::TensorOptions& options) {
  auto out_shape = exponents.sizes().vec();
  out_shape.insert(out_shape.begin(), num_heads);
  if (!decay.defined()) return at::ones(out_shape, options);
  TORCH_CHECK(decay.dim() == 1 && decay.size(0) == num_heads, "linear attention: decay must have shape [", num_heads,
              "] (one lambda per head), got ", decay.sizes());
  const at::Tensor lam = decay.to(at::kDouble);
  TORCH_CHECK(lam.gt(0).all().item<bool>() && lam.le(1).all().item<bool>(),
              "linear attention: every decay lambda must be in (0, 1], got ", lam);
  auto view_shape = std::vector<int64_t>(exponents.dim() + 1, 1);
  view_shape[0] = num_heads;
  // Powers in float64 where they are used (no host table copied per call),
  // then in the inputs' dtype.
  const at::Tensor log_lam = lam.to(options.device()).log().view(view_shape);
  return at::exp(log_lam * exponents.to(options.device(), at::kDouble).unsqueeze(0)).to(options);
}

BlockDecay chunk_decay(const at::Tensor& decay, int64_t num_heads, int64_t n, const at::TensorOptions& options) {
  const auto exact = options.dtype(at::kDouble);
  const at::Tensor t = at::arange(n, exact);
  BlockDecay d;
  d.query = decay_powers(decay, num_heads, t + 1, options).unsqueeze(-1);
  d.key = decay_powers(decay, num_heads, (n - 1) - t, options).unsqueeze(-1);
  d.block = decay_powers(decay, num_heads, at::full({1, 1}, static_cast<double>(n), exact), options);
  return d;
}

BlockDecay block_decay(const at::Tensor& decay, int64_t num_heads, int64_t n, const at::TensorOptions& options) {
  BlockDecay d = chunk_decay(decay, num_heads, n, options);
  const at::Tensor t = at::arange(n, options.dtype(at::kDouble));
  const at::Tensor diff = t.unsqueeze(1) - t.unsqueeze(0);  // i - j
  const at::Tensor lower = diff.ge(0);
  d.causal = decay_powers(decay, num_heads, diff.clamp_min(0), options) * lower.to(options).unsqueeze(0);
  return d;
}

DocumentBlocks document_blocks(const at::Tensor& doc_start, int64_t first_position, int64_t nb, int64_t c,
                               bool with_visible, const at::TensorOptions& options) {
  const int64_t B = doc_start.size(0), n = doc_start.size(1), padded = nb * c;
  TORCH_CHECK(n <= padded, "document_blocks: ", n, " tokens do not fit ", nb, " blocks of ", c);
  const auto index = options.dtype(at::kLong);
  const at::Tensor pos = at::arange(first_position, first_position + padded, index).view({nb, c});
  at::Tensor docs = doc_start.to(index);
  // Padding tokens start documents of their own.
  if (padded != n) docs = at::cat({docs, pos.reshape({padded}).narrow(0, n, padded - n).expand({B, padded - n})}, 1);
  docs = docs.view({B, nb, c});
  const at::Tensor block_start = pos.select(1, 0).view({1, nb, 1});     // [1, nb, 1]
  const at::Tensor last_doc = docs.select(2, c - 1).unsqueeze(-1);      // [B, nb, 1]
  DocumentBlocks d;
  if (with_visible) d.visible = docs.unsqueeze(-1).le(pos.view({1, nb, 1, c})).to(options).unsqueeze(1);
  d.query = docs.lt(block_start).to(options).view({B, 1, nb, c, 1});
  d.key = pos.unsqueeze(0).ge(last_doc).to(options).view({B, 1, nb, c, 1});
  d.across = last_doc.lt(block_start).to(options).view({B, 1, nb, 1, 1});
  return d;
}

void check_log_gate(const at::Tensor& log_gate, const at::Tensor& q, const char* what) {
  TORCH_CHECK(log_gate.dim() == 3 && log_gate.size(0) == q.size(0) && log_gate.size(1) == q.size(1) &&
                  log_gate.size(2) == q.size(2),
              what, ": log_gate must be [B, H, n] = [", q.size(0), ", ", q.size(1), ", ", q.size(2), "], got ",
              log_gate.sizes());
  TORCH_CHECK(at::isFloatingType(log_gate.scalar_type()), what, ": log_gate must be floating point, got ",
              log_gate.scalar_type());
  if (log_gate.numel() == 0 || log_gate.is_meta()) return;  // no values to check (meta: shapes only)
  // One transfer for both bounds; NaN fails the comparisons too.
  const at::Tensor bounds = at::stack({log_gate.max(), log_gate.min()}).to(at::kCPU, at::kDouble);
  const double top = bounds[0].item<double>(), bottom = bounds[1].item<double>();
  TORCH_CHECK(top <= 0.0, what, ": every log gate must be <= 0 (gates in (0, 1]), got a maximum of ", top);
  TORCH_CHECK(std::isfinite(bottom), what, ": every log gate must be finite, got a minimum of ", bottom,
              " (a document start is given by doc_start, not by a gate of 0)");
}

GatedBlocks gated_blocks(const at::Tensor& log_gate, const at::Tensor& decay, int64_t nb, int64_t c,
                         const at::TensorOptions& options) {
  const int64_t B = log_gate.size(0), H = log_gate.size(1), n = log_gate.size(2), padded = nb * c;
  TORCH_CHECK(n <= padded, "gated_blocks: ", n, " tokens do not fit ", nb, " blocks of ", c);
  at::Tensor lg = log_gate.to(options.device(), at::kDouble);
  if (decay.defined()) {
    TORCH_CHECK(decay.dim() == 1 && decay.size(0) == H, "linear attention: decay must have shape [", H,
                "] (one lambda per head), got ", decay.sizes());
    lg = lg + decay.to(options.device(), at::kDouble).log().view({1, H, 1});
  }
  if (padded != n) lg = at::constant_pad_nd(lg, {0, padded - n});  // padding: g = 1
  GatedBlocks g;
  g.log_cum = lg.view({B, H, nb, c}).cumsum(-1);
  const at::Tensor last = g.log_cum.narrow(-1, c - 1, 1);  // [B, H, nb, 1]
  g.query = g.log_cum.exp().to(options).unsqueeze(-1);
  g.key = (last - g.log_cum).exp().to(options).unsqueeze(-1);
  g.block = last.exp().to(options).unsqueeze(-1);
  return g;
}

at::Tensor gated_causal(const at::Tensor& log_cum, const at::TensorOptions& options) {
  const int64_t c = log_cum.size(-1);
  const at::Tensor diff = log_cum.unsqueeze(-1) - log_cum.unsqueeze(-2);  // G_i - G_j
  const at::Tensor above = at::ones({c, c}, options.dtype(at::kBool)).triu(1);
  return diff.masked_fill(above, -std::numeric_limits<double>::infinity()).exp().to(options);
}

at::Tensor log_gate_grad(const at::Tensor& q, const at::Tensor& dq, const at::Tensor& k, const at::Tensor& dk) {
  const at::Tensor dG = ((q * dq).sum(-1) - (k * dk).sum(-1)).to(at::kDouble);
  // Suffix sums in float64: the terms cancel pairwise (the diagonal of every row and column).
  return dG.flip(-1).cumsum(-1).flip(-1).to(q.scalar_type());
}

}  // namespace loom::linear_attention
