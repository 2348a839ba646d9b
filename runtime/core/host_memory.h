// Host (CPU) memory behaviour of a training process.
//
// Why: glibc serves every block above its mmap threshold (128 KiB at start,
// growing dynamically to at most 32 MiB) with a fresh mmap and returns it to
// the kernel on free. A training step allocates and frees the same activation
// tensors every step, so each step page-faults them in again: on the demo
// (2 ranks, 256-token rows) that was ~13,000 minor faults and ~24% of the CPU
// time in the kernel per step. Keeping freed blocks in the process (as the
// CUDA caching allocator does on the GPU) removes that cost.
//
// keep_freed_host_memory() serves every block from the heap (no mmap: glibc's
// threshold stops at 32 MiB, below a long sequence's activations), never trims
// the heap and pads its growth, so freed activations of any size are reused
// without faults; resident memory then stays at the step's peak instead of
// dropping between steps (as with the CUDA caching allocator). If the heap
// cannot grow, glibc still falls back to mmap. It is process-wide, called once
// by Job (loom-train and embedding trainers that use Job) before
// the first tensor; LOOM_KEEP_FREED_HOST_MEMORY=0 in the environment leaves
// glibc's defaults. No effect (and false) on a C library other than glibc.
#pragma once

#include <string>

namespace loom {

// Returns whether the settings were applied; `why` says what was done or why not (for the log).
bool keep_freed_host_memory(std::string* why);

}  // namespace loom
