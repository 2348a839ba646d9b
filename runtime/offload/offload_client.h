// OffloadClient: a compute rank's side of the attention-offload protocol
// (runtime/offload/offload_protocol.h): one request at a time to a memory node and its
// reply, the ids of attention calls, closing calls and shutting nodes down.
// Used by parallel/softmax_attention/offload_attention.h; owned by the Job.
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "loom/runtime/comm/communicator.h"
#include "loom/runtime/offload/offload_protocol.h"

namespace loom::offload {

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
  // Generation: frees these sequences' KV caches on every node.
  void close_sequences(const std::vector<int64_t>& sequences);
  // Payload bytes this client sent and received (tensors only, without the
  // control messages): what the Lamina cost model counts.
  int64_t payload_bytes_sent() const { return payload_sent_; }
  int64_t payload_bytes_received() const { return payload_received_; }
  // Header and control-message bytes: with the payload bytes, everything the
  // communicator counts for this client's requests.
  int64_t control_bytes() const { return control_; }
  // Every compute rank, once, at the end: the nodes' serve() returns when all have.
  void shutdown();
  // Whether a memory node was signalled (SIGINT/SIGTERM) and asks the compute
  // ranks to stop: "" when not, else which node. Sends STATS to every node
  // unless a reply already said so; the Trainer asks it after every step
  // (Hooks::stop_requested, on one compute rank).
  std::string stop_requested();

 private:
  CommPtr comm_;
  std::vector<int> memory_ranks_;
  int group_;
  int64_t next_call_ = 0, first_open_call_ = 0;
  int64_t payload_sent_ = 0, payload_received_ = 0, control_ = 0;
  int stopping_node_ = -1;  // the first node whose reply asked to stop
};

}  // namespace loom::offload
