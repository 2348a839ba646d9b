#include "loom/parallel/gated_delta/gated_delta.h"

#include <torch/autograd.h>

#include "loom/parallel/gated_delta/chunked_kernel.h"
#include "loom/parallel/linear_attention/ulysses.h"
#include "loom/runtime/comm/autograd_state.h"
#include "loom/runtime/comm/comm_order.h"
#include "loom/runtime/comm/documents.h"
#include "loom/runtime/comm/recompute.h"
#include "loom/runtime/core/dtypes.h"

namespace loom::gated_delta {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Runs `op` in float32 for bf16/fp16 inputs: the maps, the states and the
// exchanged payload accumulate in float32.
template <typename Op>
at::Tensor in_working_precision(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& beta,
                                const at::Tensor& log_alpha, Op op) {
  if (!is_reduced_precision(q.scalar_type())) return op(q, k, v, beta, log_alpha);
  const auto f = at::kFloat;
  return op(q.to(f), k.to(f), v.to(f), beta.to(f), log_alpha.to(f)).to(q.scalar_type());
}

// The local doc_start of chunk i, or undefined.
at::Tensor chunk_docs(const at::Tensor& doc_start, int64_t i, int64_t L) {
  return doc_start.defined() ? doc_start.narrow(1, i * L, L) : at::Tensor();
}

// [B, H, n, d] -> [B, H, nb, C, d], zero-padded at the end.
at::Tensor to_blocks(const at::Tensor& x, int64_t nb, int64_t c) {
  const int64_t pad = nb * c - x.size(2);
  const at::Tensor y = pad > 0 ? at::constant_pad_nd(x, {0, 0, 0, pad}) : x;
  return y.reshape({x.size(0), x.size(1), nb, c, x.size(3)});
}

// This rank's chunk i of a [B, H, n, *] or [B, H, n] tensor.
at::Tensor chunk_of(const at::Tensor& x, int64_t i, int64_t L) { return x.narrow(2, i * L, L); }

struct SequenceParallelFunction : public torch::autograd::Function<SequenceParallelFunction> {
  // doc_start: this rank's [B, n], or an empty tensor for "no documents".
  static variable_list forward(AutogradContext* ctx, const at::Tensor& order, const at::Tensor& q, const at::Tensor& k,
                               const at::Tensor& v, const at::Tensor& beta, const at::Tensor& log_alpha,
                               const at::Tensor& doc_start, const SequenceLayout& layout, const CommPtr& comm,
                               int64_t method, int64_t block) {
    ctx->saved_data["order"] = CommOrder::claim();
    const int64_t L = layout.chunk_len(), cpr = layout.chunks_per_rank();
    TORCH_CHECK(q.dim() == 4 && q.size(2) == layout.local_len(), "gated delta rule: local q has shape ", q.sizes(),
                "; expected [B, H, ", layout.local_len(), ", d_k] for ", layout.describe());
    const at::Tensor docs = doc_start.numel() > 0 ? doc_start : at::Tensor();
    const auto chunks = layout.chunks_of(comm->rank());

    // The maps of this rank's chunks first, so that they travel while the query side is computed.
    std::vector<Blocks> blocks;
    std::vector<BlockMaps> maps;
    std::vector<at::Tensor> transitions, offsets;
    for (int64_t i = 0; i < cpr; ++i) {
      blocks.push_back(cut_blocks(chunk_of(q, i, L), chunk_of(k, i, L), chunk_of(v, i, L), chunk_of(beta, i, L),
                                  chunk_of(log_alpha, i, L), block, chunk_docs(docs, i, L),
                                  layout.chunk_start(chunks[i])));
      maps.push_back(block_maps(blocks.back()));
      auto [A, B] = compose_blocks(maps.back());
      transitions.push_back(A);
      offsets.push_back(B);
    }
    const at::Tensor chunk_transitions = at::stack(transitions);
    // A selective recompute's rerun replays the entering states its first run
    // received (recompute.h) and exchanges nothing.
    const bool replay = CommTape::replaying();
    std::unique_ptr<AffinePrefix> prefix;
    if (!replay) {
      prefix = make_affine_prefix(static_cast<LinearAttentionMethod>(method), layout, comm, PrefixDirection::kForward);
      prefix->start(chunk_transitions, at::stack(offsets));
    }

    std::vector<BlockOutputs> query_side;
    for (int64_t i = 0; i < cpr; ++i) query_side.push_back(block_outputs(blocks[i], maps[i]));
    const at::Tensor entering =  // [cpr, B, H, d_k, d_v]
        replay ? CommTape::replay("gated delta rule: entering states")[0] : prefix->finish();
    if (!replay) CommTape::record("gated delta rule: entering states", {entering});
    std::vector<at::Tensor> outs;
    for (int64_t i = 0; i < cpr; ++i)
      outs.push_back(stretch_outputs(query_side[i], block_states(maps[i], entering[i]).first, L));

    ctx->save_for_backward({q, k, v, beta, log_alpha, entering, chunk_transitions, doc_start});
    save_comm(ctx, comm);
    save_layout(ctx, layout);
    ctx->saved_data["method"] = method;
    ctx->saved_data["block"] = block;
    return {at::cat(outs, 2), CommOrder::new_token()};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    CommOrder::backward_ran(ctx->saved_data["order"].toInt());
    const auto saved = ctx->get_saved_variables();
    const at::Tensor &entering = saved[5], &chunk_transitions = saved[6];
    const at::Tensor docs = saved[7].numel() > 0 ? saved[7] : at::Tensor();
    const CommPtr comm = saved_comm(ctx);
    const SequenceLayout layout = saved_layout(ctx, *comm);
    const int64_t block = ctx->saved_data["block"].toInt();
    const int64_t L = layout.chunk_len(), cpr = layout.chunks_per_rank();
    const auto chunks = layout.chunks_of(comm->rank());
    const at::Tensor& q = saved[0];
    // An unused output: zeros, since every rank must still take part in the exchange.
    const at::Tensor dout = grads[0].defined() ? grads[0].contiguous()
                                               : at::zeros({q.size(0), q.size(1), q.size(2), saved[2].size(3)},
                                                           q.options());

    // Re-run the local forward under autograd from the saved entering states.
    at::AutoGradMode enable_grad(true);
    std::vector<at::Tensor> inputs;
    for (int i = 0; i < 5; ++i) inputs.push_back(saved[i].detach().requires_grad_(true));
    std::vector<at::Tensor> outputs, output_grads, entering_grads;
    for (int64_t i = 0; i < cpr; ++i) {
      const Blocks x = cut_blocks(chunk_of(inputs[0], i, L), chunk_of(inputs[1], i, L), chunk_of(inputs[2], i, L),
                                  chunk_of(inputs[3], i, L), chunk_of(inputs[4], i, L), block, chunk_docs(docs, i, L),
                                  layout.chunk_start(chunks[i]));
      const BlockMaps m = block_maps(x);
      const BlockOutputs o = block_outputs(x, m);
      auto [states, leaving] = block_states(m, entering[i]);
      outputs.push_back(stretch_outputs(o, states, L));
      outputs.push_back(leaving);
      output_grads.push_back(chunk_of(dout, i, L));
      // The gradient entering the chunk from its own outputs, by the
      // transposed block maps: R_b = query_b^T dO_b + A_b^T R_(b+1).
      at::NoGradGuard no_grad;
      const at::Tensor per_block =
          at::matmul(o.query.detach().transpose(-1, -2), to_blocks(chunk_of(dout, i, L), x.count, x.block));
      at::Tensor R = per_block.select(2, x.count - 1);
      for (int64_t b = x.count - 2; b >= 0; --b)
        R = per_block.select(2, b) + at::matmul(m.transition.detach().select(2, b).transpose(-1, -2), R);
      entering_grads.push_back(R);
    }
    auto suffix = make_affine_prefix(static_cast<LinearAttentionMethod>(ctx->saved_data["method"].toInt()), layout,
                                     comm, PrefixDirection::kBackward);
    suffix->start(chunk_transitions.transpose(-1, -2), at::stack(entering_grads));
    const at::Tensor later = suffix->finish();  // gradient reaching each chunk's leaving state
    for (int64_t i = 0; i < cpr; ++i) output_grads.insert(output_grads.begin() + 2 * i + 1, later[i]);
    const auto g = torch::autograd::grad(outputs, inputs, output_grads, /*retain_graph=*/false,
                                         /*create_graph=*/false, /*allow_unused=*/true);
    variable_list result{at::Tensor()};
    for (int i = 0; i < 5; ++i) result.push_back(g[i].defined() ? g[i] : at::zeros_like(inputs[i]));
    for (int i = 0; i < 5; ++i) result.push_back(at::Tensor());  // doc_start, layout, comm, method, block
    return result;
  }
};

}  // namespace

at::Tensor gated_delta_rule(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& beta,
                            const at::Tensor& log_alpha, const GatedDeltaOptions& options) {
  return in_working_precision(q, k, v, beta, log_alpha,
                              [&](const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
                                  const at::Tensor& beta_, const at::Tensor& log_alpha_) {
                                return chunked_gated_delta_rule(q_, k_, v_, beta_, log_alpha_, options.block_size,
                                                                options.doc_start);
                              });
}

at::Tensor sequence_parallel_gated_delta_rule(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                              const at::Tensor& beta, const at::Tensor& log_alpha,
                                              const SequenceLayout& layout, const CommPtr& comm,
                                              LinearAttentionMethod method, const GatedDeltaOptions& options) {
  TORCH_CHECK(comm, "sequence_parallel_gated_delta_rule: communicator is null");
  TORCH_CHECK(options.block_size >= 1, "gated delta rule: block size must be >= 1, got ", options.block_size);
  check_document_starts(options.doc_start, q, 2, "gated delta rule");
  if (method == LinearAttentionMethod::kUlysses) {
    // Head-parallel: whole sequences of H/W heads through the single-rank rule.
    const linear_attention::UlyssesExchange exchange(layout, comm, q.size(1), "the Gated DeltaNet head count");
    const int64_t dk = q.size(3), dv = v.size(3);
    const auto dtype = q.scalar_type();
    // q, k, v in one all-to-all, beta and log alpha in another.
    const at::Tensor heads = exchange.to_heads(at::cat({q, k, v.to(dtype)}, 3));
    const at::Tensor gates = exchange.to_heads(at::stack({beta.to(dtype), log_alpha.to(dtype)}, 3));
    GatedDeltaOptions whole = options;
    whole.doc_start = exchange.gather_doc_start(options.doc_start);
    const at::Tensor out = gated_delta_rule(heads.narrow(3, 0, dk), heads.narrow(3, dk, dk), heads.narrow(3, 2 * dk, dv),
                                            gates.select(3, 0).to(beta.scalar_type()),
                                            gates.select(3, 1).to(log_alpha.scalar_type()), whole);
    return exchange.from_heads(out);
  }
  return in_working_precision(
      q, k, v, beta, log_alpha,
      [&](const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_, const at::Tensor& beta_,
          const at::Tensor& log_alpha_) {
        // Autograd functions take defined tensors only: empty = no documents.
        const at::Tensor docs = options.doc_start.defined() ? options.doc_start : at::empty({0}, at::kLong);
        return apply_in_order<SequenceParallelFunction>(q_, k_, v_, beta_, log_alpha_, docs, layout, comm,
                                                        static_cast<int64_t>(method), options.block_size)[0];
      });
}

at::Tensor gated_delta_step(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& beta,
                            const at::Tensor& log_alpha, at::Tensor& state) {
  TORCH_CHECK(q.dim() == 3 && k.sizes() == q.sizes() && v.dim() == 3 && beta.dim() == 2 && log_alpha.dim() == 2,
              "gated delta step: q, k [S, H, d_k], v [S, H, d_v], beta, log_alpha [S, H]; got ", q.sizes(), ", ",
              k.sizes(), ", ", v.sizes(), ", ", beta.sizes(), ", ", log_alpha.sizes());
  const at::Tensor S = state.defined() ? state : at::zeros({q.size(0), q.size(1), q.size(2), v.size(2)}, q.options());
  const at::Tensor alpha = log_alpha.exp().unsqueeze(-1), b = beta.unsqueeze(-1);
  // S' = alpha S + beta k (v - alpha S^T k)^T
  const at::Tensor read = at::matmul(k.unsqueeze(-2), S).squeeze(-2);  // S^T k, [S, H, d_v]
  const at::Tensor update = b * (v - alpha * read);
  state = alpha.unsqueeze(-1) * S + k.unsqueeze(-1) * update.unsqueeze(-2);
  return at::matmul(q.unsqueeze(-2), state).squeeze(-2);
}

}  // namespace loom::gated_delta
