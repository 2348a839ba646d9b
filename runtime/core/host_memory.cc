#include "loom/runtime/core/host_memory.h"

#include <cstdlib>
#include <cstring>

#if defined(__GLIBC__)
#include <malloc.h>
#endif

namespace loom {

bool keep_freed_host_memory(std::string* why) {
  const char* env = std::getenv("LOOM_KEEP_FREED_HOST_MEMORY");
  if (env != nullptr && std::strcmp(env, "0") == 0) {
    *why = "host allocator: glibc defaults (LOOM_KEEP_FREED_HOST_MEMORY=0)";
    return false;
  }
#if defined(__GLIBC__)
  constexpr int kMmapThreshold = 32 << 20;      // glibc's maximum on 64-bit
  constexpr int kTrimThreshold = 1 << 30;       // keep up to 1 GiB of freed heap
  constexpr int kTopPad = 64 << 20;             // grow the heap in 64 MiB steps
  const bool ok = mallopt(M_MMAP_THRESHOLD, kMmapThreshold) == 1 && mallopt(M_TRIM_THRESHOLD, kTrimThreshold) == 1 &&
                  mallopt(M_TOP_PAD, kTopPad) == 1;
  *why = ok ? "host allocator: freed blocks up to 32 MiB stay in the process (no page faults per step; "
              "LOOM_KEEP_FREED_HOST_MEMORY=0 to disable)"
            : "host allocator: glibc refused the settings; its defaults stay";
  return ok;
#else
  *why = "host allocator: not glibc, defaults stay";
  return false;
#endif
}

}  // namespace loom
