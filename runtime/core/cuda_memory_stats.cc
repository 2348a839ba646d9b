// Device memory statistics of CUDA tensors for MemoryTracker: the CUDA caching
// allocator's own counters (bytes handed to tensors, aggregate over pools).
// Built only with LOOM_WITH_CUDA (needs a Torch built with CUDA); registered
// when libloom loads.
#include <c10/cuda/CUDACachingAllocator.h>

#include "loom/runtime/core/memory_tracker.h"

namespace loom {
namespace {

int64_t cuda_peak_bytes(c10::DeviceIndex device) {
  const auto stats = c10::cuda::CUDACachingAllocator::getDeviceStats(device);
  return stats.allocated_bytes[0].peak;  // index 0: StatType::AGGREGATE in libtorch 1.13 and 2.x
}

void cuda_reset_peak(c10::DeviceIndex device) { c10::cuda::CUDACachingAllocator::resetPeakStats(device); }

const bool registered = [] {
  MemoryTracker::set_cuda_stats_provider({&cuda_peak_bytes, &cuda_reset_peak});
  return true;
}();

}  // namespace
}  // namespace loom
