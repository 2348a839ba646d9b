// Decay factors of linear attention with per-head decay lambda in (0, 1].
//
// All factors are non-negative powers lambda^e with e >= 0, computed as
// exp(e * log(lambda)) in float64 and cast to the working dtype: they never
// overflow and nothing divides by a power of lambda, so long chunks with strong
// decay underflow gracefully to 0 instead of producing inf/NaN.
// An undefined `decay` tensor means lambda = 1 (no decay).
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

}  // namespace loom::linear_attention
