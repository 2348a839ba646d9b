// MemoryTracker: current and peak bytes of CPU tensor memory of this process.
//
// install() puts a counting allocator in front of libtorch's CPU allocator
// (c10::SetCPUAllocator), so every CPU tensor allocated afterwards is counted
// exactly, without sampling. Benchmarks reset the peak before a measurement
// and read it after; the trainer reports it in its progress line. Tensors
// allocated before install() are not counted.
// Thread-safe; install() is idempotent.
#pragma once

#include <cstdint>

namespace loom {

class MemoryTracker {
 public:
  static void install();
  static bool installed();
  static int64_t current_bytes();
  static int64_t peak_bytes();
  // Peak := current, to measure the peak of what follows.
  static void reset_peak();
};

}  // namespace loom
