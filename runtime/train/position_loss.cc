#include "loom/runtime/train/position_loss.h"

#include <cmath>
#include <limits>

#include "loom/runtime/core/error.h"

namespace loom {

std::vector<int64_t> position_bucket_edges(int64_t seq_len) {
  TORCH_CHECK(seq_len >= 1, "position_bucket_edges: seq_len must be >= 1, got ", seq_len);
  std::vector<int64_t> edges{0};
  for (int64_t edge = 64; edge < seq_len; edge *= 2) edges.push_back(edge);
  edges.push_back(seq_len);
  return edges;
}

namespace {
std::string position_text(int64_t p) {
  if (p > 0 && p % 1024 == 0) return std::to_string(p / 1024) + "K";
  return std::to_string(p);
}
}  // namespace

std::string bucket_label(int64_t from, int64_t to) { return position_text(from) + "-" + position_text(to); }

at::Tensor token_cross_entropy(const at::Tensor& logits, const at::Tensor& labels) {
  TORCH_CHECK(logits.dim() == 3 && labels.dim() == 2 && logits.size(0) == labels.size(0) &&
                  logits.size(1) == labels.size(1),
              "token_cross_entropy: logits [B, n, V] and labels [B, n] expected, got ", logits.sizes(), " and ",
              labels.sizes());
  const at::Tensor log_probs = logits.to(at::kDouble).log_softmax(-1);
  const at::Tensor valid = labels.ne(-100);
  const at::Tensor safe = labels.masked_fill(valid.logical_not(), 0);
  const at::Tensor picked = log_probs.gather(-1, safe.unsqueeze(-1)).squeeze(-1);
  return picked.neg().masked_fill(valid.logical_not(), 0.0);
}

PositionLoss::PositionLoss(std::vector<int64_t> edges) : edges_(std::move(edges)) {
  TORCH_CHECK(edges_.size() >= 2 && edges_.front() == 0, "PositionLoss: edges must start at 0 and have 2 or more");
  for (size_t k = 1; k < edges_.size(); ++k)
    TORCH_CHECK(edges_[k] > edges_[k - 1], "PositionLoss: edges must increase, got ", edges_[k - 1], " then ",
                edges_[k]);
  sums_.assign(edges_.size() - 1, 0.0);
  counts_.assign(edges_.size() - 1, 0.0);
}

void PositionLoss::add(const at::Tensor& token_loss, const at::Tensor& labels, const SequenceLayout& layout,
                       int rank) {
  TORCH_CHECK(token_loss.dim() == 2 && token_loss.sizes() == labels.sizes() &&
                  token_loss.size(1) == layout.local_len(),
              "PositionLoss::add: token_loss and labels [B, ", layout.local_len(), "] expected, got ",
              token_loss.sizes(), " and ", labels.sizes());
  TORCH_CHECK(edges_.back() >= layout.global_len(), "PositionLoss::add: the last edge ", edges_.back(),
              " is below the layout's length ", layout.global_len());
  const at::Tensor loss = token_loss.detach().to(at::kCPU, at::kDouble);
  const at::Tensor positions = layout.global_positions(rank).to(at::kCPU, at::kLong);  // [n]
  // Bucket of each position: the last edge <= position.
  const at::Tensor bounds = at::tensor(std::vector<int64_t>(edges_.begin(), edges_.end()), at::kLong);
  const at::Tensor bucket = at::bucketize(positions, bounds, /*out_int32=*/false, /*right=*/true).sub(1);
  const at::Tensor keep = labels.to(at::kCPU).ne(-100).logical_and(positions.lt(layout.global_len()).unsqueeze(0));
  const at::Tensor index = bucket.unsqueeze(0).expand_as(loss).masked_select(keep);
  const int64_t k = static_cast<int64_t>(sums_.size());
  const at::Tensor sums = at::zeros({k}, at::kDouble).index_add_(0, index, loss.masked_select(keep));
  const at::Tensor counts =
      at::zeros({k}, at::kDouble).index_add_(0, index, at::ones({index.numel()}, at::kDouble));
  for (int64_t b = 0; b < k; ++b) {
    sums_[b] += sums[b].item<double>();
    counts_[b] += counts[b].item<double>();
  }
}

void PositionLoss::reduce(Communicator& comm) {
  const int64_t k = static_cast<int64_t>(sums_.size());
  at::Tensor both = at::empty({2 * k}, at::kDouble);
  for (int64_t b = 0; b < k; ++b) {
    both[b] = sums_[b];
    both[k + b] = counts_[b];
  }
  both = both.to(comm.device());
  comm.all_reduce(both)->wait();
  both = both.cpu();
  for (int64_t b = 0; b < k; ++b) {
    sums_[b] = both[b].item<double>();
    counts_[b] = both[k + b].item<double>();
  }
}

double PositionLoss::mean(size_t k) const {
  return counts_[k] > 0 ? sums_[k] / counts_[k] : std::numeric_limits<double>::quiet_NaN();
}

}  // namespace loom
