// Head-parallel softmax attention: DeepSpeed-Ulysses and its 2D form (USP /
// LoongTrain), the two methods a long-context user picks beside the ring.
//
// Ulysses (ulysses_degree U = the communicator's size W): q, k, v arrive
// sequence-sharded, [B, H, n, d] with this rank's n tokens under `layout`. One
// all-to-all each turns them into [B, H/U, U n, d]: H/U heads of every rank's
// tokens, which arrive in the layout's chunk order (rank 0's chunks, rank 1's,
// ...). Attention runs on that whole sequence with each chunk's global
// position (the blockwise kernel takes positions), so the zigzag layout needs
// no permutation and fully-future chunk pairs are skipped as in the ring. The
// output goes back by the reverse all-to-all. The sliding window and packed
// documents (the row's doc_start, gathered once within the group, int64 and
// not differentiable) are honoured exactly: the group holds every key a query
// may see, so the window costs no halo.
// USP (1 < U < W, W = U x R): the same all-to-alls inside groups of U
// consecutive ranks (ulysses_grid(comm, U)), then ring attention across the R
// groups: group g's K,V (all its chunks, U n tokens) travel around the ring of
// the ranks holding the same head slice, with zigzag balance from the layout.
// Backward: dout takes the forward's reverse all-to-all, the local (or ring)
// backward gives dq, dk, dv on head-sharded whole sequences, and the
// all-to-alls' adjoints bring them home (all inside autograd, CommOrder-chained).
//
// Heads: q heads must divide by U (ConfigError naming the count). GQA: KV heads
// are sharded when U divides them; otherwise each KV head is repeated
// f = U / gcd(U, Hkv) times before the exchange (f always divides the group
// Hq/Hkv, so every query head keeps its KV head), said once in the log.
//
// Bytes per rank and layer, forward (the communicator's all_to_all stats, U's
// communicator): (U-1)/U x (bytes of q + k + v as sent, KV after replication,
// + bytes of out) + (U-1)/U x the lse bytes ([B, H, n] in the accumulation
// dtype) that also return; backward moves dq, dk, dv and dout: the same 4
// activation terms. USP's ring adds K,V messages of U n tokens per rank
// in forward, twice that in backward, as ring attention does.
// Ordering: collective over `comm` (and, for USP, its grid) in forward and
// backward, the same sequence of operations on every rank.
#pragma once

#include <ATen/ATen.h>

#include <utility>

#include "loom/parallel/softmax_attention/blockwise_kernel.h"
#include "loom/runtime/comm/communicator.h"
#include "loom/runtime/comm/sequence_layout.h"

namespace loom::softmax_attention {

// How often each KV head is repeated so that U ranks can share them: 1 when U
// divides kv_heads, else U / gcd(U, kv_heads).
int64_t ulysses_kv_replication(int64_t kv_heads, int64_t degree);

// Checks of the head counts against U, as ConfigError naming them (called by
// ulysses_attention, and by config validation through the model's counts).
void check_ulysses_heads(int64_t q_heads, int64_t kv_heads, int64_t degree);

// q [B, Hq, n, d], k, v [B, Hkv, n, d], doc_start [B, n] int64 or undefined.
// degree <= 0 or = comm->size(): Ulysses over comm; else USP with groups of
// `degree`. Returns out [B, Hq, n, d] (q's dtype, differentiable) and lse
// [B, Hq, n] (accumulation dtype, not differentiable).
std::pair<at::Tensor, at::Tensor> ulysses_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                    const SequenceLayout& layout, const CommPtr& comm,
                                                    const AttentionSpec& spec, const at::Tensor& doc_start,
                                                    int degree);

}  // namespace loom::softmax_attention
