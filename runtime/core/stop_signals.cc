#include "loom/runtime/core/stop_signals.h"

#include <pthread.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstring>
#include <system_error>

namespace loom {
namespace {

// What the handler may touch: lock-free atomics and fixed buffers written
// only while no handler of ours can run on them (see set_text).
std::atomic<int> g_count{0};
std::atomic<int> g_last{0};

}  // namespace

struct StopSignalScope::Text {
  char prefix[160] = {0};
  char first[256] = {0};
  char later[256] = {0};
};

namespace {

StopSignalScope::Text g_text;

void copy_bounded(char* out, size_t size, const std::string& in) {
  const size_t n = std::min(size - 1, in.size());
  std::memcpy(out, in.data(), n);
  out[n] = '\0';
}

void write_all(const char* s) {
  size_t left = std::strlen(s);  // strlen is async-signal-safe (POSIX.1-2016)
  while (left > 0) {
    const ssize_t n = ::write(STDERR_FILENO, s, left);
    if (n <= 0) return;
    s += n;
    left -= static_cast<size_t>(n);
  }
}

extern "C" void on_stop_signal(int sig) {
  const int saved_errno = errno;
  const int n = g_count.fetch_add(1) + 1;
  g_last.store(sig);
  write_all(g_text.prefix);
  write_all(sig == SIGINT ? "SIGINT" : sig == SIGTERM ? "SIGTERM" : "a signal");
  write_all(n == 1 ? " received: " : " received again: ");
  write_all(n == 1 ? g_text.first : g_text.later);
  write_all("\n");
  errno = saved_errno;
}

// Blocks SIGINT/SIGTERM while the messages change, so that a handler never
// reads a half-written buffer.
void set_text(const StopSignalScope::Text& text) {
  sigset_t block, old;
  sigemptyset(&block);
  sigaddset(&block, SIGINT);
  sigaddset(&block, SIGTERM);
  pthread_sigmask(SIG_BLOCK, &block, &old);
  g_text = text;
  pthread_sigmask(SIG_SETMASK, &old, nullptr);
}

}  // namespace

StopSignalScope::StopSignalScope(const std::string& prefix, const std::string& first, const std::string& later) {
  Text text;
  copy_bounded(text.prefix, sizeof(text.prefix), prefix);
  copy_bounded(text.first, sizeof(text.first), first);
  copy_bounded(text.later, sizeof(text.later), later);
  saved_text_ = std::make_unique<Text>(g_text);
  set_text(text);
  baseline_ = g_count.load();
  struct sigaction action {};
  action.sa_handler = on_stop_signal;
  sigemptyset(&action.sa_mask);
  // Restart interrupted system calls: a signal must not fail a checkpoint write.
  action.sa_flags = SA_RESTART;
  if (sigaction(SIGINT, &action, &previous_int_) != 0 || sigaction(SIGTERM, &action, &previous_term_) != 0)
    throw std::system_error(errno, std::generic_category(), "sigaction(SIGINT/SIGTERM)");
}

StopSignalScope::~StopSignalScope() {
  sigaction(SIGINT, &previous_int_, nullptr);
  sigaction(SIGTERM, &previous_term_, nullptr);
  set_text(*saved_text_);
}

int StopSignalScope::received() const { return g_count.load() - baseline_; }

int StopSignalScope::last_signal() const { return received() > 0 ? g_last.load() : 0; }

std::string signal_name(int signal) {
  if (signal == SIGINT) return "SIGINT";
  if (signal == SIGTERM) return "SIGTERM";
  return "signal " + std::to_string(signal);
}

}  // namespace loom
