// Row-major matrix products on raw CPU pointers through the CBLAS that
// libtorch itself loads (Debian: libblas.so.3, OpenBLAS via alternatives),
// for the per-block loops of the CPU kernels (chunked_kernel.cc,
// blockwise_kernel.cc).
//
// Why: a batched product of many 64 x 64 x 64 blocks through ATen's CPU bmm
// dispatches one addmm per matrix (select, checks, dispatch); one direct
// sgemm/dgemm call per block product, with pointers and leading dimensions,
// skips that and needs no tensor op inside the block loop.
//
// The path is optional: where CMake found no BLAS with cblas_sgemm (a pip
// libtorch on a GPU machine) `available()` is false and the kernels keep their
// ATen path, which is also the only path for other devices and dtypes.
// `set_enabled(false)` switches the CPU kernels back to the ATen path at run
// time (benchmarks time both in one process; tests compare them); the default
// is enabled. Set it between kernel calls, not while one runs on another thread.
#pragma once

#include <cstdint>

namespace loom::cpu_blas {

// Built with a CBLAS (LOOM_HAVE_CBLAS).
bool available();
// available() and not switched off with set_enabled(false).
bool enabled();
void set_enabled(bool on);

// C[m, n] = alpha * op(A)[m, k] op(B)[k, n] + beta * C, all row-major with
// leading dimensions lda, ldb, ldc; op(X) = X^T when trans_x. Only when available().
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
          const float* b, int64_t ldb, float beta, float* c, int64_t ldc);
void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, double alpha, const double* a, int64_t lda,
          const double* b, int64_t ldb, double beta, double* c, int64_t ldc);

}  // namespace loom::cpu_blas
