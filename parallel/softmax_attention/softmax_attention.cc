#include "loom/parallel/softmax_attention/softmax_attention.h"

#include <torch/autograd.h>

#include <algorithm>
#include <cctype>

#include "loom/runtime/comm/autograd_state.h"
#include "loom/parallel/softmax_attention/offload_attention.h"
#include "loom/parallel/softmax_attention/ring_pass.h"
#include "loom/parallel/softmax_attention/ulysses.h"
#include "loom/runtime/comm/comm_order.h"
#include "loom/runtime/comm/differentiable_collectives.h"
#include "loom/runtime/comm/documents.h"
#include "loom/runtime/comm/recompute.h"
#include "loom/runtime/core/error.h"

namespace loom::softmax_attention {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

const char* method_name(SoftmaxMethod method) {
  switch (method) {
    case SoftmaxMethod::kLocal: return "local";
    case SoftmaxMethod::kRing: return "ring";
    case SoftmaxMethod::kAllGather: return "allgather";
    case SoftmaxMethod::kOffload: return "offload";
    case SoftmaxMethod::kUlysses: return "ulysses";
    case SoftmaxMethod::kUsp: return "usp";
  }
  return "?";
}

SoftmaxMethod parse_method(const std::string& name) {
  std::string lower(name);
  std::transform(lower.begin(), lower.end(), lower.begin(), [](unsigned char c) { return std::tolower(c); });
  if (lower == "local") return SoftmaxMethod::kLocal;
  if (lower == "ring") return SoftmaxMethod::kRing;
  if (lower == "allgather") return SoftmaxMethod::kAllGather;
  if (lower == "offload") return SoftmaxMethod::kOffload;
  if (lower == "ulysses") return SoftmaxMethod::kUlysses;
  if (lower == "usp") return SoftmaxMethod::kUsp;
  throw ConfigError("softmax attention method '" + name +
                    "': allowed values are local, ring, allgather, offload, ulysses, usp");
}

namespace {

// doc_start enters the autograd functions as an optional: libtorch 1.13
// registers every at::Tensor argument as an input and rejects undefined ones.
using OptionalTensor = c10::optional<at::Tensor>;
OptionalTensor optional_tensor(const at::Tensor& t) { return t.defined() ? OptionalTensor(t) : c10::nullopt; }

// Global start positions of a rank's chunks, in local order.
std::vector<int64_t> chunk_starts(const SequenceLayout& layout, int rank) {
  std::vector<int64_t> starts;
  for (int64_t c : layout.chunks_of(rank)) starts.push_back(layout.chunk_start(c));
  return starts;
}

// This rank's query chunks in local order: their start positions and, with
// documents, each chunk's doc_start [B, L] and its smallest value (what
// decides that a K,V chunk ending before it is skipped). Without documents:
// undefined tensors and 0.
struct QueryChunks {
  std::vector<int64_t> starts;
  std::vector<at::Tensor> doc_start;
  std::vector<int64_t> min_doc_start;
};

QueryChunks query_chunks(const SequenceLayout& layout, int rank, const at::Tensor& doc_start) {
  QueryChunks c;
  c.starts = chunk_starts(layout, rank);
  c.doc_start.resize(c.starts.size());
  c.min_doc_start.assign(c.starts.size(), 0);
  if (!doc_start.defined()) return c;
  const int64_t L = layout.chunk_len(), chunks = static_cast<int64_t>(c.starts.size());
  // One host read for every chunk's minimum.
  const at::Tensor mins = doc_start.reshape({doc_start.size(0), chunks, L}).amin({0, 2}).cpu().contiguous();
  for (int64_t i = 0; i < chunks; ++i) {
    c.doc_start[i] = doc_start.narrow(1, i * L, L);
    c.min_doc_start[i] = mins.data_ptr<int64_t>()[i];
  }
  return c;
}

AttentionSpec spec_from(AutogradContext* ctx) {
  AttentionSpec spec;
  spec.scale = ctx->saved_data["scale"].to<double>();
  spec.window = ctx->saved_data["window"].toInt();
  spec.block = ctx->saved_data["block"].toInt();
  return spec;
}

void save_spec(AutogradContext* ctx, const AttentionSpec& spec) {
  ctx->saved_data["scale"] = spec.scale;
  ctx->saved_data["window"] = spec.window;
  ctx->saved_data["block"] = spec.block;
}

// Local query chunks against one rank's key/value chunks (all of length L),
// merged into `partials`. Fully-future chunk pairs, and pairs whose documents
// do not meet, are skipped.
void forward_against(const at::Tensor& q, const QueryChunks& qc, const at::Tensor& k, const at::Tensor& v,
                     const std::vector<int64_t>& kv_starts, int64_t L, const AttentionSpec& spec,
                     std::vector<Partial>& partials) {
  for (size_t i = 0; i < qc.starts.size(); ++i)
    for (size_t j = 0; j < kv_starts.size(); ++j) {
      if (pair_fully_masked(qc.starts[i], L, kv_starts[j], L, spec, qc.min_doc_start[i])) continue;
      merge_partial(partials[i], attend_pair(q.narrow(2, i * L, L), qc.starts[i], k.narrow(2, j * L, L),
                                             v.narrow(2, j * L, L), kv_starts[j], spec, qc.doc_start[i]));
    }
}

// Backward of forward_against: adds into dq[i] (per local chunk) and dk, dv.
// `out`: the final output (the fused kernel's backward reads it).
void backward_against(const at::Tensor& q, const QueryChunks& qc, const at::Tensor& k, const at::Tensor& v,
                      const std::vector<int64_t>& kv_starts, int64_t L, const AttentionSpec& spec,
                      const at::Tensor& out, const at::Tensor& lse, const at::Tensor& dout, const at::Tensor& delta,
                      std::vector<at::Tensor>& dq, at::Tensor dk, at::Tensor dv) {
  for (size_t i = 0; i < qc.starts.size(); ++i)
    for (size_t j = 0; j < kv_starts.size(); ++j) {
      if (pair_fully_masked(qc.starts[i], L, kv_starts[j], L, spec, qc.min_doc_start[i])) continue;
      at::Tensor dk_j = dk.narrow(2, j * L, L), dv_j = dv.narrow(2, j * L, L);
      attend_pair_backward(q.narrow(2, i * L, L), qc.starts[i], k.narrow(2, j * L, L), v.narrow(2, j * L, L),
                           kv_starts[j], spec, lse.narrow(2, i * L, L), dout.narrow(2, i * L, L),
                           delta.narrow(2, i * L, L), dq[i], dk_j, dv_j, qc.doc_start[i], out.narrow(2, i * L, L));
    }
}

std::pair<at::Tensor, at::Tensor> join(std::vector<Partial>& partials) {
  std::vector<at::Tensor> outs, lses;
  for (auto& p : partials) {
    outs.push_back(p.out);
    lses.push_back(p.lse);
  }
  return {at::cat(outs, 2), at::cat(lses, 2)};
}

std::vector<at::Tensor> zero_chunks(const at::Tensor& q, size_t count, int64_t L) {
  std::vector<at::Tensor> out;
  const auto acc = q.options().dtype(accumulation_dtype(q.scalar_type()));
  for (size_t i = 0; i < count; ++i) out.push_back(at::zeros({q.size(0), q.size(1), L, q.size(3)}, acc));
  return out;
}

// delta = rowsum(dout * out), the softmax backward's per-row constant.
at::Tensor row_delta(const at::Tensor& dout, const at::Tensor& out_acc) {
  return (dout.to(out_acc.scalar_type()) * out_acc).sum(-1);
}

// ---- one positioned pair (local attention, sliding-window chunks) ----
struct PositionedFunction : public torch::autograd::Function<PositionedFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const OptionalTensor& documents, int64_t q_start, int64_t k_start, double scale,
                               int64_t window, int64_t block) {
    const at::Tensor doc_start = documents.value_or(at::Tensor());
    const AttentionSpec spec{scale, window, block};
    Partial p = attend_pair(q, q_start, k, v, k_start, spec, doc_start);
    ctx->save_for_backward({q, k, v, p.out, p.lse, doc_start});
    ctx->saved_data["q_start"] = q_start;
    ctx->saved_data["k_start"] = k_start;
    save_spec(ctx, spec);
    ctx->mark_non_differentiable({p.lse});
    return {p.out.to(q.scalar_type()), p.lse};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto s = ctx->get_saved_variables();
    const at::Tensor &q = s[0], &k = s[1], &v = s[2], &out = s[3], &lse = s[4], &doc_start = s[5];
    const at::Tensor dout = grads[0].defined() ? grads[0] : at::zeros_like(q);
    const auto acc = out.scalar_type();
    at::Tensor dq = at::zeros(q.sizes(), q.options().dtype(acc));
    at::Tensor dk = at::zeros(k.sizes(), k.options().dtype(acc)), dv = at::zeros(v.sizes(), v.options().dtype(acc));
    attend_pair_backward(q, ctx->saved_data["q_start"].toInt(), k, v, ctx->saved_data["k_start"].toInt(),
                         spec_from(ctx), lse, dout, row_delta(dout, out), dq, dk, dv, doc_start, out);
    return {dq.to(q.scalar_type()), dk.to(k.scalar_type()), dv.to(v.scalar_type()), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// The end of a cross-rank forward: what backward needs, and lse marked as not
// differentiable.
variable_list finish_forward(AutogradContext* ctx, const CommPtr& comm, const SequenceLayout& layout,
                             const AttentionSpec& spec, const at::Tensor& out, const at::Tensor& lse) {
  save_comm(ctx, comm);
  save_layout(ctx, layout);
  save_spec(ctx, spec);
  ctx->mark_non_differentiable({lse});
  return {out, lse, CommOrder::new_token()};
}

// The start of a cross-rank backward: communicator, layout, spec, this rank's
// chunks (with their documents), the output gradient (zeros when unused),
// delta and zeroed dq chunks.
struct CrossRankBackward {
  CommPtr comm;
  SequenceLayout layout;
  AttentionSpec spec;
  QueryChunks chunks;
  at::Tensor dout, delta;
  std::vector<at::Tensor> dq;
  CrossRankBackward(AutogradContext* ctx, const at::Tensor& q, const at::Tensor& out, const at::Tensor& grad,
                    const at::Tensor& doc_start)
      : comm(saved_comm(ctx)),
        layout(saved_layout(ctx, *comm)),
        spec(spec_from(ctx)),
        chunks(query_chunks(layout, comm->rank(), doc_start)),
        dout(grad.defined() ? grad : at::zeros_like(q)),
        delta(row_delta(dout, out)),
        dq(zero_chunks(q, chunks.starts.size(), layout.chunk_len())) {}
};

// ---- ring attention ----
struct RingFunction : public torch::autograd::Function<RingFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& order, const at::Tensor& q, const at::Tensor& k,
                               const at::Tensor& v, const OptionalTensor& documents, const SequenceLayout& layout,
                               const CommPtr& comm, double scale, int64_t window, int64_t block) {
    ctx->saved_data["order"] = CommOrder::claim();
    const at::Tensor doc_start = documents.value_or(at::Tensor());
    const AttentionSpec spec{scale, window, block};
    const int r = comm->rank();
    const int64_t L = layout.chunk_len();
    const QueryChunks mine = query_chunks(layout, r, doc_start);
    // A selective recompute's rerun keeps the first run's output and LSE
    // (recompute.h): no ring, no attention.
    if (CommTape::replaying()) {
      const auto kept = CommTape::replay("ring attention: output and LSE");
      // Fresh aliases: autograd marks outputs, the tape's tensors stay as recorded.
      const at::Tensor out = kept[0].detach(), lse = kept[1].detach();
      ctx->save_for_backward({q, k, v, out, lse, doc_start});
      return finish_forward(ctx, comm, layout, spec, out.to(q.scalar_type()), lse);
    }
    std::vector<Partial> partials;
    for (size_t i = 0; i < mine.starts.size(); ++i) partials.push_back(empty_partial(q.narrow(2, i * L, L)));
    // Every step forwards K,V even when its pairs are skipped (documents that
    // do not meet): the same messages on every rank.
    ring_forward(comm, at::stack({k, v}).contiguous(), [&](int src, const at::Tensor& kv) {
      forward_against(q, mine, kv[0], kv[1], chunk_starts(layout, src), L, spec, partials);
    });
    auto [out, lse] = join(partials);
    CommTape::record("ring attention: output and LSE", {out, lse});
    ctx->save_for_backward({q, k, v, out, lse, doc_start});
    return finish_forward(ctx, comm, layout, spec, out.to(q.scalar_type()), lse);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    CommOrder::backward_ran(ctx->saved_data["order"].toInt());
    const auto s = ctx->get_saved_variables();
    const at::Tensor &q = s[0], &k = s[1], &v = s[2], &out = s[3], &lse = s[4], &doc_start = s[5];
    CrossRankBackward b(ctx, q, out, grads[0], doc_start);
    const CommPtr& comm = b.comm;
    const SequenceLayout& layout = b.layout;
    const AttentionSpec& spec = b.spec;
    const int64_t L = layout.chunk_len();
    const QueryChunks& mine = b.chunks;
    const at::Tensor &dout = b.dout, &delta = b.delta;
    std::vector<at::Tensor>& dq = b.dq;

    const at::Tensor kv = at::stack({k, v}).contiguous();
    const at::Tensor dkv = ring_backward(comm, kv, at::zeros(kv.sizes(), kv.options().dtype(out.scalar_type())),
                                         [&](int src, const at::Tensor& block, at::Tensor& dblock) {
                                           backward_against(q, mine, block[0], block[1], chunk_starts(layout, src), L,
                                                            spec, out, lse, dout, delta, dq, dblock[0], dblock[1]);
                                         });
    return {at::Tensor(), at::cat(dq, 2).to(q.scalar_type()), dkv[0].to(k.scalar_type()), dkv[1].to(v.scalar_type()),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// ---- all-gather attention (LASP-2H) ----
std::pair<at::Tensor, at::Tensor> gathered_forward(const at::Tensor& q, const at::Tensor& all,
                                                   const SequenceLayout& layout, int rank, const AttentionSpec& spec,
                                                   const at::Tensor& doc_start) {
  const int64_t L = layout.chunk_len();
  const QueryChunks mine = query_chunks(layout, rank, doc_start);
  std::vector<Partial> partials;
  for (size_t i = 0; i < mine.starts.size(); ++i) partials.push_back(empty_partial(q.narrow(2, i * L, L)));
  for (int src = 0; src < layout.world_size(); ++src)
    forward_against(q, mine, all[src][0], all[src][1], chunk_starts(layout, src), L, spec, partials);
  return join(partials);
}

struct AllGatherFunction : public torch::autograd::Function<AllGatherFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& order, const at::Tensor& q, const at::Tensor& k,
                               const at::Tensor& v, const OptionalTensor& documents, const SequenceLayout& layout,
                               const CommPtr& comm, double scale, int64_t window, int64_t block) {
    ctx->saved_data["order"] = CommOrder::claim();
    const at::Tensor doc_start = documents.value_or(at::Tensor());
    const AttentionSpec spec{scale, window, block};
    const int W = comm->size(), r = comm->rank();
    // A selective recompute's rerun keeps the first run's gathered K,V,
    // output and LSE (recompute.h): no all-gather, no attention.
    at::Tensor all, out, lse;
    if (CommTape::replaying()) {
      const auto kept = CommTape::replay("all-gather attention: K,V, output and LSE");
      all = kept[0];
      out = kept[1].detach();  // fresh aliases: autograd marks outputs, the tape's tensors stay as recorded
      lse = kept[2].detach();
    } else {
      const at::Tensor kv = at::stack({k, v}).unsqueeze(0).contiguous();  // [1, 2, B, Hkv, n, d]
      auto shape = kv.sizes().vec();
      shape[0] = W;
      all = at::empty(shape, kv.options());
      comm->all_gather(all, kv)->wait();
      std::tie(out, lse) = gathered_forward(q, all, layout, r, spec, doc_start);
      CommTape::record("all-gather attention: K,V, output and LSE", {all, out, lse});
    }
    // Keep the gathered K,V: backward needs every chunk again (more memory than
    // the ring, fewer steps).
    ctx->save_for_backward({q, all, out, lse, doc_start});
    return finish_forward(ctx, comm, layout, spec, out.to(q.scalar_type()), lse);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    CommOrder::backward_ran(ctx->saved_data["order"].toInt());
    const auto s = ctx->get_saved_variables();
    const at::Tensor &q = s[0], &all = s[1], &out = s[2], &lse = s[3], &doc_start = s[4];
    CrossRankBackward b(ctx, q, out, grads[0], doc_start);
    const CommPtr& comm = b.comm;
    const SequenceLayout& layout = b.layout;
    const AttentionSpec& spec = b.spec;
    const int W = comm->size();
    const int64_t L = layout.chunk_len();
    const QueryChunks& mine = b.chunks;
    const at::Tensor &dout = b.dout, &delta = b.delta;
    std::vector<at::Tensor>& dq = b.dq;
    at::Tensor dall = at::zeros(all.sizes(), all.options().dtype(out.scalar_type()));
    for (int src = 0; src < W; ++src)
      backward_against(q, mine, all[src][0], all[src][1], chunk_starts(layout, src), L, spec, out, lse, dout, delta,
                       dq, dall[src][0], dall[src][1]);
    at::Tensor own = at::empty_like(dall[0]).unsqueeze(0);
    comm->reduce_scatter(own, dall)->wait();
    const auto dtype = all.scalar_type();
    return {at::Tensor(), at::cat(dq, 2).to(q.scalar_type()), own[0][0].to(dtype), own[0][1].to(dtype),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// ---- sliding window through the halo ----
// With documents each chunk's queries mask the halo tokens of another document
// (their doc_start is past them); the exchange itself is unchanged.
std::pair<at::Tensor, at::Tensor> windowed(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                           const SequenceLayout& layout, const CommPtr& comm,
                                           const AttentionSpec& spec, const at::Tensor& doc_start) {
  const int64_t L = layout.chunk_len(), halo = spec.window - 1;
  // A single chunk has no previous one: its halo (positions before 0) is
  // masked anyway, whatever its length.
  const bool single = layout.num_chunks() == 1;
  TORCH_CHECK(halo <= L || single, "sliding-window attention: window ", spec.window, " needs the previous ", halo,
              " tokens but chunks hold ", L, " (", layout.describe(),
              "); use fewer ranks, a longer sequence or a shorter window");
  const int64_t hkv = k.size(1);
  // K and V travel together in one halo exchange.
  const at::Tensor kv = at::cat({k, v}, 1);
  const at::Tensor kv_halo = single ? at::zeros({kv.size(0), kv.size(1), halo, kv.size(3)}, kv.options())
                                    : halo_exchange(kv, layout, halo, comm, 2);
  const auto starts = chunk_starts(layout, comm->rank());
  std::vector<at::Tensor> outs, lses;
  for (size_t i = 0; i < starts.size(); ++i) {
    const at::Tensor h = kv_halo.narrow(2, i * halo, halo);
    const at::Tensor k_ext = at::cat({h.narrow(1, 0, hkv), k.narrow(2, i * L, L)}, 2);
    const at::Tensor v_ext = at::cat({h.narrow(1, hkv, hkv), v.narrow(2, i * L, L)}, 2);
    const at::Tensor chunk_doc_start = doc_start.defined() ? doc_start.narrow(1, i * L, L) : at::Tensor();
    auto res = PositionedFunction::apply(q.narrow(2, i * L, L), k_ext, v_ext, optional_tensor(chunk_doc_start),
                                         starts[i], starts[i] - halo, spec.scale, spec.window, spec.block);
    outs.push_back(res[0]);
    lses.push_back(res[1]);
  }
  return {at::cat(outs, 2), at::cat(lses, 2)};
}

}  // namespace

std::pair<at::Tensor, at::Tensor> attend_gathered(const at::Tensor& q, const at::Tensor& all,
                                                  const SequenceLayout& layout, int rank, const AttentionSpec& spec,
                                                  const at::Tensor& doc_start) {
  at::NoGradGuard no_grad;
  check_document_starts(doc_start, q, 2, "attend_gathered");
  auto [out, lse] = gathered_forward(q, all, layout, rank, spec, doc_start);
  return {out.to(q.scalar_type()), lse};
}

std::pair<at::Tensor, at::Tensor> positioned_attention(const at::Tensor& q, int64_t q_start, const at::Tensor& k,
                                                       const at::Tensor& v, int64_t k_start,
                                                       const AttentionSpec& spec, const at::Tensor& doc_start) {
  check_document_starts(doc_start, q, 2, "positioned attention");
  auto res = PositionedFunction::apply(q, k, v, optional_tensor(doc_start), q_start, k_start, spec.scale, spec.window,
                                       spec.block);
  return {res[0], res[1]};
}

std::pair<at::Tensor, at::Tensor> attention_with_lse(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                     const SequenceLayout& layout, const CommPtr& comm,
                                                     SoftmaxMethod method, const AttentionSpec& spec,
                                                     offload::OffloadClient* offload, const at::Tensor& doc_start,
                                                     int ulysses_degree) {
  TORCH_CHECK(comm && comm->size() == layout.world_size(), "softmax attention: communicator has ",
              comm ? comm->size() : 0, " ranks, the layout ", layout.world_size());
  TORCH_CHECK(q.dim() == 4 && q.size(2) == layout.local_len(), "softmax attention: local q has shape ", q.sizes(),
              "; expected [B, H, ", layout.local_len(), ", d] for ", layout.describe());
  TORCH_CHECK(k.dim() == 4 && k.sizes() == v.sizes() && k.size(2) == q.size(2), "softmax attention: k ", k.sizes(),
              " and v ", v.sizes(), " must match q's length ", q.size(2));
  TORCH_CHECK(spec.window >= 0, "softmax attention: window must be >= 0, got ", spec.window);
  check_document_starts(doc_start, q, 2, "softmax attention");
  TORCH_CHECK(!doc_start.defined() || doc_start.device() == q.device(), "softmax attention: doc_start is on ",
              doc_start.device(), " but q on ", q.device());
  // Ulysses and USP hold whole group sequences: the window needs no halo there.
  if (method == SoftmaxMethod::kUlysses) return ulysses_attention(q, k, v, layout, comm, spec, doc_start, 0);
  if (method == SoftmaxMethod::kUsp) return ulysses_attention(q, k, v, layout, comm, spec, doc_start, ulysses_degree);
  if (spec.window > 0) return windowed(q, k, v, layout, comm, spec, doc_start);  // every other method, offload too
  if (method == SoftmaxMethod::kOffload) {
    if (!offload)
      throw ConfigError("softmax attention method 'offload' needs memory nodes: set offload.memory_ranks > 0");
    return offload_attention(q, k, v, layout, comm, *offload, spec, doc_start);
  }
  switch (method) {
    case SoftmaxMethod::kLocal:
      if (layout.world_size() != 1)
        throw ConfigError("softmax attention method 'local' sees only this rank's keys but the sequence is split over " +
                          std::to_string(layout.world_size()) + " ranks; use ring or allgather");
      return positioned_attention(q, 0, k, v, 0, spec, doc_start);
    case SoftmaxMethod::kRing: {
      auto res = apply_in_order<RingFunction>(q, k, v, optional_tensor(doc_start), layout, comm, spec.scale,
                                              spec.window, spec.block);
      return {res[0], res[1]};
    }
    case SoftmaxMethod::kAllGather: {
      auto res = apply_in_order<AllGatherFunction>(q, k, v, optional_tensor(doc_start), layout, comm, spec.scale,
                                                   spec.window, spec.block);
      return {res[0], res[1]};
    }
    case SoftmaxMethod::kOffload:
    case SoftmaxMethod::kUlysses:
    case SoftmaxMethod::kUsp: break;
  }
  TORCH_CHECK(false, "unknown softmax attention method");
}

}  // namespace loom::softmax_attention
