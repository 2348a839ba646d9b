// Small helpers shared by Loom's benchmarks: timing with warm-up and medians,
// the same-run matmul roofline, and table printing.
#pragma once

#include <ATen/ATen.h>
#include <malloc.h>

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
inline Timing time_it(const std::function<void()>& fn, int warmup, int reps) {
  for (int i = 0; i < warmup; ++i) fn();
  std::vector<double> t;
  for (int i = 0; i < reps; ++i) {
    const auto start = std::chrono::steady_clock::now();
    fn();
    t.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }
  std::sort(t.begin(), t.end());
  return {t[t.size() / 2], t.front(), t.back()};
}

// GFLOP/s of an n x n x n float32 matmul on this machine, now.
inline double matmul_gflops(int64_t n = 2048, int reps = 3) {
  const at::Tensor a = at::randn({n, n}), b = at::randn({n, n});
  const Timing t = time_it([&] { at::matmul(a, b); }, 1, reps);
  return 2.0 * n * n * n / t.median_s / 1e9;
}

// glibc returns large freed blocks (> 32 MiB) to the kernel, so every
// iteration of a long-sequence benchmark pays page faults on fresh memory;
// a training job reuses its memory, and so does a benchmark of it.
inline void keep_freed_memory() {
  mallopt(M_MMAP_THRESHOLD, 1 << 30);
  mallopt(M_TRIM_THRESHOLD, 1 << 30);
}

inline double mib(int64_t bytes) { return static_cast<double>(bytes) / (1024.0 * 1024.0); }

}  // namespace loom::bench
