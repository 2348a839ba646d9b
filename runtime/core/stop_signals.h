// Stop signals: SIGINT and SIGTERM turned into a request to stop at the next
// safe point, for as long as a StopSignalScope lives.
//
// Who uses it: the Trainer around fit() (every rank stops after its current
// step and one checkpoint is saved) and a memory node's OffloadServer::serve()
// (it keeps serving and tells the compute ranks to stop). While a scope lives,
// a signal only counts: received() and last_signal() report it, and the
// handler writes one line to stderr (async-signal-safe) so that the user sees
// it was heard: the first line says what happens next, later ones that the
// signal is ignored while the work finishes (SIGKILL still stops at once).
// The destructor restores the handlers the scope found (sigaction), so a
// program embedding Loom keeps its own. Scopes nest: the innermost counts and
// prints. Construct and destroy scopes on one thread (the main one).
#pragma once

#include <csignal>
#include <memory>
#include <string>

namespace loom {

class StopSignalScope {
 public:
  // The handler prints "<prefix>SIGTERM received: <first>" for the first
  // signal and "<prefix>SIGINT received again: <later>" for the others.
  StopSignalScope(const std::string& prefix, const std::string& first, const std::string& later);
  ~StopSignalScope();
  StopSignalScope(const StopSignalScope&) = delete;
  StopSignalScope& operator=(const StopSignalScope&) = delete;

  // SIGINT/SIGTERM received since this scope began.
  int received() const;
  // The latest of them (SIGINT or SIGTERM), 0 when none.
  int last_signal() const;

  struct Text;  // the handler's messages (defined in stop_signals.cc)

 private:
  struct sigaction previous_int_ {};
  struct sigaction previous_term_ {};
  int baseline_ = 0;
  std::unique_ptr<Text> saved_text_;  // the enclosing scope's messages, restored on exit
};

// "SIGINT", "SIGTERM", or "signal N".
std::string signal_name(int signal);

}  // namespace loom
