#include "loom/models/titans.h"

#include <torch/autograd.h>

#include <cmath>
#include <limits>

#include "loom/parallel/short_conv.h"
#include "loom/runtime/comm/comm_order.h"
#include "loom/runtime/comm/differentiable_collectives.h"
#include "loom/runtime/core/error.h"

namespace loom::models {
namespace {

at::Tensor l2_normalise(const at::Tensor& x) { return x / (x.pow(2).sum(-1, true) + 1e-6).sqrt(); }

at::Tensor silu_grad(const at::Tensor& z) {
  const at::Tensor s = at::sigmoid(z);
  return s * (1 + z * (1 - s));
}

// Per-chunk factors of the closed-form recurrences, from the gates of b tokens
// (all [B, H, b] in, log-space cumulative products).
struct ChunkFactors {
  at::Tensor momentum_end;   // P_b = prod eta                       [B, H, 1, 1]
  at::Tensor keep_end;       // A = prod (1 - alpha)                 [B, H, 1, 1]
  at::Tensor momentum_into;  // c_S = sum_t a_t P_t                  [B, H, 1, 1]
  at::Tensor weight_e;       // theta_s prod_{r>s} eta_r             [B, H, b]
  at::Tensor weight_h;       // theta_s sum_{t>=s} a_t prod_{s<r<=t} eta_r
};

ChunkFactors chunk_factors(const at::Tensor& theta, const at::Tensor& log_eta, const at::Tensor& log_beta) {
  const int64_t b = theta.size(-1);
  const at::Tensor le = log_eta.cumsum(-1), lb = log_beta.cumsum(-1);
  const at::Tensor le_last = le.narrow(-1, b - 1, 1), lb_last = lb.narrow(-1, b - 1, 1);
  // D[t, s] = prod_{s<r<=t} eta_r for t >= s, else 0.
  const at::Tensor diff = le.unsqueeze(-1) - le.unsqueeze(-2);
  const at::Tensor lower = at::ones({b, b}, theta.options().dtype(at::kBool)).tril();
  const at::Tensor D = at::exp(diff.masked_fill(lower.logical_not(), -std::numeric_limits<double>::infinity()));
  const at::Tensor a = at::exp(lb_last - lb);  // prod_{r>t} (1 - alpha_r)
  const at::Tensor P = at::exp(le);
  ChunkFactors f;
  f.momentum_end = at::exp(le_last).unsqueeze(-1);
  f.keep_end = at::exp(lb_last).unsqueeze(-1);
  f.momentum_into = (a * P).sum(-1, true).unsqueeze(-1);
  f.weight_e = theta * at::exp(le_last - le);
  f.weight_h = theta * at::matmul(a.unsqueeze(-2), D).squeeze(-2);
  return f;
}

// Composes each layout chunk's memory-chunk maps: (T1, B1) then (T2, B2) =
// (T1 T2, B1 T2 + B2), over nc consecutive memory chunks, for the cpr layout
// chunks of this rank: T [B, H, cpr*nc, 2d, 2d], Bm [B, H, cpr*nc, d, 2d] ->
// [cpr, B, H, 3d, 2d] ([T | B] stacked on rows). A checkpoint: forward keeps
// only T and Bm (which the layer keeps anyway) and backward reruns one layout
// chunk's composition at a time with autograd; the plain loop kept every
// partial product (2d x 2d and d x 2d per memory chunk and head), a fifth of
// the M layer's memory at long N. Local: no collective inside.
struct ComposeAffineChunks : public torch::autograd::Function<ComposeAffineChunks> {
  static at::Tensor compose(const std::vector<at::Tensor>& Ts, const std::vector<at::Tensor>& Bs, int64_t first,
                            int64_t nc) {
    // The first map as is (the identity and zero it would compose with change nothing).
    at::Tensor Tc = Ts[static_cast<size_t>(first)], Bc = Bs[static_cast<size_t>(first)];
    for (int64_t j = 1; j < nc; ++j) {
      const at::Tensor &Tj = Ts[static_cast<size_t>(first + j)], &Bj = Bs[static_cast<size_t>(first + j)];
      Bc = at::matmul(Bc, Tj) + Bj;
      Tc = at::matmul(Tc, Tj);
    }
    return at::cat({Tc, Bc}, -2);
  }

  static at::Tensor forward(torch::autograd::AutogradContext* ctx, const at::Tensor& T, const at::Tensor& Bm,
                            int64_t cpr, int64_t nc) {
    ctx->save_for_backward({T, Bm});
    ctx->saved_data["cpr"] = cpr;
    ctx->saved_data["nc"] = nc;
    const std::vector<at::Tensor> Ts = T.unbind(2), Bs = Bm.unbind(2);
    std::vector<at::Tensor> composed;
    for (int64_t i = 0; i < cpr; ++i) composed.push_back(compose(Ts, Bs, i * nc, nc));
    return at::stack(composed);
  }

  static torch::autograd::variable_list backward(torch::autograd::AutogradContext* ctx,
                                                 torch::autograd::variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const int64_t cpr = ctx->saved_data["cpr"].toInt(), nc = ctx->saved_data["nc"].toInt();
    at::Tensor dT = at::zeros_like(saved[0]), dB = at::zeros_like(saved[1]);
    if (grads[0].defined()) {
      at::AutoGradMode enable_grad(true);
      for (int64_t i = 0; i < cpr; ++i) {
        const at::Tensor T = saved[0].narrow(2, i * nc, nc).detach().requires_grad_(true);
        const at::Tensor Bm = saved[1].narrow(2, i * nc, nc).detach().requires_grad_(true);
        const at::Tensor out = compose(T.unbind(2), Bm.unbind(2), 0, nc);
        const auto g = torch::autograd::grad({out}, {T, Bm}, {grads[0][i]}, /*retain_graph=*/false,
                                             /*create_graph=*/false, /*allow_unused=*/true);
        if (g[0].defined()) dT.narrow(2, i * nc, nc).copy_(g[0]);
        if (g[1].defined()) dB.narrow(2, i * nc, nc).copy_(g[1]);
      }
    }
    return {dT, dB, at::Tensor(), at::Tensor()};
  }
};

// theta = max_lr / chunk * sigmoid, log eta = logsigmoid, log(1 - alpha) = logsigmoid(-.)
// theta is divided by the chunk length: the chunk's tokens all take their
// gradient at the same starting weights, so their summed step must not grow
// with b (correlated keys would otherwise overshoot and the memory diverge).
void split_gates(const at::Tensor& logits, int64_t heads, double max_lr, int64_t chunk, at::Tensor& theta,
                 at::Tensor& log_eta, at::Tensor& log_beta) {
  // logits [B, b, 3H] -> each [B, H, b]
  theta = at::sigmoid(logits.narrow(-1, 0, heads)).transpose(1, 2) * (max_lr / static_cast<double>(chunk));
  log_eta = at::log_sigmoid(logits.narrow(-1, heads, heads)).transpose(1, 2);
  log_beta = at::log_sigmoid(-logits.narrow(-1, 2 * heads, heads)).transpose(1, 2);
}

}  // namespace

void check_memory_chunking(const SequenceLayout& layout, int64_t memory_chunk) {
  if (layout.chunk_len() % memory_chunk != 0)
    throw ConfigError("Titans memory: the " + layout.describe() + " gives chunks of " +
                      std::to_string(layout.chunk_len()) + " tokens, not a multiple of model.memory_chunk = " +
                      std::to_string(memory_chunk) + "; use a sequence length that is a multiple of " +
                      std::to_string(memory_chunk * layout.num_chunks()));
}

at::Tensor memory_chunk_resets(const SequenceContext& ctx, int64_t memory_chunk, const at::TensorOptions& options) {
  if (!ctx.doc_start.defined()) return at::Tensor();
  const SequenceLayout& layout = ctx.layout;
  const at::Tensor& docs = ctx.doc_start;  // [B, n]
  const at::Tensor pos = layout.global_positions(ctx.rank()).to(docs.device());
  // Real tokens that start a document (padding, at positions >= N, is exempt).
  const at::Tensor starts = docs.eq(pos.unsqueeze(0)).logical_and(pos.lt(layout.global_len()).unsqueeze(0));
  const at::Tensor misaligned = starts.logical_and(pos.remainder(memory_chunk).ne(0).unsqueeze(0));
  if (misaligned.any().item<bool>()) {
    const at::Tensor where = misaligned.nonzero()[0];
    const int64_t row = where[0].item<int64_t>(), position = pos[where[1]].item<int64_t>();
    throw ConfigError("Titans memory with packed documents: a document starts at position " + std::to_string(position) +
                      " of row " + std::to_string(row) + ", not a multiple of model.memory_chunk = " +
                      std::to_string(memory_chunk) +
                      " (memory chunks never straddle documents: pad documents to multiples of it)");
  }
  // The first token of each memory chunk.
  const int64_t n = docs.size(1);
  return starts.narrow(1, 0, n).reshape({docs.size(0), n / memory_chunk, memory_chunk}).select(2, 0).to(options);
}

// ---- NeuralMemory ----

NeuralMemoryImpl::NeuralMemoryImpl(const pb::ModelConfig& c, bool own_projections)
    : model_dim_(c.d_model()),
      heads_(c.n_heads()),
      dim_(c.d_model() / c.n_heads()),
      hidden_(c.memory_expansion() * (c.d_model() / c.n_heads())),
      depth_(c.memory_depth()),
      chunk_(c.memory_chunk()),
      max_lr_(c.memory_max_lr()) {
  const int64_t D = model_dim_, K = c.conv_kernel();
  if (own_projections) {
    q_ = register_module("q", make_projection(D, D));
    k_ = register_module("k", make_projection(D, D));
    v_ = register_module("v", make_projection(D, D));
    o_ = register_module("o", make_projection(D, D));
    conv_q_ = register_parameter("conv_q", at::randn({D, K}, parameter_options()) / std::sqrt(double(K)));
    conv_k_ = register_parameter("conv_k", at::randn({D, K}, parameter_options()) / std::sqrt(double(K)));
    conv_v_ = register_parameter("conv_v", at::randn({D, K}, parameter_options()) / std::sqrt(double(K)));
  }
  gates_ = register_module("gates", Projection(D, 3 * heads_, /*bias=*/true));
  {
    torch::NoGradGuard no_grad;
    // Start with a moderate learning rate, strong momentum and little forgetting.
    gates_->bias.narrow(0, 0, heads_).fill_(0.0);
    gates_->bias.narrow(0, heads_, heads_).fill_(2.0);
    gates_->bias.narrow(0, 2 * heads_, heads_).fill_(-4.0);
  }
  int64_t in = dim_;
  for (int64_t l = 0; l < depth_; ++l) {
    const int64_t out = l + 1 == depth_ ? dim_ : hidden_;
    shapes_.emplace_back(out, in);
    in = out;
  }
  std::vector<at::Tensor> init;
  for (auto [out, inner] : shapes_) init.push_back((at::randn({heads_, out, inner}, parameter_options()) / std::sqrt(double(inner))).flatten(1));
  init_ = register_parameter("initial_weights", at::cat(init, 1));
  chain_step_ = std::make_shared<ChainStep>();
  chain_step_->output_features = model_dim_;
  // Deep memory across ranks: inputs [B, L, 3D + 3H (+ 1)] = q | k | v | gate
  // logits (| 1 at the first token of a memory chunk that starts a document).
  chain_step_->step = [this](const at::Tensor& inputs, const at::Tensor& state) {
    const int64_t D = model_dim_, L = inputs.size(1);
    const bool documents = inputs.size(-1) == 3 * D + 3 * heads_ + 1;
    std::vector<at::Tensor> w, s;
    unpack_state(state, w, s);
    const at::Tensor q = split_heads(inputs.narrow(-1, 0, D), heads_);
    const at::Tensor k = split_heads(inputs.narrow(-1, D, D), heads_);
    const at::Tensor v = split_heads(inputs.narrow(-1, 2 * D, D), heads_);
    const at::Tensor g = inputs.narrow(-1, 3 * D, 3 * heads_);
    // split, not narrow per chunk: narrow's backward writes a zero tensor of
    // the whole length for every chunk (O(L^2 / chunk) in backward).
    const auto qs = q.split(chunk_, 2), ks = k.split(chunk_, 2), vs = v.split(chunk_, 2), gs = g.split(chunk_, 1);
    // The reset column is a constant: detached, so its per-chunk select has no backward.
    const at::Tensor reset_column = documents ? inputs.select(-1, inputs.size(-1) - 1).detach() : at::Tensor();
    std::vector<at::Tensor> outs;
    for (int64_t c = 0; c < L / chunk_; ++c) {
      if (documents) reset_where(reset_column.select(1, c * chunk_), w, s);
      outs.push_back(read(w, qs[c]));
      update(w, s, ks[c], vs[c], gs[c]);
    }
    return std::make_pair(merge_heads(at::cat(outs, 2)), pack_state(w, s));
  };
}

std::vector<at::Tensor> NeuralMemoryImpl::initial_weights() const {
  std::vector<at::Tensor> w;
  int64_t offset = 0;
  for (auto [out, in] : shapes_) {
    w.push_back(init_.narrow(1, offset, out * in).reshape({1, heads_, out, in}));
    offset += out * in;
  }
  return w;
}

at::Tensor NeuralMemoryImpl::read(const std::vector<at::Tensor>& weights, const at::Tensor& q) const {
  at::Tensor h = q;
  for (size_t l = 0; l < weights.size(); ++l) {
    h = at::matmul(h, weights[l].transpose(-1, -2));
    if (l + 1 < weights.size()) h = at::silu(h);
  }
  return h;
}

void NeuralMemoryImpl::update(std::vector<at::Tensor>& weights, std::vector<at::Tensor>& momentum,
                              const at::Tensor& k, const at::Tensor& v, const at::Tensor& gate_logits) const {
  at::Tensor theta, log_eta, log_beta;
  split_gates(gate_logits, heads_, max_lr_, k.size(2), theta, log_eta, log_beta);
  const ChunkFactors f = chunk_factors(theta, log_eta, log_beta);
  // Forward of the memory MLP at the chunk's starting weights, keeping what the
  // hand-written backward needs.
  std::vector<at::Tensor> acts{k}, pre;
  at::Tensor h = k;
  for (size_t l = 0; l < weights.size(); ++l) {
    h = at::matmul(h, weights[l].transpose(-1, -2));
    if (l + 1 < weights.size()) {
      pre.push_back(h);
      h = at::silu(h);
      acts.push_back(h);
    }
  }
  // d l_t / d out = 2 (M(k_t) - v_t); weighted sums over the chunk's tokens.
  at::Tensor delta = 2 * (h - v);
  std::vector<at::Tensor> grad_e(weights.size()), grad_h(weights.size());
  for (size_t l = weights.size(); l-- > 0;) {
    grad_e[l] = at::matmul((delta * f.weight_e.unsqueeze(-1)).transpose(-1, -2), acts[l]);
    grad_h[l] = at::matmul((delta * f.weight_h.unsqueeze(-1)).transpose(-1, -2), acts[l]);
    if (l > 0) delta = at::matmul(delta, weights[l]) * silu_grad(pre[l - 1]);
  }
  for (size_t l = 0; l < weights.size(); ++l) {
    const at::Tensor s_old = momentum[l].defined() ? momentum[l] : at::zeros_like(grad_e[l]);
    const at::Tensor w_new = weights[l] * f.keep_end + s_old * f.momentum_into - grad_h[l];
    momentum[l] = s_old * f.momentum_end - grad_e[l];
    weights[l] = w_new;
  }
}

int64_t NeuralMemoryImpl::state_numel() const { return 2 * init_.numel(); }

at::Tensor NeuralMemoryImpl::pack_state(const std::vector<at::Tensor>& w, const std::vector<at::Tensor>& s) const {
  std::vector<at::Tensor> parts;
  const int64_t B = w[0].size(0);
  for (const auto& t : w) parts.push_back(t.expand({B, heads_, t.size(2), t.size(3)}).reshape({B, -1}));
  for (size_t l = 0; l < s.size(); ++l)
    parts.push_back(s[l].defined() ? s[l].expand({B, heads_, w[l].size(2), w[l].size(3)}).reshape({B, -1})
                                   : at::zeros({B, w[l].numel() / w[l].size(0)}, w[l].options()));
  return at::cat(parts, 1);
}

void NeuralMemoryImpl::unpack_state(const at::Tensor& flat, std::vector<at::Tensor>& w,
                                    std::vector<at::Tensor>& s) const {
  const int64_t B = flat.size(0);
  int64_t offset = 0;
  w.clear();
  s.clear();
  for (auto [out, in] : shapes_) {
    w.push_back(flat.narrow(1, offset, heads_ * out * in).reshape({B, heads_, out, in}));
    offset += heads_ * out * in;
  }
  for (auto [out, in] : shapes_) {
    s.push_back(flat.narrow(1, offset, heads_ * out * in).reshape({B, heads_, out, in}));
    offset += heads_ * out * in;
  }
}

void NeuralMemoryImpl::reset_where(const at::Tensor& reset, std::vector<at::Tensor>& weights,
                                   std::vector<at::Tensor>& momentum) const {
  const at::Tensor r = reset.to(at::kBool).view({-1, 1, 1, 1});  // [B] -> against [B, H, out, in]
  const auto init = initial_weights();
  for (size_t l = 0; l < weights.size(); ++l) {
    weights[l] = at::where(r, init[l].expand_as(weights[l]), weights[l]);
    momentum[l] = at::where(r, at::zeros_like(momentum[l]), momentum[l]);
  }
}

// The chain's starting state in pack_state's layout (layer-major: every
// head's layer 0, then layer 1, ...), which init_ ([H, layers...]) is not
// once the memory is deeper than one matrix.
at::Tensor NeuralMemoryImpl::initial_state_flat() const {
  const auto w = initial_weights();
  return pack_state(w, std::vector<at::Tensor>(w.size())).reshape({-1});
}

at::Tensor NeuralMemoryImpl::project(const at::Tensor& x, Projection& proj, const at::Tensor& conv_weight,
                                     const SequenceContext& ctx, bool normalise) {
  at::Tensor y = at::silu(causal_depthwise_conv(proj(x), conv_weight, at::Tensor(), ctx.layout, ctx.comm, ctx.doc_start));
  y = split_heads(y, heads_);
  return normalise ? l2_normalise(y) : y;
}

at::Tensor NeuralMemoryImpl::forward(const at::Tensor& x, const SequenceContext& ctx) {
  TORCH_CHECK(q_, "NeuralMemory built without its own projections (MAC) has no forward(); use read/update");
  check_memory_chunking(ctx.layout, chunk_);
  const at::Tensor q = project(x, q_, conv_q_, ctx, true);
  const at::Tensor k = project(x, k_, conv_k_, ctx, true);
  const at::Tensor v = project(x, v_, conv_v_, ctx, false);
  const at::Tensor gates = gates_(x);
  const at::Tensor y = depth_ == 1 && !force_chain_ ? forward_affine(q, k, v, gates, ctx) : forward_chain(q, k, v, gates, ctx);
  return o_(y);
}

at::Tensor NeuralMemoryImpl::forward_chain(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                           const at::Tensor& gates, const SequenceContext& ctx) {
  std::vector<at::Tensor> columns{merge_heads(q), merge_heads(k), merge_heads(v), gates};
  const at::Tensor resets = memory_chunk_resets(ctx, chunk_, gates.options());  // [B, n / b]
  if (resets.defined()) {  // one column: 1 at the first token of a memory chunk that starts a document
    at::Tensor column = at::zeros({gates.size(0), gates.size(1) / chunk_, chunk_, 1}, gates.options());
    column.select(2, 0).copy_(resets.unsqueeze(-1));
    columns.push_back(column.view({gates.size(0), -1, 1}));
  }
  const at::Tensor inputs = at::cat(columns, -1);
  const std::vector<at::Tensor> params{init_};
  return run_state_chain(chain_step_, inputs, initial_state_flat(), params, ctx.layout, ctx.comm);
}

// Depth 1: X = [W | S] ([B, H, d, 2d]) goes through each memory chunk as X T + B.
at::Tensor NeuralMemoryImpl::forward_affine(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                            const at::Tensor& gates, const SequenceContext& ctx) {
  const SequenceLayout& layout = ctx.layout;
  const int64_t B = q.size(0), H = heads_, d = dim_, L = layout.chunk_len(), b = chunk_, nc = L / b;
  const int64_t cpr = layout.chunks_per_rank();
  const auto opts = q.options();
  const at::Tensor eye = at::eye(d, opts);
  // Per memory chunk (all of them at once): [B, H, cpr*nc, b, d].
  const int64_t m = cpr * nc;
  const at::Tensor K = k.reshape({B, H, m, b, d}), V = v.reshape({B, H, m, b, d});
  at::Tensor theta, log_eta, log_beta;
  split_gates(gates, H, max_lr_, b, theta, log_eta, log_beta);  // [B, H, n]
  const ChunkFactors f = chunk_factors(theta.reshape({B, H, m, b}), log_eta.reshape({B, H, m, b}),
                                       log_beta.reshape({B, H, m, b}));
  const at::Tensor KhK = at::matmul((K * f.weight_h.unsqueeze(-1)).transpose(-1, -2), K);  // [B,H,m,d,d]
  const at::Tensor KeK = at::matmul((K * f.weight_e.unsqueeze(-1)).transpose(-1, -2), K);
  const at::Tensor VhK = at::matmul((V * f.weight_h.unsqueeze(-1)).transpose(-1, -2), K);
  const at::Tensor VeK = at::matmul((V * f.weight_e.unsqueeze(-1)).transpose(-1, -2), K);
  const at::Tensor T_top = at::cat({f.keep_end * eye - 2 * KhK, -2 * KeK}, -1);
  const at::Tensor T_bottom = at::cat({f.momentum_into * eye.expand_as(KhK), f.momentum_end * eye.expand_as(KhK)}, -1);
  at::Tensor T = at::cat({T_top, T_bottom}, -2);          // [B, H, m, 2d, 2d]
  at::Tensor Bm = at::cat({2 * VhK, 2 * VeK}, -1);        // [B, H, m, d, 2d]
  // X0 = [W_init | 0]: the state a document starts from.
  const at::Tensor X0 = at::cat({initial_weights()[0].expand({B, H, d, d}), at::zeros({B, H, d, d}, opts)}, -1);
  // Documents: a memory chunk that starts one forgets what entered it, so its
  // map becomes X -> X0 T + B (T' = 0, B' = X0 T + B): still affine, and the
  // composition and the AllGather below are unchanged.
  // Only the memory chunks where some row resets take X0 T (index_select): the
  // product over all m chunks kept a second full copy of T (and X0 broadcast
  // to every chunk) alive for backward, a third of the layer's memory at long N.
  const at::Tensor resets = memory_chunk_resets(ctx, b, opts);  // [B, m] or undefined
  at::Tensor reset_of;                                          // [B, 1, m, 1, 1]
  std::vector<char> chunk_resets(static_cast<size_t>(m), 0);    // some row resets at memory chunk c
  if (resets.defined()) {
    reset_of = resets.view({B, 1, m, 1, 1});
    const at::Tensor any = resets.ne(0).any(0).to(at::kCPU).contiguous();
    for (int64_t c = 0; c < m; ++c) chunk_resets[static_cast<size_t>(c)] = any.data_ptr<bool>()[c];
    const at::Tensor idx = any.nonzero().view(-1).to(T.device());
    if (idx.numel() > 0) {
      const at::Tensor reset_sel = reset_of.index_select(2, idx);
      Bm = Bm.index_add(2, idx, reset_sel * at::matmul(X0.unsqueeze(2), T.index_select(2, idx)));
      T = T * (1 - reset_of);
    }
  }

  // Compose each layout chunk's memory chunks: (T1, B1) then (T2, B2) = (T1 T2, B1 T2 + B2).
  // Per memory chunk views by unbind: select(2, j) inside the loops would give
  // every step a backward that writes a zero tensor of all m chunks (O(m^2)).
  const std::vector<at::Tensor> Ts = T.unbind(2), Bs = Bm.unbind(2);
  const at::Tensor composed = ComposeAffineChunks::apply(T, Bm, cpr, nc);  // [cpr, B, H, 3d, 2d]
  // One differentiable AllGather of every rank's (T, B): [W * cpr, B, H, 3d, 2d].
  const at::Tensor all = all_gather(composed, ctx.comm, 0);
  std::vector<at::Tensor> by_chunk(layout.num_chunks());
  for (int r = 0; r < layout.world_size(); ++r) {
    const auto owned = layout.chunks_of(r);
    for (size_t i = 0; i < owned.size(); ++i) by_chunk[owned[i]] = all[r * cpr + static_cast<int64_t>(i)];
  }
  // State entering each of my chunks, from X0.
  const auto mine = layout.chunks_of(ctx.rank());
  at::Tensor X = X0;
  std::vector<at::Tensor> entering(cpr);
  for (int64_t c = 0, found = 0; c < layout.num_chunks() && found < cpr; ++c) {
    if (layout.owner_of(c) == ctx.rank()) {
      entering[layout.local_index_of(c)] = X;
      ++found;
    }
    X = at::matmul(X, by_chunk[c].narrow(-2, 0, 2 * d)) + by_chunk[c].narrow(-2, 2 * d, d);
  }
  // Inside my chunks: read with W_c, then X <- X T + B.
  const std::vector<at::Tensor> Qs = q.reshape({B, H, m, b, d}).unbind(2);
  std::vector<at::Tensor> outs;
  for (int64_t i = 0; i < cpr; ++i) {
    at::Tensor Xi = entering[i];
    for (int64_t j = 0; j < nc; ++j) {
      const int64_t c = i * nc + j;
      // A memory chunk that starts a document reads the initial weights (where() only there: its
      // result is kept for backward, Xi is anyway).
      const at::Tensor W = chunk_resets[static_cast<size_t>(c)]
                               ? at::where(reset_of.select(2, c).to(at::kBool), X0.narrow(-1, 0, d), Xi.narrow(-1, 0, d))
                               : Xi.narrow(-1, 0, d);
      outs.push_back(at::matmul(Qs[c], W.transpose(-1, -2)));
      Xi = at::matmul(Xi, Ts[c]) + Bs[c];
    }
  }
  // A rank whose chunks need no earlier chunk's map (rank 0, contiguous) does
  // not use the AllGather's result; its backward must still run there.
  return CommOrder::close(merge_heads(at::cat(outs, 2)));
}

// ---- M: MAL ----
TitansMALMixer::TitansMALMixer(const pb::ModelConfig& c) {
  memory_ = register_module("memory", NeuralMemory(c));
  attention_ = register_module("attention", std::make_shared<SoftmaxAttentionMixer>(c, c.window()));
}
at::Tensor TitansMALMixer::forward(const at::Tensor& x, const SequenceContext& ctx) {
  return attention_->forward(memory_(x, ctx), ctx);
}

// ---- G: MAG ----
TitansMAGMixer::TitansMAGMixer(const pb::ModelConfig& c) {
  memory_ = register_module("memory", NeuralMemory(c));
  attention_ = register_module("attention", std::make_shared<SoftmaxAttentionMixer>(c, c.window()));
  attention_norm_ = register_module("attention_norm", RMSNorm(c.d_model(), c.norm_eps()));
  memory_norm_ = register_module("memory_norm", RMSNorm(c.d_model(), c.norm_eps()));
  o_ = register_module("o", make_projection(c.d_model(), c.d_model()));
}
at::Tensor TitansMAGMixer::forward(const at::Tensor& x, const SequenceContext& ctx) {
  return o_(attention_norm_(attention_->forward(x, ctx)) * at::sigmoid(memory_norm_(memory_(x, ctx))));
}

// ---- X: MAC ----
TitansMACMixer::TitansMACMixer(const pb::ModelConfig& c)
    : dim_(c.d_model()), heads_(c.n_heads()), head_dim_(c.d_model() / c.n_heads()), persistent_(c.persistent_tokens()) {
  const int64_t D = dim_;
  memory_ = register_module("memory", NeuralMemory(c, /*own_projections=*/false));
  attn_q_ = register_module("attn_q", make_projection(D, D));
  attn_k_ = register_module("attn_k", make_projection(D, D));
  attn_v_ = register_module("attn_v", make_projection(D, D));
  attn_o_ = register_module("attn_o", make_projection(D, D));
  mem_q_ = register_module("mem_q", make_projection(D, D));
  mem_k_ = register_module("mem_k", make_projection(D, D));
  mem_v_ = register_module("mem_v", make_projection(D, D));
  o_ = register_module("o", make_projection(D, D));
  persistent_tokens_ = register_parameter("persistent_tokens", at::randn({std::max<int64_t>(persistent_, 1), D}, parameter_options()) * 0.02);
  chain_step_ = std::make_shared<ChainStep>();
  chain_step_->output_features = dim_;
  chain_step_->step = [this](const at::Tensor& inputs, const at::Tensor& state) { return run_chunk(inputs, state); };
}

std::pair<at::Tensor, at::Tensor> TitansMACMixer::run_chunk(const at::Tensor& inputs, const at::Tensor& state) {
  // inputs [B, L, D (+ 1)]: the tokens (| 1 at the first token of a segment that starts a document).
  const int64_t B = inputs.size(0), L = inputs.size(1), b = memory_->chunk(), D = dim_;
  const bool documents = inputs.size(-1) == D + 1;
  const at::Tensor x = inputs.narrow(-1, 0, D);
  std::vector<at::Tensor> w, s;
  memory_->unpack_state(state, w, s);
  const at::Tensor persistent = persistent_tokens_.narrow(0, 0, persistent_).unsqueeze(0).expand({B, persistent_, D});
  const double scale = 1.0 / std::sqrt(static_cast<double>(head_dim_));
  // Mask over keys [persistent | retrieved | segment] for the segment's queries:
  // persistent always visible; retrieved and segment tokens causally.
  const auto flags = x.options().dtype(at::kBool);
  const at::Tensor causal = at::ones({b, b}, flags).tril();
  const at::Tensor visible = at::cat({at::ones({b, persistent_}, flags), causal, causal}, 1);
  const auto segments = x.split(b, 1);  // not narrow per segment: O(L^2 / b) backward
  const at::Tensor reset_column = documents ? inputs.select(-1, D).detach() : at::Tensor();  // constant
  std::vector<at::Tensor> outs;
  for (int64_t t0 = 0; t0 < L; t0 += b) {
    if (documents) memory_->reset_where(reset_column.select(1, t0), w, s);
    const at::Tensor& seg = segments[t0 / b];
    // Retrieve with the weights of the segment's start.
    const at::Tensor retrieved =
        merge_heads(memory_->read(w, l2_normalise(split_heads(mem_q_(seg), heads_))));
    const at::Tensor context = at::cat({persistent, retrieved, seg}, 1);
    const at::Tensor q = split_heads(attn_q_(seg), heads_);
    const at::Tensor k = split_heads(attn_k_(context), heads_), v = split_heads(attn_v_(context), heads_);
    const at::Tensor scores = (at::matmul(q, k.transpose(-1, -2)) * scale).masked_fill(visible.logical_not(),
                                                                                       -std::numeric_limits<double>::infinity());
    const at::Tensor y = attn_o_(merge_heads(at::matmul(at::softmax(scores, -1), v)));
    // The memory learns from the attention output; the output is gated by a
    // memory read at the segment's starting weights (causal inside the segment).
    const at::Tensor mk = l2_normalise(split_heads(mem_k_(y), heads_));
    const at::Tensor gate = merge_heads(memory_->read(w, mk));
    outs.push_back(o_(y * at::sigmoid(gate)));
    memory_->update(w, s, mk, split_heads(mem_v_(y), heads_), memory_->gate_logits(y));
  }
  return {at::cat(outs, 1), memory_->pack_state(w, s)};
}

at::Tensor TitansMACMixer::forward(const at::Tensor& x, const SequenceContext& ctx) {
  check_memory_chunking(ctx.layout, memory_->chunk());
  std::vector<at::Tensor> params;
  for (const auto& p : parameters()) params.push_back(p);
  at::Tensor inputs = x;
  const at::Tensor resets = memory_chunk_resets(ctx, memory_->chunk(), x.options());  // [B, n / b]
  if (resets.defined()) {  // segments that start a document begin from the initial memory
    const int64_t B = x.size(0), b = memory_->chunk();
    at::Tensor column = at::zeros({B, x.size(1) / b, b, 1}, x.options());
    column.select(2, 0).copy_(resets.unsqueeze(-1));
    inputs = at::cat({x, column.view({B, -1, 1})}, -1);
  }
  return run_state_chain(chain_step_, inputs, memory_->initial_state_flat(), params, ctx.layout, ctx.comm);
}

}  // namespace loom::models
