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
// barrier each rank fetches the dK, dV of its own chunks. Calls are closed
// (their K,V freed) at the next step's close_calls() or at shutdown().
// Ordering: collective over the sp communicator (barriers) in forward and
// backward; the requests of a call go to the nodes in a fixed order.
#pragma once

#include <ATen/ATen.h>

#include <utility>
#include <vector>

#include "parallel/softmax_attention/blockwise_kernel.h"
#include "runtime/communicator.h"
#include "runtime/offload_server.h"
#include "runtime/sequence_layout.h"

namespace loom::softmax_attention {

class OffloadClient {
 public:
  // `comm` spans the compute ranks and the memory nodes; `memory_ranks` are
  // the nodes' ranks in it; `group` names this rank's sp group (its dp index).
  OffloadClient(CommPtr comm, std::vector<int> memory_ranks, int group);
  int nodes() const { return static_cast<int>(memory_ranks_.size()); }
  int memory_rank(int node) const { return memory_ranks_.at(node); }
  int group() const { return group_; }
  const CommPtr& comm() const { return comm_; }

  // One request to memory node `node` and its reply; throws
  // offload::OffloadError carrying the node's message when it answers ERROR.
  pb::OffloadMessage request(int node, pb::OffloadMessage msg, const std::vector<at::Tensor>& payloads,
                             std::vector<at::Tensor>* reply = nullptr);
  // The id of the next attention call (the same sequence on every rank of the group).
  int64_t next_call();
  // Frees the K,V of every call so far: a barrier over `sp`, its rank 0 sends
  // CLOSE to every node, a barrier again. Collective over `sp`.
  void close_calls(const CommPtr& sp);
  // Every compute rank, once, at the end: the nodes' serve() returns when all have.
  void shutdown();

 private:
  CommPtr comm_;
  std::vector<int> memory_ranks_;
  int group_;
  int64_t next_call_ = 0, first_open_call_ = 0;
};

// The attention arithmetic memory nodes run (blockwise kernel, positions).
offload::OffloadKernels offload_kernels();

// out [B, Hq, n, d] in q's dtype and lse [B, Hq, n] for this rank's shard,
// as attention_with_lse() (without a window: sliding windows stay on the halo).
std::pair<at::Tensor, at::Tensor> offload_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                    const SequenceLayout& layout, const CommPtr& comm,
                                                    OffloadClient& client, const AttentionSpec& spec);

}  // namespace loom::softmax_attention
