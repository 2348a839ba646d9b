// StateChain: an exact, serial pass of a recurrent state along the chunks of a
// SequenceLayout, forward and backward (LASP-1 style, for states that do not
// compose linearly: Titans' deep memory, MAC's attention-in-the-loop).
//
// The caller supplies a differentiable step
//     (chunk_inputs [B, L, F], state_in [B, S]) -> (chunk_outputs [B, L, G], state_out [B, S])
// that may use module parameters; run_state_chain() applies it to this rank's
// chunks in global sequence order, receiving state_in from the owner of the
// previous chunk and sending state_out to the owner of the next. Chunk 0 starts
// from `initial_state` (differentiable: a learnable initial memory).
// Backward walks the chain in reverse: each rank receives the gradient of its
// chunk's state_out, recomputes the step with autograd (activations are not
// kept between forward and backward, so memory is that of one chunk) and sends
// the gradient of state_in back. Gradients reach chunk_inputs, initial_state
// and every tensor in `params` (the step's parameters, passed so that autograd
// knows them). Collective over `comm` (point-to-point along the chain).
// The step object must outlive backward: the owning module keeps it.
#pragma once

#include <ATen/ATen.h>

#include <functional>
#include <memory>
#include <utility>

#include "loom/runtime/comm/communicator.h"
#include "loom/runtime/comm/sequence_layout.h"

namespace loom {

struct ChainStep {
  std::function<std::pair<at::Tensor, at::Tensor>(const at::Tensor& chunk_inputs, const at::Tensor& state_in)> step;
  int64_t output_features = 0;  // G
};

// inputs: [B, local_len, F] this rank's shard; returns [B, local_len, G].
at::Tensor run_state_chain(const std::shared_ptr<ChainStep>& step, const at::Tensor& inputs,
                           const at::Tensor& initial_state, at::TensorList params, const SequenceLayout& layout,
                           const CommPtr& comm);

}  // namespace loom
