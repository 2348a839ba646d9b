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
// train.log_interval steps and appends JSON lines to the metrics file (first
// a run header: run id, config hash, the step it resumed from); validation
// runs every train.eval_interval steps and at the end; a checkpoint is
// written every train.checkpoint_interval steps (0: only at the end).
//
// Nothing lost (see checkpoint.h for the directory rules):
// - Before the first step fit() checks that train.checkpoint_dir is writable,
//   claims its lock (one job per directory) and refuses a directory that holds
//   checkpoints this trainer neither resumed from (resume()) nor moved aside
//   (overwrite()). These, a resume from a different model and an unwritable
//   metrics file throw RunRefused on every rank alike.
// - Divergence: a NaN or Inf loss (before the update) or parameters that are
//   not finite after the update (one sum per tensor, one all-reduce) stop the
//   run with NonFiniteLoss / NonFiniteParameters before anything is saved, so
//   the latest checkpoint stays the last finite one, at the last step too.
// - Signals: during fit(), SIGINT/SIGTERM on any rank (or Hooks::stop_requested
//   on any rank) make every rank stop after the current step and save one
//   checkpoint; further signals are ignored while that finishes. fit()
//   restores the signal handlers it found when it returns or throws.
//   Under mpirun: OpenMPI 4.1's mpirun, when it gets SIGTERM or SIGINT, sends
//   the ranks SIGCONT, waits odls_base_sigkill_timeout seconds (default 1),
//   sends SIGTERM, waits as long again and sends SIGKILL; a second SIGINT
//   kills at once. So signal a rank (any one), or give mpirun room for a step
//   and a save: mpirun --mca odls_base_sigkill_timeout 30 (mpirun itself then
//   exits non-zero; the saved checkpoint is complete). A save cut short by
//   SIGKILL leaves a .tmp directory that is never taken for the latest.
// - A failed write of the metrics file is an error (MetricsWriteError, after
//   a checkpoint), never silent loss.
// - fit() at or past train.steps changes nothing: no checkpoint, no metrics.
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
#include "loom/runtime/train/checkpoint.h"
#include "loom/runtime/train/optimizer.h"
#include "loom/runtime/comm/sequence_layout.h"

namespace loom {

// The run diverged; nothing was saved after it. loom-train exits 4.
class Divergence : public LoomError {
 public:
  using LoomError::LoomError;
};
// The loss of a step is NaN or Inf (checked before the update).
class NonFiniteLoss : public Divergence {
 public:
  using Divergence::Divergence;
};
// A parameter holds NaN or Inf after the update.
class NonFiniteParameters : public Divergence {
 public:
  using Divergence::Divergence;
};
// Appending to the metrics file failed during the run (disk full, say): the
// run stopped after saving a checkpoint. Thrown on every rank alike.
class MetricsWriteError : public LoomError {
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
    // Asked after every step: a non-empty reason on any rank stops the run
    // like a signal (loom-train: a memory node was signalled).
    std::function<std::string()> stop_requested;
  };
  struct Result {
    int64_t steps = 0;
    double loss = 0;
    double validation_loss = 0;
    bool interrupted = false;
    std::string stop_reason;   // when interrupted: "SIGTERM", ...
    bool nothing_to_do = false;  // already at train.steps: nothing trained or written
    std::string checkpoint;    // rank 0: the checkpoint that holds the result
    std::string profile_table;  // with set_profile(true), after a run that trained: step_profile.h
  };

  // `config` and `mesh` must outlive the trainer; the mesh's world is the
  // communicator gradients are summed over.
  Trainer(const pb::LoomConfig& config, ProcessMesh& mesh, std::shared_ptr<torch::nn::Module> model, LossFn loss,
          BatchFn train, BatchFn validation, Hooks hooks = {});

  ~Trainer();

  // Continues from the newest complete checkpoint (by manifest step) in
  // train.checkpoint_dir, if any; returns its path. Compares the checkpoint's
  // config, seed and data position with this run's: model fields that differ
  // (and parameters that do not match by name and shape) throw RunRefused
  // naming them; other differences (dp x sp, steps, lr schedule, intervals,
  // seed, data position) are listed in the log.
  // A model-only checkpoint (no optimizer state, e.g. made by loom-ckpt
  // import) cannot be resumed: RunRefused pointing at init_from.
  std::string resume();
  // Starts a new run (step 0, fresh optimizer state) from the parameters of
  // the checkpoint directory `path` (a step-* directory, full or model-only).
  // Model fields and parameters must match as for resume (RunRefused naming
  // them); a missing or unreadable checkpoint is RunRefused naming `path`.
  // Collective: every rank calls it, before overwrite() (which may move
  // `path` aside) and fit().
  void init_from(const std::string& path);
  // Starts over in a directory that holds checkpoints: claims the directory
  // and moves them into <dir>/superseded-<UTC time>/ (returned; "" when there
  // was nothing), deleting nothing.
  std::string overwrite();
  // Trains to train.steps, or stops (and checkpoints) after step `stop_after`
  // when it is given: the schedule still follows train.steps.
  Result fit(int64_t stop_after = -1);
  double evaluate(int64_t batches);
  // Saves a checkpoint of the current step (collective; rank 0 writes and
  // gets the path).
  std::string save(double last_loss);
  int64_t step() const { return step_; }
  // loom-train --profile: fit() times the parts of every step, the layers
  // (per mixer letter, forward and backward) and the collectives, writes one
  // {"profile": ...} line to the metrics file after the final validation line
  // and returns the table in Result::profile_table (step_profile.h). Off by
  // default: then nothing is timed and the model inserts no markers.
  void set_profile(bool on) { profile_ = on; }
  const std::vector<double>& losses() const { return losses_; }

 private:
  double train_step();
  void check_parameters_finite();
  // `starting` = false for --resume, true for --init-from (weights only: the
  // data position and seed of the checkpoint's run do not matter then).
  void check_resume_compatible(const CheckpointData& data, const std::string& path, bool starting = false) const;
  void prepare_checkpoint_dir();
  void refuse_checkpoints_of_another_run();
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
  bool profile_ = false;
  std::string run_id_;
  // The checkpoint directory, claimed on rank 0 by the first fit(), save() or overwrite().
  bool directory_ready_ = false, foreign_checked_ = false, overwritten_ = false;
  std::unique_ptr<CheckpointDirLock> lock_;
  std::unique_ptr<CheckpointWriter> writer_;
  std::string resumed_from_;
  std::string init_from_;  // --init-from's checkpoint (the metrics header names it)
  int64_t last_saved_step_ = -1;
  std::string last_saved_path_;
};

}  // namespace loom
