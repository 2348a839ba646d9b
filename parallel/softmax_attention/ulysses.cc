#include "loom/parallel/softmax_attention/ulysses.h"

#include <torch/autograd.h>

#include <atomic>
#include <numeric>
#include <string>
#include <vector>

#include "loom/parallel/softmax_attention/ring_pass.h"
#include "loom/runtime/comm/autograd_state.h"
#include "loom/runtime/comm/comm_order.h"
#include "loom/runtime/comm/differentiable_collectives.h"
#include "loom/runtime/comm/process_mesh.h"
#include "loom/runtime/comm/recompute.h"
#include "loom/runtime/core/error.h"
#include "loom/runtime/core/logging.h"

namespace loom::softmax_attention {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

int64_t ulysses_kv_replication(int64_t kv_heads, int64_t degree) {
  TORCH_CHECK(kv_heads >= 1 && degree >= 1, "ulysses: kv heads ", kv_heads, " and degree ", degree, " must be >= 1");
  return degree / std::gcd(degree, kv_heads);
}

void check_ulysses_heads(int64_t q_heads, int64_t kv_heads, int64_t degree) {
  if (q_heads % degree != 0)
    throw ConfigError("Ulysses all-to-all over " + std::to_string(degree) + " ranks: model.n_heads = " +
                      std::to_string(q_heads) + " query heads do not divide among them (n_heads must be a multiple of " +
                      std::to_string(degree) + "; for USP set parallel.ulysses_degree to a divisor of n_heads)");
  if (kv_heads < 1 || q_heads % kv_heads != 0)
    throw ConfigError("Ulysses: " + std::to_string(q_heads) + " query heads are not a multiple of " +
                      std::to_string(kv_heads) + " key/value heads");
}

namespace {

using OptionalTensor = c10::optional<at::Tensor>;
OptionalTensor optional_tensor(const at::Tensor& t) { return t.defined() ? OptionalTensor(t) : c10::nullopt; }

// Global starts of the chunks that all-to-all group `group` holds after the
// exchange, in the order they arrive: rank group*U's chunks, then the next
// rank's, each in its local order.
std::vector<int64_t> group_starts(const SequenceLayout& layout, int group, int degree) {
  std::vector<int64_t> starts;
  for (int u = 0; u < degree; ++u)
    for (int64_t c : layout.chunks_of(group * degree + u)) starts.push_back(layout.chunk_start(c));
  return starts;
}

// The query chunks of a group: starts and, with documents, each chunk's
// doc_start [B, L] and its smallest value (pairs ending before it are skipped).
struct GroupChunks {
  std::vector<int64_t> starts;
  std::vector<at::Tensor> doc_start;
  std::vector<int64_t> min_doc_start;
};

GroupChunks group_chunks(const SequenceLayout& layout, int group, int degree, const at::Tensor& doc_start) {
  GroupChunks c;
  c.starts = group_starts(layout, group, degree);
  const int64_t chunks = static_cast<int64_t>(c.starts.size()), L = layout.chunk_len();
  c.doc_start.resize(chunks);
  c.min_doc_start.assign(chunks, 0);
  if (!doc_start.defined()) return c;
  const at::Tensor mins = doc_start.reshape({doc_start.size(0), chunks, L}).amin({0, 2}).cpu().contiguous();
  for (int64_t i = 0; i < chunks; ++i) {
    c.doc_start[i] = doc_start.narrow(1, i * L, L);
    c.min_doc_start[i] = mins.data_ptr<int64_t>()[i];
  }
  return c;
}

void forward_over(const at::Tensor& q, const GroupChunks& qc, const at::Tensor& k, const at::Tensor& v,
                  const std::vector<int64_t>& kv_starts, int64_t L, const AttentionSpec& spec,
                  std::vector<Partial>& partials) {
  for (size_t i = 0; i < qc.starts.size(); ++i)
    for (size_t j = 0; j < kv_starts.size(); ++j) {
      if (pair_fully_masked(qc.starts[i], L, kv_starts[j], L, spec, qc.min_doc_start[i])) continue;
      merge_partial(partials[i], attend_pair(q.narrow(2, i * L, L), qc.starts[i], k.narrow(2, j * L, L),
                                             v.narrow(2, j * L, L), kv_starts[j], spec, qc.doc_start[i]));
    }
}

void backward_over(const at::Tensor& q, const GroupChunks& qc, const at::Tensor& k, const at::Tensor& v,
                   const std::vector<int64_t>& kv_starts, int64_t L, const AttentionSpec& spec, const at::Tensor& out,
                   const at::Tensor& lse, const at::Tensor& dout, const at::Tensor& delta, std::vector<at::Tensor>& dq,
                   at::Tensor dk, at::Tensor dv) {
  for (size_t i = 0; i < qc.starts.size(); ++i)
    for (size_t j = 0; j < kv_starts.size(); ++j) {
      if (pair_fully_masked(qc.starts[i], L, kv_starts[j], L, spec, qc.min_doc_start[i])) continue;
      at::Tensor dk_j = dk.narrow(2, j * L, L), dv_j = dv.narrow(2, j * L, L);
      attend_pair_backward(q.narrow(2, i * L, L), qc.starts[i], k.narrow(2, j * L, L), v.narrow(2, j * L, L),
                           kv_starts[j], spec, lse.narrow(2, i * L, L), dout.narrow(2, i * L, L),
                           delta.narrow(2, i * L, L), dq[i], dk_j, dv_j, qc.doc_start[i], out.narrow(2, i * L, L));
    }
}

// Attention of a group's whole head-sharded sequence: local (no ring, R = 1)
// or with the K,V of the other R-1 groups travelling around `ring`, as ring
// attention does with single ranks' chunks.
struct GroupAttentionFunction : public torch::autograd::Function<GroupAttentionFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& order, const at::Tensor& q, const at::Tensor& k,
                               const at::Tensor& v, const OptionalTensor& documents, const SequenceLayout& layout,
                               const CommPtr& ring, int64_t degree, double scale, int64_t window, int64_t block) {
    ctx->saved_data["order"] = CommOrder::claim();
    const at::Tensor doc_start = documents.value_or(at::Tensor());
    const AttentionSpec spec{scale, window, block};
    const int g = ring ? ring->rank() : 0, U = static_cast<int>(degree);
    const int64_t L = layout.chunk_len();
    const GroupChunks mine = group_chunks(layout, g, U, doc_start);
    std::vector<Partial> partials;
    for (size_t i = 0; i < mine.starts.size(); ++i) partials.push_back(empty_partial(q.narrow(2, i * L, L)));
    ring_forward(ring, at::stack({k, v}).contiguous(), [&](int src, const at::Tensor& kv) {
      forward_over(q, mine, kv[0], kv[1], group_starts(layout, src, U), L, spec, partials);
    });
    std::vector<at::Tensor> outs, lses;
    for (auto& p : partials) {
      outs.push_back(p.out);
      lses.push_back(p.lse);
    }
    const at::Tensor out = at::cat(outs, 2), lse = at::cat(lses, 2);
    ctx->save_for_backward({q, k, v, out, lse, doc_start});
    ctx->saved_data["ring"] = ring ? ring->id() : int64_t(-1);  // -1: no ring (plain Ulysses)
    ctx->saved_data["degree"] = degree;
    save_layout(ctx, layout);
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["window"] = window;
    ctx->saved_data["block"] = block;
    ctx->mark_non_differentiable({lse});
    return {out.to(q.scalar_type()), lse, CommOrder::new_token()};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    CommOrder::backward_ran(ctx->saved_data["order"].toInt());
    const auto s = ctx->get_saved_variables();
    const at::Tensor &q = s[0], &k = s[1], &v = s[2], &out = s[3], &lse = s[4], &doc_start = s[5];
    const int64_t ring_id = ctx->saved_data["ring"].toInt();
    const CommPtr ring = ring_id >= 0 ? Communicator::by_id(ring_id) : nullptr;
    const SequenceLayout layout = saved_layout(ctx);
    const AttentionSpec spec{ctx->saved_data["scale"].toDouble(), ctx->saved_data["window"].toInt(),
                             ctx->saved_data["block"].toInt()};
    const int U = static_cast<int>(ctx->saved_data["degree"].toInt());
    const int g = ring ? ring->rank() : 0;
    const int64_t L = layout.chunk_len();
    const GroupChunks mine = group_chunks(layout, g, U, doc_start);
    const at::Tensor dout = grads[0].defined() ? grads[0] : at::zeros_like(q);
    const auto acc = out.scalar_type();
    const at::Tensor delta = (dout.to(acc) * out).sum(-1);
    std::vector<at::Tensor> dq;
    for (size_t i = 0; i < mine.starts.size(); ++i)
      dq.push_back(at::zeros({q.size(0), q.size(1), L, q.size(3)}, q.options().dtype(acc)));
    const at::Tensor kv = at::stack({k, v}).contiguous();
    const at::Tensor dkv = ring_backward(ring, kv, at::zeros(kv.sizes(), kv.options().dtype(acc)),
                                         [&](int src, const at::Tensor& block, at::Tensor& dblock) {
                                           backward_over(q, mine, block[0], block[1], group_starts(layout, src, U), L,
                                                         spec, out, lse, dout, delta, dq, dblock[0], dblock[1]);
                                         });
    return {at::Tensor(), at::cat(dq, 2).to(q.scalar_type()), dkv[0].to(k.scalar_type()), dkv[1].to(v.scalar_type()),
            at::Tensor(),  at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

}  // namespace

std::pair<at::Tensor, at::Tensor> ulysses_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                    const SequenceLayout& layout, const CommPtr& comm,
                                                    const AttentionSpec& spec, const at::Tensor& doc_start,
                                                    int degree) {
  const int W = comm->size();
  const int U = degree <= 0 ? W : degree;
  if (W % U != 0)
    throw ConfigError("parallel.ulysses_degree = " + std::to_string(U) + ": must divide the sequence-parallel size " +
                      std::to_string(W) + " (sp = ulysses_degree x ring degree)");
  const int64_t B = q.size(0), Hq = q.size(1), Hkv = k.size(1), n = q.size(2), d = q.size(3);
  check_ulysses_heads(Hq, Hkv, U);
  const int64_t f = ulysses_kv_replication(Hkv, U);
  if (f > 1) {
    static std::atomic<bool> said{false};
    if (!said.exchange(true))
      LOOM_LOG(kInfo) << "Ulysses over " << U << " ranks: " << Hkv << " key/value heads do not divide among them; "
                      << "each is repeated " << f << " times before the all-to-all (" << Hkv * f
                      << " heads exchanged)";
  }
  const at::Tensor k_rep = repeat_kv_heads(k, f), v_rep = repeat_kv_heads(v, f);
  const int64_t Hk = Hkv * f;
  // The all-to-all group, and the ring across groups (none for plain Ulysses).
  CommPtr group = comm, ring;
  if (U != W) {
    const UlyssesGrid grid = ulysses_grid(comm, U);
    group = grid.ulysses;
    ring = grid.ring;
  }
  // q, k, v leave in one all-to-all: block u of the head dimension holds rank
  // u's q heads, then its k heads, then its v heads.
  const at::Tensor qkv = at::cat({q.reshape({B, U, Hq / U, n, d}), k_rep.reshape({B, U, Hk / U, n, d}),
                                  v_rep.reshape({B, U, Hk / U, n, d})},
                                 2)
                             .reshape({B, Hq + 2 * Hk, n, d});
  const at::Tensor heads = all_to_all(qkv, group, /*scatter_dim=*/1, /*gather_dim=*/2);
  const at::Tensor qh = heads.narrow(1, 0, Hq / U), kh = heads.narrow(1, Hq / U, Hk / U),
                   vh = heads.narrow(1, Hq / U + Hk / U, Hk / U);
  // A selective recompute's rerun replays the gathered starts (recompute.h) and sends nothing.
  at::Tensor group_doc_start;
  if (doc_start.defined()) {
    if (CommTape::replaying()) {
      group_doc_start = CommTape::replay("ulysses attention: document starts")[0];
    } else {
      group_doc_start = all_gather_along(doc_start, *group, 1);
      CommTape::record("ulysses attention: document starts", {group_doc_start});
    }
  }
  auto res = apply_in_order<GroupAttentionFunction>(qh, kh, vh, optional_tensor(group_doc_start), layout, ring,
                                                    static_cast<int64_t>(U), spec.scale, spec.window, spec.block);
  const at::Tensor out = all_to_all(res[0], group, /*scatter_dim=*/2, /*gather_dim=*/1);
  const at::Tensor lse = all_to_all_along(res[1], *group, /*scatter_dim=*/2, /*gather_dim=*/1);
  return {out, lse};
}

}  // namespace loom::softmax_attention
