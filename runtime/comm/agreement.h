// Agreement on set-up failures: every rank of a communicator fails alike.
//
// A set-up step (parsing the config, building the mesh, opening data, checking
// the checkpoint directory) can fail on some ranks only: a file missing on one
// node, a mesh that does not fit the compute ranks while memory nodes are
// fine. If those ranks simply exited, the others would wait forever in their
// next collective. agree_on_failure() runs the step on every rank, then agrees
// over the communicator (one all-reduce; two broadcasts when something failed):
// when any rank failed, every rank throws the same error type (ConfigError,
// UnsupportedError, or LoomError) with the lowest failing rank's message,
// prefixed by "on rank R: " on the ranks that did not fail themselves (R > 0).
// agree_on_error() is the same agreement for a caller that ran its checks
// itself and throws its own error type (loom-train's set-up checks).
//
// Who calls it: loom-train and Job at start-up, the Trainer before its first
// step. Collective over `comm`: every rank must call it, in the same order
// relative to its other collectives, also when its own step cannot fail. The
// Communicator forms work on any backend (MPI, NCCL, c10d: small tensors on
// comm.device()); the MPI_Comm form, for the time before any Communicator
// exists, runs the same agreement over a duplicate of `comm`.
#pragma once

#include <mpi.h>

#include <functional>
#include <string>

#include "loom/runtime/comm/communicator.h"

namespace loom {

void agree_on_failure(Communicator& comm, const std::function<void()>& step);
void agree_on_failure(MPI_Comm comm, const std::function<void()>& step);

// `error`: this rank's failure ("" when it did not fail). Returns, on every
// rank, the lowest failing rank's message (prefixed as above), or "" when no
// rank failed.
std::string agree_on_error(Communicator& comm, const std::string& error);

}  // namespace loom
