// MemoryTracker: current and peak bytes of CPU tensor memory of this process.
//
// install() puts a counting allocator in front of libtorch's CPU allocator
// (c10::SetCPUAllocator), so every CPU tensor allocated afterwards is counted
// exactly, without sampling. Benchmarks reset the peak before a measurement
// and read it after; the trainer reports it in its progress line. Tensors
// allocated before install() are not counted.
// Thread-safe; install() is idempotent. Installing replaces the process's CPU
// allocator, so libraries never do it on their own: executables and
// benchmarks opt in (loom-train does; the Trainer only reads what is there).
//
// The device-aware peak_bytes(device) / reset_peak(device) answer for CUDA
// devices from the CUDA caching allocator's statistics (builds with
// LOOM_WITH_CUDA), and for the CPU from the counting allocator when it is
// installed; otherwise they say "unknown" (nullopt).
#pragma once

#include <c10/core/Device.h>

#include <cstdint>
#include <optional>

namespace loom {

class MemoryTracker {
 public:
  static void install();
  static bool installed();
  static int64_t current_bytes();
  static int64_t peak_bytes();
  // Peak := current, to measure the peak of what follows.
  static void reset_peak();

  // Peak bytes allocated on `device` since its last reset_peak(device), if
  // this process can know it.
  static std::optional<int64_t> peak_bytes(const c10::Device& device);
  static void reset_peak(const c10::Device& device);

  // How the CUDA build answers for CUDA devices (runtime/core/cuda_memory_stats.cc).
  struct DeviceStatsProvider {
    int64_t (*peak_bytes)(c10::DeviceIndex);
    void (*reset_peak)(c10::DeviceIndex);
  };
  static void set_cuda_stats_provider(DeviceStatsProvider provider);
};

}  // namespace loom
