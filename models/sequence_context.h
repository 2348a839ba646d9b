// SequenceContext: what a mixer needs to know about how its sequence is split.
// Built once per step by the model's caller from the SequenceLayout and the
// ProcessMesh's sp communicator; mixers never talk to MPI themselves, they
// hand the context to parallel/ operators.
#pragma once

#include "loom/parallel/linear_attention/state_prefix.h"
#include "loom/parallel/softmax_attention/softmax_attention.h"
#include "loom/runtime/comm/communicator.h"
#include "loom/runtime/comm/sequence_layout.h"

namespace loom::models {

struct SequenceContext {
  SequenceLayout layout;
  CommPtr comm;  // the sequence-parallel group (size = layout.world_size())
  linear_attention::LinearAttentionMethod linear_method = linear_attention::LinearAttentionMethod::kLasp2;
  softmax_attention::SoftmaxMethod softmax_method = softmax_attention::SoftmaxMethod::kRing;
  // The memory nodes of the offload method (owned by the job; null without).
  offload::OffloadClient* offload = nullptr;

  int rank() const { return comm->rank(); }
  at::Tensor positions() const { return layout.global_positions(comm->rank()); }
};

}  // namespace loom::models
