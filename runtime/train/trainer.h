// Trainer: the training loop, usable with any model (an embedding trainer
// passes its own model, loss and data), driven by the `train` section.
//
// Each step: for each of train.grad_accum micro-batches, this dp rank draws
// train.batch_size windows (data position = a pure function of the step), the
// SequenceLayout shards them over the sp group, the loss function returns the
// summed token loss of this rank's shard, and backward runs on it divided by
// the global count of labelled tokens (labels -100, padding included, are
// ignored); then gradients are summed over all dp x sp ranks in
// buckets, clipped by the global norm, and AdamW steps with the warm-up +
// cosine learning rate. Rank 0 prints a progress line every
// train.log_interval steps and appends JSON lines to the metrics file;
// validation runs every train.eval_interval steps and at the end; a checkpoint
// is written every train.checkpoint_interval steps (0: only at the end).
// A NaN or Inf loss stops the run with NonFiniteLoss before anything is saved,
// so the last good checkpoint stays the latest. SIGINT/SIGTERM on any rank
// makes every rank stop after the current step and save a checkpoint.
// Collective over the job's world communicator.
#pragma once

#include <torch/nn/module.h>

#include <functional>
#include <memory>
#include <string>

#include "loom/runtime/data/data.h"
#include "loom/runtime/data/loss_function.h"
#include "loom/runtime/core/error.h"
#include "loom/runtime/core/config.h"
#include "loom/runtime/comm/process_mesh.h"
#include "loom/runtime/train/optimizer.h"
#include "loom/runtime/comm/sequence_layout.h"

namespace loom {

class NonFiniteLoss : public LoomError {
 public:
  using LoomError::LoomError;
};

struct StepMetrics {
  int64_t step = 0;  // steps completed
  double loss = 0, lr = 0, tokens_per_s = 0, ms_per_step = 0;
  double grad_norm = 0;  // global gradient norm before clipping (clip_gradients)
  int64_t peak_bytes = 0;
};

class Trainer {
 public:
  using LossFn = loom::LossFn;
  // This dp rank's samples first .. first + batch_size - 1, whole sequences.
  using BatchFn = std::function<Batch(int64_t first, int64_t batch_size)>;
  struct Hooks {
    std::function<void(const StepMetrics&)> on_step;
    std::function<void(int64_t step, double validation_loss)> on_eval;
  };
  struct Result {
    int64_t steps = 0;
    double loss = 0;
    double validation_loss = 0;
    bool interrupted = false;
    std::string checkpoint;
  };

  // `config` and `mesh` must outlive the trainer; the mesh's world is the
  // communicator gradients are summed over.
  Trainer(const pb::LoomConfig& config, ProcessMesh& mesh, std::shared_ptr<torch::nn::Module> model, LossFn loss,
          BatchFn train, BatchFn validation, Hooks hooks = {});

  // Continues from the newest complete checkpoint in train.checkpoint_dir, if
  // any; returns its path.
  std::string resume();
  // Trains to train.steps, or stops (and checkpoints) after step `stop_after`
  // when it is given: the schedule still follows train.steps.
  Result fit(int64_t stop_after = -1);
  double evaluate(int64_t batches);
  std::string save(double last_loss);
  int64_t step() const { return step_; }
  const std::vector<double>& losses() const { return losses_; }

 private:
  double train_step();
  SequenceLayout layout() const;
  std::pair<Batch, Batch> shard(const Batch& batch) const;

  const pb::LoomConfig& config_;
  ProcessMesh& mesh_;
  std::shared_ptr<torch::nn::Module> model_;
  at::Device device_{at::kCPU};  // of the model's parameters: batches go there
  LossFn loss_;
  BatchFn train_, validation_;
  Hooks hooks_;
  NamedTensors params_;
  std::unique_ptr<AdamW> optimizer_;
  int64_t step_ = 0;
  std::vector<double> losses_;
  double grad_norm_ = 0;  // of the last step, before clipping
};

}  // namespace loom
