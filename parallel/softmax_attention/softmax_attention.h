// Softmax attention across the ranks of a sequence-parallel group: one
// interface, several methods, chosen from the config without the layer
// changing its code.
//
//   kLocal      everything on this rank (sp = 1 only);
//   kRing       K,V blocks travel around the ring with isend/irecv posted
//               before each step's compute (double buffering); partial outputs
//               merge in float32 with the stable LSE formula; in backward K,V
//               travel again with dK,dV accumulating beside them back to their
//               owner, while dQ stays local;
//   kAllGather  LASP-2H's softmax half: one AllGather of K,V, local attention
//               to the causal prefix, backward reduce-scatters dK,dV;
//   kOffload    K,V on memory nodes, attention computed there
//               (offload_attention.h); needs an OffloadClient;
//   kUlysses    DeepSpeed-Ulysses: all-to-all from sequence- to head-sharded,
//               whole-sequence attention per head group, all-to-all back
//               (ulysses.h);
//   kUsp        2D: all-to-all inside groups of `ulysses_degree` consecutive
//               ranks, ring across the groups (ulysses.h).
// With a sliding window (spec.window > 0) every method but kUlysses and kUsp
// uses the halo instead (those two attend whole group sequences, where the
// window only skips blocks):
// each chunk receives the last window-1 keys/values of the chunk before it
// (halo_exchange), which is exact and moves O(window) tokens; a window longer
// than a chunk is rejected with a clear error.
//
// Inputs: q [B, Hq, n, d], k, v [B, Hkv, n, d] (GQA: Hq multiple of Hkv), this
// rank's shard under `layout` (n = layout.local_len()), rotary already applied
// with global positions (rotary.h). Returns out [B, Hq, n, d] in q's dtype and
// lse [B, Hq, n] (float32, or float64 for float64 inputs), lse not
// differentiable. Causality by global position: zigzag's balance comes from
// skipping fully-future chunk pairs, so every non-diagonal ring step does half
// a block on every rank.
// Packed documents: `doc_start` is this rank's shard [B, n] int64 of the
// row's document starts (runtime/comm/documents.h, shard_document_starts), or
// undefined for one document per row (today's code and cost). A key is
// visible only inside the query's document; chunk pairs whose documents do
// not meet (the K,V chunk ends before the query chunk's smallest doc_start)
// are skipped like fully-future pairs. The ring still forwards every K,V
// chunk and the all-gather still gathers all of them, so the communication
// pattern is the same on every rank whatever the documents; the sliding
// window keeps its halo, whose tokens the query's doc_start masks.
// Ordering: collective over `comm` in forward and backward.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <utility>

#include "loom/parallel/softmax_attention/blockwise_kernel.h"
#include "loom/runtime/comm/communicator.h"
#include "loom/runtime/comm/sequence_layout.h"

namespace loom::offload {
class OffloadClient;
}

namespace loom::softmax_attention {

enum class SoftmaxMethod { kLocal, kRing, kAllGather, kOffload, kUlysses, kUsp };
const char* method_name(SoftmaxMethod method);
// "local", "ring", "allgather", "offload", "ulysses", "usp" (any case); throws ConfigError otherwise.
SoftmaxMethod parse_method(const std::string& name);

// `offload` is required by (and only used by) kOffload. `doc_start`: see above.
// `ulysses_degree`: the all-to-all group of kUsp (0: the whole communicator,
// which is kUlysses); other methods ignore it.
std::pair<at::Tensor, at::Tensor> attention_with_lse(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                     const SequenceLayout& layout, const CommPtr& comm,
                                                     SoftmaxMethod method, const AttentionSpec& spec,
                                                     offload::OffloadClient* offload = nullptr,
                                                     const at::Tensor& doc_start = {}, int ulysses_degree = 0);

inline at::Tensor attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const SequenceLayout& layout, const CommPtr& comm, SoftmaxMethod method,
                            const AttentionSpec& spec, offload::OffloadClient* offload = nullptr,
                            const at::Tensor& doc_start = {}, int ulysses_degree = 0) {
  return attention_with_lse(q, k, v, layout, comm, method, spec, offload, doc_start, ulysses_degree).first;
}

// Forward of this rank's query chunks against every rank's K,V already
// gathered (all: [W, 2, B, Hkv, n, d] as the all-gather method gathers them):
// the compute of all-gather attention without its collective. Benchmarks time
// it as the "communication already done" baseline of the ring. `doc_start`:
// this rank's [B, n], or undefined.
std::pair<at::Tensor, at::Tensor> attend_gathered(const at::Tensor& q, const at::Tensor& all,
                                                  const SequenceLayout& layout, int rank, const AttentionSpec& spec,
                                                  const at::Tensor& doc_start = {});

// One positioned chunk pair on one rank, differentiable: q at positions
// q_start.., k/v at k_start.. (the local and sliding-window building block).
// `doc_start`: the query chunk's [B, Lq] int64, or undefined.
std::pair<at::Tensor, at::Tensor> positioned_attention(const at::Tensor& q, int64_t q_start, const at::Tensor& k,
                                                       const at::Tensor& v, int64_t k_start,
                                                       const AttentionSpec& spec, const at::Tensor& doc_start = {});

}  // namespace loom::softmax_attention
