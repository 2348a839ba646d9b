#include "loom/runtime/core/host_memory.h"

#include "loom/runtime/core/env_flag.h"

#if defined(__GLIBC__)
#include <malloc.h>
#endif

namespace loom {

bool keep_freed_host_memory(std::string* why) {
  if (!env_flag("LOOM_KEEP_FREED_HOST_MEMORY", true)) {
    *why = "host allocator: glibc defaults (LOOM_KEEP_FREED_HOST_MEMORY is off)";
    return false;
  }
#if defined(__GLIBC__)
  // No mmap'd blocks at all: glibc caps its mmap threshold at 32 MiB, and a
  // long sequence's activations are larger (a 16K-token Taylor feature tensor
  // of the demo is 70 MiB), so they were mapped and unmapped every step (L
  // layer at 16K tokens: 4.6 -> 2.0 s per step, faults 515K -> 206K).
  constexpr int kNoMmap = 0;
  constexpr int kNeverTrim = -1;      // glibc reads it as the largest size_t: the heap keeps its peak
  constexpr int kTopPad = 64 << 20;   // grow the heap in 64 MiB steps
  const bool ok = mallopt(M_MMAP_MAX, kNoMmap) == 1 && mallopt(M_TRIM_THRESHOLD, kNeverTrim) == 1 &&
                  mallopt(M_TOP_PAD, kTopPad) == 1;
  *why = ok ? "host allocator: freed blocks of any size stay in the process (no page faults per step; resident "
              "memory stays at the peak; LOOM_KEEP_FREED_HOST_MEMORY=0 to disable)"
            : "host allocator: glibc refused the settings; its defaults stay";
  return ok;
#else
  *why = "host allocator: not glibc, defaults stay";
  return false;
#endif
}

}  // namespace loom
