// Watchdog: turns an operation that never finishes into a clear error.
//
// Backends wait for their operations through wait_with_watchdog(): it polls the
// operation's completion test (which also drives MPI progress) and, once the
// communicator's timeout has passed, reports which operation on which rank and
// host did not finish. The default action prints that message to stderr and
// aborts the whole job (MPI_Abort), because a rank stuck in a collective cannot
// be recovered from the ranks that are waiting for it. Tests and servers that
// must survive (offload memory nodes) can switch the action to throwing
// CommTimeout. Hooks registered with add_abort_hook() run before the abort
// (the NCCL backend aborts its communicators there).
//
// Who did not arrive: a rank that waits can only see its own operation, while
// the culprit is usually a peer that skipped the collective, waits in another
// one, is stuck computing or died. With peer status enabled (MpiEnvironment
// does it on a duplicate of MPI_COMM_WORLD), every rank that waits answers
// small status queries on that side channel with what it waits in; a rank
// that times out asks every other rank, waits a short grace period, and its
// message lists the ranks that did not answer (busy outside communication:
// computing, stuck or dead) and the ones waiting in a different operation:
// the ranks that have not arrived. The channel costs nothing while
// operations complete in time (one MPI_Iprobe per poll of a long wait).
#pragma once

#include <mpi.h>

#include <chrono>
#include <functional>
#include <string>

namespace loom {

enum class WatchdogAction { kAbort, kThrow };

// Process-wide action; initialised from LOOM_WATCHDOG=abort|throw (default abort).
WatchdogAction watchdog_action();
void set_watchdog_action(WatchdogAction action);

// Exit code of a job aborted by the watchdog.
constexpr int kWatchdogExitCode = 124;

// Polls `is_done` until it returns true; if `timeout` passes first, reports
// describe() and aborts or throws CommTimeout. Yields the CPU between polls so
// that oversubscribed ranks are not starved.
void wait_with_watchdog(const std::function<bool()>& is_done, std::chrono::milliseconds timeout,
                        const std::function<std::string()>& describe);

// The end of wait_with_watchdog() for a backend that waited by other means (a
// blocking wait with a deadline, as c10d's Gloo send/recv): `description`
// did not finish within `timeout`; reports it (asking peers, as above) and
// aborts or throws CommTimeout.
[[noreturn]] void report_timeout(std::chrono::milliseconds timeout, const std::string& description);

// Names what the code waiting in this scope is doing (say, "offload ATTEND of
// call 3 with memory node rank 2"): the watchdog adds it to its message, since
// a point-to-point receive alone does not say which request it belongs to.
// Thread-local; scopes nest (the innermost is reported).
class WatchdogContext {
 public:
  explicit WatchdogContext(std::string what);
  ~WatchdogContext();
  WatchdogContext(const WatchdogContext&) = delete;
  WatchdogContext& operator=(const WatchdogContext&) = delete;

 private:
  std::string previous_;
};

// Enables peer status on `world_duplicate`, a communicator over all ranks that
// nothing else uses (collective: every rank calls it once, after MPI_Init).
void enable_peer_status(MPI_Comm world_duplicate);

// Runs before the watchdog aborts the job.
void add_abort_hook(std::function<void()> hook);

}  // namespace loom
