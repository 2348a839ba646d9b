// The blockwise softmax attention kernel (attend_pair and its backward) as it
// was before issue 19 (main at ded9f54), kept only so that
// loom-softmax-attention-bench can time it next to the current kernel in the
// same process (the "before" row of benchmarks/README.md). Not used by Loom
// itself; the bodies are verbatim copies.
#include "softmax_attention_bench_before.h"

#include <algorithm>
#include <cmath>
#include <limits>

namespace loom::bench::softmax_before_issue19 {
using loom::softmax_attention::accumulation_dtype;
using loom::softmax_attention::AttentionSpec;
using loom::softmax_attention::pair_fully_masked;
using loom::softmax_attention::Partial;

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

}  // namespace

Partial attend_pair(const at::Tensor& q, int64_t q_start, const at::Tensor& k, const at::Tensor& v, int64_t k_start,
                    const AttentionSpec& spec, const at::Tensor& doc_start) {
  check_pair(q, k, v);
  at::NoGradGuard no_grad;
  const int64_t B = q.size(0), Hq = q.size(1), Lq = q.size(2), d = q.size(3), Hkv = k.size(1), Lk = k.size(2);
  const int64_t G = Hq / Hkv, blk = std::max<int64_t>(1, spec.block);
  const double scale = spec.resolved_scale(d);
  const at::ScalarType acc = accumulation_dtype(q.scalar_type());
  const at::Tensor qg = group_q(q, Hkv).to(acc);
  const at::Tensor kg = k.to(acc).unsqueeze(2), vg = v.to(acc).unsqueeze(2);
  at::Tensor out = at::zeros({B, Hkv, G, Lq, d}, qg.options());
  at::Tensor lse = at::full({B, Hkv, G, Lq}, kNegInf, qg.options());
  const BlockDocuments docs = block_documents(doc_start, Lq, blk);

  for (int64_t t0 = 0; t0 < Lq; t0 += blk) {
    const int64_t bq = std::min(blk, Lq - t0);
    const size_t block = static_cast<size_t>(t0 / blk);
    const at::Tensor doc_b = doc_start.defined() ? doc_start.narrow(1, t0, bq) : at::Tensor();
    const at::Tensor qb = qg.narrow(3, t0, bq) * scale;
    at::Tensor o = at::zeros({B, Hkv, G, bq, d}, qg.options());
    at::Tensor m = at::full({B, Hkv, G, bq}, kNegInf, qg.options());
    at::Tensor l = at::zeros({B, Hkv, G, bq}, qg.options());
    for (int64_t s0 = 0; s0 < Lk; s0 += blk) {
      const int64_t bk = std::min(blk, Lk - s0);
      if (pair_fully_masked(q_start + t0, bq, k_start + s0, bk, spec, docs.min_of(block))) continue;
      at::Tensor scores = at::matmul(qb, kg.narrow(3, s0, bk).transpose(-1, -2));  // [B,Hkv,G,bq,bk]
      if (doc_start.defined()) {
        mask_scores(scores, visibility(q_start + t0, bq, k_start + s0, bk, spec, doc_b, docs.max_of(block)));
      } else {
        const at::Tensor vis = visibility(q_start + t0, bq, k_start + s0, bk, spec, q.device());
        if (vis.defined()) scores.masked_fill_(vis.logical_not(), kNegInf);
      }
      const at::Tensor m_new = at::maximum(m, std::get<0>(scores.max(-1)));
      // Rows with nothing visible yet keep m = -inf: shift by 0 there instead.
      const at::Tensor shift = at::where(at::isinf(m_new), at::zeros_like(m_new), m_new);
      const at::Tensor p = at::exp(scores - shift.unsqueeze(-1));
      const at::Tensor rescale = at::exp(m - shift);
      l = l * rescale + p.sum(-1);
      o = o * rescale.unsqueeze(-1) + at::matmul(p, vg.narrow(3, s0, bk));
      m = m_new;
    }
    const at::Tensor seen = l.gt(0);
    out.narrow(3, t0, bq).copy_(at::where(seen.unsqueeze(-1), o / l.clamp_min(1e-300).unsqueeze(-1), at::zeros_like(o)));
    lse.narrow(3, t0, bq).copy_(at::where(seen, m + at::log(l.clamp_min(1e-300)), at::full_like(m, kNegInf)));
  }
  return {out.reshape({B, Hq, Lq, d}), lse.reshape({B, Hq, Lq})};
}

void attend_pair_backward(const at::Tensor& q, int64_t q_start, const at::Tensor& k, const at::Tensor& v,
                          int64_t k_start, const AttentionSpec& spec, const at::Tensor& lse, const at::Tensor& dout,
                          const at::Tensor& delta, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv,
                          const at::Tensor& doc_start) {
  check_pair(q, k, v);
  at::NoGradGuard no_grad;
  const int64_t B = q.size(0), Hq = q.size(1), Lq = q.size(2), d = q.size(3), Hkv = k.size(1), Lk = k.size(2);
  const int64_t G = Hq / Hkv, blk = std::max<int64_t>(1, spec.block);
  const double scale = spec.resolved_scale(d);
  const at::ScalarType acc = accumulation_dtype(q.scalar_type());
  const at::Tensor qg = group_q(q, Hkv).to(acc), dog = group_q(dout, Hkv).to(acc);
  const at::Tensor lseg = lse.reshape({B, Hkv, G, Lq}).to(acc), deltag = delta.reshape({B, Hkv, G, Lq}).to(acc);
  const at::Tensor kg = k.to(acc).unsqueeze(2), vg = v.to(acc).unsqueeze(2);
  at::Tensor dqg = group_q(dq, Hkv);  // a view of dq: writes land in dq
  TORCH_CHECK(dqg.is_alias_of(dq), "attention backward: dq must be contiguous");
  const BlockDocuments docs = block_documents(doc_start, Lq, blk);

  for (int64_t t0 = 0; t0 < Lq; t0 += blk) {
    const int64_t bq = std::min(blk, Lq - t0);
    const size_t block = static_cast<size_t>(t0 / blk);
    const at::Tensor doc_b = doc_start.defined() ? doc_start.narrow(1, t0, bq) : at::Tensor();
    // Scaled exactly as in forward, so that recomputed scores match the saved
    // LSE to the last bit even when logits are large.
    const at::Tensor qb = qg.narrow(3, t0, bq), qs = qb * scale, dob = dog.narrow(3, t0, bq);
    const at::Tensor lb = lseg.narrow(3, t0, bq), db = deltag.narrow(3, t0, bq);
    const at::Tensor l_safe = at::where(at::isinf(lb), at::zeros_like(lb), lb).unsqueeze(-1);
    for (int64_t s0 = 0; s0 < Lk; s0 += blk) {
      const int64_t bk = std::min(blk, Lk - s0);
      if (pair_fully_masked(q_start + t0, bq, k_start + s0, bk, spec, docs.min_of(block))) continue;
      const at::Tensor kb = kg.narrow(3, s0, bk), vb = vg.narrow(3, s0, bk);
      at::Tensor scores = at::matmul(qs, kb.transpose(-1, -2));
      if (doc_start.defined()) {
        mask_scores(scores, visibility(q_start + t0, bq, k_start + s0, bk, spec, doc_b, docs.max_of(block)));
      } else {
        const at::Tensor vis = visibility(q_start + t0, bq, k_start + s0, bk, spec, q.device());
        if (vis.defined()) scores.masked_fill_(vis.logical_not(), kNegInf);
      }
      const at::Tensor p = at::exp(scores - l_safe);  // masked entries: exp(-inf) = 0
      dv.narrow(2, s0, bk).add_(at::matmul(p.transpose(-1, -2), dob).sum(2));
      const at::Tensor dp = at::matmul(dob, vb.transpose(-1, -2));
      const at::Tensor ds = p * (dp - db.unsqueeze(-1));
      dqg.narrow(3, t0, bq).add_(at::matmul(ds, kb) * scale);
      dk.narrow(2, s0, bk).add_(at::matmul(ds.transpose(-1, -2), qb).sum(2) * scale);
    }
  }
}

}  // namespace loom::bench::softmax_before_issue19
