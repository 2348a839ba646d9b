// Decay factors of linear attention with per-head decay lambda in (0, 1].
//
// All factors are non-negative powers lambda^e with e >= 0, computed as
// exp(e * log(lambda)) in float64 and cast to the working dtype: they never
// overflow and nothing divides by a power of lambda, so long chunks with strong
// decay underflow gracefully to 0 instead of producing inf/NaN.
// An undefined `decay` tensor means lambda = 1 (no decay).
//
// Gated (data-dependent) decay, GLA / Mamba2 style: a log gate per token and
// head, log_gate [B, H, n] <= 0 (g_t = exp(log_gate) in (0, 1]):
//     S_t = g_t S_(t-1) + k_t v_t^T.
// Inside a block G_t = sum of log g from the block's first token to t
// (cumulated in float64) and every factor is exp of a difference
// G_i - G_j <= 0 (never exp(G_i) / exp(G_j)): no overflow, gates near 0
// underflow to 0. A per-head decay, when also given, is folded into the gates
// (log g + log lambda).
#pragma once

#include <ATen/ATen.h>

namespace loom::linear_attention {

// Default per-head decays from the ALiBi slopes m_h = 2^(-8 (h+1) / H):
// lambda_h = exp(-m_h), h = 0..H-1 (from local heads to nearly undecayed ones).
at::Tensor default_decay(int64_t num_heads);

// lambda^e for e = exponents (any shape E) and each head: returns [H, E...] in
// `options` (dtype and device); ones when decay is undefined.
at::Tensor decay_powers(const at::Tensor& decay, int64_t num_heads, const at::Tensor& exponents,
                        const at::TensorOptions& options);

// Factors of one block (or chunk) of n tokens, each shaped to broadcast over
// [B, H, ..., n, d]:
//   query[h, t]  = lambda^(t+1)       (decay from the block start to token t)
//   key[h, j]    = lambda^(n-1-j)     (decay from token j to the block end)
//   causal[h,i,j]= lambda^(i-j) for i >= j, else 0
//   block[h]     = lambda^n           (decay across the whole block)
struct BlockDecay {
  at::Tensor query;   // [H, n, 1]
  at::Tensor key;     // [H, n, 1]
  at::Tensor causal;  // [H, n, n]
  at::Tensor block;   // [H, 1, 1]
};
BlockDecay block_decay(const at::Tensor& decay, int64_t num_heads, int64_t n, const at::TensorOptions& options);

// The same without the n x n causal factor (for chunks of a layout, which can
// be long: O(n) work and memory, not O(n^2)).
BlockDecay chunk_decay(const at::Tensor& decay, int64_t num_heads, int64_t n, const at::TensorOptions& options);

// Document factors of consecutive blocks (or layout chunks) of `c` tokens,
// the first token at global position `first_position`, for a local
// doc_start [B, n] (runtime/comm/documents.h; n <= nb * c, the tail is
// padding that starts documents of its own). Each is 0/1 in `options`,
// shaped to multiply the decay factors above over [B, H, nb, c, ...]:
//   visible[b,0,k,i,j] = doc_start[i] <= pos_j        (same document, for j <= i)
//   query[b,0,k,t,0]   = doc_start[t] < block start   (the entering state reaches t)
//   key[b,0,k,j,0]     = pos_j >= doc_start[last]     (token j reaches the exiting state)
//   across[b,0,k,0,0]  = doc_start[last] < block start (no document starts inside)
// `visible` is built only when asked for (it is O(n c)).
struct DocumentBlocks {
  at::Tensor visible;  // [B, 1, nb, c, c] or undefined
  at::Tensor query;    // [B, 1, nb, c, 1]
  at::Tensor key;      // [B, 1, nb, c, 1]
  at::Tensor across;   // [B, 1, nb, 1, 1]
};
DocumentBlocks document_blocks(const at::Tensor& doc_start, int64_t first_position, int64_t nb, int64_t c,
                               bool with_visible, const at::TensorOptions& options);

// Gated factors of consecutive blocks (or layout chunks) of `c` tokens from
// log_gate [B, H, n] (n <= nb * c; the padded tail gets log g = 0), each
// shaped like BlockDecay's over [B, H, nb, c, ...]:
//   log_cum[b,h,k,t]  = G_t (float64, from the block start, t included)
//   query[b,h,k,t,0]  = exp(G_t)
//   key[b,h,k,j,0]    = exp(G_last - G_j)
//   block[b,h,k,0,0]  = exp(G_last)
// The c x c causal factor is made per segment of blocks by gated_causal().
// `decay` ([H] or undefined) is folded in. Checks log_gate: [B, H, n] with
// B, H, n = `batch`, `heads`, `n`, finite and <= 0.
struct GatedBlocks {
  at::Tensor log_cum;  // [B, H, nb, c], float64
  at::Tensor query;    // [B, H, nb, c, 1]
  at::Tensor key;      // [B, H, nb, c, 1]
  at::Tensor block;    // [B, H, nb, 1, 1]
};
GatedBlocks gated_blocks(const at::Tensor& log_gate, const at::Tensor& decay, int64_t nb, int64_t c,
                         const at::TensorOptions& options);

// The causal factor of blocks from their log_cum [..., c]: exp(G_i - G_j) for
// j <= i, 0 above the diagonal, [..., c, c] in `options` (the differences are
// masked before exp, so a positive difference never overflows).
at::Tensor gated_causal(const at::Tensor& log_cum, const at::TensorOptions& options);

// Checks a log gate [B, H, n] against q [B, H, n, d]: same B, H, n, floating,
// finite and <= 0. `what` names the operator in the error.
void check_log_gate(const at::Tensor& log_gate, const at::Tensor& q, const char* what);

// Gradient of the log gates of one sequence that starts from a zero state
// (a kernel call or a layout chunk, all its terms included): with
// G_m the cumulative log gate, dL/dG_m = q_m . dq_m - k_m . dk_m (the pair
// (i, j) carries exp(G_i - G_j): + on its query row, - on its key column),
// and dL/dlog g_u = sum_{m >= u} dL/dG_m. q, dq, k, dk [B, H, n, d_k] -> [B, H, n].
// Documents need nothing more: a masked pair is a constant 0.
at::Tensor log_gate_grad(const at::Tensor& q, const at::Tensor& dq, const at::Tensor& k, const at::Tensor& dk);

}  // namespace loom::linear_attention
