#include "loom/parallel/linear_attention/chunked_kernel.h"

#include <ATen/Dispatch.h>
#include <torch/autograd.h>

#include <algorithm>
#include <initializer_list>
#include <vector>

#include "loom/parallel/linear_attention/cpu_blas.h"
#include "loom/parallel/linear_attention/decay.h"
#include "loom/runtime/comm/documents.h"

namespace loom::linear_attention {
namespace {

void check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t block) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "linear attention: q, k, v must be [B, H, N, d], got ",
              q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  TORCH_CHECK(q.sizes() == k.sizes(), "linear attention: q ", q.sizes(), " and k ", k.sizes(), " must match");
  TORCH_CHECK(v.size(0) == q.size(0) && v.size(1) == q.size(1) && v.size(2) == q.size(2), "linear attention: v ",
              v.sizes(), " must match q ", q.sizes(), " in batch, heads and length");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
              "linear attention: q, k, v must share a dtype");
  TORCH_CHECK(block >= 1, "linear attention: block size must be >= 1, got ", block);
}

int64_t effective_block(int64_t n, int64_t block) { return std::max<int64_t>(1, std::min(block, n)); }

// [B, H, N, d] -> [B, H, nb, C, d], zero-padded at the end.
at::Tensor to_blocks(const at::Tensor& x, int64_t nb, int64_t c) {
  const int64_t n = x.size(2), padded = nb * c;
  at::Tensor y = x;
  if (padded != n) y = at::constant_pad_nd(x, {0, 0, 0, padded - n});
  return y.reshape({x.size(0), x.size(1), nb, c, x.size(3)});
}

at::Tensor from_blocks(const at::Tensor& x, int64_t n) {
  return x.reshape({x.size(0), x.size(1), x.size(2) * x.size(3), x.size(4)}).narrow(2, 0, n);
}

// Head-wise factor [H, a, b] viewed to broadcast over [B, H, nb, a, b].
at::Tensor per_head(const at::Tensor& f) { return f.unsqueeze(0).unsqueeze(2); }

// The kernel's factors, each [1|B, 1|H, 1|nb, ...] (a dimension of size 1 is
// shared): decay alone has batch and block dimensions of size 1; gates make
// query, key and across per row, head and block (and the causal factor per
// segment, from log_cum); documents make query, key and across per row and
// block, and add the same-document mask `visible`. Without decay, gates and
// documents query, key and across are undefined (1: nothing to multiply).
struct KernelFactors {
  at::Tensor causal;   // [1, 1|H, 1, C, C], undefined with gates
  at::Tensor log_cum;  // [B, H, nb, C] with gates (float64), else undefined
  at::Tensor visible;  // [B, 1, nb, C, C] with documents, else undefined
  at::Tensor query;    // [1|B, 1|H, 1|nb, C, 1] or undefined
  at::Tensor key;      // [1|B, 1|H, 1|nb, C, 1] or undefined
  at::Tensor across;   // [1|B, 1|H, 1|nb, 1, 1] or undefined
};

KernelFactors kernel_factors(const at::Tensor& decay, const at::Tensor& log_gate, int64_t H, int64_t C, int64_t nb,
                             const at::Tensor& doc_start, int64_t first_position, const at::TensorOptions& options) {
  KernelFactors k;
  if (log_gate.defined()) {
    GatedBlocks g = gated_blocks(log_gate, decay, nb, C, options);
    k.log_cum = g.log_cum;
    k.query = g.query;
    k.key = g.key;
    k.across = g.block;
  } else if (decay.defined()) {
    const BlockDecay f = block_decay(decay, H, C, options);
    k.causal = per_head(f.causal);
    k.query = per_head(f.query);
    k.key = per_head(f.key);
    k.across = per_head(f.block);
  } else {
    k.causal = at::ones({C, C}, options).tril().view({1, 1, 1, C, C});
  }
  if (doc_start.defined()) {
    const DocumentBlocks d = document_blocks(doc_start, first_position, nb, C, /*with_visible=*/true, options);
    k.visible = d.visible;
    k.query = k.query.defined() ? k.query * d.query : d.query;
    k.key = k.key.defined() ? k.key * d.key : d.key;
    k.across = k.across.defined() ? k.across * d.across : d.across;
  }
  return k;
}

// One (batch row, head)'s view of the factors: [1|nb, ...] each, and the
// blocks b0 .. b0+n-1 of it.
struct HeadFactors {
  at::Tensor causal, log_cum, visible, query, key, across;

  static at::Tensor of(const at::Tensor& f, int64_t b, int64_t h) {
    if (!f.defined()) return f;
    const at::Tensor row = f.select(0, f.size(0) == 1 ? 0 : b);
    return row.select(0, row.size(0) == 1 ? 0 : h);
  }
  static at::Tensor blocks(const at::Tensor& f, int64_t b0, int64_t n) {
    return !f.defined() || f.size(0) == 1 ? f : f.narrow(0, b0, n);
  }
  HeadFactors(const KernelFactors& k, int64_t b, int64_t h)
      : causal(of(k.causal, b, h)), log_cum(of(k.log_cum, b, h)), visible(of(k.visible, b, h)),
        query(of(k.query, b, h)), key(of(k.key, b, h)), across(of(k.across, b, h)) {}

  // scores [n, C, C] *= causal (and same-document) factor of blocks b0 .. b0+n-1.
  // `causal_blocks` is made once per segment (with gates it is per block).
  at::Tensor causal_blocks(int64_t b0, int64_t n, const at::TensorOptions& options) const {
    return log_cum.defined() ? gated_causal(log_cum.narrow(0, b0, n), options) : causal;
  }
  void mask_scores(at::Tensor& scores, const at::Tensor& causal_factor, int64_t b0, int64_t n) const {
    scores.mul_(causal_factor);
    if (visible.defined()) scores.mul_(blocks(visible, b0, n));
  }
};

// x * f, or x itself where f is undefined (a factor of 1).
at::Tensor scaled(const at::Tensor& x, const at::Tensor& f) { return f.defined() ? x * f : x; }

// The state recurrence of one head's segment of n blocks, x [n, dk, dv]:
//   forward (step +1):  s[0] = carry, s[i] = a[i-1] s[i-1] + x[i-1]; returns a[n-1] s[n-1] + x[n-1];
//   backward (step -1): s[n-1] = carry, s[i] = a[i+1] s[i+1] + x[i+1]; returns a[0] s[0] + x[0];
// a = across [1|n, 1, 1] (undefined: 1). On the CPU one fused pass over the
// contiguous states; elsewhere two ops per block.
template <typename scalar_t>
void scan_cpu(scalar_t* s, const scalar_t* x, const scalar_t* a, int64_t a_stride, const scalar_t* carry,
              scalar_t* carry_out, int64_t n, int64_t m, int step) {
  const int64_t first = step > 0 ? 0 : n - 1;
  std::copy(carry, carry + m, s + first * m);
  for (int64_t t = 1; t < n; ++t) {
    const int64_t i = step > 0 ? t : n - 1 - t, prev = i - step;
    const scalar_t f = a ? a[prev * a_stride] : scalar_t(1);
    const scalar_t* sp = s + prev * m;
    const scalar_t* xp = x + prev * m;
    scalar_t* si = s + i * m;
    for (int64_t j = 0; j < m; ++j) si[j] = f * sp[j] + xp[j];
  }
  const int64_t last = step > 0 ? n - 1 : 0;
  const scalar_t f = a ? a[last * a_stride] : scalar_t(1);
  for (int64_t j = 0; j < m; ++j) carry_out[j] = f * s[last * m + j] + x[last * m + j];
}

at::Tensor scan_states(at::Tensor& s, const at::Tensor& x, const at::Tensor& across, const at::Tensor& carry,
                       int step) {
  const int64_t n = s.size(0);
  const bool fused = s.device().is_cpu() && s.is_contiguous() && x.is_contiguous() &&
                     (s.scalar_type() == at::kFloat || s.scalar_type() == at::kDouble) &&
                     x.scalar_type() == s.scalar_type() && (!across.defined() || across.scalar_type() == s.scalar_type());
  if (fused) {
    at::Tensor out = at::empty_like(carry, at::MemoryFormat::Contiguous);
    const at::Tensor c = carry.contiguous(), a = across.defined() ? across.contiguous() : across;
    AT_DISPATCH_FLOATING_TYPES(s.scalar_type(), "linear attention state scan", [&] {
      scan_cpu<scalar_t>(s.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), a.defined() ? a.data_ptr<scalar_t>() : nullptr,
                         a.defined() && a.size(0) > 1 ? 1 : 0, c.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), n,
                         s.numel() / std::max<int64_t>(1, n), step);
    });
    return out;
  }
  auto factor = [&](int64_t i) { return across.defined() ? across.select(0, across.size(0) == 1 ? 0 : i) : at::Tensor(); };
  const int64_t first = step > 0 ? 0 : n - 1, last = step > 0 ? n - 1 : 0;
  s.select(0, first).copy_(carry);
  for (int64_t t = 1; t < n; ++t) {
    const int64_t i = step > 0 ? t : n - 1 - t, prev = i - step;
    at::Tensor dst = s.select(0, i);
    if (across.defined()) {
      at::mul_out(dst, s.select(0, prev), factor(prev));
      dst.add_(x.select(0, prev));
    } else {
      at::add_out(dst, s.select(0, prev), x.select(0, prev));
    }
  }
  return scaled(s.select(0, last), factor(last)) + x.select(0, last);
}

// Blocks are processed per (batch row, head) in segments small enough that a
// segment's score blocks ([blocks, C, C]) stay in cache: about 2^16 elements.
int64_t segment_blocks(int64_t c) { return std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, c * c)); }

// ---- The CPU float32/float64 path: one BLAS call per block product ----
// Same algorithm and products as the ATen path below, but block by block with
// raw pointers into the contiguous [nb, C, d] slabs of one (batch row, head)
// and no tensor op inside the block loop (cpu_blas.h says why); the state
// recurrence is folded into the products (beta = 1 onto the scaled state).

bool blas_path(const at::Tensor& q, std::initializer_list<const at::Tensor*> others, const KernelFactors& f) {
  if (!cpu_blas::enabled() || !q.device().is_cpu()) return false;
  if (q.scalar_type() != at::kFloat && q.scalar_type() != at::kDouble) return false;
  for (const at::Tensor* t : others)
    if (!t->device().is_cpu() || t->scalar_type() != q.scalar_type()) return false;
  for (const at::Tensor* t : {&f.causal, &f.visible, &f.query, &f.key, &f.across})
    if (t->defined() && (!t->device().is_cpu() || t->scalar_type() != q.scalar_type())) return false;
  return true;
}

// One head's factor as a pointer and a per-block stride (0: shared by every
// block); null is a factor of 1.
template <typename T>
struct RawFactor {
  at::Tensor keep;  // owns the contiguous copy the pointer reads
  const T* p = nullptr;
  int64_t stride = 0;
  explicit RawFactor(const at::Tensor& f) {
    if (!f.defined()) return;
    keep = f.contiguous();
    p = keep.data_ptr<T>();
    stride = keep.size(0) == 1 ? 0 : keep.numel() / keep.size(0);
  }
  const T* at(int64_t i) const { return p ? p + i * stride : nullptr; }
};

// The causal (and same-document) factor of one (batch row, head) per block:
// constant per head with decay, none (a plain lower triangle) without decay,
// made per segment of `seg` blocks from the cumulative log gates with gates.
template <typename T>
struct RawCausal {
  const HeadFactors& hf;
  const at::TensorOptions options;
  const int64_t nb, seg, c;
  RawFactor<T> fixed, visible;
  at::Tensor segment_factor;
  int64_t segment_start = -1;
  RawCausal(const HeadFactors& h, const at::TensorOptions& o, int64_t nblocks, int64_t s, int64_t block)
      : hf(h), options(o), nb(nblocks), seg(s), c(block), fixed(h.log_cum.defined() ? at::Tensor() : h.causal),
        visible(h.visible) {}
  // Lower-triangular factor of block i (null: ones on and below the diagonal).
  const T* at(int64_t i) {
    if (!hf.log_cum.defined()) return fixed.at(i);
    const int64_t start = i / seg * seg;
    if (start != segment_start) {
      segment_factor = hf.causal_blocks(start, std::min(seg, nb - start), options).contiguous();
      segment_start = start;
    }
    return segment_factor.data_ptr<T>() + (i - start) * c * c;
  }
};

// scores [C, C] *= causal factor (lower triangle) and visible; zero above the diagonal.
template <typename T>
void mask_block(T* scores, const T* causal, const T* visible, int64_t c) {
  for (int64_t r = 0; r < c; ++r) {
    T* row = scores + r * c;
    if (causal) {
      const T* f = causal + r * c;
      for (int64_t j = 0; j <= r; ++j) row[j] *= f[j];
    }
    if (visible) {
      const T* f = visible + r * c;
      for (int64_t j = 0; j <= r; ++j) row[j] *= f[j];
    }
    std::fill(row + r + 1, row + c, T(0));
  }
}

// dst[C, d] = diag(f) src[C, d]; returns src itself where f is null.
template <typename T>
const T* scale_rows(const T* src, const T* f, int64_t c, int64_t d, T* dst) {
  if (!f) return src;
  for (int64_t r = 0; r < c; ++r)
    for (int64_t j = 0; j < d; ++j) dst[r * d + j] = f[r] * src[r * d + j];
  return dst;
}

// Forward of one (batch row, head): Q, K [nb, C, dk], V, O [nb, C, dv], S [nb, dk, dv].
template <typename T>
void forward_head_blas(const T* Q, const T* K, const T* V, T* O, T* S, int64_t nb, int64_t C, int64_t dk, int64_t dv,
                       const HeadFactors& hf, int64_t seg, const at::TensorOptions& options) {
  using cpu_blas::gemm;
  RawCausal<T> causal(hf, options, nb, seg, C);
  const RawFactor<T> query(hf.query), key(hf.key), across(hf.across);
  std::vector<T> scores(C * C), scaled_q(C * dk), scaled_v(C * dv);
  std::fill(S, S + dk * dv, T(0));  // zero state before token 0
  for (int64_t i = 0; i < nb; ++i) {
    const T *Qi = Q + i * C * dk, *Ki = K + i * C * dk, *Vi = V + i * C * dv, *Si = S + i * dk * dv;
    T* Oi = O + i * C * dv;
    // Intra-block: O_i = [(Q_i K_i^T) * D] V_i.
    gemm(false, true, C, C, dk, T(1), Qi, dk, Ki, dk, T(0), scores.data(), C);
    mask_block(scores.data(), causal.at(i), causal.visible.at(i), C);
    gemm(false, false, C, dv, C, T(1), scores.data(), C, Vi, dv, T(0), Oi, dv);
    // Inter-block: O_i += (Lq Q_i) S_i.
    gemm(false, false, C, dv, dk, T(1), scale_rows(Qi, query.at(i), C, dk, scaled_q.data()), dk, Si, dv, T(1), Oi, dv);
    if (i + 1 == nb) break;  // the state after the last block is not needed
    // S_(i+1) = a_i S_i + K_i^T (Lk V_i).
    T* next = S + (i + 1) * dk * dv;
    const T a = across.p ? *across.at(i) : T(1);
    for (int64_t j = 0; j < dk * dv; ++j) next[j] = a * Si[j];
    gemm(true, false, dk, dv, C, T(1), Ki, dk, scale_rows(Vi, key.at(i), C, dv, scaled_v.data()), dv, T(1), next, dv);
  }
}

// Backward of one (batch row, head), blocks from last to first; R carries the
// gradient reaching block i's state from every later block.
template <typename T>
void backward_head_blas(const T* Q, const T* K, const T* V, const T* dO, const T* S, T* dQ, T* dK, T* dV, int64_t nb,
                        int64_t C, int64_t dk, int64_t dv, const HeadFactors& hf, int64_t seg,
                        const at::TensorOptions& options) {
  using cpu_blas::gemm;
  RawCausal<T> causal(hf, options, nb, seg, C);
  const RawFactor<T> query(hf.query), key(hf.key), across(hf.across);
  std::vector<T> scores(C * C), dA(C * C), scaled_do(C * dv), scaled_v(C * dv), scaled_k(C * dk), R(dk * dv, T(0));
  for (int64_t i = nb - 1; i >= 0; --i) {
    const T *Qi = Q + i * C * dk, *Ki = K + i * C * dk, *Vi = V + i * C * dv, *dOi = dO + i * C * dv,
            *Si = S + i * dk * dv;
    T *dQi = dQ + i * C * dk, *dKi = dK + i * C * dk, *dVi = dV + i * C * dv;
    const T *causal_i = causal.at(i), *visible_i = causal.visible.at(i);
    // Intra-block: A = (Q K^T) * D, O = A V: dV = A^T dO, dA = (dO V^T) * D, dQ = dA K, dK = dA^T Q.
    gemm(false, true, C, C, dk, T(1), Qi, dk, Ki, dk, T(0), scores.data(), C);
    mask_block(scores.data(), causal_i, visible_i, C);
    gemm(true, false, C, dv, C, T(1), scores.data(), C, dOi, dv, T(0), dVi, dv);
    gemm(false, true, C, C, dv, T(1), dOi, dv, Vi, dv, T(0), dA.data(), C);
    mask_block(dA.data(), causal_i, visible_i, C);
    gemm(false, false, C, dk, C, T(1), dA.data(), C, Ki, dk, T(0), dQi, dk);
    gemm(true, false, C, dk, C, T(1), dA.data(), C, Qi, dk, T(0), dKi, dk);
    // Inter-block: dQ_i += (Lq dO_i) S_i^T; dK_i += (Lk V_i) R_i^T, dV_i += (Lk K_i) R_i
    // (R of the last block is zero); R_(i-1) = a_i R_i + Q_i^T (Lq dO_i).
    const T* dOq = scale_rows(dOi, query.at(i), C, dv, scaled_do.data());
    gemm(false, true, C, dk, dv, T(1), dOq, dv, Si, dv, T(1), dQi, dk);
    if (i + 1 < nb) {
      gemm(false, true, C, dk, dv, T(1), scale_rows(Vi, key.at(i), C, dv, scaled_v.data()), dv, R.data(), dv, T(1),
           dKi, dk);
      gemm(false, false, C, dv, dk, T(1), scale_rows(Ki, key.at(i), C, dk, scaled_k.data()), dk, R.data(), dv, T(1),
           dVi, dv);
    }
    if (i == 0) break;
    const T a = across.p ? *across.at(i) : T(1);
    if (a != T(1))
      for (T& r : R) r *= a;
    gemm(true, false, dk, dv, C, T(1), Qi, dk, dOq, dv, T(1), R.data(), dv);
  }
}

}  // namespace

// Both passes walk one (batch row, head) at a time: its blocks are contiguous
// [nb, C, d] slabs, so every product is a bmm on contiguous operands (no
// copies) that writes straight into the output.
ChunkForwardResult chunk_forward(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                 const at::Tensor& decay, int64_t block, int64_t segment, const at::Tensor& doc_start,
                                 int64_t first_position, const at::Tensor& log_gate) {
  at::NoGradGuard no_grad;  // a raw kernel: autograd wraps it from outside
  check_inputs(q, k, v, block);
  check_document_starts(doc_start, q, 2, "linear attention");
  if (log_gate.defined()) check_log_gate(log_gate, q, "linear attention");
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), dk = q.size(3), dv = v.size(3);
  const int64_t C = effective_block(N, block), nb = (N + C - 1) / C;
  const KernelFactors f = kernel_factors(decay, log_gate, H, C, nb, doc_start, first_position, q.options());
  const at::Tensor Q = to_blocks(q, nb, C).contiguous(), K = to_blocks(k, nb, C).contiguous(),
                   V = to_blocks(v, nb, C).contiguous();

  at::Tensor O = at::empty({B, H, nb, C, dv}, q.options());
  at::Tensor states = at::empty({B, H, nb, dk, dv}, q.options());
  const int64_t seg = segment > 0 ? segment : segment_blocks(C);
  if (blas_path(q, {&k, &v}, f)) {
    AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "chunked linear attention forward (BLAS)", [&] {
      for (int64_t b = 0; b < B; ++b)
        for (int64_t h = 0; h < H; ++h) {
          const int64_t bh = b * H + h;
          forward_head_blas<scalar_t>(Q.data_ptr<scalar_t>() + bh * nb * C * dk, K.data_ptr<scalar_t>() + bh * nb * C * dk,
                                      V.data_ptr<scalar_t>() + bh * nb * C * dv, O.data_ptr<scalar_t>() + bh * nb * C * dv,
                                      states.data_ptr<scalar_t>() + bh * nb * dk * dv, nb, C, dk, dv,
                                      HeadFactors(f, b, h), seg, q.options());
        }
    });
    return {from_blocks(O, N), states};
  }
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      const HeadFactors hf(f, b, h);
      at::Tensor carry = at::zeros({dk, dv}, q.options());  // state entering the segment
      for (int64_t b0 = 0; b0 < nb; b0 += seg) {
        const int64_t n = std::min(seg, nb - b0);
        const at::Tensor Qs = Q[b][h].narrow(0, b0, n), Ks = K[b][h].narrow(0, b0, n), Vs = V[b][h].narrow(0, b0, n);
        at::Tensor Os = O[b][h].narrow(0, b0, n), st = states[b][h].narrow(0, b0, n);
        // Intra-block: [(Q K^T) * D] V.
        at::Tensor scores = at::bmm(Qs, Ks.transpose(1, 2));
        hf.mask_scores(scores, hf.causal_blocks(b0, n, scores.options()), b0, n);
        at::bmm_out(Os, scores, Vs);
        // State entering block i: S_i = a_(i-1) S_(i-1) + K_(i-1)^T (Lk V_(i-1)).
        const at::Tensor block_kv = at::bmm(Ks.transpose(1, 2), scaled(Vs, HeadFactors::blocks(hf.key, b0, n)));
        carry = scan_states(st, block_kv, HeadFactors::blocks(hf.across, b0, n), carry, +1);
        // Inter-block: O_i += (Lq Q_i) S_i.
        Os.baddbmm_(scaled(Qs, HeadFactors::blocks(hf.query, b0, n)), st);
      }
    }
  return {from_blocks(O, N), states};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> chunk_backward(const at::Tensor& q, const at::Tensor& k,
                                                              const at::Tensor& v, const at::Tensor& decay,
                                                              int64_t block, const at::Tensor& block_states,
                                                              const at::Tensor& grad_out, int64_t segment,
                                                              const at::Tensor& doc_start, int64_t first_position,
                                                              const at::Tensor& log_gate) {
  at::NoGradGuard no_grad;
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), dk = q.size(3), dv = v.size(3);
  const int64_t C = effective_block(N, block), nb = (N + C - 1) / C;
  const KernelFactors f = kernel_factors(decay, log_gate, H, C, nb, doc_start, first_position, q.options());
  const at::Tensor Q = to_blocks(q, nb, C).contiguous(), K = to_blocks(k, nb, C).contiguous(),
                   V = to_blocks(v, nb, C).contiguous();
  const at::Tensor dO = to_blocks(grad_out, nb, C).contiguous(), S = block_states.contiguous();

  at::Tensor dQ = at::empty({B, H, nb, C, dk}, q.options());
  at::Tensor dK = at::empty({B, H, nb, C, dk}, q.options());
  at::Tensor dV = at::empty({B, H, nb, C, dv}, q.options());
  const int64_t seg = segment > 0 ? segment : segment_blocks(C);
  if (blas_path(q, {&k, &v, &grad_out, &block_states}, f)) {
    AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "chunked linear attention backward (BLAS)", [&] {
      for (int64_t b = 0; b < B; ++b)
        for (int64_t h = 0; h < H; ++h) {
          const int64_t bh = b * H + h, qk = bh * nb * C * dk, vo = bh * nb * C * dv;
          backward_head_blas<scalar_t>(Q.data_ptr<scalar_t>() + qk, K.data_ptr<scalar_t>() + qk,
                                       V.data_ptr<scalar_t>() + vo, dO.data_ptr<scalar_t>() + vo,
                                       S.data_ptr<scalar_t>() + bh * nb * dk * dv, dQ.data_ptr<scalar_t>() + qk,
                                       dK.data_ptr<scalar_t>() + qk, dV.data_ptr<scalar_t>() + vo, nb, C, dk, dv,
                                       HeadFactors(f, b, h), seg, q.options());
        }
    });
    return {from_blocks(dQ, N), from_blocks(dK, N), from_blocks(dV, N)};
  }
  const int64_t last_start = ((nb - 1) / seg) * seg;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t h = 0; h < H; ++h) {
      const HeadFactors hf(f, b, h);
      // carry = R of the block before the segment: the gradient reaching it through
      // every later state, R_i = sum_{c > i} (decay across i+1 .. c-1) G_c, G_c = (Lq Q_c)^T dO_c.
      at::Tensor carry = at::zeros({dk, dv}, q.options());
      for (int64_t b0 = last_start; b0 >= 0; b0 -= seg) {
        const int64_t n = std::min(seg, nb - b0);
        const at::Tensor Qs = Q[b][h].narrow(0, b0, n), Ks = K[b][h].narrow(0, b0, n), Vs = V[b][h].narrow(0, b0, n);
        const at::Tensor dOs = dO[b][h].narrow(0, b0, n), st = S[b][h].narrow(0, b0, n);
        at::Tensor dQs = dQ[b][h].narrow(0, b0, n), dKs = dK[b][h].narrow(0, b0, n), dVs = dV[b][h].narrow(0, b0, n);
        // Intra-block: A = (Q K^T) * D, O = A V.
        at::Tensor scores = at::bmm(Qs, Ks.transpose(1, 2));
        const at::Tensor causal = hf.causal_blocks(b0, n, scores.options());
        hf.mask_scores(scores, causal, b0, n);
        at::bmm_out(dVs, scores.transpose(1, 2), dOs);
        at::Tensor dA = at::bmm(dOs, Vs.transpose(1, 2));
        hf.mask_scores(dA, causal, b0, n);
        at::bmm_out(dQs, dA, Ks);
        at::bmm_out(dKs, dA.transpose(1, 2), Qs);
        // Inter-block: dQ_i += (Lq dO_i) S_i^T; G_i = Q_i^T (Lq dO_i);
        // dK_i += (Lk V_i) R_i^T, dV_i += (Lk K_i) R_i.
        const at::Tensor key = HeadFactors::blocks(hf.key, b0, n);
        const at::Tensor dOq = scaled(dOs, HeadFactors::blocks(hf.query, b0, n));
        dQs.baddbmm_(dOq, st.transpose(1, 2));
        const at::Tensor G = at::bmm(Qs.transpose(1, 2), dOq);
        at::Tensor R = at::empty_like(G);
        carry = scan_states(R, G, HeadFactors::blocks(hf.across, b0, n), carry, -1);
        dKs.baddbmm_(scaled(Vs, key), R.transpose(1, 2));
        dVs.baddbmm_(scaled(Ks, key), R);
      }
    }
  return {from_blocks(dQ, N), from_blocks(dK, N), from_blocks(dV, N)};
}

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct ChunkedLinearAttentionFunction : public torch::autograd::Function<ChunkedLinearAttentionFunction> {
  // doc_start: [B, N], log_gate: [B, H, N], or empty tensors for "no
  // documents" / "no gates" (autograd functions take defined tensors only).
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const at::Tensor& decay, int64_t block, const at::Tensor& doc_start,
                            const at::Tensor& log_gate) {
    const at::Tensor docs = doc_start.numel() > 0 ? doc_start : at::Tensor();
    const at::Tensor gates = log_gate.numel() > 0 ? log_gate : at::Tensor();
    const at::Tensor per_head_decay = gates.defined() || decay.numel() == 0 ? at::Tensor() : decay;
    auto result = chunk_forward(q, k, v, per_head_decay, block, 0, docs, 0, gates);
    ctx->save_for_backward({q, k, v, decay, result.block_states, doc_start, log_gate});
    ctx->saved_data["block"] = block;
    return result.out;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const at::Tensor docs = saved[5].numel() > 0 ? saved[5] : at::Tensor();
    const at::Tensor gates = saved[6].numel() > 0 ? saved[6] : at::Tensor();
    const at::Tensor per_head_decay = gates.defined() || saved[3].numel() == 0 ? at::Tensor() : saved[3];
    auto [dq, dk, dv] = chunk_backward(saved[0], saved[1], saved[2], per_head_decay,
                                       ctx->saved_data["block"].toInt(), saved[4], grads[0].contiguous(), 0, docs, 0,
                                       gates);
    at::Tensor dgate;
    if (gates.defined()) dgate = log_gate_grad(saved[0], dq, saved[1], dk).to(gates.scalar_type());
    return {dq, dk, dv, at::Tensor(), at::Tensor(), at::Tensor(), dgate};
  }
};

}  // namespace

double chunked_linear_attention_flops(int64_t n, int64_t block, int64_t dk, int64_t dv) {
  const double N = static_cast<double>(n), C = static_cast<double>(block);
  return 2 * N * C * (dk + dv) + 4 * N * dk * dv + 2 * N * C * (3 * dk + 2 * dv) + 8 * N * dk * dv;
}

double gated_linear_attention_flops(int64_t n, int64_t block, int64_t dk, int64_t dv) {
  return chunked_linear_attention_flops(n, block, dk, dv) + 4.0 * static_cast<double>(n) * dk;
}

at::Tensor chunked_linear_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                    const at::Tensor& decay, int64_t block, const at::Tensor& doc_start,
                                    const at::Tensor& log_gate) {
  // Autograd functions take defined tensors only: an empty decay is "no decay".
  // With gates the per-head decay is folded into them here (differentiably).
  at::Tensor gates = log_gate.defined() ? log_gate : at::empty({0}, q.options());
  if (log_gate.defined() && decay.defined())
    gates = log_gate + decay.to(log_gate.options()).log().view({1, -1, 1});
  const at::Tensor d = decay.defined() && !log_gate.defined() ? decay : at::empty({0}, at::kDouble);
  const at::Tensor docs = doc_start.defined() ? doc_start : at::empty({0}, at::kLong);
  return ChunkedLinearAttentionFunction::apply(q, k, v, d, block, docs, gates);
}

}  // namespace loom::linear_attention
