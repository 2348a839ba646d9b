#include "loom/runtime/comm/differentiable_collectives.h"

#include <torch/autograd.h>

#include "loom/runtime/comm/autograd_state.h"
#include "loom/runtime/comm/comm_order.h"
#include "loom/runtime/comm/recompute.h"
#include "loom/runtime/core/error.h"

namespace loom {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// ---- raw (non-differentiable) forms ----

at::Tensor all_gather_along(const at::Tensor& x, Communicator& comm, int64_t dim) {
  dim = at::maybe_wrap_dim(dim, x.dim());
  const at::Tensor moved = x.movedim(dim, 0).contiguous();
  auto shape = moved.sizes().vec();
  shape[0] *= comm.size();
  at::Tensor out = at::empty(shape, moved.options());
  comm.all_gather(out, moved)->wait();
  return out.movedim(0, dim);
}

at::Tensor reduce_scatter_along(const at::Tensor& x, Communicator& comm, int64_t dim) {
  dim = at::maybe_wrap_dim(dim, x.dim());
  TORCH_CHECK(x.size(dim) % comm.size() == 0, "reduce_scatter: dimension ", dim, " has ", x.size(dim),
              " entries, not divisible by the ", comm.size(), " ranks");
  const at::Tensor moved = x.movedim(dim, 0).contiguous();
  auto shape = moved.sizes().vec();
  shape[0] /= comm.size();
  at::Tensor out = at::empty(shape, moved.options());
  comm.reduce_scatter(out, moved)->wait();
  return out.movedim(0, dim);
}

at::Tensor ring_shift_raw(const at::Tensor& x, Communicator& comm, int shift) {
  const int w = comm.size();
  const int s = ((shift % w) + w) % w;
  if (s == 0) return x.clone();
  const int dst = (comm.rank() + s) % w;
  const int src = (comm.rank() - s + w) % w;
  at::Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous);
  auto recv = comm.irecv(out, src, /*tag=*/0);
  auto send = comm.isend(x, dst, /*tag=*/0);
  recv->wait();
  send->wait();
  return out;
}

at::Tensor all_to_all_along(const at::Tensor& x, Communicator& comm, int64_t scatter_dim, int64_t gather_dim) {
  const int64_t W = comm.size();
  scatter_dim = at::maybe_wrap_dim(scatter_dim, x.dim());
  gather_dim = at::maybe_wrap_dim(gather_dim, x.dim());
  TORCH_CHECK(scatter_dim != gather_dim, "all_to_all: scatter and gather dimension are both ", scatter_dim);
  TORCH_CHECK(x.size(scatter_dim) % W == 0, "all_to_all: dimension ", scatter_dim, " has ", x.size(scatter_dim),
              " entries, not divisible by the ", W, " ranks");
  // Block q of the scatter dimension becomes row q of a leading rank dimension.
  auto split_shape = x.sizes().vec();
  split_shape[scatter_dim] = x.size(scatter_dim) / W;
  split_shape.insert(split_shape.begin() + scatter_dim, W);
  const at::Tensor send = x.reshape(split_shape).movedim(scatter_dim, 0).contiguous();
  at::Tensor received = at::empty_like(send);
  comm.all_to_all(received, send)->wait();
  // Row q came from rank q: put it in front of the gather dimension, merge.
  return received.movedim(0, gather_dim).flatten(gather_dim, gather_dim + 1);
}

at::Tensor all_to_all_rows(const at::Tensor& x, Communicator& comm, const std::vector<int64_t>& output_splits,
                           const std::vector<int64_t>& input_splits) {
  TORCH_CHECK(x.dim() >= 1, "all_to_all: needs a dim 0 to split");
  auto shape = x.sizes().vec();
  shape[0] = 0;
  for (int64_t rows : output_splits) shape[0] += rows;
  const at::Tensor in = x.contiguous();
  at::Tensor out = at::empty(shape, in.options());
  comm.all_to_all(out, in, output_splits, input_splits)->wait();
  return out;
}

at::Tensor halo_forward_raw(const at::Tensor& x, const SequenceLayout& layout, int64_t halo, Communicator& comm,
                            int64_t dim) {
  dim = at::maybe_wrap_dim(dim, x.dim());
  const int64_t L = layout.chunk_len();
  TORCH_CHECK(comm.size() == layout.world_size(), "halo_exchange: communicator has ", comm.size(),
              " ranks, the layout ", layout.world_size());
  TORCH_CHECK(x.size(dim) == layout.local_len(), "halo_exchange: local tensor has ", x.size(dim),
              " tokens along dim ", dim, ", the layout expects ", layout.local_len());
  TORCH_CHECK(halo >= 0, "halo_exchange: halo must be >= 0, got ", halo);
  TORCH_CHECK(halo <= L, "halo_exchange: halo of ", halo, " tokens exceeds the chunk length ", L, " (",
              layout.describe(), "); use fewer ranks, a longer sequence or a shorter window");
  const int me = comm.rank();
  const auto mine = layout.chunks_of(me);
  auto out_shape = x.sizes().vec();
  out_shape[dim] = static_cast<int64_t>(mine.size()) * halo;
  at::Tensor out = at::zeros(out_shape, x.options());
  if (halo == 0) return out;
  std::vector<WorkPtr> works;
  std::vector<at::Tensor> recv_buffers(mine.size());
  // Post receives first, then sends; tags are the receiving chunk's id.
  for (size_t i = 0; i < mine.size(); ++i) {
    const int64_t c = mine[i];
    if (c == 0) continue;
    const int src = layout.owner_of(c - 1);
    if (src == me) continue;
    auto slot_shape = out_shape;
    slot_shape[dim] = halo;
    recv_buffers[i] = at::empty(slot_shape, x.options());
    works.push_back(comm.irecv(recv_buffers[i], src, static_cast<int>(c)));
  }
  for (size_t i = 0; i < mine.size(); ++i) {
    const int64_t c = mine[i];
    if (c + 1 >= layout.num_chunks()) continue;
    const at::Tensor tail = x.narrow(dim, static_cast<int64_t>(i) * L + L - halo, halo);
    const int dst = layout.owner_of(c + 1);
    if (dst == me) {
      out.narrow(dim, layout.local_index_of(c + 1) * halo, halo).copy_(tail);
    } else {
      works.push_back(comm.isend(tail, dst, static_cast<int>(c + 1)));
    }
  }
  wait_all(works);
  for (size_t i = 0; i < mine.size(); ++i)
    if (recv_buffers[i].defined()) out.narrow(dim, static_cast<int64_t>(i) * halo, halo).copy_(recv_buffers[i]);
  return out;
}

at::Tensor halo_backward_raw(const at::Tensor& grad_halo, const SequenceLayout& layout, int64_t halo,
                             Communicator& comm, int64_t dim, const std::vector<int64_t>& x_sizes) {
  dim = at::maybe_wrap_dim(dim, grad_halo.dim());
  const int64_t L = layout.chunk_len();
  const int me = comm.rank();
  const auto mine = layout.chunks_of(me);
  at::Tensor grad_x = at::zeros(x_sizes, grad_halo.options());
  if (halo == 0) return grad_x;
  std::vector<WorkPtr> works;
  std::vector<at::Tensor> recv_buffers(mine.size());
  for (size_t i = 0; i < mine.size(); ++i) {
    const int64_t c = mine[i];
    if (c + 1 >= layout.num_chunks()) continue;
    const int src = layout.owner_of(c + 1);
    if (src == me) continue;
    auto slot_shape = grad_halo.sizes().vec();
    slot_shape[dim] = halo;
    recv_buffers[i] = at::empty(slot_shape, grad_halo.options());
    works.push_back(comm.irecv(recv_buffers[i], src, static_cast<int>(c + 1)));
  }
  for (size_t i = 0; i < mine.size(); ++i) {
    const int64_t c = mine[i];
    if (c == 0) continue;
    const at::Tensor g = grad_halo.narrow(dim, static_cast<int64_t>(i) * halo, halo);
    const int dst = layout.owner_of(c - 1);
    if (dst == me) {
      grad_x.narrow(dim, layout.local_index_of(c - 1) * L + L - halo, halo).add_(g);
    } else {
      works.push_back(comm.isend(g, dst, static_cast<int>(c)));
    }
  }
  wait_all(works);
  for (size_t i = 0; i < mine.size(); ++i)
    if (recv_buffers[i].defined())
      grad_x.narrow(dim, static_cast<int64_t>(i) * L + L - halo, halo).add_(recv_buffers[i]);
  return grad_x;
}

// ---- autograd functions ----

namespace {

CommPtr comm_of(AutogradContext* ctx) { return saved_comm(ctx); }

void remember_output(AutogradContext* ctx, const at::Tensor& out) {
  ctx->saved_data["out_sizes"] = out.sizes().vec();
  ctx->saved_data["out_dtype"] = static_cast<int64_t>(out.scalar_type());
  ctx->saved_data["out_device"] = out.device();
}

// What the collective delivered: communicated, or, in a selective
// recompute's rerun, what the first run received (recompute.h).
template <typename Communicate>
at::Tensor received(const char* name, Communicate communicate) {
  // A fresh alias: autograd marks the output, the tape's tensor stays as recorded.
  if (CommTape::replaying()) return CommTape::replay(name)[0].detach();
  at::Tensor out = communicate();
  CommTape::record(name, {out});
  return out;
}

// An output that nothing downstream used arrives undefined; it still takes
// part in the collective (every rank must call it) as zeros.
at::Tensor grad_or_zero(const at::Tensor& grad, AutogradContext* ctx) {
  if (grad.defined()) return grad;
  // On the output's device: a CPU zero tensor would reach NCCL from a CUDA run.
  return at::zeros(ctx->saved_data["out_sizes"].toIntVector(),
                   at::TensorOptions()
                       .dtype(static_cast<at::ScalarType>(ctx->saved_data["out_dtype"].toInt()))
                       .device(ctx->saved_data["out_device"].toDevice()));
}

struct AllGatherFunction : public torch::autograd::Function<AllGatherFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& order, const at::Tensor& x,
                               const CommPtr& comm, int64_t dim) {
    ctx->saved_data["order"] = CommOrder::claim();
    save_comm(ctx, comm);
    ctx->saved_data["dim"] = dim;
    at::Tensor out = received("all_gather", [&] { return all_gather_along(x, *comm, dim); });
    remember_output(ctx, out);
    return {out, CommOrder::new_token()};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    CommOrder::backward_ran(ctx->saved_data["order"].toInt());
    return {at::Tensor(), reduce_scatter_along(grad_or_zero(grads[0], ctx), *comm_of(ctx), ctx->saved_data["dim"].toInt()),
            at::Tensor(), at::Tensor()};
  }
};

struct ReduceScatterFunction : public torch::autograd::Function<ReduceScatterFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& order, const at::Tensor& x,
                               const CommPtr& comm, int64_t dim) {
    ctx->saved_data["order"] = CommOrder::claim();
    save_comm(ctx, comm);
    ctx->saved_data["dim"] = dim;
    at::Tensor out = received("reduce_scatter", [&] { return reduce_scatter_along(x, *comm, dim); });
    remember_output(ctx, out);
    return {out, CommOrder::new_token()};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    CommOrder::backward_ran(ctx->saved_data["order"].toInt());
    return {at::Tensor(), all_gather_along(grad_or_zero(grads[0], ctx), *comm_of(ctx), ctx->saved_data["dim"].toInt()),
            at::Tensor(), at::Tensor()};
  }
};

struct AllReduceFunction : public torch::autograd::Function<AllReduceFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& order, const at::Tensor& x,
                               const CommPtr& comm) {
    ctx->saved_data["order"] = CommOrder::claim();
    save_comm(ctx, comm);
    at::Tensor out = received("all_reduce", [&] {
      at::Tensor sum = x.clone(at::MemoryFormat::Contiguous);
      comm->all_reduce(sum)->wait();
      return sum;
    });
    remember_output(ctx, out);
    return {out, CommOrder::new_token()};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    CommOrder::backward_ran(ctx->saved_data["order"].toInt());
    at::Tensor g = grad_or_zero(grads[0], ctx).clone(at::MemoryFormat::Contiguous);
    comm_of(ctx)->all_reduce(g)->wait();
    return {at::Tensor(), g, at::Tensor()};
  }
};

struct RingShiftFunction : public torch::autograd::Function<RingShiftFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& order, const at::Tensor& x,
                               const CommPtr& comm, int64_t shift) {
    ctx->saved_data["order"] = CommOrder::claim();
    save_comm(ctx, comm);
    ctx->saved_data["shift"] = shift;
    at::Tensor out = received("ring_shift", [&] { return ring_shift_raw(x, *comm, static_cast<int>(shift)); });
    remember_output(ctx, out);
    return {out, CommOrder::new_token()};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    CommOrder::backward_ran(ctx->saved_data["order"].toInt());
    return {at::Tensor(),
            ring_shift_raw(grad_or_zero(grads[0], ctx), *comm_of(ctx), -static_cast<int>(ctx->saved_data["shift"].toInt())),
            at::Tensor(), at::Tensor()};
  }
};

struct AllToAllFunction : public torch::autograd::Function<AllToAllFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& order, const at::Tensor& x,
                               const CommPtr& comm, int64_t scatter_dim, int64_t gather_dim) {
    ctx->saved_data["order"] = CommOrder::claim();
    save_comm(ctx, comm);
    ctx->saved_data["scatter_dim"] = scatter_dim;
    ctx->saved_data["gather_dim"] = gather_dim;
    at::Tensor out = received("all_to_all", [&] { return all_to_all_along(x, *comm, scatter_dim, gather_dim); });
    remember_output(ctx, out);
    return {out, CommOrder::new_token()};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    CommOrder::backward_ran(ctx->saved_data["order"].toInt());
    return {at::Tensor(),
            all_to_all_along(grad_or_zero(grads[0], ctx), *comm_of(ctx), ctx->saved_data["gather_dim"].toInt(),
                             ctx->saved_data["scatter_dim"].toInt()),
            at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

struct AllToAllUnevenFunction : public torch::autograd::Function<AllToAllUnevenFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& order, const at::Tensor& x,
                               const CommPtr& comm, const std::vector<int64_t>& output_splits,
                               const std::vector<int64_t>& input_splits) {
    ctx->saved_data["order"] = CommOrder::claim();
    save_comm(ctx, comm);
    ctx->saved_data["output_splits"] = output_splits;
    ctx->saved_data["input_splits"] = input_splits;
    at::Tensor out = received("all_to_all (splits)",
                              [&] { return all_to_all_rows(x, *comm, output_splits, input_splits); });
    remember_output(ctx, out);
    return {out, CommOrder::new_token()};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    CommOrder::backward_ran(ctx->saved_data["order"].toInt());
    // The gradient travels back: what this rank received it now sends.
    return {at::Tensor(),
            all_to_all_rows(grad_or_zero(grads[0], ctx), *comm_of(ctx), ctx->saved_data["input_splits"].toIntVector(),
                            ctx->saved_data["output_splits"].toIntVector()),
            at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

struct HaloExchangeFunction : public torch::autograd::Function<HaloExchangeFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& order, const at::Tensor& x,
                               const SequenceLayout& layout, int64_t halo, const CommPtr& comm, int64_t dim) {
    ctx->saved_data["order"] = CommOrder::claim();
    save_comm(ctx, comm);
    ctx->saved_data["dim"] = dim;
    ctx->saved_data["halo"] = halo;
    save_layout(ctx, layout);
    ctx->saved_data["x_sizes"] = x.sizes().vec();
    at::Tensor out = received("halo_exchange", [&] { return halo_forward_raw(x, layout, halo, *comm, dim); });
    ctx->saved_data["out_sizes"] = out.sizes().vec();
    return {out, CommOrder::new_token()};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    CommOrder::backward_ran(ctx->saved_data["order"].toInt());
    auto comm = comm_of(ctx);
    const SequenceLayout layout = saved_layout(ctx, *comm);
    at::Tensor grad_x =
        halo_backward_raw(grads[0].defined() ? grads[0] : at::zeros(ctx->saved_data["out_sizes"].toIntVector(), grads[1].options()),
                          layout, ctx->saved_data["halo"].toInt(), *comm, ctx->saved_data["dim"].toInt(),
                          ctx->saved_data["x_sizes"].toIntVector());
    return {at::Tensor(), grad_x, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

at::Tensor all_gather(const at::Tensor& x, const CommPtr& comm, int64_t dim) {
  return apply_in_order<AllGatherFunction>(x, comm, dim)[0];
}
at::Tensor reduce_scatter(const at::Tensor& x, const CommPtr& comm, int64_t dim) {
  return apply_in_order<ReduceScatterFunction>(x, comm, dim)[0];
}
at::Tensor all_reduce(const at::Tensor& x, const CommPtr& comm) { return apply_in_order<AllReduceFunction>(x, comm)[0]; }
at::Tensor ring_shift(const at::Tensor& x, const CommPtr& comm, int shift) {
  return apply_in_order<RingShiftFunction>(x, comm, static_cast<int64_t>(shift))[0];
}
at::Tensor all_to_all(const at::Tensor& x, const CommPtr& comm, int64_t scatter_dim, int64_t gather_dim) {
  return apply_in_order<AllToAllFunction>(x, comm, scatter_dim, gather_dim)[0];
}
at::Tensor all_to_all_uneven(const at::Tensor& x, const CommPtr& comm, const std::vector<int64_t>& output_splits,
                             const std::vector<int64_t>& input_splits) {
  return apply_in_order<AllToAllUnevenFunction>(x, comm, output_splits, input_splits)[0];
}
at::Tensor halo_exchange(const at::Tensor& x, const SequenceLayout& layout, int64_t halo, const CommPtr& comm,
                         int64_t dim) {
  return apply_in_order<HaloExchangeFunction>(x, layout, halo, comm, dim)[0];
}

}  // namespace loom
