// Loss by position: how well a model predicts a token as a function of its
// global position in the row, i.e. of how much context precedes it. The main
// job (launch/loom_train.cc, --position-loss-rows) prints it after training,
// writes it to metrics.jsonl and launch/plot-position-loss.sh plots it.
//
// Buckets: position_bucket_edges(N) = 0, 64, 128, 256, ... doubling, the last
// edge N (an edge at or past N is replaced by N); bucket k holds global
// positions [edges[k], edges[k+1]). N = 8192 gives 0-64, 64-128, 128-256,
// 256-512, 512-1K, 1K-2K, 2K-4K, 4K-8K (bucket_label()).
//
// PositionLoss::add() takes one rank's shard of per-token losses and labels
// under a SequenceLayout: the local token i of rank r is global position
// layout.global_positions(r)[i] (zigzag: two chunks, the second far from the
// first), never i itself. Tokens labelled -100 and layout padding (positions
// >= N) are skipped. Sums and counts are float64. reduce() sums them over a
// communicator (collective: every rank of it calls reduce once, in the same
// order as its other collectives), after which every rank holds the totals
// that a single rank would have computed over the whole rows.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <string>
#include <vector>

#include "loom/runtime/comm/communicator.h"
#include "loom/runtime/comm/sequence_layout.h"

namespace loom {

// 0, 64, 128, ..., seq_len (seq_len >= 1; a seq_len <= 64 gives {0, seq_len}).
std::vector<int64_t> position_bucket_edges(int64_t seq_len);
// "0-64", "512-1K", "4K-8K": K when a multiple of 1024.
std::string bucket_label(int64_t from, int64_t to);

// Per-token cross-entropy (float64) of logits [B, n, V] against labels [B, n];
// 0 where the label is -100.
at::Tensor token_cross_entropy(const at::Tensor& logits, const at::Tensor& labels);

class PositionLoss {
 public:
  explicit PositionLoss(std::vector<int64_t> edges);
  // token_loss and labels [B, layout.local_len()] of `rank`'s shard.
  void add(const at::Tensor& token_loss, const at::Tensor& labels, const SequenceLayout& layout, int rank);
  // Sums and counts over `comm` (collective).
  void reduce(Communicator& comm);
  const std::vector<int64_t>& edges() const { return edges_; }
  size_t buckets() const { return sums_.size(); }
  double sum(size_t k) const { return sums_[k]; }
  double count(size_t k) const { return counts_[k]; }
  // Mean loss of bucket k (NaN when it holds no labelled token).
  double mean(size_t k) const;

 private:
  std::vector<int64_t> edges_;
  std::vector<double> sums_, counts_;
};

}  // namespace loom
