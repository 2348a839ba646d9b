// SequenceContext: what a mixer needs to know about how its sequence is split.
// Built once per step by the model's caller from the SequenceLayout and the
// ProcessMesh's sp communicator; mixers never talk to MPI themselves, they
// hand the context to parallel/ operators.
#pragma once

#include "loom/parallel/linear_attention/state_prefix.h"
#include "loom/parallel/softmax_attention/softmax_attention.h"
#include "loom/runtime/comm/communicator.h"
#include "loom/runtime/comm/documents.h"
#include "loom/runtime/comm/sequence_layout.h"

namespace loom::models {

struct SequenceContext {
  SequenceLayout layout;
  CommPtr comm;  // the sequence-parallel group (size = layout.world_size())
  linear_attention::LinearAttentionMethod linear_method = linear_attention::LinearAttentionMethod::kLasp2;
  softmax_attention::SoftmaxMethod softmax_method = softmax_attention::SoftmaxMethod::kRing;
  // The memory nodes of the offload method (owned by the job; null without).
  offload::OffloadClient* offload = nullptr;
  // Packed documents: this rank's doc_start [B, n] (runtime/comm/documents.h),
  // undefined for one document per row. Every mixer keeps tokens inside
  // their own document.
  at::Tensor doc_start;
  // All-to-all group of softmax_method kUsp (parallel.ulysses_degree; 0: comm's size).
  int ulysses_degree = 0;
  // Rotary positions restart at each document (model.positions_per_document).
  bool positions_per_document = false;

  int rank() const { return comm->rank(); }
  // Rotary positions of this rank's tokens: global positions [n], or with
  // positions_per_document and documents, positions inside the document [B, n].
  at::Tensor positions() const {
    return positions_per_document ? positions_in_document(doc_start, layout, comm->rank())
                                  : layout.global_positions(comm->rank());
  }
};

}  // namespace loom::models
