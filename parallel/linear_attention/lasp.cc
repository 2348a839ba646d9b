#include "loom/parallel/linear_attention/lasp.h"

#include <torch/autograd.h>

#include <limits>

#include "loom/parallel/linear_attention/chunked_kernel.h"
#include "loom/parallel/linear_attention/decay.h"
#include "loom/parallel/linear_attention/ulysses.h"
#include "loom/parallel/softmax_attention/blockwise_kernel.h"
#include "loom/runtime/comm/autograd_state.h"
#include "loom/runtime/comm/comm_order.h"
#include "loom/runtime/comm/documents.h"
#include "loom/runtime/comm/recompute.h"
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
// documents or gates every chunk shares them: query, key [1, H, L, 1], across
// [H] (lambda^L). With gates or documents they are per chunk and row: query,
// key [cpr][B, H, L, 1] (gated: exp(G_t), exp(G_last - G_t) from the chunk's
// cumulative log gates; masked by the documents), across [cpr, B, H]
// (exp(G_last) or lambda^L; 0 where a document starts inside the chunk).
struct ChunkFactors {
  std::vector<at::Tensor> query, key;
  at::Tensor across;
};
ChunkFactors chunk_factors(const at::Tensor& decay, const at::Tensor& log_gate, int64_t heads,
                           const SequenceLayout& layout, int rank, const at::Tensor& doc_start,
                           const at::TensorOptions& options) {
  const int64_t L = layout.chunk_len(), cpr = layout.chunks_per_rank();
  ChunkFactors out;
  if (!doc_start.defined() && !log_gate.defined()) {
    const BlockDecay f = chunk_decay(decay, heads, L, options);
    out.query.assign(cpr, f.query.unsqueeze(0));
    out.key.assign(cpr, f.key.unsqueeze(0));
    out.across = f.block.reshape({heads});
    return out;
  }
  const auto chunks = layout.chunks_of(rank);
  const BlockDecay fixed = log_gate.defined() ? BlockDecay{} : chunk_decay(decay, heads, L, options);
  std::vector<at::Tensor> across;
  for (int64_t i = 0; i < cpr; ++i) {
    at::Tensor query, key, a;  // [1|B, H, L, 1], [1|B, H]
    if (log_gate.defined()) {
      const GatedBlocks g = gated_blocks(log_gate.narrow(2, i * L, L), decay, 1, L, options);
      query = g.query.squeeze(2);
      key = g.key.squeeze(2);
      a = g.block.reshape({g.block.size(0), heads});
    } else {
      query = fixed.query.unsqueeze(0);
      key = fixed.key.unsqueeze(0);
      a = fixed.block.reshape({1, heads});
    }
    if (doc_start.defined()) {
      const DocumentBlocks d = document_blocks(doc_start.narrow(1, i * L, L), layout.chunk_start(chunks[i]), 1, L,
                                               /*with_visible=*/false, options);
      query = query * d.query.squeeze(2);
      key = key * d.key.squeeze(2);
      a = a * d.across.reshape({-1, 1});
    }
    out.query.push_back(query);
    out.key.push_back(key);
    across.push_back(a);
  }
  out.across = at::stack(across);
  return out;
}

// GQA: k, v carry Hkv = H / group heads, each serving `group` consecutive
// query heads. Only the local kernel sees them repeated
// (softmax_attention::repeat_kv_heads); the exchanged states and chunk
// gradients stay at Hkv heads, so the bytes scale with Hkv.
at::Tensor sum_groups(const at::Tensor& x, int64_t group) {  // [B, Hkv * group, ...] -> [B, Hkv, ...]
  if (group == 1) return x;
  return x.unflatten(1, {x.size(1) / group, group}).sum(2);
}

// The local doc_start of chunk i, or undefined.
at::Tensor chunk_docs(const at::Tensor& doc_start, int64_t i, int64_t L) {
  return doc_start.defined() ? doc_start.narrow(1, i * L, L) : at::Tensor();
}
// The local log gates of chunk i, or undefined.
at::Tensor chunk_gates(const at::Tensor& log_gate, int64_t i, int64_t L) {
  return log_gate.defined() ? log_gate.narrow(2, i * L, L) : at::Tensor();
}

// The gates the kernels take: log_gate with the per-head decay folded in
// (differentiably), or undefined without gates.
at::Tensor folded_gates(const LinearAttentionOptions& options) {
  if (!options.log_gate.defined() || !options.decay.defined()) return options.log_gate;
  return options.log_gate + options.decay.to(options.log_gate.options()).log().view({1, -1, 1});
}

struct SequenceParallelFunction : public torch::autograd::Function<SequenceParallelFunction> {
  // doc_start: this rank's [B, n], log_gate: this rank's [B, H, n], or empty
  // tensors for "no documents" / "no gates" (then `decay` is the per-head
  // decay; with gates it is folded into them by the caller and unused here).
  static variable_list forward(AutogradContext* ctx, const at::Tensor& order, const at::Tensor& q, const at::Tensor& k,
                               const at::Tensor& v, const at::Tensor& decay, const at::Tensor& doc_start,
                               const at::Tensor& log_gate, const SequenceLayout& layout, const CommPtr& comm,
                               int64_t method, int64_t block) {
    ctx->saved_data["order"] = CommOrder::claim();
    const int64_t L = layout.chunk_len(), cpr = layout.chunks_per_rank();
    TORCH_CHECK(q.dim() == 4 && q.size(2) == layout.local_len(), "linear attention: local q has shape ", q.sizes(),
                "; expected [B, H, ", layout.local_len(), ", d] for ", layout.describe());
    TORCH_CHECK(k.dim() == 4 && v.dim() == 4 && k.size(0) == q.size(0) && k.size(2) == q.size(2) &&
                    k.size(3) == q.size(3) && v.size(0) == q.size(0) && v.size(1) == k.size(1) &&
                    v.size(2) == q.size(2) && k.size(1) >= 1 && q.size(1) % k.size(1) == 0,
                "linear attention: q ", q.sizes(), ", k ", k.sizes(), ", v ", v.sizes(),
                " do not agree (k and v may have fewer heads than q, a divisor of its count)");
    const int64_t group = q.size(1) / k.size(1);
    TORCH_CHECK(group == 1 || (log_gate.numel() == 0 && decay.size(0) == k.size(1)),
                "linear attention: grouped key/value heads need factors shared by each group (no gates, no decay: "
                "the caller repeats k and v for those)");
    const at::Tensor docs = doc_start.numel() > 0 ? doc_start : at::Tensor();
    const at::Tensor gates = log_gate.numel() > 0 ? log_gate : at::Tensor();
    check_document_starts(docs, q, 2, "linear attention");
    if (gates.defined()) check_log_gate(gates, q, "linear attention");
    const at::Tensor kernel_decay = gates.defined() ? at::Tensor() : decay;
    const auto chunks = layout.chunks_of(comm->rank());
    // State side at k's head count, query side at q's (the same factors repeated).
    const ChunkFactors f = chunk_factors(kernel_decay, gates, k.size(1), layout, comm->rank(), docs, q.options());
    const at::Tensor query_decay = group == 1 ? kernel_decay : at::Tensor();  // grouped: decay is all ones
    const at::Tensor k_local = softmax_attention::repeat_kv_heads(k, group), v_local = softmax_attention::repeat_kv_heads(v, group);

    // A selective recompute's rerun replays the entering states its first run
    // received (recompute.h) and exchanges nothing.
    const bool replay = CommTape::replaying();
    std::unique_ptr<StatePrefix> prefix;
    if (!replay) {
      std::vector<at::Tensor> states;
      for (int64_t i = 0; i < cpr; ++i)
        states.push_back(at::matmul(k.narrow(2, i * L, L).transpose(-1, -2), v.narrow(2, i * L, L) * f.key[i]));
      prefix = make_state_prefix(static_cast<LinearAttentionMethod>(method), layout, comm, f.across,
                                 PrefixDirection::kForward);
      prefix->start(at::stack(states));
    }

    // Intra-chunk work while the states travel.
    std::vector<at::Tensor> outs, block_states;
    for (int64_t i = 0; i < cpr; ++i) {
      auto r = chunk_forward(q.narrow(2, i * L, L), k_local.narrow(2, i * L, L), v_local.narrow(2, i * L, L),
                             query_decay, block, 0, chunk_docs(docs, i, L), layout.chunk_start(chunks[i]),
                             chunk_gates(gates, i, L));
      outs.push_back(r.out);
      block_states.push_back(r.block_states);
    }
    const at::Tensor entering = replay ? CommTape::replay("linear attention: entering states")[0] : prefix->finish();
    if (!replay) CommTape::record("linear attention: entering states", {entering});
    for (int64_t i = 0; i < cpr; ++i)
      outs[i].add_(at::matmul(q.narrow(2, i * L, L) * softmax_attention::repeat_kv_heads(f.query[i], group), softmax_attention::repeat_kv_heads(entering[i], group)));

    ctx->save_for_backward({q, k, v, decay, entering, at::stack(block_states), doc_start, log_gate});
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
    const at::Tensor gates = saved[7].numel() > 0 ? saved[7] : at::Tensor();
    const at::Tensor kernel_decay = gates.defined() ? at::Tensor() : decay;
    const CommPtr comm = saved_comm(ctx);
    const SequenceLayout layout = saved_layout(ctx, *comm);
    const int64_t block = ctx->saved_data["block"].toInt();
    const int64_t L = layout.chunk_len(), cpr = layout.chunks_per_rank();
    const auto chunks = layout.chunks_of(comm->rank());
    const int64_t group = q.size(1) / k.size(1);
    const ChunkFactors f = chunk_factors(kernel_decay, gates, k.size(1), layout, comm->rank(), docs, q.options());
    const at::Tensor query_decay = group == 1 ? kernel_decay : at::Tensor();  // grouped: decay is all ones
    const at::Tensor k_local = softmax_attention::repeat_kv_heads(k, group), v_local = softmax_attention::repeat_kv_heads(v, group);
    // Unused output: zeros, since every rank must still take part in the exchange.
    const at::Tensor dout = grads[0].defined() ? grads[0].contiguous()
                                               : at::zeros({q.size(0), q.size(1), q.size(2), v.size(3)}, q.options());

    std::vector<at::Tensor> chunk_grads;
    for (int64_t i = 0; i < cpr; ++i)
      chunk_grads.push_back(sum_groups(
          at::matmul((q.narrow(2, i * L, L) * softmax_attention::repeat_kv_heads(f.query[i], group)).transpose(-1, -2),
                     dout.narrow(2, i * L, L)),
          group));
    auto suffix = make_state_prefix(static_cast<LinearAttentionMethod>(ctx->saved_data["method"].toInt()), layout,
                                    comm, f.across, PrefixDirection::kBackward);
    suffix->start(at::stack(chunk_grads));

    std::vector<at::Tensor> dqs, dks, dvs;
    for (int64_t i = 0; i < cpr; ++i) {
      const at::Tensor qc = q.narrow(2, i * L, L), kc = k_local.narrow(2, i * L, L), vc = v_local.narrow(2, i * L, L);
      const at::Tensor dc = dout.narrow(2, i * L, L);
      auto [dq, dk, dv] = chunk_backward(qc, kc, vc, query_decay, block, block_states[i], dc, 0,
                                         chunk_docs(docs, i, L), layout.chunk_start(chunks[i]),
                                         chunk_gates(gates, i, L));
      dq.add_(at::matmul(dc, softmax_attention::repeat_kv_heads(entering[i], group).transpose(-1, -2)).mul_(softmax_attention::repeat_kv_heads(f.query[i], group)));
      dqs.push_back(dq);
      dks.push_back(sum_groups(dk, group));
      dvs.push_back(sum_groups(dv, group));
    }
    const at::Tensor later = suffix->finish();  // gradient reaching each chunk's state
    std::vector<at::Tensor> dgates;
    for (int64_t i = 0; i < cpr; ++i) {
      const at::Tensor qc = q.narrow(2, i * L, L), kc = k.narrow(2, i * L, L), vc = v.narrow(2, i * L, L);
      const at::Tensor dk_state = at::matmul(vc, later[i].transpose(-1, -2)).mul_(f.key[i]);
      dks[i].add_(dk_state);
      dvs[i].add_(at::matmul(kc, later[i]).mul_(f.key[i]));
      if (!gates.defined()) continue;
      // Log gates of chunk i (G_t cumulative from the chunk start): every term
      // but the exiting state's decay follows the identity of log_gate_grad,
      // dL/dG_m = q_m . dq_m - k_m . dk_m with all of dq, dk. The exiting
      // state M = sum_j exp(G_last - G_j) k_j v_j^T and the decay across the
      // chunk a = exp(G_last) also depend on G_last: dL/dG_last gains
      // sum_j k_j . dk_state_j + a <R, P> (R: gradient reaching M, P: the
      // entering state), which reaches every gate of the chunk.
      const at::Tensor through_last = (kc * dk_state).sum({2, 3}) +
                                      f.across[i].to(q.options()) * (later[i] * entering[i]).sum({2, 3});  // [B, H]
      dgates.push_back(log_gate_grad(qc, dqs[i], kc, dks[i]) + through_last.unsqueeze(-1));
    }
    const at::Tensor dgate = gates.defined() ? at::cat(dgates, 2).to(gates.scalar_type()) : at::Tensor();
    return {at::Tensor(), at::cat(dqs, 2), at::cat(dks, 2), at::cat(dvs, 2), at::Tensor(), at::Tensor(),
            dgate, at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

at::Tensor linear_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const LinearAttentionOptions& options) {
  if (k.dim() == 4 && q.dim() == 4 && k.size(1) != q.size(1) && k.size(1) > 0 && q.size(1) % k.size(1) == 0)
    return linear_attention(q, softmax_attention::repeat_kv_heads(k, q.size(1) / k.size(1)), softmax_attention::repeat_kv_heads(v, q.size(1) / k.size(1)), options);
  return with_normaliser(q, k, v, options, [&](const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_) {
    return chunked_linear_attention(q_, k_, v_, options.decay, options.block_size, options.doc_start,
                                    options.log_gate);
  });
}

at::Tensor sequence_parallel_linear_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                              const SequenceLayout& layout, const CommPtr& comm,
                                              LinearAttentionMethod method, const LinearAttentionOptions& options) {
  TORCH_CHECK(comm, "sequence_parallel_linear_attention: communicator is null");
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4 && k.size(1) >= 1 && v.size(1) == k.size(1) &&
                  q.size(1) % k.size(1) == 0,
              "sequence_parallel_linear_attention: q ", q.sizes(), ", k ", k.sizes(), ", v ", v.sizes(),
              ": k and v need the same head count, a divisor of q's");
  const int64_t group = q.size(1) / k.size(1);
  // Grouped heads travel unrepeated when the factors are the same for every
  // query head of a group (no decay, no gates). A per-query-head decay or gate
  // makes each query head's state its own: then k and v are repeated here, and
  // so are the states (Ulysses also takes them repeated).
  if (group > 1 && (options.decay.defined() || options.log_gate.defined() || method == LinearAttentionMethod::kUlysses))
    return sequence_parallel_linear_attention(q, softmax_attention::repeat_kv_heads(k, group), softmax_attention::repeat_kv_heads(v, group), layout, comm, method,
                                              options);
  if (method == LinearAttentionMethod::kUlysses) {
    // Head-parallel: whole sequences of H/W heads through the single-rank kernel.
    const UlyssesExchange exchange(layout, comm, q.size(1), "the linear attention head count");
    const int64_t dk = q.size(3), dv = v.size(3);
    // q, k, v leave in one all-to-all (cat along the feature dimension).
    const at::Tensor heads = exchange.to_heads(at::cat({q, k, v.to(q.scalar_type())}, 3));
    LinearAttentionOptions whole = options;
    whole.doc_start = exchange.gather_doc_start(options.doc_start);
    if (options.decay.defined()) whole.decay = exchange.local_heads(options.decay);
    if (options.log_gate.defined()) whole.log_gate = exchange.to_heads(options.log_gate);
    const at::Tensor out = linear_attention(heads.narrow(3, 0, dk), heads.narrow(3, dk, dk),
                                            heads.narrow(3, 2 * dk, dv), whole);
    return exchange.from_heads(out);
  }
  return with_normaliser(q, k, v, options, [&](const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_) {
    // Autograd functions take defined tensors only: lambda = 1 is "no decay",
    // empty tensors are "no documents" and "no gates".
    const at::Tensor gates = folded_gates(options);
    const at::Tensor decay = options.decay.defined() && !gates.defined() ? options.decay
                                                                         : at::ones({k_.size(1)}, at::kDouble);
    const at::Tensor docs = options.doc_start.defined() ? options.doc_start : at::empty({0}, at::kLong);
    return apply_in_order<SequenceParallelFunction>(q_, k_, v_, decay, docs,
                                                    gates.defined() ? gates : at::empty({0}, q_.options()), layout,
                                                    comm, static_cast<int64_t>(method), options.block_size)[0];
  });
}

at::Tensor naive_linear_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                  const LinearAttentionOptions& options) {
  if (k.dim() == 4 && q.dim() == 4 && k.size(1) != q.size(1) && k.size(1) > 0 && q.size(1) % k.size(1) == 0)
    return naive_linear_attention(q, softmax_attention::repeat_kv_heads(k, q.size(1) / k.size(1)), softmax_attention::repeat_kv_heads(v, q.size(1) / k.size(1)),
                                  options);
  return with_normaliser(q, k, v, options, [&](const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_) {
    const int64_t n = q_.size(2);
    const at::Tensor t = at::arange(n, at::kDouble);
    const at::Tensor diff = t.unsqueeze(1) - t.unsqueeze(0);
    at::Tensor mask = (decay_powers(options.decay, q_.size(1), diff.clamp_min(0), q_.options()) *
                       diff.ge(0).to(q_.options()).unsqueeze(0))
                          .unsqueeze(0);  // [1, H, n, n]
    if (options.log_gate.defined()) {  // exp(G_i - G_j) for j <= i, G the cumulative log gate
      const at::Tensor G = options.log_gate.to(q_.scalar_type()).cumsum(-1);
      const at::Tensor above = diff.lt(0).to(q_.device());
      mask = mask * (G.unsqueeze(-1) - G.unsqueeze(-2)).masked_fill(above, -std::numeric_limits<double>::infinity()).exp();  // [B, H, n, n]
    }
    if (options.doc_start.defined()) {  // same document: doc_start[i] <= j
      const at::Tensor j = at::arange(n, options.doc_start.options());
      mask = mask * options.doc_start.unsqueeze(-1).le(j).to(q_.options()).unsqueeze(1);
    }
    return at::matmul(at::matmul(q_, k_.transpose(-1, -2)) * mask, v_);
  });
}

}  // namespace loom::linear_attention
