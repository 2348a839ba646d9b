// StepProfile: the end-of-run report of `loom-train --profile`.
//
// What it does: turns the profile accumulator (runtime/core/profile.h: layer
// forward/backward per mixer letter, data, gradient all-reduce, clipping,
// optimizer, checkpoint, evaluation, ...) and the communicators' counters
// since the start of the run (calls, bytes, seconds blocked in Work::wait())
// into rows of seconds, % of the wall time and ms per step, with the max over
// ranks next to this rank's value, and prints them as a table and as one JSON
// object for the metrics file.
//
// Who calls it: Trainer::fit() when profiling is on: CommSnapshot at the start
// of the run, make_step_profile() at the end (a collective over the world:
// every rank calls it, in the same place).
//
// The parts of a step do not overlap and "other" is the wall time minus their
// sum; "embedding + head/loss" is the model's forward+backward minus the
// layers. Collective waits are not a part: they happen inside the parts (a
// layer's all-gather inside its forward, the gradient all-reduce inside its
// own part), so their table stands beside the parts, not in their sum.
#pragma once

#include <array>
#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "loom/runtime/comm/communicator.h"
#include "loom/runtime/core/profile.h"

namespace loom {

// Calls, bytes and wait seconds of one operation type.
struct CollectiveCounters {
  int64_t calls = 0, bytes_sent = 0, bytes_received = 0;
  double wait_seconds = 0;
};

// Per-op counters (CommStats: calls, bytes, wait seconds) summed over every
// live registered communicator of any backend (Communicator::live(): splits,
// reversed() and an NCCL communicator's MPI bootstrap included), counted from
// the moment of construction.
class CommSnapshot {
 public:
  CommSnapshot();
  using Totals = std::array<CollectiveCounters, static_cast<int>(OpType::kCount)>;
  // Counters since construction; a communicator created later counts from 0.
  Totals since() const;

 private:
  std::map<int64_t, CommStats> start_;
};

struct ProfileRow {
  std::string name;
  double seconds = 0;      // this rank
  double max_seconds = 0;  // max over ranks
};

struct CollectiveRow {
  std::string name;  // op_type_name()
  CollectiveCounters counters;
  double max_wait_seconds = 0;
};

struct StepProfile {
  int64_t steps = 0;
  double wall_seconds = 0, max_wall_seconds = 0;
  std::vector<ProfileRow> parts;  // in print order, "other" last
  std::vector<CollectiveRow> collectives;
  std::string note;  // e.g. what the backward rows hold under recompute
  bool have_max = true;  // false when the ranks' parts differ (then max = this rank)

  std::string table() const;
  std::string json() const;  // {"profile": {...}}: one metrics line
};

// The layer kinds in `accumulator` ("forward L" -> 'L'), sorted.
std::string profiled_layer_kinds(const profile::Accumulator& accumulator);

// Collective over `world`: this rank's rows and the max over ranks.
StepProfile make_step_profile(const profile::Accumulator& accumulator, const CommSnapshot::Totals& comm,
                              Communicator& world, std::string note);

}  // namespace loom
