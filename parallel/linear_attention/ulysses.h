// Head-parallel (DeepSpeed-Ulysses / Megatron style) exchange for the linear
// families: LinearAttentionMethod::kUlysses.
//
// A recurrence needs its tokens in sequence order, so unlike softmax
// attention (which attends with positions) the linear operators reorder the
// gathered sequence: to_heads() takes a rank's sequence shard [B, H, n, ...]
// (sequence along dim 2, heads along dim 1) through one all-to-all to
// [B, H/W, N, ...] holding H/W heads of the whole padded sequence in global
// order (the zigzag layout's chunks permuted into place; the contiguous layout
// needs no permutation), and from_heads() is its inverse. Both are
// differentiable (the all-to-all's adjoint is the reverse all-to-all, the
// permutation's its inverse). The single-rank chunked kernel then runs on
// whole sequences: linear_attention (plain, decay, gated) and
// gated_delta_rule, so the result is the single-rank result exactly.
// Layout padding sits after every real token in global order and cannot reach
// them. Heads must divide by W: a ConfigError names the count otherwise.
// Bytes per rank and layer, forward: (W-1)/W x (q, k, v and, where present,
// gates sent + out received); backward the same for the gradients. Document
// starts are all-gathered once (int64, [B, n] per rank).
// Ordering: collective over `comm`; every rank makes the same calls.
#pragma once

#include <ATen/ATen.h>

#include <string>

#include "loom/runtime/comm/communicator.h"
#include "loom/runtime/comm/sequence_layout.h"

namespace loom::linear_attention {

class UlyssesExchange {
 public:
  // `heads`: the head count every exchanged tensor has (checked here, named
  // in the error with `what`, e.g. "model.n_heads").
  UlyssesExchange(const SequenceLayout& layout, CommPtr comm, int64_t heads, const std::string& what);

  // [B, H, n, ...] sequence-sharded -> [B, H/W, N, ...] head-sharded, global order.
  at::Tensor to_heads(const at::Tensor& x) const;
  // The inverse: [B, H/W, N, ...] -> [B, H, n, ...].
  at::Tensor from_heads(const at::Tensor& x) const;
  // doc_start [B, n] -> [B, N] in global order (not differentiable); undefined stays undefined.
  at::Tensor gather_doc_start(const at::Tensor& doc_start) const;
  // A per-head parameter [H, ...] -> this rank's heads [H/W, ...] (differentiable slice).
  at::Tensor local_heads(const at::Tensor& per_head) const;

 private:
  SequenceLayout layout_;
  CommPtr comm_;
  int64_t heads_;
  // Gathered-order index of each global-order token and the inverse; undefined
  // when the orders coincide (contiguous layout, one rank).
  at::Tensor to_global_, to_gathered_;
};

}  // namespace loom::linear_attention
