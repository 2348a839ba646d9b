// LossFn: how a model's loss over one rank's shard of a batch is computed.
//
// The trainer (runtime/train) calls it once per micro-batch; models/ provides
// one for its language models. It lives beside Batch so that both sides see
// it without models/ including the trainer. Collective when the model is
// sequence-parallel: every rank of `sp` calls it for the same micro-batch.
#pragma once

#include <torch/nn/module.h>

#include <functional>

#include "loom/runtime/comm/communicator.h"
#include "loom/runtime/comm/sequence_layout.h"
#include "loom/runtime/data/data.h"

namespace loom {

// Sum of the token losses of this rank's shard (labels -100 ignored).
using LossFn = std::function<at::Tensor(torch::nn::Module& model, const Batch& local, const SequenceLayout& layout,
                                        const CommPtr& sp)>;

}  // namespace loom
