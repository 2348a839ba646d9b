// OffloadServer: the loop a memory node runs (Lamina-style attention offload,
// DESIGN.md section 7). It holds the K,V of softmax layers that compute ranks
// store, split by KV head across memory nodes, computes attention for the
// query chunks they send (forward: out and lse; backward: dq, accumulating dK,
// dV of the stored chunks until they are fetched; with packed documents the
// request carries the query chunk's doc_start, which masks the keys) and
// answers STATS, CLOSE
// and SHUTDOWN. For generation (Lamina) it keeps each sequence's KV cache of
// each softmax layer: a DECODE request brings one token's q, k, v per
// sequence, appends k, v and returns the attention output; CLOSE with
// sequence ids frees their caches. Messages follow runtime/offload/offload_protocol.h.
//
// Every request is validated before its payloads travel: a known type, sizes
// within limits, a dtype it can hold, a call, group and chunk that exist, and
// room under the capacity; otherwise the client gets ERROR naming the problem
// and the node keeps serving. serve() polls one pending header per client and
// returns when every client has sent SHUTDOWN. SIGINT/SIGTERM during serve()
// do not stop the node: it keeps serving and sets stop_requested in its
// replies, so that the compute ranks stop after their current step, save a
// checkpoint and shut it down (signal handlers are restored on return). The
// attention arithmetic is
// injected (OffloadKernels) so that runtime/ does not depend on parallel/;
// parallel/softmax_attention/offload_attention.h provides it.
#pragma once

#include <ATen/ATen.h>

#include <functional>
#include <map>
#include <tuple>
#include <utility>
#include <vector>

#include "loom/runtime/comm/communicator.h"
#include "loom/runtime/offload/offload_protocol.h"

namespace loom::offload {

struct StoredChunk {
  int64_t start = 0;  // global position of the chunk's first key
  at::Tensor k, v;    // [B, Hkv_node, L, d] as stored
  at::Tensor dk, dv;  // accumulation dtype; undefined until a backward touches them
};

struct OffloadKernels {
  // {out, lse} (accumulation dtype) of q [B, Hq_node, L, d] at q_start against
  // the chunks; doc_start: the query chunk's [B, L] int64, or undefined (one
  // document per row).
  std::function<std::pair<at::Tensor, at::Tensor>(const at::Tensor& q, int64_t q_start, const at::Tensor& doc_start,
                                                  const std::vector<StoredChunk>& chunks,
                                                  const pb::OffloadMessage& request)>
      attend;
  // dq (accumulation dtype); adds into the chunks' dk, dv. doc_start as in attend.
  std::function<at::Tensor(const at::Tensor& q, const at::Tensor& out, const at::Tensor& dout, const at::Tensor& lse,
                           int64_t q_start, const at::Tensor& doc_start, std::vector<StoredChunk>& chunks,
                           const pb::OffloadMessage& request)>
      attend_backward;
  // Generation: the newest token's out [S, Hq_node, 1, d] against the cached k, v.
  std::function<at::Tensor(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           const pb::OffloadMessage& request)>
      attend_newest;
};

class OffloadServer {
 public:
  // `comm` spans clients and this node; `clients` are their ranks in it.
  OffloadServer(CommPtr comm, std::vector<int> clients, int64_t capacity_bytes, OffloadKernels kernels);
  void serve();
  int64_t bytes_in_use() const { return bytes_in_use_; }

 private:
  struct Call {
    std::vector<StoredChunk> chunks;
    int64_t bytes = 0;
  };
  using Key = std::pair<int, int64_t>;  // (group, call)
  struct DecodeCache {
    at::Tensor k, v;  // [1, Hkv_node, T, d]
  };
  using CacheKey = std::tuple<int, int64_t, int64_t>;  // (group, layer, sequence)

  // Throws OffloadError naming the problem.
  void validate(const pb::OffloadMessage& req) const;
  pb::OffloadMessage execute(const pb::OffloadMessage& req, std::vector<at::Tensor>& in, std::vector<at::Tensor>& out,
                             bool& shutdown);
  void handle(int client, const at::Tensor& header, bool& shutdown);
  Call& call_of(const pb::OffloadMessage& req);
  const Call& call_of(const pb::OffloadMessage& req) const;
  std::string describe(const pb::OffloadMessage& req) const;

  CommPtr comm_;
  std::vector<int> clients_;
  int64_t capacity_bytes_, bytes_in_use_ = 0;
  OffloadKernels kernels_;
  std::map<Key, Call> calls_;
  std::map<CacheKey, DecodeCache> caches_;
  bool stop_requested_ = false;  // a signal arrived during serve()
};

}  // namespace loom::offload
