// Checkpoints: everything needed to continue a run exactly, and the rules
// that keep them from being lost.
//
// A checkpoint is a directory <dir>/step-NNNNNNNN/ with state.bin (the raw
// bytes of every tensor: model parameters, optimizer state) and manifest.pb
// (a CheckpointManifest: step, data position, seed, layout, the resolved
// config, each tensor's name, dtype, shape, offset and size, and the FNV-1a
// checksum of state.bin). It is written into step-NNNNNNNN.tmp/ and renamed
// only when complete and synced, so a save killed halfway leaves the previous
// checkpoint as the latest. Loading checks sizes and checksum and refuses a
// truncated or corrupt file with a message naming it. Parameters are
// replicated, so one rank (0) writes and every rank reads; a different
// dp x sp layout can resume.
//
// Ordering: "latest" and pruning go by the step in the manifest, never by the
// directory name (names have at least 8 digits; a step of 9 or more still
// orders right). Nothing here deletes a checkpoint that the caller did not
// write: CheckpointWriter prunes only its own, a directory of the same name
// is moved aside, and move_checkpoints_aside() (loom-train --overwrite) moves
// old ones into <dir>/superseded-<UTC time>/.
//
// One writer per directory: CheckpointDirLock holds <dir>/loom.lock (host,
// pid, process start time) for as long as a run may write; a second job is
// refused with the holder named, a lock left by a dead process on this host
// is taken over.
//
// Fault injection for tests: LOOM_FAULT_KILL_DURING_SAVE=S kills the process
// with SIGKILL halfway through writing the checkpoint of step S;
// LOOM_FAULT_SLOW_SAVE_S=T pauses every save for T seconds halfway through
// writing state.bin (so that a test can signal a job during a save).
#pragma once

#include <optional>
#include <string>
#include <vector>

#include "loom/runtime/core/error.h"
#include "loom/runtime/core/proto/loom.pb.h"
#include "loom/runtime/train/optimizer.h"

namespace loom {

// A run cannot go ahead as asked: its checkpoint directory holds another
// run's checkpoints, is locked by another job or is not writable, the
// checkpoint to resume belongs to a different model, or the metrics file
// cannot be written. The Trainer throws it on every rank alike, before any
// training step; loom-train exits 2.
class RunRefused : public ConfigError {
 public:
  using ConfigError::ConfigError;
};

struct CheckpointData {
  pb::CheckpointManifest manifest;  // step, seed, data_position, dp, sp, config_text, last_loss
  NamedTensors tensors;
};

struct CheckpointInfo {
  std::string path;
  int64_t step = 0;  // from the manifest
};

// "step-NNNNNNNN" (at least 8 digits).
std::string checkpoint_name(int64_t step);

// The complete checkpoints directly under `dir` (a step-* directory whose
// manifest parses; unfinished .tmp directories and anything else are
// skipped), oldest first by manifest step.
std::vector<CheckpointInfo> list_checkpoints(const std::string& dir);
// The newest of them, if any.
std::optional<std::string> latest_checkpoint(const std::string& dir);
// Why a new run (neither resuming nor overwriting) must not write into `dir`:
// it already holds checkpoints (their count and the newest named, the two
// ways on); empty when it holds none. Trainer and loom-train --dry-run refuse alike.
std::string unresumed_checkpoints_refusal(const std::string& dir);
// Reads and verifies one checkpoint directory.
CheckpointData load_checkpoint(const std::string& path);

// Writes <dir>/step-NNNNNNNN/ atomically and returns its path. A directory of
// that name already there is moved aside into <dir>/superseded-<time>/
// (logged), never deleted. Prunes nothing.
std::string save_checkpoint(const std::string& dir, const CheckpointData& data);

// Moves every step-* entry of `dir` (complete or not) into a new
// <dir>/superseded-<UTC time>/ and returns that path; "" when there was
// nothing to move.
std::string move_checkpoints_aside(const std::string& dir);

// The checkpoints of one run: saves them and keeps the newest `keep` (0: all)
// of those it saved, ordered by step. Checkpoints it did not save are never
// touched; saving a step it saved before replaces that one.
class CheckpointWriter {
 public:
  CheckpointWriter(std::string dir, int64_t keep);
  std::string save(const CheckpointData& data);
  // A resumed run continues the checkpoints in its directory: counts them as
  // its own, so that `keep` bounds the directory across a chain of resumes,
  // not each session's checkpoints alone. Not when the run it resumes
  // (`resumed`, its config in the manifest) kept every checkpoint
  // (keep_checkpoints 0: history the user asked for) or its config does not
  // parse. Prunes nothing until the next save. Returns a note for the log
  // (what was counted, or why not; a lowered keep_checkpoints), "" if none.
  std::string adopt_earlier(const std::string& resumed);
  // What this writer saved or adopted and still keeps, oldest first.
  const std::vector<CheckpointInfo>& kept() const { return kept_; }

 private:
  std::string dir_;
  int64_t keep_;
  std::vector<CheckpointInfo> kept_;
};

// Creates `dir` if needed and checks that a file can be created, written and
// synced in it; throws RunRefused naming the directory and the reason.
void check_directory_writable(const std::string& dir);

// The exclusive claim of one job on a checkpoint directory: <dir>/loom.lock.
class CheckpointDirLock {
 public:
  static constexpr const char* kFileName = "loom.lock";
  // Claims the lock for this process. Throws RunRefused naming the holder's
  // host and pid when another live process holds it (or a process on another
  // host, whose liveness cannot be checked). A lock whose process is gone
  // (same host; pid not running, or running with another start time) is
  // taken over: takeover_note() says so.
  CheckpointDirLock(const std::string& dir, const std::string& run_id);
  // Removes the lock file if it is still this process's.
  ~CheckpointDirLock();
  CheckpointDirLock(const CheckpointDirLock&) = delete;
  CheckpointDirLock& operator=(const CheckpointDirLock&) = delete;

  const std::string& path() const { return path_; }
  const std::string& takeover_note() const { return takeover_note_; }

  // Why a job could not claim `dir`'s lock now (another live job holds it),
  // or "" (no lock, or a dead holder's that would be taken over). Claims
  // nothing: loom-train --dry-run asks it.
  static std::string holder_refusal(const std::string& dir);

 private:
  // The refusal for a lock file holding `held` ("" for a dead holder on this host); `who` names the holder.
  static std::string refusal_for(const std::string& dir, const std::string& held, std::string* who);
  std::string path_, content_, takeover_note_;
};

}  // namespace loom
