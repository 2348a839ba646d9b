// Small helpers shared by Loom's benchmarks: timing with warm-up and medians,
// the same-run matmul roofline, and table printing.
#pragma once

#include <ATen/ATen.h>
#include <malloc.h>

#include "loom/runtime/core/memory_tracker.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <functional>
#include <vector>

namespace loom::bench {

struct Timing {
  double median_s = 0;
  double min_s = 0;
  double max_s = 0;
};

// Runs `fn` `warmup` times, then `reps` times, and returns the spread.
// `sync` (a device's synchronize) drains queued work before and inside
// every timed run, so that asynchronous devices are timed too.
inline Timing time_it(const std::function<void()>& fn, int warmup, int reps,
                      const std::function<void()>& sync = [] {}) {
  for (int i = 0; i < warmup; ++i) fn();
  sync();
  std::vector<double> t;
  for (int i = 0; i < reps; ++i) {
    const auto start = std::chrono::steady_clock::now();
    fn();
    sync();
    t.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }
  std::sort(t.begin(), t.end());
  return {t[t.size() / 2], t.front(), t.back()};
}

// GFLOP/s of an n x n x n matmul with `options` (default float32 on the
// CPU) here, now: the same-run roofline next to which kernels are reported.
inline double matmul_gflops(int64_t n = 2048, int reps = 3, at::TensorOptions options = {},
                            const std::function<void()>& sync = [] {}) {
  const at::Tensor a = at::randn({n, n}, options), b = at::randn({n, n}, options);
  const Timing t = time_it([&] { at::matmul(a, b); }, 1, reps, sync);
  return 2.0 * n * n * n / t.median_s / 1e9;
}

// The same from the best of `reps` runs, for the kernel tables, which report
// their kernels' best of reps: best against best, so that load flatters
// neither side (a median matmul next to a best kernel did).
inline double matmul_gflops_best(int64_t n = 2048, int reps = 3) {
  const at::Tensor a = at::randn({n, n}), b = at::randn({n, n});
  const Timing t = time_it([&] { at::matmul(a, b); }, 1, reps);
  return 2.0 * n * n * n / t.min_s / 1e9;
}

// glibc returns large freed blocks (> 32 MiB) to the kernel, so every
// iteration of a long-sequence benchmark pays page faults on fresh memory;
// a training job reuses its memory, and so does a benchmark of it.
inline void keep_freed_memory() {
  mallopt(M_MMAP_THRESHOLD, 1 << 30);
  mallopt(M_TRIM_THRESHOLD, 1 << 30);
}

struct Measured {
  double seconds = 0;     // median of the timed repetitions
  int64_t peak_bytes = 0;  // peak tensor memory above what existed before
};

// Forward+backward of an attention-like op on q, k, v [1, heads, n, d]
// (q and k scaled by qk_scale), after one warm-up step outside the peak.
// Needs MemoryTracker::install().
inline Measured measure_attention(
    const std::function<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&)>& op, int64_t heads,
    int64_t n, int64_t d, int reps, double qk_scale = 1.0) {
  at::Tensor q = (at::randn({1, heads, n, d}) * qk_scale).requires_grad_(true);
  at::Tensor k = (at::randn({1, heads, n, d}) * qk_scale).requires_grad_(true);
  at::Tensor v = at::randn({1, heads, n, d}).requires_grad_(true);
  const at::Tensor g = at::randn({1, heads, n, d});
  auto step = [&] {
    q.mutable_grad().reset();
    k.mutable_grad().reset();
    v.mutable_grad().reset();
    op(q, k, v).backward(g);
  };
  step();
  MemoryTracker::reset_peak();
  const int64_t base = MemoryTracker::current_bytes();
  const Timing t = time_it(step, 0, reps);
  return {t.median_s, MemoryTracker::peak_bytes() - base};
}

inline double mib(int64_t bytes) { return static_cast<double>(bytes) / (1024.0 * 1024.0); }

}  // namespace loom::bench
