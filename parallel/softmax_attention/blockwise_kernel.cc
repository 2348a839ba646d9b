#include "loom/parallel/softmax_attention/blockwise_kernel.h"

#include <ATen/Dispatch.h>

#include <algorithm>
#include <cmath>
#include <initializer_list>
#include <limits>
#include <vector>

#include "loom/parallel/linear_attention/cpu_blas.h"

#include "loom/parallel/softmax_attention/fused_attention.h"

namespace loom::softmax_attention {
namespace {

constexpr double kNegInf = -std::numeric_limits<double>::infinity();

void check_pair(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "attention: q, k, v must be [B, H, L, d], got ",
              q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  TORCH_CHECK(k.sizes() == v.sizes(), "attention: k ", k.sizes(), " and v ", v.sizes(), " must match");
  TORCH_CHECK(q.size(0) == k.size(0) && q.size(3) == k.size(3), "attention: q ", q.sizes(), " and k ", k.sizes(),
              " differ in batch or head dim");
  TORCH_CHECK(k.size(1) >= 1 && q.size(1) % k.size(1) == 0, "attention: ", q.size(1),
              " query heads are not a multiple of ", k.size(1), " key/value heads (GQA)");
}

// Visibility of keys [k0, k0+lk) to queries [q0, q0+lq): [lq, lk] bool, or
// undefined when everything is visible.
at::Tensor visibility(int64_t q0, int64_t lq, int64_t k0, int64_t lk, const AttentionSpec& spec, at::Device device) {
  const bool all_visible = k0 >= 0 && k0 + lk - 1 <= q0 && (spec.window <= 0 || k0 > q0 + lq - 1 - spec.window);
  if (all_visible) return at::Tensor();
  const at::Tensor qp = at::arange(q0, q0 + lq, at::TensorOptions().dtype(at::kLong).device(device)).unsqueeze(1);
  const at::Tensor kp = at::arange(k0, k0 + lk, at::TensorOptions().dtype(at::kLong).device(device)).unsqueeze(0);
  at::Tensor vis = kp.le(qp).logical_and(kp.ge(0));
  if (spec.window > 0) vis = vis.logical_and(kp.gt(qp - spec.window));
  return vis;
}

// The same with the query block's documents, doc_start [B, lq] (defined);
// when every key is at or after the block's largest doc_start the documents
// add nothing. Returns [lq, lk], [B, lq, lk] or undefined (everything visible).
at::Tensor visibility(int64_t q0, int64_t lq, int64_t k0, int64_t lk, const AttentionSpec& spec,
                      const at::Tensor& doc_start, int64_t max_doc_start) {
  const at::Tensor causal = visibility(q0, lq, k0, lk, spec, doc_start.device());
  if (k0 >= max_doc_start) return causal;
  const at::Tensor kp = at::arange(k0, k0 + lk, doc_start.options());
  const at::Tensor same_document = kp.view({1, 1, lk}).ge(doc_start.unsqueeze(-1));  // [B, lq, lk]
  return causal.defined() ? same_document.logical_and(causal) : same_document;
}

// Masks scores [B, Hkv, G, bq, bk] (or [B, H, bq, bk]) where `vis` ([bq, bk] or
// [B, bq, bk]) is false.
void mask_scores(at::Tensor& scores, const at::Tensor& vis) {
  if (!vis.defined()) return;
  at::Tensor keep = vis;
  if (vis.dim() == 3) {  // per row: broadcast over the head dimensions
    std::vector<int64_t> shape(static_cast<size_t>(scores.dim()), 1);
    shape[0] = vis.size(0);
    shape[shape.size() - 2] = vis.size(1);
    shape[shape.size() - 1] = vis.size(2);
    keep = vis.view(shape);
  }
  scores.masked_fill_(keep.logical_not(), kNegInf);
}

// Per query block of `blk` rows: the smallest and largest doc_start over the
// batch (one host read for the whole chunk). Empty without documents.
struct BlockDocuments {
  std::vector<int64_t> min, max;
  int64_t min_of(size_t block) const { return min.empty() ? 0 : min[block]; }
  int64_t max_of(size_t block) const { return max.empty() ? 0 : max[block]; }
};

BlockDocuments block_documents(const at::Tensor& doc_start, int64_t lq, int64_t blk) {
  BlockDocuments out;
  if (!doc_start.defined() || lq == 0) return out;
  TORCH_CHECK(doc_start.dim() == 2 && doc_start.size(1) == lq && doc_start.scalar_type() == at::kLong,
              "attention: doc_start must be int64 [B, ", lq, "] for the query chunk, got ", doc_start.scalar_type(),
              " ", doc_start.sizes());
  const int64_t blocks = (lq + blk - 1) / blk, pad = blocks * blk - lq;
  // Repeat the last column into the partial last block: it changes no extreme.
  const at::Tensor padded =
      pad > 0 ? at::cat({doc_start, doc_start.narrow(1, lq - 1, 1).expand({doc_start.size(0), pad})}, 1) : doc_start;
  const at::Tensor grouped = padded.reshape({doc_start.size(0), blocks, blk});
  const at::Tensor extremes = at::stack({grouped.amin({0, 2}), grouped.amax({0, 2})}).cpu().contiguous();
  const int64_t* e = extremes.data_ptr<int64_t>();
  out.min.assign(e, e + blocks);
  out.max.assign(e + blocks, e + 2 * blocks);
  return out;
}

// Grouped views for GQA: q [B, Hkv, G, L, d], k/v [B, Hkv, 1, L, d].
at::Tensor group_q(const at::Tensor& q, int64_t hkv) {
  return q.reshape({q.size(0), hkv, q.size(1) / hkv, q.size(2), q.size(3)});
}

// Keys or values [B, Hkv, L, d] as [B*Hkv, L, d] in the accumulation dtype
// (a view where the strides allow, e.g. a chunk narrowed from a longer
// sequence): blocks are narrows of it, and the products read them in place.
at::Tensor key_slabs(const at::Tensor& x, at::ScalarType acc) {
  return x.to(acc).reshape({x.size(0) * x.size(1), x.size(2), x.size(3)});
}

// Query rows t0 .. t0+bq-1 of grouped qg [B, Hkv, G, L, d], times `scale`, as
// one contiguous [B*Hkv, G*bq, d] slab (the G heads of a key/value head share
// every product).
at::Tensor query_slab(const at::Tensor& qg, int64_t t0, int64_t bq, double scale) {
  const at::Tensor rows = qg.narrow(3, t0, bq);
  // rows * scale keeps the strides of a non-contiguous q (a Ulysses head
  // slice), which view() cannot flatten: make it contiguous (a no-op otherwise).
  const at::Tensor slab = scale == 1.0 ? rows.contiguous() : (rows * scale).contiguous();
  return slab.view({qg.size(0) * qg.size(1), qg.size(2) * bq, qg.size(4)});
}

// Per-row values [B, Hkv, G, L] for rows t0 .. t0+bq-1 as [B*Hkv, G*bq].
at::Tensor row_slab(const at::Tensor& x, int64_t t0, int64_t bq) {
  return x.narrow(3, t0, bq).contiguous().view({x.size(0) * x.size(1), x.size(2) * bq});
}

// Masks one block's scores [B*Hkv, G*bq, bk] (rows ordered head, then query)
// with -inf where the key is not visible.
void mask_block(at::Tensor& scores, int64_t q0, int64_t bq, int64_t k0, int64_t bk, const AttentionSpec& spec,
                const at::Tensor& doc_b, int64_t max_doc_start, int64_t B, int64_t Hkv, int64_t G) {
  const at::Tensor vis = doc_b.defined() ? visibility(q0, bq, k0, bk, spec, doc_b, max_doc_start)
                                         : visibility(q0, bq, k0, bk, spec, scores.device());
  if (!vis.defined()) return;
  at::Tensor grouped = scores.view({B, Hkv, G, bq, bk});
  mask_scores(grouped, vis);
}


// ---- The CPU float32/float64 path: one BLAS call per block product ----
// The same algorithm and products as the ATen path below, on raw pointers:
// per (batch row, kv head) and query block the G query heads' rows are one
// [G*bq, d] slab (scaled as the ATen path scales them); the mask is one
// visible key interval per row (the causal, window and document bounds are
// each one-sided), and the online softmax is one pass per row (max, shift,
// mask), one vectorised exp over the block (ATen's, on the block's buffer:
// the only tensor op per block pair) and one pass per row (sum, rescale).

bool blas_pair(const at::Tensor& q, std::initializer_list<const at::Tensor*> others) {
  if (!cpu_blas::enabled() || !q.device().is_cpu() || q.numel() == 0) return false;
  if (q.scalar_type() != at::kFloat && q.scalar_type() != at::kDouble) return false;
  for (const at::Tensor* t : others)
    if (!t->device().is_cpu() || t->scalar_type() != q.scalar_type() || t->stride(-1) != 1) return false;
  return q.stride(-1) == 1;
}

// A [B, H, L, d] tensor with unit stride in d (or [B, H, L]) addressed by strides.
template <typename T>
struct Rows {
  T* p;
  int64_t s0, s1, s2;
  explicit Rows(const at::Tensor& t)
      : p(static_cast<T*>(t.data_ptr())), s0(t.stride(0)), s1(t.stride(1)), s2(t.stride(2)) {}
  T* at(int64_t b, int64_t h, int64_t t = 0) const { return p + b * s0 + h * s1 + t * s2; }
};

// The keys of a block starting at position kpos0 (bk of them) that the query
// at qpos sees: indices lo .. hi (none when lo > hi).
struct KeyInterval {
  int64_t lo, hi;
};
KeyInterval visible_keys(int64_t qpos, int64_t kpos0, int64_t bk, const AttentionSpec& spec, int64_t doc_start) {
  int64_t first = std::max<int64_t>(0, doc_start);
  if (spec.window > 0) first = std::max(first, qpos - spec.window + 1);
  return {std::max<int64_t>(0, first - kpos0), std::min(bk - 1, qpos - kpos0)};
}

// Row r of scores [rows, bk]: entries outside [lo, hi] set to -inf (exp gives 0).
template <typename T>
void mask_outside(T* row, int64_t bk, const KeyInterval& iv) {
  const T neg_inf = -std::numeric_limits<T>::infinity();
  const int64_t lo = std::min(iv.lo, bk), hi = std::max<int64_t>(iv.hi, lo - 1);
  std::fill(row, row + lo, neg_inf);
  std::fill(row + hi + 1, row + bk, neg_inf);
}

// Max and sum of x[lo .. hi] with 8 independent accumulators: a plain loop is
// one dependent max/add per element (its latency, not its throughput), and
// the compiler may not reorder floating-point reductions itself.
template <typename T>
T row_max(const T* x, int64_t lo, int64_t hi) {
  T acc[8];
  std::fill(acc, acc + 8, -std::numeric_limits<T>::infinity());
  int64_t j = lo;
  for (; j + 8 <= hi + 1; j += 8)
    for (int u = 0; u < 8; ++u) acc[u] = acc[u] < x[j + u] ? x[j + u] : acc[u];
  for (; j <= hi; ++j) acc[0] = acc[0] < x[j] ? x[j] : acc[0];
  return *std::max_element(acc, acc + 8);
}
template <typename T>
T row_sum(const T* x, int64_t lo, int64_t hi) {
  T acc[8] = {};
  int64_t j = lo;
  for (; j + 8 <= hi + 1; j += 8)
    for (int u = 0; u < 8; ++u) acc[u] += x[j + u];
  for (; j <= hi; ++j) acc[0] += x[j];
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

template <typename T>
void exp_in_place(T* x, int64_t n) {
  at::from_blob(x, {n}, at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value)).exp_();
}

// Gathers the G heads' rows t0 .. t0+bq-1 of x [B, Hq, L, d] for (b, kv head hk) into slab [G*bq, d], times scale.
template <typename T>
void gather_rows(const Rows<T>& x, int64_t b, int64_t hk, int64_t G, int64_t t0, int64_t bq, int64_t d, T scale,
                 T* slab) {
  for (int64_t g = 0; g < G; ++g)
    for (int64_t t = 0; t < bq; ++t) {
      const T* src = x.at(b, hk * G + g, t0 + t);
      T* dst = slab + (g * bq + t) * d;
      if (scale == T(1))
        std::copy(src, src + d, dst);
      else
        for (int64_t j = 0; j < d; ++j) dst[j] = src[j] * scale;
    }
}

template <typename T>
Partial attend_pair_blas(const at::Tensor& q, int64_t q_start, const at::Tensor& k, const at::Tensor& v,
                         int64_t k_start, const AttentionSpec& spec, const at::Tensor& doc_start) {
  using cpu_blas::gemm;
  const int64_t B = q.size(0), Hq = q.size(1), Lq = q.size(2), d = q.size(3), Hkv = k.size(1), Lk = k.size(2);
  const int64_t G = Hq / Hkv, blk = std::max<int64_t>(1, spec.block);
  const T scale = static_cast<T>(spec.resolved_scale(d)), neg_inf = -std::numeric_limits<T>::infinity();
  const BlockDocuments docs = block_documents(doc_start, Lq, blk);
  const at::Tensor doc = doc_start.defined() ? doc_start.contiguous() : doc_start;
  const int64_t* doc_p = doc.defined() ? doc.data_ptr<int64_t>() : nullptr;
  at::Tensor out = at::empty({B, Hq, Lq, d}, q.options());
  at::Tensor lse = at::empty({B, Hq, Lq}, q.options());
  const Rows<T> qr(q), kr(k), vr(v), outr(out), lser(lse);
  const int64_t most = G * std::min(blk, Lq);
  std::vector<T> qb(most * d), o(most * d), scores(most * blk), m(most), l(most), rescale(most);
  std::vector<KeyInterval> span(most);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t hk = 0; hk < Hkv; ++hk) {
      const T *kp = kr.at(b, hk), *vp = vr.at(b, hk);
      for (int64_t t0 = 0; t0 < Lq; t0 += blk) {
        const int64_t bq = std::min(blk, Lq - t0), rows = G * bq;
        const size_t block = static_cast<size_t>(t0 / blk);
        gather_rows(qr, b, hk, G, t0, bq, d, scale, qb.data());
        std::fill(o.begin(), o.begin() + rows * d, T(0));
        std::fill(m.begin(), m.begin() + rows, neg_inf);
        std::fill(l.begin(), l.begin() + rows, T(0));
        for (int64_t s0 = 0; s0 < Lk; s0 += blk) {
          const int64_t bk = std::min(blk, Lk - s0);
          if (pair_fully_masked(q_start + t0, bq, k_start + s0, bk, spec, docs.min_of(block))) continue;
          gemm(false, true, rows, bk, d, T(1), qb.data(), d, kp + s0 * kr.s2, kr.s2, T(0), scores.data(), bk);
          for (int64_t r = 0; r < rows; ++r) {
            const int64_t t = r % bq;
            const KeyInterval iv =
                visible_keys(q_start + t0 + t, k_start + s0, bk, spec, doc_p ? doc_p[b * Lq + t0 + t] : 0);
            span[r] = iv;
            T* sr = scores.data() + r * bk;
            const T m_new = std::max(m[r], row_max(sr, iv.lo, iv.hi));
            // Rows with nothing visible yet keep m = -inf: shift by 0 there instead.
            const T shift = std::isinf(m_new) ? T(0) : m_new;
            for (int64_t j = iv.lo; j <= iv.hi; ++j) sr[j] -= shift;
            mask_outside(sr, bk, iv);
            rescale[r] = std::exp(m[r] - shift);
            m[r] = m_new;
          }
          exp_in_place(scores.data(), rows * bk);
          for (int64_t r = 0; r < rows; ++r) {
            const T* pr = scores.data() + r * bk;
            l[r] = l[r] * rescale[r] + row_sum(pr, span[r].lo, span[r].hi);
            if (rescale[r] != T(1))
              for (T* x = o.data() + r * d; x < o.data() + (r + 1) * d; ++x) *x *= rescale[r];
          }
          gemm(false, false, rows, d, bk, T(1), scores.data(), bk, vp + s0 * vr.s2, vr.s2, T(1), o.data(), d);
        }
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t g = r / bq, t = r % bq;
          T* dst = outr.at(b, hk * G + g, t0 + t);
          const T* src = o.data() + r * d;
          const bool seen = l[r] > 0;
          for (int64_t j = 0; j < d; ++j) dst[j] = seen ? src[j] / l[r] : T(0);
          *lser.at(b, hk * G + g, t0 + t) = seen ? m[r] + std::log(l[r]) : neg_inf;
        }
      }
    }
  return {out, lse};
}

// Backward of one pair on the BLAS path: dq, dk, dv [.., d] with unit stride in d, of q's dtype.
template <typename T>
void attend_pair_backward_blas(const at::Tensor& q, int64_t q_start, const at::Tensor& k, const at::Tensor& v,
                               int64_t k_start, const AttentionSpec& spec, const at::Tensor& lse,
                               const at::Tensor& dout, const at::Tensor& delta, at::Tensor& dq, at::Tensor& dk,
                               at::Tensor& dv, const at::Tensor& doc_start) {
  using cpu_blas::gemm;
  const int64_t B = q.size(0), Lq = q.size(2), d = q.size(3), Hkv = k.size(1), Lk = k.size(2);
  const int64_t G = q.size(1) / Hkv, blk = std::max<int64_t>(1, spec.block);
  const T scale = static_cast<T>(spec.resolved_scale(d));
  const BlockDocuments docs = block_documents(doc_start, Lq, blk);
  const at::Tensor doc = doc_start.defined() ? doc_start.contiguous() : doc_start;
  const int64_t* doc_p = doc.defined() ? doc.data_ptr<int64_t>() : nullptr;
  const Rows<T> qr(q), kr(k), vr(v), lr(lse), dor(dout), der(delta), dqr(dq), dkr(dk), dvr(dv);
  const int64_t most = G * std::min(blk, Lq);
  std::vector<T> qs(most * d), dob(most * d), dqb(most * d), p(most * blk), ds(most * blk), lb(most), db(most);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t hk = 0; hk < Hkv; ++hk) {
      const T *kp = kr.at(b, hk), *vp = vr.at(b, hk);
      T *dkp = dkr.at(b, hk), *dvp = dvr.at(b, hk);
      for (int64_t t0 = 0; t0 < Lq; t0 += blk) {
        const int64_t bq = std::min(blk, Lq - t0), rows = G * bq;
        const size_t block = static_cast<size_t>(t0 / blk);
        // Scaled exactly as in forward (the same slab, the same products), so that
        // recomputed scores match the saved LSE to the last bit.
        gather_rows(qr, b, hk, G, t0, bq, d, scale, qs.data());
        gather_rows(dor, b, hk, G, t0, bq, d, T(1), dob.data());
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t g = r / bq, t = r % bq;
          const T l = *lr.at(b, hk * G + g, t0 + t);
          lb[r] = std::isinf(l) ? T(0) : l;
          db[r] = *der.at(b, hk * G + g, t0 + t);
        }
        std::fill(dqb.begin(), dqb.begin() + rows * d, T(0));
        bool touched = false;
        for (int64_t s0 = 0; s0 < Lk; s0 += blk) {
          const int64_t bk = std::min(blk, Lk - s0);
          if (pair_fully_masked(q_start + t0, bq, k_start + s0, bk, spec, docs.min_of(block))) continue;
          touched = true;
          const T *kb = kp + s0 * kr.s2, *vb = vp + s0 * vr.s2;
          gemm(false, true, rows, bk, d, T(1), qs.data(), d, kb, kr.s2, T(0), p.data(), bk);
          for (int64_t r = 0; r < rows; ++r) {
            const int64_t t = r % bq;
            const KeyInterval iv =
                visible_keys(q_start + t0 + t, k_start + s0, bk, spec, doc_p ? doc_p[b * Lq + t0 + t] : 0);
            T* pr = p.data() + r * bk;
            for (int64_t j = iv.lo; j <= iv.hi; ++j) pr[j] -= lb[r];
            mask_outside(pr, bk, iv);
          }
          exp_in_place(p.data(), rows * bk);  // P; masked entries exp(-inf) = 0
          gemm(true, false, bk, d, rows, T(1), p.data(), bk, dob.data(), d, T(1), dvp + s0 * dvr.s2, dvr.s2);
          gemm(false, true, rows, bk, d, T(1), dob.data(), d, vb, vr.s2, T(0), ds.data(), bk);
          for (int64_t r = 0; r < rows; ++r) {  // dS = P * (dP - delta)
            T* dr = ds.data() + r * bk;
            const T* pr = p.data() + r * bk;
            for (int64_t j = 0; j < bk; ++j) dr[j] = (dr[j] - db[r]) * pr[j];
          }
          // dQ's scale is applied once at the end: small-matrix kernels take alpha = 1 only (cpu_blas.h).
          gemm(false, false, rows, d, bk, T(1), ds.data(), bk, kb, kr.s2, T(1), dqb.data(), d);
          gemm(true, false, bk, d, rows, T(1), ds.data(), bk, qs.data(), d, T(1), dkp + s0 * dkr.s2, dkr.s2);
        }
        if (!touched) continue;
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t g = r / bq, t = r % bq;
          T* dst = dqr.at(b, hk * G + g, t0 + t);
          const T* src = dqb.data() + r * d;
          for (int64_t j = 0; j < d; ++j) dst[j] += scale * src[j];
        }
      }
    }
}
}  // namespace

double AttentionSpec::resolved_scale(int64_t head_dim) const {
  return scale > 0 ? scale : 1.0 / std::sqrt(static_cast<double>(head_dim));
}

at::ScalarType accumulation_dtype(at::ScalarType input) {
  return input == at::kDouble ? at::kDouble : at::kFloat;
}

Partial empty_partial(const at::Tensor& q) {
  const auto acc = at::TensorOptions().dtype(accumulation_dtype(q.scalar_type())).device(q.device());
  return {at::zeros(q.sizes(), acc), at::full({q.size(0), q.size(1), q.size(2)}, kNegInf, acc)};
}

int64_t smallest_document_start(const at::Tensor& doc_start) {
  if (!doc_start.defined() || doc_start.numel() == 0) return 0;
  return doc_start.min().item<int64_t>();
}

bool pair_fully_masked(int64_t q_start, int64_t lq, int64_t k_start, int64_t lk, const AttentionSpec& spec,
                       int64_t min_doc_start) {
  const int64_t q_last = q_start + lq - 1, k_last = k_start + lk - 1;
  if (lq == 0 || lk == 0) return true;
  if (k_start > q_last) return true;  // all keys in the future
  // All keys before the sequence (min_doc_start = 0) or before every query's document.
  if (k_last < std::max<int64_t>(0, min_doc_start)) return true;
  if (spec.window > 0 && k_last <= q_start - spec.window) return true;  // all outside every window
  return false;
}

Partial attend_pair(const at::Tensor& q, int64_t q_start, const at::Tensor& k, const at::Tensor& v, int64_t k_start,
                    const AttentionSpec& spec, const at::Tensor& doc_start) {
  check_pair(q, k, v);
  if (Partial fused; fused_attend_pair(q, q_start, k, v, k_start, spec, doc_start, fused)) return fused;
  at::NoGradGuard no_grad;
  if (blas_pair(q, {&k, &v})) {
    Partial result;
    AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "attend_pair (BLAS)", [&] {
      result = attend_pair_blas<scalar_t>(q, q_start, k, v, k_start, spec, doc_start);
    });
    return result;
  }
  const int64_t B = q.size(0), Hq = q.size(1), Lq = q.size(2), d = q.size(3), Hkv = k.size(1), Lk = k.size(2);
  const int64_t G = Hq / Hkv, blk = std::max<int64_t>(1, spec.block);
  const double scale = spec.resolved_scale(d);
  const at::ScalarType acc = accumulation_dtype(q.scalar_type());
  const at::Tensor qg = group_q(q, Hkv).to(acc);
  const at::Tensor ks = key_slabs(k, acc), vs = key_slabs(v, acc);
  at::Tensor out = at::zeros({B, Hkv, G, Lq, d}, qg.options());
  at::Tensor lse = at::full({B, Hkv, G, Lq}, kNegInf, qg.options());
  const BlockDocuments docs = block_documents(doc_start, Lq, blk);

  for (int64_t t0 = 0; t0 < Lq; t0 += blk) {
    const int64_t bq = std::min(blk, Lq - t0);
    const size_t block = static_cast<size_t>(t0 / blk);
    const at::Tensor doc_b = doc_start.defined() ? doc_start.narrow(1, t0, bq) : at::Tensor();
    // The G query heads of a key/value head stacked into one [G*bq, d] slab per (batch row, kv head).
    const at::Tensor qb = query_slab(qg, t0, bq, scale);
    at::Tensor o = at::zeros({B * Hkv, G * bq, d}, qg.options());
    at::Tensor m = at::full({B * Hkv, G * bq}, kNegInf, qg.options());
    at::Tensor l = at::zeros({B * Hkv, G * bq}, qg.options());
    for (int64_t s0 = 0; s0 < Lk; s0 += blk) {
      const int64_t bk = std::min(blk, Lk - s0);
      if (pair_fully_masked(q_start + t0, bq, k_start + s0, bk, spec, docs.min_of(block))) continue;
      at::Tensor scores = at::bmm(qb, ks.narrow(1, s0, bk).transpose(1, 2));  // [B*Hkv, G*bq, bk]
      mask_block(scores, q_start + t0, bq, k_start + s0, bk, spec, doc_b, docs.max_of(block), B, Hkv, G);
      const at::Tensor m_new = at::maximum(m, scores.amax(-1));
      // Rows with nothing visible yet keep m = -inf: shift by 0 there instead.
      const at::Tensor shift = at::where(at::isinf(m_new), at::zeros_like(m_new), m_new);
      at::Tensor& p = scores.sub_(shift.unsqueeze(-1)).exp_();  // in place: no second score buffer
      const at::Tensor rescale = (m - shift).exp_();
      l.mul_(rescale).add_(p.sum(-1));
      o.mul_(rescale.unsqueeze(-1)).baddbmm_(p, vs.narrow(1, s0, bk));
      m = m_new;
    }
    const at::Tensor seen = l.gt(0);
    const at::Tensor o_final = at::where(seen.unsqueeze(-1), o / l.clamp_min(1e-300).unsqueeze(-1), at::zeros_like(o));
    const at::Tensor lse_final = at::where(seen, m + at::log(l.clamp_min(1e-300)), at::full_like(m, kNegInf));
    out.narrow(3, t0, bq).copy_(o_final.view({B, Hkv, G, bq, d}));
    lse.narrow(3, t0, bq).copy_(lse_final.view({B, Hkv, G, bq}));
  }
  return {out.reshape({B, Hq, Lq, d}), lse.reshape({B, Hq, Lq})};
}

void merge_partial(Partial& acc, const Partial& part) {
  at::NoGradGuard no_grad;
  const at::Tensor hi = at::maximum(acc.lse, part.lse);
  const at::Tensor lo = at::minimum(acc.lse, part.lse);
  const at::Tensor finite = at::isfinite(hi);
  // lse = hi + log1p(exp(lo - hi)); both -inf stays -inf.
  const at::Tensor merged =
      at::where(finite, hi + at::log1p(at::exp(lo - at::where(finite, hi, at::zeros_like(hi)))), hi);
  const at::Tensor safe = at::where(at::isfinite(merged), merged, at::zeros_like(merged));
  const at::Tensor wa = at::exp(acc.lse - safe).unsqueeze(-1), wb = at::exp(part.lse - safe).unsqueeze(-1);
  acc.out = acc.out * wa + part.out.to(acc.out.scalar_type()) * wb;
  acc.lse = merged;
}

void attend_pair_backward(const at::Tensor& q, int64_t q_start, const at::Tensor& k, const at::Tensor& v,
                          int64_t k_start, const AttentionSpec& spec, const at::Tensor& lse, const at::Tensor& dout,
                          const at::Tensor& delta, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv,
                          const at::Tensor& doc_start, const at::Tensor& out) {
  check_pair(q, k, v);
  if (fused_attend_pair_backward(q, q_start, k, v, k_start, spec, out, lse, dout, dq, dk, dv, doc_start)) return;
  at::NoGradGuard no_grad;
  if (dq.is_contiguous() && blas_pair(q, {&k, &v, &lse, &dout, &delta, &dq, &dk, &dv})) {
    AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "attend_pair_backward (BLAS)", [&] {
      attend_pair_backward_blas<scalar_t>(q, q_start, k, v, k_start, spec, lse, dout, delta, dq, dk, dv, doc_start);
    });
    return;
  }
  const int64_t B = q.size(0), Hq = q.size(1), Lq = q.size(2), d = q.size(3), Hkv = k.size(1), Lk = k.size(2);
  const int64_t G = Hq / Hkv, blk = std::max<int64_t>(1, spec.block);
  const double scale = spec.resolved_scale(d);
  const at::ScalarType acc = accumulation_dtype(q.scalar_type());
  const at::Tensor qg = group_q(q, Hkv).to(acc), dog = group_q(dout, Hkv).to(acc);
  const at::Tensor lseg = lse.reshape({B, Hkv, G, Lq}).to(acc), deltag = delta.reshape({B, Hkv, G, Lq}).to(acc);
  const at::Tensor ks = key_slabs(k, acc), vs = key_slabs(v, acc);
  at::Tensor dqg = group_q(dq, Hkv);  // a view of dq: writes land in dq
  TORCH_CHECK(dqg.is_alias_of(dq), "attention backward: dq must be contiguous");
  // dk, dv as [B*Hkv, Lk, d] views (the products accumulate into them in place),
  // or copies written back at the end where the strides allow no view.
  at::Tensor dks = dk.reshape({B * Hkv, Lk, d}), dvs = dv.reshape({B * Hkv, Lk, d});
  const bool dk_in_place = dks.is_alias_of(dk), dv_in_place = dvs.is_alias_of(dv);
  const BlockDocuments docs = block_documents(doc_start, Lq, blk);

  for (int64_t t0 = 0; t0 < Lq; t0 += blk) {
    const int64_t bq = std::min(blk, Lq - t0);
    const size_t block = static_cast<size_t>(t0 / blk);
    const at::Tensor doc_b = doc_start.defined() ? doc_start.narrow(1, t0, bq) : at::Tensor();
    // Scaled exactly as in forward (the same slab, the same products), so that
    // recomputed scores match the saved LSE to the last bit even when logits are
    // large. qs also serves dK = dS^T (scale Q).
    const at::Tensor qs = query_slab(qg, t0, bq, scale), dob = query_slab(dog, t0, bq, 1.0);
    const at::Tensor lb = row_slab(lseg, t0, bq), db = row_slab(deltag, t0, bq);
    const at::Tensor l_safe = at::where(at::isinf(lb), at::zeros_like(lb), lb).unsqueeze(-1);
    at::Tensor dq_block = at::zeros({B * Hkv, G * bq, d}, qs.options());
    bool touched = false;
    for (int64_t s0 = 0; s0 < Lk; s0 += blk) {
      const int64_t bk = std::min(blk, Lk - s0);
      if (pair_fully_masked(q_start + t0, bq, k_start + s0, bk, spec, docs.min_of(block))) continue;
      touched = true;
      const at::Tensor kb = ks.narrow(1, s0, bk), vb = vs.narrow(1, s0, bk);
      at::Tensor scores = at::bmm(qs, kb.transpose(1, 2));
      mask_block(scores, q_start + t0, bq, k_start + s0, bk, spec, doc_b, docs.max_of(block), B, Hkv, G);
      const at::Tensor& p = scores.sub_(l_safe).exp_();  // masked entries: exp(-inf) = 0
      at::Tensor dvb = dvs.narrow(1, s0, bk), dkb = dks.narrow(1, s0, bk);
      dvb.baddbmm_(p.transpose(1, 2), dob);  // the G query heads sum inside the product
      at::Tensor ds = at::bmm(dob, vb.transpose(1, 2));
      ds.sub_(db.unsqueeze(-1)).mul_(p);  // dS = P * (dP - delta)
      dq_block.baddbmm_(ds, kb, 1.0, scale);
      dkb.baddbmm_(ds.transpose(1, 2), qs);
    }
    if (touched) dqg.narrow(3, t0, bq).add_(dq_block.view({B, Hkv, G, bq, d}));
  }
  if (!dk_in_place) dk.copy_(dks.view(dk.sizes()));
  if (!dv_in_place) dv.copy_(dvs.view(dv.sizes()));
}

at::Tensor repeat_kv_heads(const at::Tensor& x, int64_t group) {
  if (group == 1) return x;
  return x.unsqueeze(2)
      .expand({x.size(0), x.size(1), group, x.size(2), x.size(3)})
      .reshape({x.size(0), x.size(1) * group, x.size(2), x.size(3)});
}

at::Tensor attend_newest(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const AttentionSpec& spec,
                         const at::Tensor& visible) {
  TORCH_CHECK(q.dim() == 4 && q.size(2) == 1 && k.dim() == 4 && k.sizes() == v.sizes() && q.size(1) % k.size(1) == 0,
              "attend_newest: q ", q.sizes(), " must be [B, Hq, 1, d] against k, v [B, Hkv, T, d], got ", k.sizes());
  TORCH_CHECK(!visible.defined() || (visible.dim() == 2 && visible.size(0) == k.size(0) &&
                                     visible.size(1) == k.size(2) && visible.scalar_type() == at::kBool),
              "attend_newest: visible must be bool [B, T] = [", k.size(0), ", ", k.size(2), "], got ",
              visible.sizes());
  const int64_t G = q.size(1) / k.size(1);
  const auto acc = accumulation_dtype(q.scalar_type());
  at::Tensor scores = at::matmul(q.to(acc), repeat_kv_heads(k, G).to(acc).transpose(-1, -2)) *
                      spec.resolved_scale(q.size(3));
  if (visible.defined()) scores = scores.masked_fill(visible.logical_not().view({k.size(0), 1, 1, k.size(2)}), kNegInf);
  return at::matmul(at::softmax(scores, -1), repeat_kv_heads(v, G).to(acc)).to(q.scalar_type());
}

std::pair<at::Tensor, at::Tensor> naive_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                  const AttentionSpec& spec, const at::Tensor& doc_start) {
  check_pair(q, k, v);
  const int64_t Hkv = k.size(1), G = q.size(1) / Hkv, n = q.size(2);
  TORCH_CHECK(!doc_start.defined() || (doc_start.dim() == 2 && doc_start.size(0) == q.size(0) &&
                                       doc_start.size(1) == n && doc_start.scalar_type() == at::kLong),
              "naive attention: doc_start must be int64 [B, n] = [", q.size(0), ", ", n, "]");
  const at::Tensor ke = repeat_kv_heads(k, G), ve = repeat_kv_heads(v, G);
  at::Tensor scores = at::matmul(q, ke.transpose(-1, -2)) * spec.resolved_scale(q.size(3));
  if (doc_start.defined()) {
    // Every key is checked against every query's document (no largest doc_start to skip by).
    mask_scores(scores, visibility(0, n, 0, k.size(2), spec, doc_start, std::numeric_limits<int64_t>::max()));
  } else {
    const at::Tensor vis = visibility(0, n, 0, k.size(2), spec, q.device());
    if (vis.defined()) scores = scores.masked_fill(vis.logical_not(), kNegInf);
  }
  const at::Tensor lse = at::logsumexp(scores, -1);
  return {at::matmul(at::softmax(scores, -1), ve), lse};
}

}  // namespace loom::softmax_attention
