#include "loom/parallel/softmax_attention/offload_attention.h"

#include <torch/autograd.h>

#include "loom/runtime/comm/autograd_state.h"
#include "loom/runtime/comm/comm_order.h"
#include "loom/runtime/comm/documents.h"
#include "loom/runtime/core/error.h"
#include "loom/runtime/offload/offload_protocol.h"

namespace loom::softmax_attention {

using Msg = pb::OffloadMessage;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

offload::OffloadKernels offload_kernels() {
  auto spec_of = [](const Msg& m) { return AttentionSpec{m.scale(), m.window(), m.block()}; };
  offload::OffloadKernels k;
  k.attend = [spec_of](const at::Tensor& q, int64_t q_start, const at::Tensor& doc_start,
                       const std::vector<offload::StoredChunk>& chunks, const Msg& req) {
    const AttentionSpec spec = spec_of(req);
    const int64_t min_doc_start = smallest_document_start(doc_start);
    Partial acc = empty_partial(q);
    for (const auto& c : chunks)
      if (!pair_fully_masked(q_start, q.size(2), c.start, c.k.size(2), spec, min_doc_start))
        merge_partial(acc, attend_pair(q, q_start, c.k, c.v, c.start, spec, doc_start));
    return std::make_pair(acc.out, acc.lse);
  };
  k.attend_backward = [spec_of](const at::Tensor& q, const at::Tensor& out, const at::Tensor& dout,
                                const at::Tensor& lse, int64_t q_start, const at::Tensor& doc_start,
                                std::vector<offload::StoredChunk>& chunks, const Msg& req) {
    const AttentionSpec spec = spec_of(req);
    const int64_t min_doc_start = smallest_document_start(doc_start);
    const auto acc = out.scalar_type();
    const at::Tensor delta = (dout.to(acc) * out).sum(-1);
    at::Tensor dq = at::zeros(q.sizes(), q.options().dtype(acc));
    for (auto& c : chunks) {
      if (!c.dk.defined()) {
        c.dk = at::zeros(c.k.sizes(), c.k.options().dtype(acc));
        c.dv = at::zeros(c.v.sizes(), c.v.options().dtype(acc));
      }
      if (!pair_fully_masked(q_start, q.size(2), c.start, c.k.size(2), spec, min_doc_start))
        attend_pair_backward(q, q_start, c.k, c.v, c.start, spec, lse, dout, delta, dq, c.dk, c.dv, doc_start, out);
    }
    return dq;
  };
  k.attend_newest = [spec_of](const at::Tensor& q, const at::Tensor& kc, const at::Tensor& vc, const Msg& req) {
    return attend_newest(q, kc, vc, spec_of(req));
  };
  return k;
}

at::Tensor offload_decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                    OffloadClient& client, int64_t layer, const std::vector<int64_t>& sequences,
                                    const AttentionSpec& spec) {
  const int M = client.nodes();
  if (k.size(1) % M != 0)
    throw ConfigError("offload: " + std::to_string(k.size(1)) + " key/value heads do not split over " +
                      std::to_string(M) + " memory nodes (offload.memory_ranks must divide n_kv_heads)");
  TORCH_CHECK(q.size(0) == static_cast<int64_t>(sequences.size()), "offload decode: ", q.size(0), " queries for ",
              sequences.size(), " sequences");
  Msg m;
  m.set_type(Msg::DECODE);
  m.set_call(layer);
  m.set_scale(spec.scale);
  for (int64_t s : sequences) m.add_sequences(s);
  std::vector<at::Tensor> outs;
  for (int j = 0; j < M; ++j) {
    const int64_t hq = q.size(1) / M, hk = k.size(1) / M;
    std::vector<at::Tensor> reply;
    client.request(j, m, {q.narrow(1, j * hq, hq), k.narrow(1, j * hk, hk), v.narrow(1, j * hk, hk)}, &reply);
    outs.push_back(reply[0]);
  }
  return at::cat(outs, 1);
}

namespace {

// The slices of a [B, H, n, d] shard: local chunk i, heads of memory node j.
at::Tensor piece(const at::Tensor& x, int64_t chunk, int64_t L, int node, int nodes) {
  const int64_t h = x.size(1) / nodes;
  return x.narrow(2, chunk * L, L).narrow(1, node * h, h);
}

// Inverse of piece(): pieces[chunk][node] back into [B, H, n, d] (or [B, H, n]).
at::Tensor assemble(const std::vector<std::vector<at::Tensor>>& pieces) {
  std::vector<at::Tensor> chunks;
  for (const auto& by_node : pieces) chunks.push_back(at::cat(by_node, 1));
  return at::cat(chunks, 2);
}

// A request about the chunk of this call that starts at `start`.
Msg chunk_message(Msg::Type type, int64_t call, int64_t start, double scale, int64_t block) {
  Msg m;
  m.set_type(type);
  m.set_call(call);
  m.set_start(start);
  m.set_scale(scale);
  m.set_window(0);
  m.set_block(block);
  return m;
}

// With documents, ATTEND / ATTEND_BACKWARD of local chunk i carry its
// doc_start [B, L] as the last payload (every node gets all of it).
void add_documents(Msg& m, std::vector<at::Tensor>& payloads, const at::Tensor& doc_start, int64_t chunk, int64_t L) {
  if (!doc_start.defined()) return;
  m.set_documents(true);
  payloads.push_back(doc_start.narrow(1, chunk * L, L));
}

struct OffloadFunction : public torch::autograd::Function<OffloadFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& order, const at::Tensor& q, const at::Tensor& k,
                               const at::Tensor& v, const c10::optional<at::Tensor>& documents,
                               const SequenceLayout& layout, const CommPtr& comm, OffloadClient* client, double scale,
                               int64_t block) {
    ctx->saved_data["order"] = CommOrder::claim();
    const at::Tensor doc_start = documents.value_or(at::Tensor());
    const int64_t call = client->next_call(), L = layout.chunk_len();
    const auto chunks = layout.chunks_of(comm->rank());
    const int M = client->nodes();
    auto message = [&](Msg::Type type, int64_t chunk) {
      return chunk_message(type, call, layout.chunk_start(chunks[chunk]), scale, block);
    };
    for (size_t i = 0; i < chunks.size(); ++i)
      for (int j = 0; j < M; ++j)
        client->request(j, message(Msg::STORE_KV, i), {piece(k, i, L, j, M), piece(v, i, L, j, M)});
    comm->barrier()->wait();  // the whole causal prefix is stored
    std::vector<std::vector<at::Tensor>> outs(chunks.size()), lses(chunks.size());
    for (size_t i = 0; i < chunks.size(); ++i)
      for (int j = 0; j < M; ++j) {
        std::vector<at::Tensor> reply, payloads{piece(q, i, L, j, M)};
        Msg m = message(Msg::ATTEND, i);
        add_documents(m, payloads, doc_start, i, L);
        client->request(j, m, payloads, &reply);
        outs[i].push_back(reply[0]);
        lses[i].push_back(reply[1]);
      }
    const at::Tensor out = assemble(outs), lse = assemble(lses);
    ctx->save_for_backward({q, k, v, out, lse, doc_start});
    ctx->saved_data["call"] = call;
    ctx->saved_data["client"] = reinterpret_cast<int64_t>(client);  // the job's; outlives the graph
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["block"] = block;
    save_comm(ctx, comm);
    save_layout(ctx, layout);
    ctx->mark_non_differentiable({lse});
    return {out.to(q.scalar_type()), lse, CommOrder::new_token()};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    CommOrder::backward_ran(ctx->saved_data["order"].toInt());
    const auto s = ctx->get_saved_variables();
    const at::Tensor &q = s[0], &k = s[1], &v = s[2], &out = s[3], &lse = s[4], &doc_start = s[5];
    auto* client = reinterpret_cast<OffloadClient*>(ctx->saved_data["client"].toInt());
    const CommPtr comm = saved_comm(ctx);
    const SequenceLayout layout = saved_layout(ctx, *comm);
    const at::Tensor dout = grads[0].defined() ? grads[0] : at::zeros_like(q);
    const int64_t L = layout.chunk_len();
    const auto chunks = layout.chunks_of(comm->rank());
    const int M = client->nodes();
    auto message = [&](Msg::Type type, int64_t chunk) {
      return chunk_message(type, ctx->saved_data["call"].toInt(), layout.chunk_start(chunks[chunk]),
                           ctx->saved_data["scale"].to<double>(), ctx->saved_data["block"].toInt());
    };
    std::vector<std::vector<at::Tensor>> dq(chunks.size()), dk(chunks.size()), dv(chunks.size());
    for (size_t i = 0; i < chunks.size(); ++i)
      for (int j = 0; j < M; ++j) {
        std::vector<at::Tensor> reply,
            payloads{piece(q, i, L, j, M), piece(out, i, L, j, M), piece(dout, i, L, j, M),
                     lse.narrow(2, i * L, L).narrow(1, j * (lse.size(1) / M), lse.size(1) / M)};
        Msg m = message(Msg::ATTEND_BACKWARD, i);
        add_documents(m, payloads, doc_start, i, L);
        client->request(j, m, payloads, &reply);
        dq[i].push_back(reply[0]);
      }
    comm->barrier()->wait();  // every query chunk has added into dK, dV
    for (size_t i = 0; i < chunks.size(); ++i)
      for (int j = 0; j < M; ++j) {
        std::vector<at::Tensor> reply;
        client->request(j, message(Msg::FETCH_DKV, i), {}, &reply);
        dk[i].push_back(reply[0]);
        dv[i].push_back(reply[1]);
      }
    return {at::Tensor(), assemble(dq).to(q.scalar_type()), assemble(dk).to(k.scalar_type()),
            assemble(dv).to(v.scalar_type()), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(),
            at::Tensor()};
  }
};

}  // namespace

std::pair<at::Tensor, at::Tensor> offload_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                    const SequenceLayout& layout, const CommPtr& comm,
                                                    OffloadClient& client, const AttentionSpec& spec,
                                                    const at::Tensor& doc_start) {
  TORCH_CHECK(spec.window == 0, "offload attention: sliding windows use the halo, not the memory nodes");
  const int M = client.nodes();
  if (k.size(1) % M != 0)
    throw ConfigError("offload: " + std::to_string(k.size(1)) + " key/value heads do not split over " +
                      std::to_string(M) + " memory nodes (offload.memory_ranks must divide n_kv_heads)");
  TORCH_CHECK(q.device().is_cpu(), "offload attention: the memory nodes' MPI transport takes CPU tensors, got ",
              q.device());
  check_document_starts(doc_start, q, 2, "offload attention");
  TORCH_CHECK(!doc_start.defined() || doc_start.device().is_cpu(),
              "offload attention: doc_start must be on the CPU, got ", doc_start.device());
  // An optional: libtorch 1.13 rejects undefined at::Tensor arguments of autograd functions.
  const c10::optional<at::Tensor> documents = doc_start.defined() ? c10::optional<at::Tensor>(doc_start) : c10::nullopt;
  auto res = apply_in_order<OffloadFunction>(q, k, v, documents, layout, comm, &client, spec.scale, spec.block);
  return {res[0], res[1]};
}

}  // namespace loom::softmax_attention
