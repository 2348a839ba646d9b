#include "loom/parallel/linear_attention/cpu_blas.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <limits>
#include <mutex>
#include <type_traits>
#include <vector>

#include "loom/runtime/core/error.h"

#ifdef LOOM_HAVE_CBLAS
// The two CBLAS entry points used, declared here so that no cblas.h is needed
// (the enum values are fixed by the CBLAS standard).
extern "C" {
void cblas_sgemm(int order, int trans_a, int trans_b, int m, int n, int k, float alpha, const float* a, int lda,
                 const float* b, int ldb, float beta, float* c, int ldc);
void cblas_dgemm(int order, int trans_a, int trans_b, int m, int n, int k, double alpha, const double* a, int lda,
                 const double* b, int ldb, double beta, double* c, int ldc);
}
#endif

#ifdef LOOM_HAVE_LIBXSMM
#include <libxsmm.h>
#endif

namespace loom::cpu_blas {
namespace {

std::atomic<bool> switched_on{true};
std::atomic<bool> small_kernels_on{true};
std::atomic<uint64_t> small_calls{0};  // products libxsmm ran (stays 0 without it)

#ifdef LOOM_HAVE_CBLAS
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;
int op(bool trans) { return trans ? kTrans : kNoTrans; }

void cblas(bool ta, bool tb, int m, int n, int k, float alpha, const float* a, int lda, const float* b, int ldb,
           float beta, float* c, int ldc) {
  cblas_sgemm(kRowMajor, op(ta), op(tb), m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
void cblas(bool ta, bool tb, int m, int n, int k, double alpha, const double* a, int lda, const double* b, int ldb,
           double beta, double* c, int ldc) {
  cblas_dgemm(kRowMajor, op(ta), op(tb), m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
#endif

#ifdef LOOM_HAVE_LIBXSMM
// libxsmm works column-major: the row-major C[m, n] = op(A) op(B) + beta C is
// the column-major C^T[n, m] = op(B)^T op(A)^T + beta C^T, so its kernel gets
// (B, A) with m and n swapped, and a row-major trans_a is its TRANS_B. Its
// TRANS_A (our trans_b) has no JIT kernel in libxsmm 1.17: B is transposed
// first into a per-thread buffer (a 64 x 64 transpose costs about a seventh of
// the 64^3 product it feeds).
//
// Dispatch is a hash lookup in libxsmm; each thread remembers the last few
// shapes it asked for (a kernel's block loop uses a handful).
//
// Which products: libxsmm's kernels do not block for the caches and run on
// the calling thread. Measured here against OpenBLAS (1 thread, float32): 2x
// its rate from 64^3 to 128 x 128 x 273 (a Taylor feature map's 1 + 16 + 256
// = 273 wide keys), 1024 x 64 x 64 and 64 x 64 x 1024; 1.6x at 512 x 512 x 64.
// So: every side <= 1024 and m n k <= 512 x 512 x 64; with more than one
// intra-op thread, where OpenBLAS would split a product over the threads,
// only products up to 64 x 64 x 256 (too small for OpenBLAS to split well).
constexpr int64_t kLargestSide = 1024;
constexpr int64_t kLargestVolume = int64_t(512) * 512 * 64;
constexpr int64_t kLargestThreadedVolume = int64_t(64) * 64 * 256;

template <typename T>
using SmallKernel = void (*)(const T*, const T*, T*, ...);

struct Shape {
  int m, n, k, lda, ldb, ldc, flags;
  bool operator==(const Shape& o) const {
    return m == o.m && n == o.n && k == o.k && lda == o.lda && ldb == o.ldb && ldc == o.ldc && flags == o.flags;
  }
};

template <typename T>
struct KernelMemo {
  static constexpr int kSlots = 16;
  std::array<Shape, kSlots> shapes{};
  std::array<SmallKernel<T>, kSlots> kernels{};
  int used = 0, next = 0;  // next: the slot to replace once all are used
};

void init_once() {
  static std::once_flag once;
  std::call_once(once, [] { libxsmm_init(); });
}

template <typename T>
SmallKernel<T> dispatch(const Shape& s) {
  static thread_local KernelMemo<T> memo;
  for (int i = 0; i < memo.used; ++i)
    if (memo.shapes[i] == s) return memo.kernels[i];
  init_once();
  const libxsmm_blasint m = s.m, n = s.n, k = s.k, lda = s.lda, ldb = s.ldb, ldc = s.ldc;
  const T alpha = 1, beta = (s.flags & LIBXSMM_GEMM_FLAG_BETA_0) ? 0 : 1;
  SmallKernel<T> kernel;
  if constexpr (std::is_same_v<T, float>)
    kernel = reinterpret_cast<SmallKernel<T>>(libxsmm_smmdispatch(m, n, k, &lda, &ldb, &ldc, &alpha, &beta, &s.flags,
                                                                  nullptr));
  else
    kernel = reinterpret_cast<SmallKernel<T>>(libxsmm_dmmdispatch(m, n, k, &lda, &ldb, &ldc, &alpha, &beta, &s.flags,
                                                                  nullptr));
  int slot = memo.used;
  if (memo.used < KernelMemo<T>::kSlots) {
    ++memo.used;
  } else {
    slot = memo.next;
    memo.next = (memo.next + 1) % KernelMemo<T>::kSlots;
  }
  memo.shapes[slot] = s;
  memo.kernels[slot] = kernel;  // null (no JIT kernel for the shape) is remembered too
  return kernel;
}

// True when a JIT kernel ran the product.
template <typename T>
bool small_gemm(bool ta, bool tb, int m, int n, int k, T alpha, const T* a, int lda, const T* b, int ldb, T beta,
                T* c, int ldc) {
  if (alpha != T(1) || (beta != T(0) && beta != T(1))) return false;
  const int64_t volume = int64_t(m) * n * k;
  if (std::max<int64_t>({m, n, k}) > kLargestSide || volume > kLargestVolume) return false;
  if (volume > kLargestThreadedVolume && at::get_num_threads() > 1) return false;
  // With tb, B is first transposed into a row-major [k, n] with ld n.
  const int ld_b = tb ? n : ldb;
  const Shape s{n, m, k, ld_b, lda, ldc,
                (ta ? LIBXSMM_GEMM_FLAG_TRANS_B : 0) | (beta == T(0) ? LIBXSMM_GEMM_FLAG_BETA_0 : 0)};
  const SmallKernel<T> kernel = dispatch<T>(s);
  if (!kernel) return false;
  const T* b_rows = b;
  if (tb) {
    static thread_local std::vector<T> transposed;
    transposed.resize(static_cast<size_t>(k) * n);
    // B is row-major [n, k] = column-major [k, n] with ld ldb; its transpose,
    // column-major [n, k] with ld n, is the row-major [k, n] the kernel reads.
    libxsmm_otrans(transposed.data(), b, sizeof(T), k, n, ldb, n);
    b_rows = transposed.data();
  }
  kernel(b_rows, a, c);
  small_calls.fetch_add(1, std::memory_order_relaxed);
  return true;
}
#endif

template <typename T>
void gemm_any(bool ta, bool tb, int64_t m, int64_t n, int64_t k, T alpha, const T* a, int64_t lda, const T* b,
              int64_t ldb, T beta, T* c, int64_t ldc) {
  // Both libraries take int sizes: a larger one must not wrap into a small product.
  constexpr int64_t kMax = std::numeric_limits<int>::max();
  TORCH_CHECK(m >= 0 && n >= 0 && k >= 0 && m <= kMax && n <= kMax && k <= kMax && lda <= kMax && ldb <= kMax &&
                  ldc <= kMax,
              "cpu_blas::gemm: sizes beyond int: m ", m, ", n ", n, ", k ", k, ", lda ", lda, ", ldb ", ldb, ", ldc ",
              ldc);
#ifdef LOOM_HAVE_LIBXSMM
  if (small_kernels_on.load(std::memory_order_relaxed) &&
      small_gemm<T>(ta, tb, static_cast<int>(m), static_cast<int>(n), static_cast<int>(k), alpha, a,
                    static_cast<int>(lda), b, static_cast<int>(ldb), beta, c, static_cast<int>(ldc)))
    return;
#endif
#ifdef LOOM_HAVE_CBLAS
  cblas(ta, tb, static_cast<int>(m), static_cast<int>(n), static_cast<int>(k), alpha, a, static_cast<int>(lda), b,
        static_cast<int>(ldb), beta, c, static_cast<int>(ldc));
#else
  (void)ta, (void)tb, (void)m, (void)n, (void)k, (void)alpha, (void)a, (void)lda, (void)b, (void)ldb, (void)beta,
      (void)c, (void)ldc;
  throw loom::UnsupportedError("loom::cpu_blas::gemm called in a build without a CBLAS (check cpu_blas::available())");
#endif
}

}  // namespace

bool available() {
#ifdef LOOM_HAVE_CBLAS
  return true;
#else
  return false;
#endif
}

bool enabled() { return available() && switched_on.load(std::memory_order_relaxed); }
void set_enabled(bool on) { switched_on.store(on, std::memory_order_relaxed); }

bool small_kernels_available() {
#ifdef LOOM_HAVE_LIBXSMM
  return available();
#else
  return false;
#endif
}
bool small_kernels_usable() {
#ifdef LOOM_HAVE_LIBXSMM
  static const bool usable = [] {
    const int flags = 0;
    const libxsmm_blasint n = 64;
    const float one = 1;
    init_once();
    return available() && libxsmm_smmdispatch(n, n, n, &n, &n, &n, &one, &one, &flags, nullptr) != nullptr;
  }();
  return usable;
#else
  return false;
#endif
}
uint64_t small_kernel_calls() { return small_calls.load(std::memory_order_relaxed); }
bool small_kernels_enabled() { return small_kernels_available() && small_kernels_on.load(std::memory_order_relaxed); }
void set_small_kernels_enabled(bool on) { small_kernels_on.store(on, std::memory_order_relaxed); }

void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
          const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  gemm_any<float>(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, double alpha, const double* a, int64_t lda,
          const double* b, int64_t ldb, double beta, double* c, int64_t ldc) {
  gemm_any<double>(trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

}  // namespace loom::cpu_blas
