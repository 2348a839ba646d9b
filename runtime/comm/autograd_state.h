// What a communicating autograd node must find again in its backward: the
// communicator (saved by id, since saved_data holds IValues only; see
// Communicator::by_id) and the SequenceLayout it ran under.
#pragma once

#include <torch/csrc/autograd/custom_function.h>

#include "loom/runtime/comm/communicator.h"
#include "loom/runtime/comm/sequence_layout.h"

namespace loom {

inline void save_comm(torch::autograd::AutogradContext* ctx, const CommPtr& comm) {
  ctx->saved_data["comm"] = comm->id();
}
inline CommPtr saved_comm(torch::autograd::AutogradContext* ctx) {
  return Communicator::by_id(ctx->saved_data["comm"].toInt());
}
inline void save_layout(torch::autograd::AutogradContext* ctx, const SequenceLayout& layout) {
  ctx->saved_data["layout_kind"] = static_cast<int64_t>(layout.kind());
  ctx->saved_data["layout_len"] = layout.global_len();
  ctx->saved_data["layout_world"] = static_cast<int64_t>(layout.world_size());
}
// The saved layout as it was (for an operator whose saved communicator is not
// the layout's ranks, e.g. USP's ring across Ulysses groups).
inline SequenceLayout saved_layout(torch::autograd::AutogradContext* ctx) {
  return SequenceLayout(static_cast<LayoutKind>(ctx->saved_data["layout_kind"].toInt()),
                        ctx->saved_data["layout_len"].toInt(),
                        static_cast<int>(ctx->saved_data["layout_world"].toInt()));
}
// The layout over the saved communicator's ranks.
inline SequenceLayout saved_layout(torch::autograd::AutogradContext* ctx, const Communicator& comm) {
  return SequenceLayout(static_cast<LayoutKind>(ctx->saved_data["layout_kind"].toInt()),
                        ctx->saved_data["layout_len"].toInt(), comm.size());
}

}  // namespace loom
