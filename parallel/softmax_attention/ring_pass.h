// The K,V rotation of ring attention, shared by ring attention
// (softmax_attention.cc, a ring of single ranks) and USP (ulysses.cc, a ring
// of all-to-all groups).
//
// K and V travel stacked as one tensor kv [2, ...] to the next rank of `ring`
// (rank g sends to g+1 and receives from g-1). `visit(src, kv_block)` runs on
// each of the R blocks in turn, its own first (src = g, then g-1, ...), with
// the next block's transfer already posted so that it overlaps the compute.
// In backward the gradient of each block travels with it and a last hop
// brings it home, so ring_backward returns the gradient of this rank's own
// block. A null `ring` is a ring of one: visit(0, kv) and nothing moves.
//
// Ordering: collective over `ring`; every rank calls the same pass in the same
// order (forward tags 0..R-2, backward tags 0..2R-1 on the ring's
// communicator).
#pragma once

#include <ATen/ATen.h>

#include <functional>

#include "loom/runtime/comm/communicator.h"

namespace loom::softmax_attention {

void ring_forward(const CommPtr& ring, const at::Tensor& kv,
                  const std::function<void(int src, const at::Tensor& kv_block)>& visit);

// `dkv` starts as zeros shaped like kv (the accumulation dtype); visit adds
// into the dkv_block it is given.
at::Tensor ring_backward(const CommPtr& ring, const at::Tensor& kv, at::Tensor dkv,
                         const std::function<void(int src, const at::Tensor& kv_block, at::Tensor& dkv_block)>& visit);

}  // namespace loom::softmax_attention
