// Step profile: where a training step's time goes, for `loom-train --profile`.
//
// What it does: a process-wide accumulator of named parts (seconds and the
// number of times each was entered) plus the wall time and step count of the
// profiled window, and a switch that says whether the model's layers time
// themselves now. Parts are plain names: "data", "optimizer step", and for the
// layers "forward L", "backward A", ... (one per mixer letter, summed over the
// layers of that kind).
//
// Who calls it: the Trainer (turns collection on around a training step's
// forward and backward, times the other parts, reads the totals at the end);
// HybridLM (times each block's forward and installs the backward markers of
// backward_markers.h only while layers_active() is true). Nothing else.
//
// Ordering rules: single-threaded use (the training loop and the CPU autograd
// engine run on one thread); layers_active() is false unless the trainer set
// it, so a model that is not being profiled pays one bool load per block and
// builds no extra autograd nodes.
#pragma once

#include <chrono>
#include <cstdint>
#include <map>
#include <string>

namespace loom::profile {

using Clock = std::chrono::steady_clock;

inline double seconds_since(Clock::time_point start) {
  return std::chrono::duration<double>(Clock::now() - start).count();
}

struct Part {
  double seconds = 0;
  int64_t count = 0;
};

// Sums of named parts over a window of steps.
class Accumulator {
 public:
  void add(const std::string& part, double seconds);
  // Parts in name order (the same on every rank that ran the same model).
  const std::map<std::string, Part>& parts() const { return parts_; }
  double seconds(const std::string& part) const;  // 0 for a part never added
  // Sum of the parts whose name starts with `prefix` ("forward " sums every kind).
  double sum_with_prefix(const std::string& prefix) const;
  void add_step(double wall_seconds) {
    wall_seconds_ += wall_seconds;
    ++steps_;
  }
  void add_wall(double seconds) { wall_seconds_ += seconds; }  // outside a step (final save/eval)
  double wall_seconds() const { return wall_seconds_; }
  int64_t steps() const { return steps_; }
  void clear() { *this = Accumulator(); }

 private:
  std::map<std::string, Part> parts_;
  double wall_seconds_ = 0;
  int64_t steps_ = 0;
};

// The accumulator the trainer and the model share.
Accumulator& global();

// True while the trainer collects layer timings (a profiled step's forward
// and backward); never true when profiling is off.
bool layers_active();
void set_layers_active(bool active);

// Layer collection on for a scope (when `on`), off again at its end, also
// when the scope is left by an exception.
class LayersActiveScope {
 public:
  explicit LayersActiveScope(bool on) { set_layers_active(on); }
  ~LayersActiveScope() { set_layers_active(false); }
  LayersActiveScope(const LayersActiveScope&) = delete;
  LayersActiveScope& operator=(const LayersActiveScope&) = delete;
};

// Adds the time from construction to destruction (or to stop(), or to the
// next start()) to `part` of global(). Does nothing at all when `enabled` is
// false (profiling off), so that each timed scope is one line:
//   const profile::ScopedTimer timer("evaluation", profile_);
// Window::kOutsideStep also adds the seconds to the profiled wall time (the
// final checkpoint and evaluation, which no step's wall time holds).
class ScopedTimer {
 public:
  enum class Window { kInsideStep, kOutsideStep };
  explicit ScopedTimer(std::string part, bool enabled = true, Window window = Window::kInsideStep)
      : enabled_(enabled), window_(window) {
    if (enabled_) start(std::move(part));
  }
  ~ScopedTimer() { stop(); }
  ScopedTimer(const ScopedTimer&) = delete;
  ScopedTimer& operator=(const ScopedTimer&) = delete;

  // Ends the current part (if any) and times `part` from now.
  void start(std::string part) {
    stop();
    if (!enabled_) return;
    part_ = std::move(part);
    start_ = Clock::now();
    running_ = true;
  }
  // Ends the current part; idempotent.
  void stop() {
    if (!running_) return;
    running_ = false;
    const double seconds = seconds_since(start_);
    global().add(part_, seconds);
    if (window_ == Window::kOutsideStep) global().add_wall(seconds);
  }

 private:
  bool enabled_;
  Window window_;
  bool running_ = false;
  std::string part_;
  Clock::time_point start_;
};

}  // namespace loom::profile
