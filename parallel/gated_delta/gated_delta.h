// Gated DeltaNet (Yang, Kautz, Hatamizadeh 2024), on one rank or
// sequence-parallel across ranks, exact:
//     S_t = alpha_t (I - beta_t k_t k_t^T) S_(t-1) + beta_t k_t v_t^T,   o_t = S_t^T q_t
// per batch row and head (chunked_kernel.h has the block algebra). Inputs:
// q, k [B, H, n, d_k] with k L2-normalised by the caller, v [B, H, n, d_v],
// beta [B, H, n] in (0, 1), log_alpha [B, H, n] = log alpha_t, finite and <= 0.
// Heads are matched one to one; a model with fewer q/k heads than value heads
// repeats them first (models/mixers.h).
//
// sequence_parallel_gated_delta_rule() takes this rank's shard under `layout`
// (n = layout.local_len(), chunks in local order; padding after the real
// tokens never reaches them). Every layout chunk is an affine map of the state
// entering it, S -> A_c S + B_c. Forward, per rank: (A_c, B_c) of its chunks
// (the WY maps of their blocks, composed), the exchange of affine_prefix.h
// posted at once, the query side of each block (Mq U0 and the effective
// queries) computed while it flies, then the states from the received prefix
// and the outputs. Backward: the gradient entering each chunk's state
// (G_c = sum over its blocks of the transposed block maps applied to
// query_b^T dO_b), one exchange of (A_c^T, G_c) from the end of the
// sequence, then the local gradients of q, k, v, beta and log_alpha.
//   LASP-2 (kLasp2): one AllGather forward and one backward, each
//     (W-1) x chunks_per_rank x B x H x (d_k^2 + d_k d_v) x sizeof(dtype)
//     bytes received per rank, independent of N;
//   all-scan (kLasp2AllScan) and the point-to-point chain (kLasp1), as in
//     affine_prefix.h.
// The local backward re-runs the chunk's forward under autograd (the
// rank keeps only its inputs, the entering states and the chunk maps between
// forward and backward; the recomputation's graph is O(n (C + d)) and freed at
// once): an exact gradient, not a hand-written one.
// Documents: options.doc_start (this rank's [B, n]) makes a document's first
// token forget the state (alpha = 0 there); across ranks nothing more travels,
// the chunk maps carry it (A_c = 0 below a start inside the chunk).
// bf16/fp16 inputs run in float32 (maps, states and the exchanged payload).
// Ordering: collective over `comm`, in forward and in backward.
#pragma once

#include <ATen/ATen.h>

#include "loom/parallel/gated_delta/affine_prefix.h"
#include "loom/runtime/comm/communicator.h"
#include "loom/runtime/comm/sequence_layout.h"

namespace loom::gated_delta {

struct GatedDeltaOptions {
  int64_t block_size = 64;  // C, tokens per block of the chunked kernel
  // Documents: this rank's doc_start [B, n] (runtime/comm/documents.h), or
  // undefined for one document per row.
  at::Tensor doc_start;
};

// Single rank, the whole sequence local (differentiable through autograd).
at::Tensor gated_delta_rule(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& beta,
                            const at::Tensor& log_alpha, const GatedDeltaOptions& options);

at::Tensor sequence_parallel_gated_delta_rule(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                              const at::Tensor& beta, const at::Tensor& log_alpha,
                                              const SequenceLayout& layout, const CommPtr& comm,
                                              LinearAttentionMethod method, const GatedDeltaOptions& options);

// One token of the recurrence (incremental decoding): q, k [S, H, d_k], v [S, H, d_v],
// beta, log_alpha [S, H]; `state` [S, H, d_k, d_v] is updated in place
// (undefined on the first token: zeros). Returns o [S, H, d_v].
at::Tensor gated_delta_step(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& beta,
                            const at::Tensor& log_alpha, at::Tensor& state);

}  // namespace loom::gated_delta
