#include "loom/parallel/gated_delta/chunked_kernel.h"

#include <algorithm>
#include <limits>
#include <tuple>
#include <vector>

#include "loom/runtime/comm/documents.h"

namespace loom::gated_delta {
namespace {

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& beta,
                  const at::Tensor& log_alpha, int64_t block) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "gated delta rule: q, k, v must be [B, H, n, d], got ",
              q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  TORCH_CHECK(q.sizes() == k.sizes(), "gated delta rule: q ", q.sizes(), " and k ", k.sizes(), " must match");
  TORCH_CHECK(v.size(0) == q.size(0) && v.size(1) == q.size(1) && v.size(2) == q.size(2), "gated delta rule: v ",
              v.sizes(), " must match q ", q.sizes(), " in batch, heads and length");
  const std::vector<int64_t> gate_shape{q.size(0), q.size(1), q.size(2)};
  TORCH_CHECK(beta.sizes() == at::IntArrayRef(gate_shape) && log_alpha.sizes() == at::IntArrayRef(gate_shape),
              "gated delta rule: beta ", beta.sizes(), " and log_alpha ", log_alpha.sizes(), " must be [B, H, n] = ",
              at::IntArrayRef(gate_shape));
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type() &&
                  q.scalar_type() == beta.scalar_type() && q.scalar_type() == log_alpha.scalar_type(),
              "gated delta rule: q, k, v, beta, log_alpha must share a dtype");
  TORCH_CHECK(block >= 1, "gated delta rule: block size must be >= 1, got ", block);
}

// [B, H, n, *] -> [B, H, nb, C, *] (gates: [B, H, n] -> [B, H, nb, C]), zero-padded
// at the end. Padding tokens (k = v = beta = 0, log_alpha = 0) leave the state alone.
at::Tensor to_blocks(const at::Tensor& x, int64_t nb, int64_t c) {
  const int64_t pad = nb * c - x.size(2);
  at::Tensor y = x;
  if (pad > 0) y = x.dim() == 4 ? at::constant_pad_nd(x, {0, 0, 0, pad}) : at::constant_pad_nd(x, {0, pad});
  std::vector<int64_t> shape{x.size(0), x.size(1), nb, c};
  if (x.dim() == 4) shape.push_back(x.size(3));
  return y.reshape(shape);
}

}  // namespace

Blocks cut_blocks(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& beta,
                  const at::Tensor& log_alpha, int64_t block, const at::Tensor& doc_start, int64_t first_position) {
  check_inputs(q, k, v, beta, log_alpha, block);
  check_document_starts(doc_start, q, 2, "gated delta rule");
  Blocks x;
  x.n = q.size(2);
  x.block = std::max<int64_t>(1, std::min(block, x.n));
  x.count = (x.n + x.block - 1) / x.block;
  x.q = to_blocks(q, x.count, x.block);
  x.k = to_blocks(k, x.count, x.block);
  x.v = to_blocks(v, x.count, x.block);
  x.beta = to_blocks(beta, x.count, x.block);
  x.log_alpha = to_blocks(log_alpha, x.count, x.block);
  if (doc_start.defined()) {
    // A token starts a document when its doc_start is its own position;
    // segment = number of starts in the block up to and including t.
    const at::Tensor positions = at::arange(first_position, first_position + x.n, doc_start.options());
    at::Tensor starts = doc_start.eq(positions.unsqueeze(0)).to(at::kLong);
    if (x.count * x.block > x.n) starts = at::constant_pad_nd(starts, {0, x.count * x.block - x.n});
    const at::Tensor segment = starts.reshape({doc_start.size(0), x.count, x.block}).cumsum(-1);
    x.same_document = segment.unsqueeze(-1).eq(segment.unsqueeze(-2)).to(q.options()).unsqueeze(1);
    x.sees_entering = segment.eq(0).to(q.options()).unsqueeze(1);
  }
  return x;
}

BlockMaps block_maps(const Blocks& x) {
  const int64_t C = x.block, dv = x.v.size(-1), dk = x.k.size(-1);
  BlockMaps m;
  const at::Tensor G = x.log_alpha.cumsum(-1);  // [B, H, nb, C]
  // exp of differences only, and -inf above the diagonal before exp (there the
  // difference is positive and could overflow).
  const at::Tensor above = at::ones({C, C}, x.q.options().dtype(at::kBool)).triu(1);
  m.decay = (G.unsqueeze(-1) - G.unsqueeze(-2)).masked_fill(above, -std::numeric_limits<double>::infinity()).exp();
  m.gamma = G.exp();
  if (x.same_document.defined()) {
    m.decay = m.decay * x.same_document;
    m.gamma = m.gamma * x.sees_entering;
  }
  // (I + L) [U0 W] = [diag(beta) V, diag(beta gamma) K], L strictly lower.
  const at::Tensor L = (at::matmul(x.k, x.k.transpose(-1, -2)) * m.decay).tril(-1) * x.beta.unsqueeze(-1);
  const at::Tensor rhs = at::cat({x.v * x.beta.unsqueeze(-1), x.k * (x.beta * m.gamma).unsqueeze(-1)}, -1);
  // libtorch 1.13 has no meta kernel for linalg_solve_triangular; the older
  // (deprecated, warning) triangular_solve has one, so the meta device uses that.
  const at::Tensor solved =
      L.is_meta() ? std::get<0>(at::triangular_solve(rhs, L, /*upper=*/false, /*transpose=*/false,
                                                     /*unitriangular=*/true))
                  : at::linalg_solve_triangular(L, rhs, /*upper=*/false, /*left=*/true, /*unitriangular=*/true);
  m.u0 = solved.narrow(-1, 0, dv);
  m.w = solved.narrow(-1, dv, dk);
  // Leaving state: e_i = Gamma_(C-1, i) carries token i's write to the block's end.
  const at::Tensor ke = (x.k * m.decay.select(-2, C - 1).unsqueeze(-1)).transpose(-1, -2);  // [.., d_k, C]
  const at::Tensor eye = at::eye(dk, x.k.options());
  m.transition = m.gamma.select(-1, C - 1).unsqueeze(-1).unsqueeze(-1) * eye - at::matmul(ke, m.w);
  m.offset = at::matmul(ke, m.u0);
  return m;
}

BlockOutputs block_outputs(const Blocks& x, const BlockMaps& m) {
  const at::Tensor scores = at::matmul(x.q, x.k.transpose(-1, -2)) * m.decay;  // Mq
  return {at::matmul(scores, m.u0), x.q * m.gamma.unsqueeze(-1) - at::matmul(scores, m.w)};
}

std::pair<at::Tensor, at::Tensor> block_states(const BlockMaps& m, const at::Tensor& entering) {
  // unbind, not select(2, b) in the loop: each select's backward writes a
  // zero tensor of the whole [.., nb, ..] size, which made backward O(nb^2).
  const std::vector<at::Tensor> transitions = m.transition.unbind(2), offsets = m.offset.unbind(2);
  const int64_t nb = static_cast<int64_t>(transitions.size());
  std::vector<at::Tensor> states;
  states.reserve(nb);
  at::Tensor S = entering;
  for (int64_t b = 0; b < nb; ++b) {
    states.push_back(S);
    S = at::matmul(transitions[b], S) + offsets[b];
  }
  return {at::stack(states, 2), S};
}

at::Tensor stretch_outputs(const BlockOutputs& o, const at::Tensor& states, int64_t n) {
  const at::Tensor out = o.local_out + at::matmul(o.query, states);  // [B, H, nb, C, d_v]
  return out.reshape({out.size(0), out.size(1), out.size(2) * out.size(3), out.size(4)}).narrow(2, 0, n);
}

std::pair<at::Tensor, at::Tensor> compose_blocks(const BlockMaps& m) {
  const std::vector<at::Tensor> transitions = m.transition.unbind(2), offsets = m.offset.unbind(2);
  at::Tensor A = transitions[0], B = offsets[0];
  for (size_t b = 1; b < transitions.size(); ++b) {
    B = at::matmul(transitions[b], B) + offsets[b];
    A = at::matmul(transitions[b], A);
  }
  return {A, B};
}

double gated_delta_forward_flops(int64_t n, int64_t block, int64_t dk, int64_t dv) {
  const double N = static_cast<double>(n), C = static_cast<double>(block), k = static_cast<double>(dk),
               v = static_cast<double>(dv);
  return N * (C * (7 * k + 3 * v) + 2 * k * k + 4 * k * v) + 2 * (N / C) * k * k * v;
}

double gated_delta_flops(int64_t n, int64_t block, int64_t dk, int64_t dv) {
  const double N = static_cast<double>(n), C = static_cast<double>(block), k = static_cast<double>(dk),
               v = static_cast<double>(dv);
  return N * (C * (22 * k + 10 * v) + 6 * k * k + 12 * k * v) + 6 * (N / C) * k * k * v;
}

at::Tensor chunked_gated_delta_rule(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                    const at::Tensor& beta, const at::Tensor& log_alpha, int64_t block,
                                    const at::Tensor& doc_start) {
  const Blocks x = cut_blocks(q, k, v, beta, log_alpha, block, doc_start, 0);
  const BlockMaps m = block_maps(x);
  const BlockOutputs o = block_outputs(x, m);
  const at::Tensor zero = at::zeros({q.size(0), q.size(1), q.size(3), v.size(3)}, q.options());
  return stretch_outputs(o, block_states(m, zero).first, x.n);
}

}  // namespace loom::gated_delta
