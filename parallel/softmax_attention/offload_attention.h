// Softmax attention with K,V on memory nodes: the `offload` method of the
// softmax-family interface (softmax_attention.h), Lamina's split applied to
// training. Compute ranks keep only their own q, K, V chunks.
//
// Forward of one call: every compute rank stores its K,V chunks on the memory
// nodes (KV heads split evenly across nodes), the sp group synchronises (a
// barrier: every chunk is stored), then each rank sends its query chunks and
// gets back (out, lse) computed against the stored causal prefix at global
// positions, merged per head group. Backward: each rank sends (q, out, dOut,
// lse) and gets dq; the nodes accumulate dK, dV of every stored chunk; after a
// barrier each rank fetches the dK, dV of its own chunks. With packed
// documents every ATTEND / ATTEND_BACKWARD also carries the query chunk's
// doc_start (int64 [B, L], the same for every node) and the nodes skip the
// stored chunks that end before its smallest value. Calls are closed
// (their K,V freed) at the next step's close_calls() or at shutdown().
// Ordering: collective over the sp communicator (barriers) in forward and
// backward; the requests of a call go to the nodes in a fixed order. The
// client (runtime/offload/offload_client.h) and server (runtime/offload/offload_server.h)
// carry the protocol; this file adds the attention on both sides.
#pragma once

#include <ATen/ATen.h>

#include <utility>
#include <vector>

#include "loom/parallel/softmax_attention/blockwise_kernel.h"
#include "loom/runtime/comm/communicator.h"
#include "loom/runtime/offload/offload_client.h"
#include "loom/runtime/offload/offload_server.h"
#include "loom/runtime/comm/sequence_layout.h"

namespace loom::softmax_attention {

using offload::OffloadClient;



// Generation (Lamina): q [S, Hq, 1, d], k, v [S, Hkv, 1, d] of the newest
// token of S sequences; k, v append to those sequences' caches of `layer` on
// the memory nodes (split by KV head), which return out [S, Hq, 1, d]. Per
// token per layer (2 + 2/G) e d payload bytes cross the network.
at::Tensor offload_decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                    OffloadClient& client, int64_t layer, const std::vector<int64_t>& sequences,
                                    const AttentionSpec& spec);

// The attention arithmetic memory nodes run (blockwise kernel, positions).
offload::OffloadKernels offload_kernels();

// out [B, Hq, n, d] in q's dtype and lse [B, Hq, n] for this rank's shard,
// as attention_with_lse() (without a window: sliding windows stay on the halo).
// doc_start: this rank's [B, n] int64, or undefined (one document per row).
std::pair<at::Tensor, at::Tensor> offload_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                    const SequenceLayout& layout, const CommPtr& comm,
                                                    OffloadClient& client, const AttentionSpec& spec,
                                                    const at::Tensor& doc_start = {});

}  // namespace loom::softmax_attention
