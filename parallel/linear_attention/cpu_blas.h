// Row-major matrix products on raw CPU pointers, for the per-block loops of
// the CPU kernels (chunked_kernel.cc, blockwise_kernel.cc).
//
// Why: a batched product of many 64 x 64 x 64 blocks through ATen's CPU bmm
// dispatches one addmm per matrix (select, checks, dispatch); one direct call
// per block product, with pointers and leading dimensions, skips that and
// needs no tensor op inside the block loop.
//
// Two libraries, tried in this order:
// - libxsmm (Debian: libxsmm-dev), when the build found it: kernels generated
//   at run time for one small shape each (every side <= 1024, m n k <= 512 x
//   512 x 64; with several intra-op threads <= 64 x 64 x 256, cpu_blas.cc says
//   why), no packing of the operands. On this project's 1-thread CPU a 64^3 float product runs at
//   ~110% of a 2048^3 OpenBLAS matmul's rate where OpenBLAS's own 64^3 call
//   reaches ~50% (it packs both operands on every call). Products it has no
//   kernel for (alpha != 1, beta not 0 or 1, larger shapes, a CPU it cannot
//   generate code for) go to CBLAS.
// - the CBLAS that libtorch itself loads (Debian: libblas.so.3, OpenBLAS via
//   alternatives).
//
// The path is optional: where CMake found no BLAS with cblas_sgemm (a pip
// libtorch on a GPU machine) `available()` is false and the kernels keep their
// ATen path, which is also the only path for other devices and dtypes.
// `set_enabled(false)` switches the CPU kernels back to the ATen path at run
// time and `set_small_kernels_enabled(false)` sends every product to CBLAS
// (benchmarks time the paths in one process; tests compare them); the
// defaults are on. Set them between kernel calls, not while one runs on
// another thread.
#pragma once

#include <cstdint>

namespace loom::cpu_blas {

// Built with a CBLAS (LOOM_HAVE_CBLAS).
bool available();
// available() and not switched off with set_enabled(false).
bool enabled();
void set_enabled(bool on);
// Built with libxsmm (LOOM_HAVE_LIBXSMM) and a CBLAS to fall back on.
bool small_kernels_available();
// small_kernels_available() and not switched off.
bool small_kernels_enabled();
void set_small_kernels_enabled(bool on);
// small_kernels_available() and libxsmm generates a 64^3 float kernel on this CPU.
bool small_kernels_usable();
// Products libxsmm's kernels ran in this process, all threads (tests check the route taken).
uint64_t small_kernel_calls();

// C[m, n] = alpha * op(A)[m, k] op(B)[k, n] + beta * C, all row-major with
// leading dimensions lda, ldb, ldc; op(X) = X^T when trans_x. Only when available().
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
          const float* b, int64_t ldb, float beta, float* c, int64_t ldc);
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, double alpha, const double* a, int64_t lda,
          const double* b, int64_t ldb, double beta, double* c, int64_t ldc);

}  // namespace loom::cpu_blas
