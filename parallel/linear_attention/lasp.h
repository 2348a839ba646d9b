// Causal linear attention, on one rank or sequence-parallel across ranks.
//
//   o_i = phi(q_i)^T S_i [ / (phi(q_i)^T z_i + eps) ],
//   S_i = sum_{j<=i} lambda^(i-j) phi(k_j) v_j^T,  z_i = sum_{j<=i} lambda^(i-j) phi(k_j)
//
// Inputs are already feature-mapped (models/feature_maps.h applies phi):
// q [B, H, n, d_k], k [B, Hkv, n, d_k], v [B, Hkv, n, d_v] with Hkv dividing H
// (GQA: key/value head j serves query heads j*H/Hkv ..). The normaliser is the
// same machinery with a column of ones appended to v.
// GQA and bytes: without decay and gates the chunk states M_c = K_c^T V_c and
// their gradients are exchanged at Hkv heads (H/Hkv times fewer bytes than
// repeating k and v first); only the local chunked kernel sees k, v repeated.
// A decay or gate per query head gives every query head its own state, so
// then k and v are repeated up front (as they are for LINEAR_ULYSSES).
//
// sequence_parallel_linear_attention() takes this rank's shard under `layout`
// (n = layout.local_len(), chunks in local order) and computes, per local chunk:
// the intra-chunk part with the chunked kernel (chunked_kernel.h) while the
// chunk states M_c = K_c^T (Lk V_c) travel (state_prefix.h), then adds
// (Lq Q_c) P_c with P_c the state entering the chunk. Backward mirrors it: the
// chunk gradients G_c = (Lq Q_c)^T dO_c travel the other way and give the
// gradient of every earlier chunk's state.
//   LASP-2: one AllGather forward, one backward; bytes independent of N.
//   LASP-2 all-scan: exclusive scans (contiguous: 1 per direction; zigzag: 2).
//   LASP-1: point-to-point chain of states, serial.
// Gated linear attention (GLA / Mamba2 style): with a log gate per token and
// head, S_i = g_i S_(i-1) + phi(k_i) v_i^T, g_i = exp(log_gate_i) in (0, 1].
// A chunk's decay is then a_c = exp(sum of its log gates) per row and head,
// travelling with its state as documents' per-chunk decays do (B x H more
// numbers per chunk, still independent of N); the same prefix methods apply.
// Backward also returns d log_gate, including the terms through the states
// exchanged across ranks (each rank's from its own chunks' entering states and
// the gradients reaching their exiting states: no extra communication).
// Padding from the layout sits after every real token and cannot affect them.
// Ordering: collective over `comm`, in forward and in backward.
#pragma once

#include <ATen/ATen.h>

#include "loom/parallel/linear_attention/state_prefix.h"
#include "loom/runtime/comm/communicator.h"
#include "loom/runtime/comm/sequence_layout.h"

namespace loom::linear_attention {

struct LinearAttentionOptions {
  int64_t block_size = 64;  // block of the chunked kernel
  at::Tensor decay;         // [H] in (0, 1]; undefined: no decay
  bool normalize = false;
  double eps = 1e-6;
  // Documents: this rank's doc_start [B, n] (runtime/comm/documents.h), or
  // undefined for one document per row. A token sees only its own document;
  // the state forgets everything before a document's first token.
  at::Tensor doc_start;
  // Gates: this rank's log gates [B, H, n] (finite, <= 0), differentiable, or
  // undefined for none. A document start overrides its token's gate (the state
  // is reset there whatever the gate). With `decay` also set, both apply.
  at::Tensor log_gate;
};

// Single rank, chunked (the sequence is all local).
at::Tensor linear_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const LinearAttentionOptions& options);

at::Tensor sequence_parallel_linear_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                              const SequenceLayout& layout, const CommPtr& comm,
                                              LinearAttentionMethod method, const LinearAttentionOptions& options);

// The O(N^2) definition with full masked matrices: the reference of the tests.
at::Tensor naive_linear_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const LinearAttentionOptions& options);

}  // namespace loom::linear_attention
