#include "loom/parallel/linear_attention/ulysses.h"

#include <utility>
#include <vector>

#include "loom/runtime/comm/differentiable_collectives.h"
#include "loom/runtime/comm/recompute.h"
#include "loom/runtime/core/error.h"

namespace loom::linear_attention {

UlyssesExchange::UlyssesExchange(const SequenceLayout& layout, CommPtr comm, int64_t heads, const std::string& what)
    : layout_(layout), comm_(std::move(comm)), heads_(heads) {
  TORCH_CHECK(comm_ && comm_->size() == layout_.world_size(), "linear Ulysses: communicator has ",
              comm_ ? comm_->size() : 0, " ranks, the layout ", layout_.world_size());
  const int W = comm_->size();
  if (heads_ % W != 0)
    throw ConfigError("parallel.linear_method = LINEAR_ULYSSES over " + std::to_string(W) + " ranks: " + what + " = " +
                      std::to_string(heads_) + " heads do not divide among them (need a multiple of " +
                      std::to_string(W) + ")");
  if (layout_.kind() == LayoutKind::kContiguous || W == 1) return;
  // Gathered order: rank 0's chunks in local order, then rank 1's, ...
  const int64_t L = layout_.chunk_len(), C = layout_.num_chunks();
  std::vector<int64_t> gathered_chunk_slot(C);
  int64_t slot = 0;
  for (int r = 0; r < W; ++r)
    for (int64_t c : layout_.chunks_of(r)) gathered_chunk_slot[c] = slot++;
  std::vector<int64_t> to_global(C * L);
  for (int64_t c = 0; c < C; ++c)
    for (int64_t i = 0; i < L; ++i) to_global[c * L + i] = gathered_chunk_slot[c] * L + i;
  to_global_ = at::tensor(to_global, at::kLong);
  to_gathered_ = at::empty_like(to_global_).scatter_(0, to_global_, at::arange(C * L, at::kLong));
}

at::Tensor UlyssesExchange::to_heads(const at::Tensor& x) const {
  TORCH_CHECK(x.dim() >= 3 && x.size(1) == heads_ && x.size(2) == layout_.local_len(),
              "linear Ulysses: expected [B, ", heads_, ", ", layout_.local_len(), ", ...], got ", x.sizes());
  const at::Tensor gathered = all_to_all(x, comm_, /*scatter_dim=*/1, /*gather_dim=*/2);
  return to_global_.defined() ? gathered.index_select(2, to_global_.to(x.device())) : gathered;
}

at::Tensor UlyssesExchange::from_heads(const at::Tensor& x) const {
  const at::Tensor gathered = to_gathered_.defined() ? x.index_select(2, to_gathered_.to(x.device())) : x;
  return all_to_all(gathered, comm_, /*scatter_dim=*/2, /*gather_dim=*/1);
}

at::Tensor UlyssesExchange::gather_doc_start(const at::Tensor& doc_start) const {
  if (!doc_start.defined()) return doc_start;
  // A selective recompute's rerun replays the gathered starts (recompute.h) and sends nothing.
  at::Tensor gathered;
  if (CommTape::replaying()) {
    gathered = CommTape::replay("linear ulysses: document starts")[0];
  } else {
    gathered = all_gather_along(doc_start, *comm_, 1);
    CommTape::record("linear ulysses: document starts", {gathered});
  }
  return to_global_.defined() ? gathered.index_select(1, to_global_.to(doc_start.device())) : gathered;
}

at::Tensor UlyssesExchange::local_heads(const at::Tensor& per_head) const {
  TORCH_CHECK(per_head.dim() >= 1 && per_head.size(0) == heads_, "linear Ulysses: per-head tensor has shape ",
              per_head.sizes(), ", expected ", heads_, " heads first");
  const int64_t h = heads_ / comm_->size();
  return per_head.narrow(0, comm_->rank() * h, h);
}

}  // namespace loom::linear_attention
