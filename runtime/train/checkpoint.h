// Checkpoints: everything needed to continue a run exactly.
//
// A checkpoint is a directory <dir>/step-NNNNNNNN/ with state.bin (the raw
// bytes of every tensor: model parameters, optimizer state) and manifest.pb
// (a CheckpointManifest: step, data position, seed, layout, each tensor's name,
// dtype, shape, offset and size, and the FNV-1a checksum of state.bin). It is
// written into step-NNNNNNNN.tmp/ and renamed only when complete and synced,
// so a save killed halfway leaves the previous checkpoint as the latest.
// Loading checks sizes and checksum and refuses a truncated or corrupt file
// with a message naming it. Parameters are replicated, so one rank (0) writes
// and every rank reads; a different dp x sp layout can resume.
// Fault injection for tests: LOOM_FAULT_KILL_DURING_SAVE=S kills the process
// with SIGKILL halfway through writing the checkpoint of step S.
#pragma once

#include <optional>
#include <string>

#include "loom/runtime/train/optimizer.h"
#include "loom/runtime/core/proto/loom.pb.h"

namespace loom {

struct CheckpointData {
  pb::CheckpointManifest manifest;  // step, seed, data_position, dp, sp, config_text, last_loss
  NamedTensors tensors;
};

// Writes <dir>/step-NNNNNNNN/ atomically and returns its path; keeps the newest
// `keep` complete checkpoints.
std::string save_checkpoint(const std::string& dir, const CheckpointData& data, int64_t keep);
// The newest complete checkpoint under `dir`, if any (unfinished .tmp
// directories are ignored).
std::optional<std::string> latest_checkpoint(const std::string& dir);
// Reads and verifies one checkpoint directory.
CheckpointData load_checkpoint(const std::string& path);

}  // namespace loom
