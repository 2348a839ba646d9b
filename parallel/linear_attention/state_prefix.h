// State prefixes across ranks: the communication half of LASP-2, its all-scan
// variant and the LASP-1 baseline.
//
// Linear-attention chunks compose as an affine monoid on (a, S) pairs, a the
// decay across a chunk (lambda^L per head; 0 in a row where a document starts
// inside the chunk) and S a [B, H, d_k, d_v] state:
//     (a1, S1) then (a2, S2)  =  (a1 a2, a2 S1 + S2).
// The state entering chunk c is the S of the composition of every chunk before
// it in the sequence. Backward needs the same thing read right to left: the
// gradient reaching chunk s's state is the S of the composition of the (a, G)
// pairs of the chunks after s, taken from the end of the sequence backwards.
// A StatePrefix computes exactly that exclusive prefix for this rank's chunks,
// in either direction, for any SequenceLayout:
//   kLasp2         one AllGather of all chunks' states, prefixes formed locally;
//   kLasp2AllScan  exclusive scans over ranks with the monoid as a user
//                  operation (one scan for contiguous, two for zigzag), volume
//                  independent of the world size;
//   kLasp1         the prefix passed chunk to chunk over point-to-point, serially.
// start() posts the communication and returns at once where the method allows
// (LASP-2, all-scan), so the caller computes the intra-chunk part meanwhile
// (all-scan also scans over comm->reversed(), whose stats count those bytes);
// finish() waits and returns the prefixes.
// Ordering: collective over `comm`; every rank creates and finishes its
// StatePrefix objects in the same order (forward and backward).
#pragma once

#include <ATen/ATen.h>

#include <functional>
#include <memory>
#include <vector>
#include <string>

#include "loom/runtime/comm/communicator.h"
#include "loom/runtime/comm/sequence_layout.h"

namespace loom::linear_attention {

// kUlysses is head-parallel (parallel/linear_attention/ulysses.h): it moves
// tokens, not states, so make_state_prefix() refuses it; the operators
// (linear attention, gated, Gated DeltaNet) dispatch it before any prefix.
enum class LinearAttentionMethod { kLasp2, kLasp2AllScan, kLasp1, kUlysses };
const char* method_name(LinearAttentionMethod method);
// "lasp2", "lasp2_allscan", "lasp1", "ulysses" (any case); throws ConfigError otherwise.
LinearAttentionMethod parse_method(const std::string& name);

enum class PrefixDirection { kForward, kBackward };

// Chunk ids in the order a prefix runs over them.
std::vector<int64_t> sequence_order(const SequenceLayout& layout, PrefixDirection direction);

// The point-to-point chain (LASP-1 style) shared by every exclusive prefix:
// along `order`, each chunk of this rank (local index li) gets the prefix
// entering it in out[li] (zeros for the sequence's first chunk; out is shaped
// like `local`, [chunks_per_rank, ...]) and passes leaving(li, prefix) to the
// owner of the next chunk (kept when that is this rank). Serial across ranks.
at::Tensor chain_exclusive_prefix(const SequenceLayout& layout, Communicator& comm, const std::vector<int64_t>& order,
                                  const at::Tensor& local,
                                  const std::function<at::Tensor(int li, const at::Tensor& prefix)>& leaving);

class StatePrefix {
 public:
  virtual ~StatePrefix() = default;
  // local: [chunks_per_rank, B, H, d_k, d_v], this rank's chunk states in
  // local chunk order.
  virtual void start(const at::Tensor& local) = 0;
  // [chunks_per_rank, B, H, d_k, d_v]: the exclusive prefix for each local chunk.
  virtual at::Tensor finish() = 0;
};

// chunk_decay: the decay across each chunk of the layout, either [H] (lambda^L,
// every chunk alike) or [chunks_per_rank, B, H] for this rank's chunks in
// local order (documents: 0 where a document starts inside the chunk); the
// per-chunk form adds B x H numbers per chunk to LASP-2's AllGather.
std::unique_ptr<StatePrefix> make_state_prefix(LinearAttentionMethod method, const SequenceLayout& layout,
                                               const CommPtr& comm, const at::Tensor& chunk_decay,
                                               PrefixDirection direction);

}  // namespace loom::linear_attention
