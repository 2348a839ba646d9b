#include "benchmarks/allgather_baseline.h"

#include <algorithm>
#include <vector>

#include "loom/runtime/comm/differentiable_collectives.h"

namespace loom::bench {

at::Tensor allgather_recurrent(const at::Tensor& q, const at::Tensor& inputs, const SequenceLayout& layout,
                               const CommPtr& comm, const at::Tensor& global_doc_start, const PrefixOp& prefix_op) {
  TORCH_CHECK(q.dim() == 4 && inputs.dim() == 4 && q.size(2) == layout.local_len() &&
                  inputs.size(2) == layout.local_len(),
              "all-gather baseline: q ", q.sizes(), " and inputs ", inputs.sizes(), " must be [B, H, ",
              layout.local_len(), ", *] for ", layout.describe());
  const int me = comm->rank();
  const at::Tensor gathered = loom::all_gather(inputs.unsqueeze(0), comm, 0);  // [W, B, H, local, F]
  const at::Tensor sequence = layout.unshard(gathered.unbind(0), 2);          // [B, H, N, F]
  std::vector<at::Tensor> queries;
  for (int r = 0; r < comm->size(); ++r) queries.push_back(r == me ? q : at::zeros_like(q));
  const at::Tensor all_queries = layout.unshard(queries, 2);
  int64_t end = 0;
  for (int64_t c : layout.chunks_of(me)) end = std::max(end, layout.chunk_start(c) + layout.chunk_len());
  end = std::min(end, layout.global_len());
  const at::Tensor out = prefix_op(all_queries.narrow(2, 0, end), sequence.narrow(2, 0, end),
                                   global_doc_start.defined() ? global_doc_start.narrow(1, 0, end) : at::Tensor());
  return layout.shard(at::constant_pad_nd(out, {0, 0, 0, layout.global_len() - end}), me, 2);
}

}  // namespace loom::bench
