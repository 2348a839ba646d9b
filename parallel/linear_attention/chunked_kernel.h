// Chunked causal linear attention on one rank (Lightning Attention-2 tiling).
//
//   o_i = sum_{j <= i} lambda^(i-j) (q_i . k_j) v_j        per batch and head
//
// The sequence is cut into blocks of C tokens. Inside a block the masked
// product [(Q K^T) * D] V is a small dense matmul; across blocks a running
// d_k x d_v state carries the past, multiplied right-first, so the cost is
// linear in N. The kernel walks one (batch row, head) at a time, whose blocks
// are contiguous [nb, C, d] slabs. On the CPU in float32/float64, where Loom
// was built with a CBLAS (cpu_blas.h), every block product is one BLAS call on
// raw pointers and the state recurrence is folded into the products (no
// tensor op inside the block loop). Elsewhere (other devices and dtypes, or
// cpu_blas::set_enabled(false)) it walks segments of blocks: every product of
// a segment is one bmm on contiguous operands written in place (no padding
// beyond the last block, no copies before a bmm), and the state recurrence is
// one fused pass over the segment's d_k x d_v states on the CPU (two ops per
// block elsewhere). Without decay, gates or documents no factor is applied.
// Memory: saved tensors are q, k, v and the per-block entry states (N/C x
// d_k x d_v): O(N). The C x C score blocks exist only transiently.
//
// Shapes: q, k [B, H, N, d_k], v [B, H, N, d_v]; any N (padded internally to a
// multiple of C, never truncated). `decay` is [H] in (0, 1] or undefined.
// These functions assume a zero state before token 0; sequence-parallel
// operators add the incoming state themselves (lasp.h).
// Gates: with log_gate [B, H, N] (<= 0, decay.h) the decay is data-dependent,
//   o_i = sum_{j <= i} exp(G_i - G_j) (q_i . k_j) v_j,  G = cumulative log gate,
// and the query, key, across and causal factors are per row, head and block
// (the C x C causal factor is made per segment, from block-local cumulative
// logs). chunk_backward returns dq, dk, dv only: the gradient of the log
// gates follows from them (log_gate_grad in decay.h). A `decay` given with
// gates is folded into them.
// Documents: with doc_start [B, N] (runtime/comm/documents.h; the global
// positions of the tokens are first_position ..), token i sees token j only
// when doc_start[i] <= j; a block in which a document starts passes no state
// across itself, and the returned entering states carry only what the open
// document may see (so the caller's own entering state, added with the query
// factors of lasp.h, is masked the same way).
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace loom::linear_attention {

struct ChunkForwardResult {
  at::Tensor out;           // [B, H, N, d_v]
  at::Tensor block_states;  // [B, H, nb, d_k, d_v]: state entering each block
};

// `segment`: blocks processed together (their C x C scores live at once);
// 0 picks a size that keeps a segment's scores in cache. The BLAS path holds
// one block's scores; there only the gated causal factor is made per segment.
ChunkForwardResult chunk_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& decay, int64_t block, int64_t segment = 0,
                                 const at::Tensor& doc_start = {}, int64_t first_position = 0,
                                 const at::Tensor& log_gate = {});

// Gradients of sum(out * grad_out) with respect to q, k, v.
std::tuple<at::Tensor, at::Tensor, at::Tensor> chunk_backward(const at::Tensor& q, const at::Tensor& k,
                                                              const at::Tensor& v, const at::Tensor& decay,
                                                              int64_t block, const at::Tensor& block_states,
                                                              const at::Tensor& grad_out, int64_t segment = 0,
                                                              const at::Tensor& doc_start = {},
                                                              int64_t first_position = 0,
                                                              const at::Tensor& log_gate = {});

// Differentiable single-rank chunked linear attention (no normaliser),
// differentiable in q, k, v and log_gate (when given).
// Nominal FLOPs of one forward+backward of the kernel per (batch, head) with
// block C, the masked halves of the C x C blocks included: forward
// 2NC(dk+dv) + 4N dk dv, backward 2NC(3dk+2dv) + 8N dk dv. The C terms are the
// intra-block part; at C = 0 what is left is the inter-block (state) part.
double chunked_linear_attention_flops(int64_t n, int64_t block, int64_t dk, int64_t dv);
// With gates: the same plus 4N dk for d(log_gate) (the q . dq and k . dk
// products); the exponentials of the gate factors and the cumulative sums
// are not multiply-adds and are not counted.
double gated_linear_attention_flops(int64_t n, int64_t block, int64_t dk, int64_t dv);

at::Tensor chunked_linear_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                    const at::Tensor& decay, int64_t block, const at::Tensor& doc_start = {},
                                    const at::Tensor& log_gate = {});

}  // namespace loom::linear_attention
