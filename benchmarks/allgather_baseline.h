// The all-gather K,V baseline of loom-bench's recurrent layers (GLA, Gated
// DeltaNet): the sequence parallelism a user would otherwise write without
// LASP or head redistribution (Ulysses is a method of its own).
//
// allgather_recurrent(): every rank gathers `inputs` [B, H, local, F] (k, v and
// the gates of its tokens under `layout`) of the whole sequence in one
// AllGather (backward: a reduce-scatter of their gradients, by autograd), runs
// `prefix_op(q, inputs, doc_start)`, a single-rank kernel, on the prefix up to
// the end of its own chunks with its own queries in place and zeros elsewhere,
// and returns its own rows [B, H, local, d_v] (padding rows zero).
// `global_doc_start` is the whole rows' [B, N] (undefined: one document per
// row); it is read, not communicated. The last rank of a contiguous layout runs
// the kernel over all N tokens.
// Who calls it: loom-bench (benchmarks/loom_bench.cc); tests/bench_test.cc checks
// it against the single-rank kernel. Ordering: collective over `comm`, forward
// and backward.
#pragma once

#include <ATen/ATen.h>

#include <functional>

#include "loom/runtime/comm/communicator.h"
#include "loom/runtime/comm/sequence_layout.h"

namespace loom::bench {

using PrefixOp = std::function<at::Tensor(const at::Tensor& q, const at::Tensor& inputs, const at::Tensor& doc_start)>;

at::Tensor allgather_recurrent(const at::Tensor& q, const at::Tensor& inputs, const SequenceLayout& layout,
                               const CommPtr& comm, const at::Tensor& global_doc_start, const PrefixOp& prefix_op);

}  // namespace loom::bench
