// Documents (packed sequences): which tokens of a row may see each other.
//
// A training row is several documents packed end to end. Loom represents the
// boundaries per token as its document's start: doc_start[b, t] is the global
// position (in the row) of the first token of the document that token t
// belongs to. Documents are contiguous, so for a query at position i and a
// key at position j:
//     j is visible to i   <=>   doc_start[i] <= j <= i
// (and j > i - window for sliding-window attention). Token t starts a
// document exactly when doc_start[t] == t. This needs nothing from another
// rank: a query's own doc_start bounds every key, wherever the key lives, so
// ring and all-gather attention move no document data, and a linear-attention
// chunk knows from its own tokens whether a document starts inside it (its
// decay across the chunk is then 0: the state forgets what came before).
// It is the per-token form of cu_seqlens / the THD layout.
//
// Shapes: doc_start is int64 [B, N] for a whole row, or [B, n] for this rank's
// shard under a SequenceLayout (shard_document_starts). Padding tokens that
// the layout appends after the row's N tokens get doc_start = N: they form a
// document of their own and never reach a real token. An undefined tensor
// means one document per row starting at 0 (no masking beyond causality):
// every operator then behaves and costs exactly as without documents.
#pragma once

#include <ATen/ATen.h>

#include "loom/runtime/comm/sequence_layout.h"

namespace loom {

// doc_start [B, N] from per-token document ids [B, N] (any int values; a
// change of id between neighbours starts a document; position 0 always does).
at::Tensor document_starts_from_ids(const at::Tensor& doc_ids);

// doc_start [B, N] from the document lengths of each row (lengths[b] sums to N).
at::Tensor document_starts_from_lengths(const std::vector<std::vector<int64_t>>& lengths, int64_t n);

// This rank's shard of a row's doc_start [B, N] (padding gets N). Undefined in,
// undefined out.
at::Tensor shard_document_starts(const at::Tensor& doc_start, const SequenceLayout& layout, int rank);

// Position of each local token inside its document (positions restart at each
// document, e.g. for rotary embeddings): [B, n] = global position - doc_start.
// With doc_start undefined: the global positions [n] of the rank's tokens.
at::Tensor positions_in_document(const at::Tensor& doc_start, const SequenceLayout& layout, int rank);

// Checks a local doc_start against a tensor x [B, ..., n, ...] with the
// sequence on `seq_dim`: int64, [B, n] with the same B and n. `what` names
// the operator in the error.
void check_document_starts(const at::Tensor& doc_start, const at::Tensor& x, int64_t seq_dim, const char* what);

}  // namespace loom
