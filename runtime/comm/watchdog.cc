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

// ---- peer status: the side channel that tells who has not arrived ----
namespace {

constexpr int kQueryTag = 32001, kReplyTag = 32002;
constexpr size_t kMaxStatusBytes = 480;  // small enough to travel eagerly
MPI_Comm g_peer_channel = MPI_COMM_NULL;
int64_t g_query_id = 0;

bool mpi_usable() {
  int initialized = 0, finalized = 0;
  MPI_Initialized(&initialized);
  MPI_Finalized(&finalized);
  return initialized && !finalized && g_peer_channel != MPI_COMM_NULL;
}

// Answers every pending status query with `status` (what this rank waits in).
void answer_peer_queries(const std::function<std::string()>& status) {
  if (!mpi_usable()) return;
  for (;;) {
    int pending = 0;
    MPI_Status st;
    if (MPI_Iprobe(MPI_ANY_SOURCE, kQueryTag, g_peer_channel, &pending, &st) != MPI_SUCCESS || !pending) return;
    int64_t id = 0;
    MPI_Recv(&id, 1, MPI_INT64_T, st.MPI_SOURCE, kQueryTag, g_peer_channel, MPI_STATUS_IGNORE);
    std::string reply(reinterpret_cast<const char*>(&id), sizeof(id));
    reply += status().substr(0, kMaxStatusBytes);
    MPI_Send(reply.data(), static_cast<int>(reply.size()), MPI_CHAR, st.MPI_SOURCE, kReplyTag, g_peer_channel);
  }
}

// "operation all_reduce #2 on mpi communicator 'world'" of a description
// "... (rank 0 of 2, 16 bytes)": the part every rank of the operation shares.
std::string operation_key(const std::string& description) {
  return description.substr(0, description.find(" (rank "));
}

// Asks every other rank what it waits in and returns a summary naming the
// ranks that have not arrived in `mine`.
std::string ask_peers(const std::string& mine, std::chrono::milliseconds grace) {
  if (!mpi_usable()) return "";
  int rank = 0, size = 1;
  MPI_Comm_rank(g_peer_channel, &rank);
  MPI_Comm_size(g_peer_channel, &size);
  if (size == 1) return "";
  const int64_t id = ++g_query_id;
  std::vector<MPI_Request> sends(static_cast<size_t>(size), MPI_REQUEST_NULL);
  for (int r = 0; r < size; ++r)
    if (r != rank) MPI_Isend(&id, 1, MPI_INT64_T, r, kQueryTag, g_peer_channel, &sends[static_cast<size_t>(r)]);
  std::vector<std::string> answers(static_cast<size_t>(size));
  std::vector<bool> answered(static_cast<size_t>(size), false);
  answered[static_cast<size_t>(rank)] = true;
  int missing = size - 1;
  const auto deadline = std::chrono::steady_clock::now() + grace;
  while (missing > 0 && std::chrono::steady_clock::now() < deadline) {
    answer_peer_queries([&] { return mine; });  // peers may be asking at the same time
    int pending = 0;
    MPI_Status st;
    if (MPI_Iprobe(MPI_ANY_SOURCE, kReplyTag, g_peer_channel, &pending, &st) != MPI_SUCCESS) break;
    if (!pending) {
      std::this_thread::sleep_for(std::chrono::milliseconds(1));
      continue;
    }
    int bytes = 0;
    MPI_Get_count(&st, MPI_CHAR, &bytes);
    std::string reply(static_cast<size_t>(std::max(bytes, 0)), '\0');
    MPI_Recv(reply.data(), bytes, MPI_CHAR, st.MPI_SOURCE, kReplyTag, g_peer_channel, MPI_STATUS_IGNORE);
    int64_t reply_id = 0;
    if (reply.size() >= sizeof(reply_id)) std::memcpy(&reply_id, reply.data(), sizeof(reply_id));
    const auto src = static_cast<size_t>(st.MPI_SOURCE);
    if (reply_id != id || answered[src]) continue;  // an answer to an earlier question
    answered[src] = true;
    answers[src] = reply.substr(sizeof(reply_id));
    --missing;
  }
  for (auto& request : sends)
    if (request != MPI_REQUEST_NULL) MPI_Request_free(&request);  // unanswered: the peer may never receive it

  std::vector<int> silent, same;
  std::vector<std::string> elsewhere;
  for (int r = 0; r < size; ++r) {
    if (r == rank) continue;
    const auto i = static_cast<size_t>(r);
    if (!answered[i]) {
      silent.push_back(r);
    } else if (operation_key(answers[i]) == operation_key(mine)) {
      same.push_back(r);
    } else {
      elsewhere.push_back("rank " + std::to_string(r) + " waits in " + answers[i]);
    }
  }
  auto list = [](const std::vector<int>& ranks) {
    std::string s;
    for (size_t i = 0; i < ranks.size(); ++i) s += (i ? ", " : "") + std::to_string(ranks[i]);
    return s;
  };
  std::ostringstream out;
  if (!silent.empty() || !elsewhere.empty()) {
    out << "; not arrived: ";
    if (!silent.empty())
      out << (silent.size() == 1 ? "rank " : "ranks ") << list(silent) << " did not answer within "
          << std::chrono::duration<double>(grace).count()
          << " s (busy outside communication: computing, stuck or dead)";
    for (size_t i = 0; i < elsewhere.size(); ++i) out << (i || !silent.empty() ? "; " : "") << elsewhere[i];
  }
  if (!same.empty()) out << "; waiting in the same operation: " << (same.size() == 1 ? "rank " : "ranks ") << list(same);
  return out.str();
}

}  // namespace

void enable_peer_status(MPI_Comm world_duplicate) { g_peer_channel = world_duplicate; }

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
    // A long wait: tell peers that ask what this rank waits in.
    if (polls % 16 == 0) answer_peer_queries(describe);
    const auto waited = clock::now() - start;
    if (waited > timeout) break;
    const auto pause = std::chrono::duration_cast<std::chrono::microseconds>(waited / 100);
    std::this_thread::sleep_for(std::clamp(pause, std::chrono::microseconds(50), std::chrono::microseconds(2000)));
  }
  report_timeout(timeout, describe());
}

void report_timeout(std::chrono::milliseconds timeout, const std::string& description) {
  const double seconds = std::chrono::duration<double>(timeout).count();
  const std::string& mine = description;
  std::ostringstream msg;
  msg << "loom watchdog: rank " << world_rank_or_minus_one() << " on host " << host_name() << ": " << mine;
  if (!watchdog_context().empty()) msg << " (" << watchdog_context() << ")";
  msg << " did not complete within " << seconds << " s";
  // Grace for the peers' answers: long enough for a rank that polls slowly,
  // short next to the timeout.
  const auto grace = std::clamp(std::chrono::duration_cast<std::chrono::milliseconds>(timeout / 4),
                                std::chrono::milliseconds(1000), std::chrono::milliseconds(10000));
  msg << ask_peers(mine, grace);
  msg << " (a rank skipped or reordered a collective, a peer died, or the timeout is too short; "
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
