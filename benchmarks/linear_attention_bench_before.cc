// The chunked linear attention kernel as it was before issue 19 (main at
// ded9f54), kept only so that loom-linear-attention-bench can time it next to
// the current kernel in the same process (the "before" row of
// benchmarks/README.md). Not used by Loom itself; the body is a verbatim copy.
#include "linear_attention_bench_before.h"

#include <torch/autograd.h>

#include "loom/parallel/linear_attention/chunked_kernel.h"
#include "loom/parallel/linear_attention/decay.h"
#include "loom/runtime/comm/documents.h"

namespace loom::bench::linear_before_issue19 {
using loom::linear_attention::block_decay;
using loom::linear_attention::BlockDecay;
using loom::linear_attention::check_log_gate;
using loom::linear_attention::ChunkForwardResult;
using loom::linear_attention::document_blocks;
using loom::linear_attention::DocumentBlocks;
using loom::linear_attention::gated_blocks;
using loom::linear_attention::gated_causal;
using loom::linear_attention::GatedBlocks;

namespace {

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t block) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "linear attention: q, k, v must be [B, H, N, d], got ",
              q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  TORCH_CHECK(q.sizes() == k.sizes(), "linear attention: q ", q.sizes(), " and k ", k.sizes(), " must match");
  TORCH_CHECK(v.size(0) == q.size(0) && v.size(1) == q.size(1) && v.size(2) == q.size(2), "linear attention: v ",
              v.sizes(), " must match q ", q.sizes(), " in batch, heads and length");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "linear attention: q, k, v must share a dtype");
  TORCH_CHECK(block >= 1, "linear attention: block size must be >= 1, got ", block);
}

int64_t effective_block(int64_t n, int64_t block) { return std::max<int64_t>(1, std::min(block, n)); }

// [B, H, N, d] -> [B, H, nb, C, d], zero-padded at the end.
at::Tensor to_blocks(const at::Tensor& x, int64_t nb, int64_t c) {
  const int64_t n = x.size(2), padded = nb * c;
  at::Tensor y = x;
  if (padded != n) y = at::constant_pad_nd(x, {0, 0, 0, padded - n});
  return y.reshape({x.size(0), x.size(1), nb, c, x.size(3)});
}

at::Tensor from_blocks(const at::Tensor& x, int64_t n) {
  return x.reshape({x.size(0), x.size(1), x.size(2) * x.size(3), x.size(4)}).narrow(2, 0, n);
}

// Head-wise factor [H, a, b] viewed to broadcast over [B, H, nb, a, b].
at::Tensor per_head(const at::Tensor& f) { return f.unsqueeze(0).unsqueeze(2); }

// The kernel's factors, each broadcastable over [B, H, nb, C, *]: decay alone
// has batch and block dimensions of size 1; gates make query, key and across
// per row, head and block (and the causal factor per segment, from log_cum);
// documents make query, key and across per row and block, and add the
// same-document mask `visible`.
struct KernelFactors {
  at::Tensor causal;   // [1, H, 1, C, C], undefined with gates
  at::Tensor log_cum;  // [B, H, nb, C] with gates (float64), else undefined
  at::Tensor visible;  // [B, 1, nb, C, C] with documents, else undefined
  at::Tensor query;    // [1|B, H, 1|nb, C, 1]
  at::Tensor key;      // [1|B, H, 1|nb, C, 1]
  at::Tensor across;   // [1|B, H, 1|nb, 1, 1]

  // Blocks b0 .. b0+n-1 of a factor (all of them share it when its block dimension is 1).
  static at::Tensor blocks(const at::Tensor& f, int64_t b0, int64_t n) {
    return f.size(2) == 1 ? f : f.narrow(2, b0, n);
  }
  // Decay across block b, against a [B, H, d_k, d_v] state.
  at::Tensor across_block(int64_t b) const { return across.select(2, across.size(2) == 1 ? 0 : b); }
  // The causal factor of blocks b0 .. b0+n-1 (made per segment with gates).
  at::Tensor causal_blocks(int64_t b0, int64_t n, const at::TensorOptions& options) const {
    return log_cum.defined() ? gated_causal(log_cum.narrow(2, b0, n), options) : causal;
  }
  void mask_scores(at::Tensor& scores, const at::Tensor& causal_factor, int64_t b0, int64_t n) const {
    scores.mul_(causal_factor);
    if (visible.defined()) scores.mul_(blocks(visible, b0, n));
  }
};

KernelFactors kernel_factors(const at::Tensor& decay, const at::Tensor& log_gate, int64_t H, int64_t C, int64_t nb,
                             const at::Tensor& doc_start, int64_t first_position, const at::TensorOptions& options) {
  KernelFactors k;
  if (log_gate.defined()) {
    GatedBlocks g = gated_blocks(log_gate, decay, nb, C, options);
    k.log_cum = g.log_cum;
    k.query = g.query;
    k.key = g.key;
    k.across = g.block;
  } else {
    const BlockDecay f = block_decay(decay, H, C, options);
    k.causal = per_head(f.causal);
    k.query = per_head(f.query);
    k.key = per_head(f.key);
    k.across = per_head(f.block);
  }
  if (doc_start.defined()) {
    const DocumentBlocks d = document_blocks(doc_start, first_position, nb, C, /*with_visible=*/true, options);
    k.visible = d.visible;
    k.query = k.query * d.query;
    k.key = k.key * d.key;
    k.across = k.across * d.across;
  }
  return k;
}

}  // namespace

namespace {

// Blocks are processed in segments small enough that a segment's score blocks
// ([B, H, blocks, C, C]) stay in cache: about 2^18 elements per segment.
int64_t segment_blocks(int64_t batch_heads, int64_t c) {
  return std::max<int64_t>(1, (int64_t(1) << 18) / std::max<int64_t>(1, batch_heads * c * c));
}

}  // namespace

ChunkForwardResult chunk_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& decay, int64_t block, int64_t segment, const at::Tensor& doc_start,
                                 int64_t first_position, const at::Tensor& log_gate) {
  at::NoGradGuard no_grad;  // a raw kernel: autograd wraps it from outside
  check_inputs(q, k, v, block);
  check_document_starts(doc_start, q, 2, "linear attention");
  if (log_gate.defined()) check_log_gate(log_gate, q, "linear attention");
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), dk = q.size(3), dv = v.size(3);
  const int64_t C = effective_block(N, block), nb = (N + C - 1) / C;
  const KernelFactors f = kernel_factors(decay, log_gate, H, C, nb, doc_start, first_position, q.options());
  const at::Tensor Q = to_blocks(q, nb, C), K = to_blocks(k, nb, C), V = to_blocks(v, nb, C);

  at::Tensor O = at::empty({B, H, nb, C, dv}, q.options());
  at::Tensor states = at::empty({B, H, nb, dk, dv}, q.options());
  at::Tensor carry = at::zeros({B, H, dk, dv}, q.options());  // state entering the segment
  const int64_t seg = segment > 0 ? segment : segment_blocks(B * H, C);
  for (int64_t b0 = 0; b0 < nb; b0 += seg) {
    const int64_t n = std::min(seg, nb - b0);
    const at::Tensor Qs = Q.narrow(2, b0, n), Ks = K.narrow(2, b0, n), Vs = V.narrow(2, b0, n);
    at::Tensor Os = O.narrow(2, b0, n);
    // Intra-block: [(Q K^T) * D] V.
    at::Tensor scores = at::matmul(Qs, Ks.transpose(-1, -2));
    f.mask_scores(scores, f.causal_blocks(b0, n, scores.options()), b0, n);
    at::matmul_out(Os, scores, Vs);
    // State entering block b: S_b = a_(b-1) S_(b-1) + K_(b-1)^T (Lk V_(b-1)).
    const at::Tensor block_kv = at::matmul(Ks.transpose(-1, -2), Vs * KernelFactors::blocks(f.key, b0, n));
    at::Tensor st = states.narrow(2, b0, n);
    st.select(2, 0).copy_(carry);
    for (int64_t b = 1; b < n; ++b) {
      at::Tensor dst = st.select(2, b);
      at::mul_out(dst, st.select(2, b - 1), f.across_block(b0 + b - 1));
      dst.add_(block_kv.select(2, b - 1));
    }
    carry = st.select(2, n - 1) * f.across_block(b0 + n - 1) + block_kv.select(2, n - 1);
    // Inter-block: O_b += (Lq Q_b) S_b.
    Os.add_(at::matmul(Qs * KernelFactors::blocks(f.query, b0, n), st));
  }
  return {from_blocks(O, N), states};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> chunk_backward(const at::Tensor& q, const at::Tensor& k,
                                                              const at::Tensor& v, const at::Tensor& decay,
                                                              int64_t block, const at::Tensor& block_states,
                                                              const at::Tensor& grad_out, int64_t segment,
                                                              const at::Tensor& doc_start, int64_t first_position,
                                                              const at::Tensor& log_gate) {
  at::NoGradGuard no_grad;
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), dk = q.size(3), dv = v.size(3);
  const int64_t C = effective_block(N, block), nb = (N + C - 1) / C;
  const KernelFactors f = kernel_factors(decay, log_gate, H, C, nb, doc_start, first_position, q.options());
  const at::Tensor Q = to_blocks(q, nb, C), K = to_blocks(k, nb, C), V = to_blocks(v, nb, C);
  const at::Tensor dO = to_blocks(grad_out, nb, C);

  at::Tensor dQ = at::empty({B, H, nb, C, dk}, q.options());
  at::Tensor dK = at::empty({B, H, nb, C, dk}, q.options());
  at::Tensor dV = at::empty({B, H, nb, C, dv}, q.options());
  // carry = R of the block before the segment: the gradient reaching it through
  // every later state, R_b = sum_{c > b} (decay across b+1 .. c-1) G_c, G_c = (Lq Q_c)^T dO_c.
  at::Tensor carry = at::zeros({B, H, dk, dv}, q.options());
  const int64_t seg = segment > 0 ? segment : segment_blocks(B * H, C);
  const int64_t last_start = ((nb - 1) / seg) * seg;
  for (int64_t b0 = last_start; b0 >= 0; b0 -= seg) {
    const int64_t n = std::min(seg, nb - b0);
    const at::Tensor Qs = Q.narrow(2, b0, n), Ks = K.narrow(2, b0, n), Vs = V.narrow(2, b0, n);
    const at::Tensor dOs = dO.narrow(2, b0, n), st = block_states.narrow(2, b0, n);
    at::Tensor dQs = dQ.narrow(2, b0, n), dKs = dK.narrow(2, b0, n), dVs = dV.narrow(2, b0, n);
    // Intra-block: A = (Q K^T) * D, O = A V.
    at::Tensor scores = at::matmul(Qs, Ks.transpose(-1, -2));
    const at::Tensor causal = f.causal_blocks(b0, n, scores.options());
    f.mask_scores(scores, causal, b0, n);
    at::matmul_out(dVs, scores.transpose(-1, -2), dOs);
    at::Tensor dA = at::matmul(dOs, Vs.transpose(-1, -2));
    f.mask_scores(dA, causal, b0, n);
    at::matmul_out(dQs, dA, Ks);
    at::matmul_out(dKs, dA.transpose(-1, -2), Qs);
    // Inter-block.
    const at::Tensor query = KernelFactors::blocks(f.query, b0, n), key = KernelFactors::blocks(f.key, b0, n);
    dQs.add_(at::matmul(dOs, st.transpose(-1, -2)).mul_(query));
    const at::Tensor G = at::matmul((Qs * query).transpose(-1, -2), dOs);
    at::Tensor R = at::empty_like(G);
    R.select(2, n - 1).copy_(carry);
    for (int64_t b = n - 2; b >= 0; --b) {
      at::Tensor dst = R.select(2, b);
      at::mul_out(dst, R.select(2, b + 1), f.across_block(b0 + b + 1));
      dst.add_(G.select(2, b + 1));
    }
    carry = R.select(2, 0) * f.across_block(b0) + G.select(2, 0);
    dKs.add_(at::matmul(Vs, R.transpose(-1, -2)).mul_(key));
    dVs.add_(at::matmul(Ks, R).mul_(key));
  }
  return {from_blocks(dQ, N), from_blocks(dK, N), from_blocks(dV, N)};
}

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The autograd wrapper of the time: per-head decay only (no documents, no
// gates), lambda = 1 passed as a tensor of ones.
struct BeforeFunction : public torch::autograd::Function<BeforeFunction> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& decay, int64_t block) {
    auto result = chunk_forward(q, k, v, decay, block, 0, {}, 0, {});
    ctx->save_for_backward({q, k, v, decay, result.block_states});
    ctx->saved_data["block"] = block;
    return result.out;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    auto [dq, dk, dv] = chunk_backward(saved[0], saved[1], saved[2], saved[3], ctx->saved_data["block"].toInt(),
                                       saved[4], grads[0].contiguous(), 0, {}, 0, {});
    return {dq, dk, dv, at::Tensor(), at::Tensor()};
  }
};

}  // namespace

at::Tensor chunked_linear_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                    const at::Tensor& decay, int64_t block) {
  const at::Tensor d = decay.defined() ? decay : at::ones({q.size(1)}, at::kDouble);
  return BeforeFunction::apply(q, k, v, d, block);
}

}  // namespace loom::bench::linear_before_issue19
