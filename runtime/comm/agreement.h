// Agreement on set-up failures: every rank of a communicator fails alike.
//
// A set-up step (parsing the config, building the mesh, opening data, checking
// the checkpoint directory) can fail on some ranks only: a file missing on one
// node, a mesh that does not fit the compute ranks while memory nodes are
// fine. If those ranks simply exited, the others would wait forever in their
// next collective. agree_on_failure() runs the step on every rank, then agrees
// over MPI (one all-reduce; one broadcast when something failed): when any rank
// failed, every rank throws the same error type (ConfigError,
// UnsupportedError, or LoomError) with the first failing rank's message,
// prefixed by "on rank R: " on the ranks that did not fail themselves.
//
// Who calls it: loom-train and Job at start-up, the Trainer before its first
// step. Collective over `comm`: every rank must call it, in the same order
// relative to its other collectives, also when its own step cannot fail.
#pragma once

#include <mpi.h>

#include <functional>

namespace loom {

void agree_on_failure(MPI_Comm comm, const std::function<void()>& step);

}  // namespace loom
