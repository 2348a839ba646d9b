// Gated DeltaNet on one stretch of tokens: the chunked (WY/UT) kernel.
//
// Per batch row and head, with k_t L2-normalised by the caller, beta_t in
// (0, 1) and alpha_t = exp(log_alpha_t) in (0, 1]:
//     S_t = alpha_t (I - beta_t k_t k_t^T) S_(t-1) + beta_t k_t v_t^T,   o_t = S_t^T q_t
// (S is d_k x d_v). Shapes: q, k [B, H, n, d_k], v [B, H, n, d_v], beta and
// log_alpha [B, H, n]; log_alpha must be finite (a forgetting gate of exactly
// 0 is a document start, below).
//
// Block form. The stretch is cut into blocks of C tokens (the last one padded
// with tokens that leave the state unchanged). Inside a block, with
// G_t = sum of log_alpha up to t, gamma_t = exp(G_t), Gamma_ti = exp(G_t - G_i)
// for i <= t (differences only: nothing overflows or underflows wrongly for
// gates near 0), and the entering state S:
//     u_t = beta_t (v_t - alpha_t S_(t-1)^T k_t)          (the delta rule's new value)
//     (I + L) U = diag(beta) V - diag(beta gamma) K S,   L_ti = beta_t Gamma_ti k_t.k_i (i < t)
// so with one unit-lower-triangular solve per block (no token loop)
//     U0 = (I + L)^-1 diag(beta) V,   W = (I + L)^-1 diag(beta gamma) K,   U = U0 - W S
//     O  = Mq U0 + (diag(gamma) Q - Mq W) S,     Mq = (Q K^T) * Gamma (i <= t)
//     S' = A S + B,  A = gamma_C I - K^T diag(e) W,  B = K^T diag(e) U0,  e_i = Gamma_Ci.
// A block is thus an affine map of its entering state; blocks and chunks of
// the layout compose as (A1, B1) then (A2, B2) = (A2 A1, A2 B1 + B2).
//
// Documents: with doc_start (this stretch's [B, n], runtime/comm/documents.h,
// its first token at global position first_position), a token whose
// doc_start is its own position starts a document: alpha there is 0, so the
// state forgets everything before it. The kernel applies it as masks (no
// log 0): Gamma_ti is kept only within one document, gamma_t only while no
// document has started in the block up to t.
//
// Cost per block: about C^2 (3 d_k + d_v) + C d_k (d_k + 2 d_v) + d_k^2 d_v
// multiply-adds and a C x C triangular solve with d_k + d_v right-hand sides; memory (what
// autograd keeps) O(n (C + d)) plus one d_k x d_v state per block.
// Who calls it: gated_delta.h (one rank, and each rank's chunks of the
// sequence-parallel operator).
#pragma once

#include <ATen/ATen.h>

#include <utility>

namespace loom::gated_delta {

// A stretch of n tokens cut into nb blocks of C: inputs [B, H, nb, C, *],
// gates [B, H, nb, C]; the document masks broadcast over heads.
struct Blocks {
  at::Tensor q, k, v, beta, log_alpha;
  at::Tensor same_document;  // [B, 1, nb, C, C] (t, i), or undefined without documents
  at::Tensor sees_entering;  // [B, 1, nb, C]: no document started in the block up to t; or undefined
  int64_t n = 0, block = 0, count = 0;
};
Blocks cut_blocks(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& beta,
                  const at::Tensor& log_alpha, int64_t block, const at::Tensor& doc_start = {},
                  int64_t first_position = 0);

// What does not depend on the entering state, all blocks at once (differentiable).
struct BlockMaps {
  at::Tensor decay;       // Gamma, [B, H, nb, C, C], zero above the diagonal and across documents
  at::Tensor gamma;       // [B, H, nb, C]
  at::Tensor u0, w;       // [B, H, nb, C, d_v], [B, H, nb, C, d_k]
  at::Tensor transition;  // A, [B, H, nb, d_k, d_k]
  at::Tensor offset;      // B, [B, H, nb, d_k, d_v]
};
BlockMaps block_maps(const Blocks& x);

// The query side: O_b = local_out_b + query_b S_b for the state S_b entering block b.
struct BlockOutputs {
  at::Tensor local_out;  // Mq U0, [B, H, nb, C, d_v]
  at::Tensor query;      // diag(gamma) Q - Mq W, [B, H, nb, C, d_k]
};
BlockOutputs block_outputs(const Blocks& x, const BlockMaps& m);

// States entering every block from `entering` [B, H, d_k, d_v] (a short loop
// over blocks of d_k x d_k by d_k x d_v products), and the state leaving the stretch.
std::pair<at::Tensor, at::Tensor> block_states(const BlockMaps& m, const at::Tensor& entering);

// [B, H, n, d_v] from the block outputs and the states entering each block.
at::Tensor stretch_outputs(const BlockOutputs& o, const at::Tensor& states, int64_t n);

// The affine map of the whole stretch: (A, B) composed over its blocks.
std::pair<at::Tensor, at::Tensor> compose_blocks(const BlockMaps& m);

// Multiply-add FLOPs (2 per multiply-add) of the chunked algorithm above per
// (batch row, head) for n tokens, blocks of C, useful tokens only (no padding):
//   forward  n [C (7 d_k + 3 d_v) + 2 d_k^2 + 4 d_k d_v] + 2 (n / C) d_k^2 d_v
//     (Q K^T, K K^T, Mq W: 2C^2 d_k each; Mq U0: 2C^2 d_v; the unit-triangular
//     solve with d_k + d_v right-hand sides: C^2 (d_k + d_v); the maps
//     K^T diag(e) W, K^T diag(e) U0: 2C d_k^2 + 2C d_k d_v; query x state:
//     2C d_k d_v; the state recurrence A S: 2 d_k^2 d_v per block);
//   forward+backward: 3x the products (each product's backward is two of its
//     size) and 4x the solve (the transposed solve and the C x C outer
//     product for d L): n [C (22 d_k + 10 d_v) + 6 d_k^2 + 12 d_k d_v] + 6 (n / C) d_k^2 d_v.
// Exponentials, masks, gates and the L2 norm are not multiply-adds and are
// not counted. Benchmarks evaluate it at a fixed reference block
// (kGatedDeltaReferenceBlock) whatever block runs, so that a block that does
// more work per token cannot look faster.
double gated_delta_forward_flops(int64_t n, int64_t block, int64_t dk, int64_t dv);
double gated_delta_flops(int64_t n, int64_t block, int64_t dk, int64_t dv);
constexpr int64_t kGatedDeltaReferenceBlock = 64;

// Differentiable single-stretch forward from a zero state: [B, H, n, d_v].
at::Tensor chunked_gated_delta_rule(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                    const at::Tensor& beta, const at::Tensor& log_alpha, int64_t block,
                                    const at::Tensor& doc_start = {});

}  // namespace loom::gated_delta
