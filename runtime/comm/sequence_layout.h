// SequenceLayout: which rank owns which tokens of a sequence sharded across the
// ranks of a sequence-parallel group.
//
// A global sequence of length N is split into C equal chunks of L tokens
// (after padding N up to C*L). Two layouts:
//   contiguous  C = W,  rank r owns chunk r;
//   zigzag      C = 2W, rank r owns chunks r and 2W-1-r (in that local order),
//               which balances causal attention work across ranks.
// A rank's local tensor is its chunks concatenated in local order along the
// sequence dimension. The layout is chosen once per model and every operator
// consults it, so tokens are never permuted between layers.
//
// When N does not divide into C chunks, the tail is padded (positions >= N are
// padding, valid_mask() says which) or, with PadPolicy::kReject, construction
// fails with a message naming N, C and the layout. Nothing is ever truncated.
// Causal operators are unaffected by padding, which sits after every real token.
#pragma once

#include <ATen/ATen.h>

#include <string>
#include <vector>

#include "loom/runtime/comm/communicator.h"

namespace loom {

enum class LayoutKind { kContiguous, kZigzag };
enum class PadPolicy { kPad, kReject };

const char* layout_kind_name(LayoutKind kind);
// Accepts "contiguous" and "zigzag" (any case); throws ConfigError otherwise.
LayoutKind parse_layout_kind(const std::string& name);

class SequenceLayout {
 public:
  SequenceLayout(LayoutKind kind, int64_t global_len, int world_size, PadPolicy pad = PadPolicy::kPad);

  LayoutKind kind() const { return kind_; }
  int world_size() const { return world_size_; }
  int64_t global_len() const { return global_len_; }
  int64_t padded_len() const { return num_chunks_ * chunk_len_; }
  int64_t padding() const { return padded_len() - global_len_; }
  int64_t num_chunks() const { return num_chunks_; }
  int64_t chunk_len() const { return chunk_len_; }
  int chunks_per_rank() const { return kind_ == LayoutKind::kZigzag ? 2 : 1; }
  int64_t local_len() const { return chunks_per_rank() * chunk_len_; }

  // Global chunk ids owned by `rank`, in local order.
  std::vector<int64_t> chunks_of(int rank) const;
  int owner_of(int64_t chunk) const;
  // Position of `chunk` among its owner's chunks (0 or 1).
  int local_index_of(int64_t chunk) const;
  int64_t chunk_start(int64_t chunk) const { return chunk * chunk_len_; }

  // int64 [local_len]: global position of each local token.
  at::Tensor global_positions(int rank) const;
  // bool [local_len]: false where the local token is padding.
  at::Tensor valid_mask(int rank) const;

  // The part of `global` (size N or padded_len along `dim`) that `rank` owns,
  // padded with `pad_value`. Differentiable.
  at::Tensor shard(const at::Tensor& global, int rank, int64_t dim = 1, double pad_value = 0) const;
  // Inverse of shard: `locals[r]` is rank r's local tensor; returns the global
  // tensor of length N (padding dropped). Differentiable.
  at::Tensor unshard(const std::vector<at::Tensor>& locals, int64_t dim = 1) const;
  // unshard() of every rank's `local`, gathered over `comm` (collective; not
  // differentiable: for evaluation and tests).
  at::Tensor gather(const at::Tensor& local, Communicator& comm, int64_t dim = 1) const;

  std::string describe() const;

 private:
  LayoutKind kind_;
  int64_t global_len_;
  int world_size_;
  int64_t num_chunks_;
  int64_t chunk_len_;
};

}  // namespace loom
