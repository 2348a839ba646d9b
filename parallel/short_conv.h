// Short causal depthwise convolution across ranks (BASED's BaseConv core):
//   y[t, c] = bias[c] + sum_{i=0}^{K-1} weight[c, i] * x[t - (K-1) + i, c]
// with zeros before the sequence start. Each chunk of the layout needs the
// last K-1 tokens of the chunk before it: a halo exchange (differentiable: its
// backward returns the halo gradient to the owner). Exact at any world size.
// x [B, n, C] (sequence on dim 1, this rank's shard), weight [C, K], bias [C]
// or undefined. Collective over `comm`.
// Packed documents: with doc_start (this rank's [B, n] int64 shard, see
// runtime/comm/documents.h) an output token never reads an input from before
// its document: x[j] counts as zero for j < doc_start[t], halo tokens of
// another rank included. Undefined: one document per row, today's conv1d.
#pragma once

#include <ATen/ATen.h>

#include "loom/runtime/comm/communicator.h"
#include "loom/runtime/comm/sequence_layout.h"

namespace loom {

at::Tensor causal_depthwise_conv(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                 const SequenceLayout& layout, const CommPtr& comm, const at::Tensor& doc_start = {});

// The same on one whole sequence with zero left padding: the reference.
// doc_start [B, n] int64 or undefined, as above.
at::Tensor naive_causal_depthwise_conv(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias,
                                       const at::Tensor& doc_start = {});

}  // namespace loom
