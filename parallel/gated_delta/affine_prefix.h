// Exclusive prefixes of affine state maps across ranks: the communication of
// Gated DeltaNet's sequence parallelism (LASP-2, its all-scan variant and the
// LASP-1 chain).
//
// Each chunk c of a SequenceLayout maps the state entering it to the state
// leaving it, S -> A_c S + B_c (A_c [B, H, d_k, d_k], B_c [B, H, d_k, d_v]).
// Maps compose, associatively but not commutatively:
//     (A1, B1) then (A2, B2)  =  (A2 A1, A2 B1 + B2).
// The state entering chunk c is the B of the composition of every chunk before
// it (from a zero state). Backward reads the sequence from the end with the
// transposed maps: the gradient reaching chunk s's leaving state is
//     R_s = sum_{c > s} A_(s+1)^T ... A_(c-1)^T G_c,   G_c = dLoss/d(state entering c)
// i.e. the same exclusive prefix over the pairs (A_c^T, G_c) in reverse order.
// An AffinePrefix computes that prefix for this rank's chunks in either
// direction, for any layout (contiguous, zigzag):
//   kLasp2         one AllGather of every chunk's (A, B): W x chunks_per_rank x
//                  B x H x (d_k^2 + d_k d_v) numbers, independent of N; each rank
//                  composes the prefixes of its own chunks;
//   kLasp2AllScan  exclusive scans over ranks with the composition as a user
//                  operation (contiguous: one; zigzag: two, one of them over
//                  comm->reversed()); volume independent of W;
//   kLasp1         the state handed chunk to chunk over point-to-point, serially.
// start() posts the communication and returns at once (LASP-2, all-scan), so
// the caller computes meanwhile; finish() waits and returns the prefixes.
// Ordering: collective over `comm`; every rank creates, starts and finishes
// its prefixes in the same order.
#pragma once

#include <ATen/ATen.h>

#include <memory>

#include "loom/parallel/linear_attention/state_prefix.h"
#include "loom/runtime/comm/communicator.h"
#include "loom/runtime/comm/sequence_layout.h"

namespace loom::gated_delta {

using linear_attention::LinearAttentionMethod;
using linear_attention::PrefixDirection;

class AffinePrefix {
 public:
  virtual ~AffinePrefix() = default;
  // maps [chunks_per_rank, B, H, d_k, d_k], offsets [chunks_per_rank, B, H, d_k, d_v]:
  // this rank's chunks in local order (for kBackward: the transposed maps and
  // the gradients entering each chunk).
  virtual void start(const at::Tensor& maps, const at::Tensor& offsets) = 0;
  // [chunks_per_rank, B, H, d_k, d_v]: the exclusive prefix (applied to a zero state) of each local chunk.
  virtual at::Tensor finish() = 0;
};

std::unique_ptr<AffinePrefix> make_affine_prefix(LinearAttentionMethod method, const SequenceLayout& layout,
                                                 const CommPtr& comm, PrefixDirection direction);

}  // namespace loom::gated_delta
