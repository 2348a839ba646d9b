#include "loom/parallel/linear_attention/lasp.h"

#include <torch/autograd.h>

#include "loom/parallel/linear_attention/chunked_kernel.h"
#include "loom/parallel/linear_attention/decay.h"
#include "loom/runtime/comm/autograd_state.h"
#include "loom/runtime/comm/comm_order.h"
#include "loom/runtime/comm/documents.h"
#include "loom/runtime/core/dtypes.h"

namespace loom::linear_attention {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Applies the normaliser around an unnormalised operator `attend(q, k, v)`.
template <typename Attend>
at::Tensor with_normaliser(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                           const LinearAttentionOptions& options, Attend attend) {
  // bf16/fp16 inputs run in float32: the chunk states, their prefixes (and
  // the AllGather payload) and the normaliser accumulate in float32.
  if (is_reduced_precision(q.scalar_type()))
    return with_normaliser(q.to(at::kFloat), k.to(at::kFloat), v.to(at::kFloat), options, attend).to(q.scalar_type());
  if (!options.normalize) return attend(q, k, v);
  const int64_t dv = v.size(-1);
  const at::Tensor ones = at::ones({v.size(0), v.size(1), v.size(2), 1}, v.options());
  const at::Tensor out = attend(q, k, at::cat({v, ones}, -1));
  return out.narrow(-1, 0, dv) / (out.narrow(-1, dv, 1) + options.eps);
}

// Factors of each local layout chunk, shaped for [B, H, L, d]. Without
// documents every chunk shares them: query, key [1, H, L, 1], across [H]
// (lambda^L). With documents they are per chunk and row: query, key
// [cpr][B, H, L, 1] masked by the documents, across [cpr, B, H] (0 where a
// document starts inside the chunk).
struct ChunkFactors {
  std::vector<at::Tensor> query, key;
  at::Tensor across;
};
ChunkFactors chunk_factors(const at::Tensor& decay, int64_t heads, const SequenceLayout& layout, int rank,
                           const at::Tensor& doc_start, const at::TensorOptions& options) {
  const int64_t L = layout.chunk_len(), cpr = layout.chunks_per_rank();
  const BlockDecay f = chunk_decay(decay, heads, L, options);
  ChunkFactors out;
  if (!doc_start.defined()) {
    out.query.assign(cpr, f.query.unsqueeze(0));
    out.key.assign(cpr, f.key.unsqueeze(0));
    out.across = f.block.reshape({heads});
    return out;
  }
  const auto chunks = layout.chunks_of(rank);
  std::vector<at::Tensor> across;
  for (int64_t i = 0; i < cpr; ++i) {
    const DocumentBlocks d = document_blocks(doc_start.narrow(1, i * L, L), layout.chunk_start(chunks[i]), 1, L,
                                             /*with_visible=*/false, options);
    out.query.push_back(f.query.unsqueeze(0) * d.query.squeeze(2));        // [B, H, L, 1]
    out.key.push_back(f.key.unsqueeze(0) * d.key.squeeze(2));
    across.push_back(f.block.reshape({1, heads}) * d.across.reshape({-1, 1}));  // [B, H]
  }
  out.across = at::stack(across);
  return out;
}

// The local doc_start of chunk i, or undefined.
at::Tensor chunk_docs(const at::Tensor& doc_start, int64_t i, int64_t L) {
  return doc_start.defined() ? doc_start.narrow(1, i * L, L) : at::Tensor();
}

struct SequenceParallelFunction : public torch::autograd::Function<SequenceParallelFunction> {
  // doc_start: this rank's [B, n], or an empty tensor for "no documents".
  static variable_list forward(AutogradContext* ctx, const at::Tensor& order, const at::Tensor& q, const at::Tensor& k,
                               const at::Tensor& v, const at::Tensor& decay, const at::Tensor& doc_start,
                               const SequenceLayout& layout, const CommPtr& comm, int64_t method, int64_t block) {
    ctx->saved_data["order"] = CommOrder::claim();
    const int64_t L = layout.chunk_len(), cpr = layout.chunks_per_rank();
    TORCH_CHECK(q.dim() == 4 && q.size(2) == layout.local_len(), "linear attention: local q has shape ", q.sizes(),
                "; expected [B, H, ", layout.local_len(), ", d] for ", layout.describe());
    TORCH_CHECK(k.sizes() == q.sizes() && v.dim() == 4 && v.size(2) == q.size(2),
                "linear attention: q ", q.sizes(), ", k ", k.sizes(), ", v ", v.sizes(), " do not agree");
    const at::Tensor docs = doc_start.numel() > 0 ? doc_start : at::Tensor();
    check_document_starts(docs, q, 2, "linear attention");
    const auto chunks = layout.chunks_of(comm->rank());
    const ChunkFactors f = chunk_factors(decay, q.size(1), layout, comm->rank(), docs, q.options());

    std::vector<at::Tensor> states;
    for (int64_t i = 0; i < cpr; ++i)
      states.push_back(at::matmul(k.narrow(2, i * L, L).transpose(-1, -2), v.narrow(2, i * L, L) * f.key[i]));
    auto prefix = make_state_prefix(static_cast<LinearAttentionMethod>(method), layout, comm, f.across,
                                    PrefixDirection::kForward);
    prefix->start(at::stack(states));

    // Intra-chunk work while the states travel.
    std::vector<at::Tensor> outs, block_states;
    for (int64_t i = 0; i < cpr; ++i) {
      auto r = chunk_forward(q.narrow(2, i * L, L), k.narrow(2, i * L, L), v.narrow(2, i * L, L), decay, block, 0,
                             chunk_docs(docs, i, L), layout.chunk_start(chunks[i]));
      outs.push_back(r.out);
      block_states.push_back(r.block_states);
    }
    const at::Tensor entering = prefix->finish();
    for (int64_t i = 0; i < cpr; ++i) outs[i].add_(at::matmul(q.narrow(2, i * L, L) * f.query[i], entering[i]));

    ctx->save_for_backward({q, k, v, decay, entering, at::stack(block_states), doc_start});
    save_comm(ctx, comm);
    ctx->saved_data["method"] = method;
    ctx->saved_data["block"] = block;
    save_layout(ctx, layout);
    return {at::cat(outs, 2), CommOrder::new_token()};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    CommOrder::backward_ran(ctx->saved_data["order"].toInt());
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &q = saved[0], &k = saved[1], &v = saved[2], &decay = saved[3], &entering = saved[4],
                     &block_states = saved[5];
    const at::Tensor docs = saved[6].numel() > 0 ? saved[6] : at::Tensor();
    const CommPtr comm = saved_comm(ctx);
    const SequenceLayout layout = saved_layout(ctx, *comm);
    const int64_t block = ctx->saved_data["block"].toInt();
    const int64_t L = layout.chunk_len(), cpr = layout.chunks_per_rank();
    const auto chunks = layout.chunks_of(comm->rank());
    const ChunkFactors f = chunk_factors(decay, q.size(1), layout, comm->rank(), docs, q.options());
    // Unused output: zeros, since every rank must still take part in the exchange.
    const at::Tensor dout = grads[0].defined() ? grads[0].contiguous()
                                               : at::zeros({q.size(0), q.size(1), q.size(2), v.size(3)}, q.options());

    std::vector<at::Tensor> chunk_grads;
    for (int64_t i = 0; i < cpr; ++i)
      chunk_grads.push_back(
          at::matmul((q.narrow(2, i * L, L) * f.query[i]).transpose(-1, -2), dout.narrow(2, i * L, L)));
    auto suffix = make_state_prefix(static_cast<LinearAttentionMethod>(ctx->saved_data["method"].toInt()), layout,
                                    comm, f.across, PrefixDirection::kBackward);
    suffix->start(at::stack(chunk_grads));

    std::vector<at::Tensor> dqs, dks, dvs;
    for (int64_t i = 0; i < cpr; ++i) {
      const at::Tensor qc = q.narrow(2, i * L, L), kc = k.narrow(2, i * L, L), vc = v.narrow(2, i * L, L);
      const at::Tensor dc = dout.narrow(2, i * L, L);
      auto [dq, dk, dv] = chunk_backward(qc, kc, vc, decay, block, block_states[i], dc, 0, chunk_docs(docs, i, L),
                                         layout.chunk_start(chunks[i]));
      dq.add_(at::matmul(dc, entering[i].transpose(-1, -2)).mul_(f.query[i]));
      dqs.push_back(dq);
      dks.push_back(dk);
      dvs.push_back(dv);
    }
    const at::Tensor later = suffix->finish();  // gradient reaching each chunk's state
    for (int64_t i = 0; i < cpr; ++i) {
      const at::Tensor kc = k.narrow(2, i * L, L), vc = v.narrow(2, i * L, L);
      dks[i].add_(at::matmul(vc, later[i].transpose(-1, -2)).mul_(f.key[i]));
      dvs[i].add_(at::matmul(kc, later[i]).mul_(f.key[i]));
    }
    return {at::Tensor(), at::cat(dqs, 2), at::cat(dks, 2), at::cat(dvs, 2), at::Tensor(), at::Tensor(),
            at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

at::Tensor linear_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const LinearAttentionOptions& options) {
  return with_normaliser(q, k, v, options, [&](const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_) {
    return chunked_linear_attention(q_, k_, v_, options.decay, options.block_size, options.doc_start);
  });
}

at::Tensor sequence_parallel_linear_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                              const SequenceLayout& layout, const CommPtr& comm,
                                              LinearAttentionMethod method, const LinearAttentionOptions& options) {
  TORCH_CHECK(comm, "sequence_parallel_linear_attention: communicator is null");
  return with_normaliser(q, k, v, options, [&](const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_) {
    // Autograd functions take defined tensors only: lambda = 1 is "no decay".
    const at::Tensor decay = options.decay.defined() ? options.decay : at::ones({q_.size(1)}, at::kDouble);
    const at::Tensor docs = options.doc_start.defined() ? options.doc_start : at::empty({0}, at::kLong);
    return apply_in_order<SequenceParallelFunction>(q_, k_, v_, decay, docs, layout, comm,
                                                    static_cast<int64_t>(method), options.block_size)[0];
  });
}

at::Tensor naive_linear_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const LinearAttentionOptions& options) {
  return with_normaliser(q, k, v, options, [&](const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_) {
    const int64_t n = q_.size(2);
    const at::Tensor t = at::arange(n, at::kDouble);
    const at::Tensor diff = t.unsqueeze(1) - t.unsqueeze(0);
    at::Tensor mask = (decay_powers(options.decay, q_.size(1), diff.clamp_min(0), q_.options()) *
                       diff.ge(0).to(q_.options()).unsqueeze(0))
                          .unsqueeze(0);  // [1, H, n, n]
    if (options.doc_start.defined()) {  // same document: doc_start[i] <= j
      const at::Tensor j = at::arange(n, options.doc_start.options());
      mask = mask * options.doc_start.unsqueeze(-1).le(j).to(q_.options()).unsqueeze(1);
    }
    return at::matmul(at::matmul(q_, k_.transpose(-1, -2)) * mask, v_);
  });
}

}  // namespace loom::linear_attention
