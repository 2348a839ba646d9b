// keep_freed_host_memory (runtime/core/host_memory.h): after it, freeing and
// allocating the same large block again costs no page faults; the opt-out
// leaves glibc's defaults.
#include <gtest/gtest.h>
#include <stdlib.h>
#include <sys/resource.h>

#include <cstring>
#include <string>

#include "loom/runtime/core/host_memory.h"

#if defined(__GLIBC__)
#include <malloc.h>
#endif

namespace loom {
namespace {

long minor_faults() {
  rusage usage{};
  getrusage(RUSAGE_SELF, &usage);
  return usage.ru_minflt;
}

// Faults of `rounds` allocations of a block (1 MiB: below the 2 MiB of a transparent huge page, like most
// activations of a small model; 64 MiB: above glibc's largest mmap threshold, like a long sequence's), each
// written and freed.
long faults_of_alloc_free_rounds(int rounds, size_t kBytes = 1 << 20) {
  const long before = minor_faults();
  for (int i = 0; i < rounds; ++i) {
    auto* p = static_cast<char*>(std::malloc(kBytes));
    if (p == nullptr) {
      ADD_FAILURE() << "malloc of " << kBytes << " bytes failed";
      return -1;
    }
    std::memset(p, i, kBytes);
    asm volatile("" : : "r"(p) : "memory");  // the block escapes: the compiler may not elide the writes
    std::free(p);
  }
  return minor_faults() - before;
}

TEST(HostMemory, FreedBlocksAreReusedWithoutPageFaults) {
#if !defined(__GLIBC__)
  GTEST_SKIP() << "not glibc";
#else
  // glibc's start-up settings, fixed (no dynamic threshold): every 1 MiB block is mmap'd and unmapped, so
  // each round faults its 256 pages in again. This is the cost the function removes.
  ASSERT_EQ(mallopt(M_MMAP_THRESHOLD, 128 << 10), 1);
  ASSERT_EQ(mallopt(M_TRIM_THRESHOLD, 128 << 10), 1);
  ASSERT_EQ(mallopt(M_TOP_PAD, 0), 1);
  const long before = faults_of_alloc_free_rounds(40);
  EXPECT_GT(before, 40 * 256 * 9 / 10) << "the baseline should fault every round";

  ::unsetenv("LOOM_KEEP_FREED_HOST_MEMORY");
  std::string why;
  ASSERT_TRUE(keep_freed_host_memory(&why)) << why;
  EXPECT_NE(why.find("stay in the process"), std::string::npos) << why;
  faults_of_alloc_free_rounds(1);  // the heap grows once
  const long after = faults_of_alloc_free_rounds(40);
  EXPECT_LT(after, 256) << "freed 1 MiB blocks were returned to the kernel and faulted in again (baseline "
                         << before << ")";
  // Blocks above 32 MiB (glibc maps those whatever the threshold) are reused too: 16,384 pages each.
  constexpr size_t kLarge = size_t{64} << 20;
  faults_of_alloc_free_rounds(1, kLarge);
  const long large = faults_of_alloc_free_rounds(5, kLarge);
  EXPECT_LT(large, 16384) << "freed 64 MiB blocks were unmapped and faulted in again";
#endif
}

TEST(HostMemory, OptOutLeavesTheDefaultsAndSaysSo) {
  ::setenv("LOOM_KEEP_FREED_HOST_MEMORY", "0", 1);
  std::string why;
  EXPECT_FALSE(keep_freed_host_memory(&why));
  EXPECT_NE(why.find("LOOM_KEEP_FREED_HOST_MEMORY is off"), std::string::npos) << why;
  ::unsetenv("LOOM_KEEP_FREED_HOST_MEMORY");
}

}  // namespace
}  // namespace loom
