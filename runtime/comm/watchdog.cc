#include "loom/runtime/comm/watchdog.h"

#include <mpi.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <mutex>
#include <sstream>
#include <thread>
#include <vector>

#include "loom/runtime/core/error.h"

namespace loom {
namespace {

WatchdogAction action_from_env() {
  const char* env = std::getenv("LOOM_WATCHDOG");
  if (env == nullptr || std::strcmp(env, "abort") == 0) return WatchdogAction::kAbort;
  if (std::strcmp(env, "throw") == 0) return WatchdogAction::kThrow;
  throw ConfigError("environment variable LOOM_WATCHDOG='" + std::string(env) + "': allowed values are abort, throw");
}

std::atomic<int>& action_slot() {
  static std::atomic<int> slot{static_cast<int>(action_from_env())};
  return slot;
}

std::mutex& hooks_mutex() {
  static std::mutex m;
  return m;
}
std::vector<std::function<void()>>& hooks() {
  static std::vector<std::function<void()>> h;
  return h;
}

}  // namespace

WatchdogAction watchdog_action() { return static_cast<WatchdogAction>(action_slot().load()); }
void set_watchdog_action(WatchdogAction action) { action_slot().store(static_cast<int>(action)); }

void add_abort_hook(std::function<void()> hook) {
  std::lock_guard<std::mutex> lock(hooks_mutex());
  hooks().push_back(std::move(hook));
}

namespace {
std::string& watchdog_context() {
  thread_local std::string context;
  return context;
}
}  // namespace

WatchdogContext::WatchdogContext(std::string what) : previous_(std::move(watchdog_context())) {
  watchdog_context() = std::move(what);
}
WatchdogContext::~WatchdogContext() { watchdog_context() = std::move(previous_); }

void wait_with_watchdog(const std::function<bool()>& is_done, std::chrono::milliseconds timeout,
                        const std::function<std::string()>& describe) {
  using clock = std::chrono::steady_clock;
  const auto start = clock::now();
  // Spin briefly for latency, then yield, then sleep with a back-off that grows
  // with the time already waited (1% of it, 50 us to 2 ms): an oversubscribed
  // rank that busy-waits steals the core its peers need to make progress, and a
  // rank parked at a barrier for seconds should cost nothing.
  for (int64_t polls = 0;; ++polls) {
    if (is_done()) return;
    if (polls < 64) continue;
    if (polls < 1024) {
      std::this_thread::yield();
      continue;
    }
    const auto waited = clock::now() - start;
    if (waited > timeout) break;
    const auto pause = std::chrono::duration_cast<std::chrono::microseconds>(waited / 100);
    std::this_thread::sleep_for(std::clamp(pause, std::chrono::microseconds(50), std::chrono::microseconds(2000)));
  }
  const double seconds = std::chrono::duration<double>(timeout).count();
  std::ostringstream msg;
  msg << "loom watchdog: rank " << world_rank_or_minus_one() << " on host " << host_name() << ": " << describe();
  if (!watchdog_context().empty()) msg << " (" << watchdog_context() << ")";
  msg << " did not complete within " << seconds
      << " s (a rank skipped or reordered a collective, a peer died, or the timeout is too short; "
      << "set parallel.comm_timeout_s or LOOM_COMM_TIMEOUT_S)";
  if (watchdog_action() == WatchdogAction::kThrow) throw CommTimeout(msg.str());
  std::cerr << msg.str() << "; aborting the job" << std::endl;
  {
    std::lock_guard<std::mutex> lock(hooks_mutex());
    for (auto& hook : hooks()) {
      try {
        hook();
      } catch (...) {
      }
    }
  }
  int initialized = 0, finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  if (initialized && !finalized) MPI_Abort(MPI_COMM_WORLD, kWatchdogExitCode);
  std::abort();  // only without MPI: nothing else can stop the job
}

}  // namespace loom
