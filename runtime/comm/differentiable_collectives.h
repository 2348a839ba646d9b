// Differentiable collectives: communication that autograd can run backwards.
//
// Each is a torch::autograd::Function whose backward is the adjoint of its
// forward, issued on the same communicator:
//   all_gather      cat over ranks along `dim`   backward: reduce_scatter (sum)
//   reduce_scatter  sum over ranks, keep block r  backward: all_gather
//   all_reduce      sum over ranks                backward: all_reduce (sum)
//   ring_shift      receive from rank - shift     backward: shift by -shift
//   all_to_all      split `scatter_dim` into W blocks, block q to rank q;
//                   concatenate the received blocks along `gather_dim` in
//                   rank order          backward: all_to_all with the dims swapped
//   all_to_all_uneven  rows of dim 0 by split sizes (Communicator::all_to_all)
//                   backward: the same with input and output splits swapped
//   halo_exchange   each chunk of the layout gets the last `halo` tokens of the
//                   chunk before it (zeros for chunk 0)
//                   backward: the halo gradient goes back to its owner and is
//                   added to the tail of that chunk's gradient
//
// Ordering: forward and backward are collective. Every rank of `comm` must call
// the same functions in the same order, and must run backward over graphs that
// contain the same collectives in the same order (true when every rank runs the
// same model code on its own shard).
#pragma once

#include <ATen/ATen.h>

#include "loom/runtime/comm/communicator.h"
#include "loom/runtime/comm/sequence_layout.h"

namespace loom {

at::Tensor all_gather(const at::Tensor& x, const CommPtr& comm, int64_t dim = 0);
at::Tensor reduce_scatter(const at::Tensor& x, const CommPtr& comm, int64_t dim = 0);
at::Tensor all_reduce(const at::Tensor& x, const CommPtr& comm);
at::Tensor ring_shift(const at::Tensor& x, const CommPtr& comm, int shift = 1);
// Ulysses' exchange: [.., S, .., G, ..] with S = x.size(scatter_dim) divisible
// by W becomes [.., S/W, .., W*G, ..]. scatter_dim != gather_dim.
at::Tensor all_to_all(const at::Tensor& x, const CommPtr& comm, int64_t scatter_dim, int64_t gather_dim);
// input_splits[q] rows of x (dim 0) go to rank q; output_splits[q] rows come
// from rank q (see Communicator::all_to_all).
at::Tensor all_to_all_uneven(const at::Tensor& x, const CommPtr& comm, const std::vector<int64_t>& output_splits,
                             const std::vector<int64_t>& input_splits);
// x: this rank's local tensor under `layout` (sequence along `dim`).
// Returns [.., chunks_per_rank * halo, ..]: the halo of each local chunk, in
// local chunk order. halo must not exceed the chunk length.
at::Tensor halo_exchange(const at::Tensor& x, const SequenceLayout& layout, int64_t halo, const CommPtr& comm,
                         int64_t dim = 1);

// Non-differentiable building blocks (also used by parallel/ operators).
at::Tensor all_gather_along(const at::Tensor& x, Communicator& comm, int64_t dim);
at::Tensor reduce_scatter_along(const at::Tensor& x, Communicator& comm, int64_t dim);
at::Tensor ring_shift_raw(const at::Tensor& x, Communicator& comm, int shift);
at::Tensor all_to_all_along(const at::Tensor& x, Communicator& comm, int64_t scatter_dim, int64_t gather_dim);
at::Tensor all_to_all_rows(const at::Tensor& x, Communicator& comm, const std::vector<int64_t>& output_splits,
                           const std::vector<int64_t>& input_splits);
// Sends the tail of each chunk forward (forward=true) or the halo gradient back
// (forward=false), see halo_exchange.
at::Tensor halo_forward_raw(const at::Tensor& x, const SequenceLayout& layout, int64_t halo, Communicator& comm,
                            int64_t dim);
at::Tensor halo_backward_raw(const at::Tensor& grad_halo, const SequenceLayout& layout, int64_t halo,
                             Communicator& comm, int64_t dim, const std::vector<int64_t>& x_sizes);

}  // namespace loom
