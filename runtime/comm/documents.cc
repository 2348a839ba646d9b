#include "loom/runtime/comm/documents.h"

#include "loom/runtime/core/error.h"

namespace loom {

at::Tensor document_starts_from_ids(const at::Tensor& doc_ids) {
  TORCH_CHECK(doc_ids.dim() == 2, "document_starts_from_ids: doc_ids must be [B, N], got ", doc_ids.sizes());
  const int64_t n = doc_ids.size(1);
  const at::Tensor ids = doc_ids.to(at::kLong);
  at::Tensor starts_here = at::ones_like(ids, ids.options().dtype(at::kBool));
  if (n > 1) starts_here.narrow(1, 1, n - 1).copy_(ids.narrow(1, 1, n - 1).ne(ids.narrow(1, 0, n - 1)));
  const at::Tensor pos = at::arange(n, ids.options()).expand_as(ids);
  // The start of a token's document is the latest start at or before it.
  return std::get<0>(at::cummax(at::where(starts_here, pos, at::zeros_like(pos)), 1));
}

at::Tensor document_starts_from_lengths(const std::vector<std::vector<int64_t>>& lengths, int64_t n) {
  at::Tensor out = at::empty({static_cast<int64_t>(lengths.size()), n}, at::kLong);
  auto acc = out.accessor<int64_t, 2>();
  for (size_t b = 0; b < lengths.size(); ++b) {
    int64_t t = 0;
    for (int64_t len : lengths[b]) {
      TORCH_CHECK(len >= 1, "document_starts_from_lengths: row ", b, " has a document of length ", len);
      const int64_t start = t;
      for (int64_t i = 0; i < len && t < n; ++i, ++t) acc[static_cast<int64_t>(b)][t] = start;
    }
    TORCH_CHECK(t == n, "document_starts_from_lengths: row ", b, "'s documents cover ", t, " tokens, the row has ", n);
  }
  return out;
}

at::Tensor shard_document_starts(const at::Tensor& doc_start, const SequenceLayout& layout, int rank) {
  if (!doc_start.defined()) return doc_start;
  TORCH_CHECK(doc_start.dim() == 2 && doc_start.size(1) == layout.global_len(), "doc_start must be [B, ",
              layout.global_len(), "] for ", layout.describe(), ", got ", doc_start.sizes());
  return layout.shard(doc_start.to(at::kLong), rank, 1, static_cast<double>(layout.global_len()));
}

at::Tensor positions_in_document(const at::Tensor& doc_start, const SequenceLayout& layout, int rank) {
  const at::Tensor global = layout.global_positions(rank);
  if (!doc_start.defined()) return global;
  return global.to(doc_start.device()).unsqueeze(0) - doc_start;
}

void check_document_starts(const at::Tensor& doc_start, const at::Tensor& x, int64_t seq_dim, const char* what) {
  if (!doc_start.defined()) return;
  TORCH_CHECK(doc_start.scalar_type() == at::kLong, what, ": doc_start must be int64, got ", doc_start.scalar_type());
  TORCH_CHECK(doc_start.dim() == 2 && doc_start.size(0) == x.size(0) && doc_start.size(1) == x.size(seq_dim), what,
              ": doc_start ", doc_start.sizes(), " must be [B, n] = [", x.size(0), ", ", x.size(seq_dim),
              "] for input ", x.sizes());
}

}  // namespace loom
