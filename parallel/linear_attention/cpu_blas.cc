#include "loom/parallel/linear_attention/cpu_blas.h"

#include <atomic>

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

namespace loom::cpu_blas {
namespace {

std::atomic<bool> switched_on{true};

#ifdef LOOM_HAVE_CBLAS
constexpr int kRowMajor = 101, kNoTrans = 111, kTrans = 112;
int op(bool trans) { return trans ? kTrans : kNoTrans; }
#else
[[noreturn]] void missing() {
  throw loom::UnsupportedError("loom::cpu_blas::gemm called in a build without a CBLAS (check cpu_blas::available())");
}
#endif

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

void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
          const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
#ifdef LOOM_HAVE_CBLAS
  cblas_sgemm(kRowMajor, op(trans_a), op(trans_b), static_cast<int>(m), static_cast<int>(n), static_cast<int>(k),
              alpha, a, static_cast<int>(lda), b, static_cast<int>(ldb), beta, c, static_cast<int>(ldc));
#else
  (void)trans_a, (void)trans_b, (void)m, (void)n, (void)k, (void)alpha, (void)a, (void)lda, (void)b, (void)ldb,
      (void)beta, (void)c, (void)ldc;
  missing();
#endif
}

void gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, double alpha, const double* a, int64_t lda,
          const double* b, int64_t ldb, double beta, double* c, int64_t ldc) {
#ifdef LOOM_HAVE_CBLAS
  cblas_dgemm(kRowMajor, op(trans_a), op(trans_b), static_cast<int>(m), static_cast<int>(n), static_cast<int>(k),
              alpha, a, static_cast<int>(lda), b, static_cast<int>(ldb), beta, c, static_cast<int>(ldc));
#else
  (void)trans_a, (void)trans_b, (void)m, (void)n, (void)k, (void)alpha, (void)a, (void)lda, (void)b, (void)ldb,
      (void)beta, (void)c, (void)ldc;
  missing();
#endif
}

}  // namespace loom::cpu_blas
