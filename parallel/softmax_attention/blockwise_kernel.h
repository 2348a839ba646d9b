// Blockwise causal softmax attention on positioned chunks (the FlashAttention-2
// algorithm in libtorch ops), the building block of local, ring, all-gather,
// sliding-window and offloaded attention.
//
// A query chunk q [B, Hq, Lq, d] holds the tokens at global positions
// q_start .. q_start+Lq-1; a key/value chunk k, v [B, Hkv, Lk, d] those at
// k_start .. k_start+Lk-1. Key j is visible to query i when
//   0 <= pos_j <= pos_i   and, with window w > 0,   pos_j > pos_i - w.
// (Negative key positions are the zero halo before the sequence start.)
// Packed documents (runtime/comm/documents.h): with the query chunk's
// doc_start [B, Lq] int64 the mask also needs pos_j >= doc_start[b, i]; an
// undefined doc_start is one document per row, and then the kernels run the
// code and cost of the document-free path exactly.
// GQA: Hq = G * Hkv; query head h reads key head h / G.
//
// On CUDA with bf16/fp16 inputs, attend_pair and attend_pair_backward first
// offer the pair to libtorch's fused flash attention (fused_attention.h); the
// blockwise kernel below is the fallback and the reference.
// On the CPU in float32/float64, where Loom was built with a CBLAS
// (linear_attention/cpu_blas.h), every block product is one BLAS call on raw
// pointers and the online softmax runs per row over the block's buffer; other
// devices and dtypes (and cpu_blas::set_enabled(false)) run the same algorithm
// in ATen ops. Forward walks query blocks x key blocks with an online softmax
// and returns a normalised partial result (out, lse) for the pair; pairs merge
// with merge_partial() in float32 or wider (never in the input's bf16):
//   lse = max + log1p(exp(min - max)),  out = exp(lse_a - lse) out_a + exp(lse_b - lse) out_b.
// Rows that see no key of the pair have lse = -inf and out = 0, and merge
// exactly. Backward recomputes scores block by block from q, k, v, the final
// out/lse of the query rows and dout, and accumulates dq, dk, dv.
// Memory: O(L * block), never a full score matrix. Blocks fully in the future
// (or outside the window) are skipped, so causal work is about half; with
// documents, key blocks that end before the smallest doc_start of the query
// block are skipped too, so packed short documents cost less than one long one.
#pragma once

#include <ATen/ATen.h>

namespace loom::softmax_attention {

struct AttentionSpec {
  double scale = 0;      // softmax scale; 0 means 1/sqrt(d)
  int64_t window = 0;    // 0: full causal; w > 0: the last w positions (itself included)
  int64_t block = 128;   // query and key block of the kernel
  double resolved_scale(int64_t head_dim) const;
};

// The dtype partial results and merges use: float32, or float64 for float64 inputs.
at::ScalarType accumulation_dtype(at::ScalarType input);

// GQA: [B, Hkv, n, d] -> [B, Hkv * group, n, d], each key/value head repeated
// `group` times in a row. A broadcast view and one copy: repeat_interleave
// with an integer count builds a repeats tensor and syncs the device to size
// its output.
at::Tensor repeat_kv_heads(const at::Tensor& x, int64_t group);

struct Partial {
  at::Tensor out;  // [B, Hq, Lq, d], accumulation dtype
  at::Tensor lse;  // [B, Hq, Lq], accumulation dtype; -inf where nothing was visible
};

// An empty partial (lse = -inf) for a query chunk.
Partial empty_partial(const at::Tensor& q);

// The smallest doc_start of a query chunk (one host read), 0 when undefined:
// the argument pair_fully_masked() takes for documents.
int64_t smallest_document_start(const at::Tensor& doc_start);

// True when no key of the pair is visible to any query of the pair.
// `min_doc_start` is the smallest doc_start of the query chunk (0: no
// documents): keys that all end before it are invisible, like future keys.
bool pair_fully_masked(int64_t q_start, int64_t lq, int64_t k_start, int64_t lk, const AttentionSpec& spec,
                       int64_t min_doc_start = 0);

// `doc_start`: the query chunk's [B, Lq] int64, or undefined (one document).
Partial attend_pair(const at::Tensor& q, int64_t q_start, const at::Tensor& k, const at::Tensor& v, int64_t k_start,
                    const AttentionSpec& spec, const at::Tensor& doc_start = {});

// acc := merge(acc, part), in place.
void merge_partial(Partial& acc, const Partial& part);

// Backward of one pair. out/lse are the query rows' final (fully merged)
// results; delta = rowsum(dout * out) [B, Hq, Lq]. Adds into dq [B, Hq, Lq, d],
// dk, dv [B, Hkv, Lk, d] (accumulation dtype). `doc_start` as in attend_pair.
// `out` (optional): the final out [B, Hq, Lq, d] itself, which the fused path
// needs (it computes delta itself); without it the blockwise kernel runs.
void attend_pair_backward(const at::Tensor& q, int64_t q_start, const at::Tensor& k, const at::Tensor& v,
                          int64_t k_start, const AttentionSpec& spec, const at::Tensor& lse, const at::Tensor& dout,
                          const at::Tensor& delta, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv,
                          const at::Tensor& doc_start = {}, const at::Tensor& out = {});

// Generation: the newest token's query q [B, Hq, 1, d] against the cached
// keys and values k, v [B, Hkv, T, d], with the spec's scale: [B, Hq, 1, d]
// in q's dtype. `visible` [B, T] bool hides keys (false) of an earlier
// document; undefined: every key is visible. The newest key must be visible.
at::Tensor attend_newest(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const AttentionSpec& spec,
                         const at::Tensor& visible = {});

// The definition with full masked matrices over one contiguous sequence
// starting at position 0 (the reference of the tests): returns {out, lse}.
// `doc_start` [B, n] int64 or undefined (one document).
std::pair<at::Tensor, at::Tensor> naive_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                  const AttentionSpec& spec, const at::Tensor& doc_start = {});

}  // namespace loom::softmax_attention
