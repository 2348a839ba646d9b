#include "loom/runtime/core/memory_tracker.h"

#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/core/impl/alloc_cpu.h>

#include <atomic>
#include <cstring>
#include <mutex>
#include <unordered_map>

namespace loom {
namespace {

std::atomic<int64_t> g_current{0};
std::atomic<int64_t> g_peak{0};
std::atomic<bool> g_installed{false};

void count(int64_t delta) {
  const int64_t now = g_current.fetch_add(delta) + delta;
  int64_t peak = g_peak.load();
  while (now > peak && !g_peak.compare_exchange_weak(peak, now)) {
  }
}

// Allocates with c10::alloc_cpu (what libtorch's default CPU allocator uses)
// and records each block's size, so that the context is the data pointer
// itself, as code calling raw_allocate()/raw_deleter() requires.
std::mutex g_sizes_mutex;
std::unordered_map<void*, int64_t>& sizes() {
  static std::unordered_map<void*, int64_t> s;
  return s;
}

void release(void* ptr) {
  if (ptr == nullptr) return;
  int64_t bytes = 0;
  {
    std::lock_guard<std::mutex> lock(g_sizes_mutex);
    auto it = sizes().find(ptr);
    if (it != sizes().end()) {
      bytes = it->second;
      sizes().erase(it);
    }
  }
  count(-bytes);
  c10::free_cpu(ptr);
}

class CountingAllocator final : public c10::Allocator {
 public:
  // libtorch < 2.3 declares allocate() const, later versions non-const: both are defined (without
  // `override`, which would fail on one of them) so the one the base declares is overridden.
  c10::DataPtr allocate(size_t bytes) const { return allocate_counted(bytes); }
  c10::DataPtr allocate(size_t bytes) { return allocate_counted(bytes); }
  c10::DeleterFnPtr raw_deleter() const override { return &release; }
  // Required by newer libtorch (2.x) allocators; harmless on 1.13.
  void copy_data(void* dest, const void* src, std::size_t count) const { std::memcpy(dest, src, count); }

 private:
  static c10::DataPtr allocate_counted(size_t bytes) {
    void* data = bytes == 0 ? nullptr : c10::alloc_cpu(bytes);
    if (data != nullptr) {
      std::lock_guard<std::mutex> lock(g_sizes_mutex);
      sizes()[data] = static_cast<int64_t>(bytes);
    }
    count(static_cast<int64_t>(bytes));
    return c10::DataPtr(data, data, &release, c10::Device(c10::DeviceType::CPU));
  }
};

}  // namespace

void MemoryTracker::install() {
  static std::once_flag once;
  std::call_once(once, [] {
    static CountingAllocator allocator;
    c10::SetCPUAllocator(&allocator, /*priority=*/100);
    g_installed = true;
  });
}

bool MemoryTracker::installed() { return g_installed.load(); }
int64_t MemoryTracker::current_bytes() { return g_current.load(); }
int64_t MemoryTracker::peak_bytes() { return g_peak.load(); }
void MemoryTracker::reset_peak() { g_peak.store(g_current.load()); }

namespace {
MemoryTracker::DeviceStatsProvider& cuda_provider() {
  static MemoryTracker::DeviceStatsProvider provider{nullptr, nullptr};
  return provider;
}
}  // namespace

void MemoryTracker::set_cuda_stats_provider(DeviceStatsProvider provider) { cuda_provider() = provider; }

std::optional<int64_t> MemoryTracker::peak_bytes(const c10::Device& device) {
  if (device.is_cpu()) return installed() ? std::optional<int64_t>(peak_bytes()) : std::nullopt;
  if (device.is_cuda() && cuda_provider().peak_bytes != nullptr)
    return cuda_provider().peak_bytes(device.has_index() ? device.index() : 0);
  return std::nullopt;
}

void MemoryTracker::reset_peak(const c10::Device& device) {
  if (device.is_cpu()) {
    reset_peak();
  } else if (device.is_cuda() && cuda_provider().reset_peak != nullptr) {
    cuda_provider().reset_peak(device.has_index() ? device.index() : 0);
  }
}

}  // namespace loom
