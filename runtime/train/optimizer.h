// Optimisation: AdamW with decoupled weight decay (none on norms and biases,
// i.e. parameters of fewer than 2 dimensions), linear warm-up then cosine
// decay, clipping by the global gradient norm, and the bucketed gradient
// all-reduce over the dp x sp world.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <utility>
#include <vector>

#include "loom/runtime/comm/communicator.h"
#include "loom/runtime/core/proto/loom.pb.h"

namespace loom {

using NamedTensors = std::vector<std::pair<std::string, at::Tensor>>;

// Mixed precision: a bf16/fp16 parameter gets a float32 master copy; moments
// and the update are float32 and the parameter is the master rounded once
// per step. Checkpoints carry "<param>/master" so that resuming loses nothing.
class AdamW {
 public:
  AdamW(NamedTensors params, double weight_decay, double beta1 = 0.9, double beta2 = 0.95, double eps = 1e-8);
  void step(double lr);
  int64_t steps() const { return steps_; }
  // Optimizer state for checkpoints: "<param>/exp_avg", "<param>/exp_avg_sq", "adamw/steps".
  NamedTensors state() const;
  void load_state(const NamedTensors& state);
  // A fresh state for parameters that were just replaced (--init-from):
  // moments zero, step count 0; each float32 master copy is taken from
  // `masters` ("<param>/master", a checkpoint's, when it has one: nothing is
  // lost to rounding) or else from the parameter.
  void restart(const NamedTensors& masters);

 private:
  NamedTensors params_;
  std::vector<at::Tensor> master_;  // undefined for float32/float64 parameters
  std::vector<at::Tensor> exp_avg_, exp_avg_sq_;
  double weight_decay_, beta1_, beta2_, eps_;
  int64_t steps_ = 0;
};

// Learning rate at `step` (0-based): linear warm-up to train.lr, cosine to
// train.lr * min_lr_ratio at train.steps.
double learning_rate(const pb::TrainConfig& train, int64_t step);

// Sums gradients over `comm` in flat buckets of at most `bucket_bytes`, all
// buckets in flight at once. Parameters without a gradient contribute zeros
// (every rank must send the same buckets). bf16/fp16 gradients travel and are
// summed in float32, then rounded once into the parameter's dtype.
void all_reduce_gradients(const NamedTensors& params, Communicator& comm, int64_t bucket_bytes = 16 << 20);

// Scales gradients so that their global norm is at most max_norm (0: no
// clipping; a non-finite norm clips nothing); returns the norm before
// clipping (the trainer reports it as StepMetrics::grad_norm). Gradients must
// already be identical on every rank (after all_reduce_gradients), so every
// rank returns the same norm.
double clip_gradients(const NamedTensors& params, double max_norm);

}  // namespace loom
