// CommWaitTimes: the host seconds each communicator's operations spent
// blocked in Work::wait() (exposed communication), per operation type, for
// `loom-train --profile` (runtime/train/step_profile.h).
//
// Kept beside CommStats (calls, bytes) rather than in it: a backend records
// here from its Work, and a reader pairs the two by Communicator::id().
//
// Who records: the MPI backend (MpiCommunicator tracks itself from
// construction to destruction and its Work adds the seconds of each blocking
// wait(), the watchdog's polling included). Backends whose wait does not block
// the host (NCCL orders a stream) or that do not time it are not tracked.
//
// Thread-safe (one mutex); totals only grow while a communicator lives.
#pragma once

#include <array>
#include <cstdint>
#include <vector>

#include "loom/runtime/comm/communicator.h"

namespace loom {

class CommWaitTimes {
 public:
  using PerOp = std::array<double, static_cast<int>(OpType::kCount)>;
  // A backend's communicator: from its construction / until its destruction.
  static void track(int64_t comm_id);
  static void forget(int64_t comm_id);
  // Adds `seconds` to `op` of a tracked communicator (ignored for one that is not).
  static void record(int64_t comm_id, OpType op, double seconds);
  // Seconds per op so far (zeros for an untracked id).
  static PerOp of(int64_t comm_id);
  // Ids of the communicators tracked now, ascending.
  static std::vector<int64_t> tracked();
};

}  // namespace loom
