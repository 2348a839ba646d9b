#include "loom/parallel/state_chain.h"

#include <torch/autograd.h>

#include <atomic>
#include <mutex>
#include <unordered_map>

#include "loom/runtime/comm/autograd_state.h"
#include "loom/runtime/comm/comm_order.h"
#include "loom/runtime/comm/recompute.h"
#include "loom/runtime/core/error.h"

namespace loom {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Steps are found again in backward by id (saved_data holds only IValues).
std::mutex& steps_mutex() {
  static std::mutex m;
  return m;
}
std::unordered_map<int64_t, std::weak_ptr<ChainStep>>& steps() {
  static std::unordered_map<int64_t, std::weak_ptr<ChainStep>> s;
  return s;
}
int64_t register_step(const std::shared_ptr<ChainStep>& step) {
  static std::atomic<int64_t> next{1};
  std::lock_guard<std::mutex> lock(steps_mutex());
  for (auto it = steps().begin(); it != steps().end();)  // forget dead steps
    it = it->second.expired() ? steps().erase(it) : std::next(it);
  for (const auto& [id, weak] : steps())
    if (weak.lock() == step) return id;
  const int64_t id = next++;
  steps()[id] = step;
  return id;
}
std::shared_ptr<ChainStep> find_step(int64_t id) {
  std::lock_guard<std::mutex> lock(steps_mutex());
  auto it = steps().find(id);
  auto step = it == steps().end() ? nullptr : it->second.lock();
  TORCH_CHECK(step, "state chain: the step of this graph no longer exists (module destroyed before backward?)");
  return step;
}

struct ChainFunction : public torch::autograd::Function<ChainFunction> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& order, const at::Tensor& inputs,
                               const at::Tensor& initial_state, at::TensorList params, int64_t step_id,
                               const SequenceLayout& layout, const CommPtr& comm) {
    ctx->saved_data["order"] = CommOrder::claim();
    const auto step = find_step(step_id);
    const int me = comm->rank();
    const int64_t L = layout.chunk_len();
    const auto mine = layout.chunks_of(me);
    std::vector<at::Tensor> outputs(mine.size()), states_in(mine.size());
    std::vector<WorkPtr> sends;
    at::Tensor carried;
    const bool replay = CommTape::replaying();  // recompute.h: no sends, no receives
    for (size_t idx = 0; idx < mine.size(); ++idx) {  // local order is sequence order
      const int64_t c = mine[idx];
      at::Tensor state;
      if (c == 0) {
        state = initial_state.expand({inputs.size(0), initial_state.size(-1)}).contiguous();
      } else if (layout.owner_of(c - 1) == me) {
        state = carried;
      } else if (replay) {  // a selective recompute's rerun: the state the first run received
        state = CommTape::replay("state chain: entering state")[0];
      } else {
        state = at::empty({inputs.size(0), initial_state.size(-1)}, initial_state.options());
        comm->irecv(state, layout.owner_of(c - 1), static_cast<int>(c))->wait();
        CommTape::record("state chain: entering state", {state});
      }
      states_in[idx] = state;
      auto [out, next] = step->step(inputs.narrow(1, static_cast<int64_t>(idx) * L, L), state);
      outputs[idx] = out;
      if (c + 1 < layout.num_chunks()) {
        if (layout.owner_of(c + 1) == me)
          carried = next;
        else if (!replay)
          sends.push_back(comm->isend(next.contiguous(), layout.owner_of(c + 1), static_cast<int>(c + 1)));
      }
    }
    wait_all(sends);
    std::vector<at::Tensor> saved{inputs, initial_state};
    for (auto& s : states_in) saved.push_back(s);
    for (const auto& p : params) saved.push_back(p);
    ctx->save_for_backward(saved);
    ctx->saved_data["step"] = step_id;
    save_comm(ctx, comm);
    save_layout(ctx, layout);
    ctx->saved_data["params"] = static_cast<int64_t>(params.size());
    return {at::cat(outputs, 1), CommOrder::new_token()};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    CommOrder::backward_ran(ctx->saved_data["order"].toInt());
    const auto saved = ctx->get_saved_variables();
    const auto step = find_step(ctx->saved_data["step"].toInt());
    const CommPtr comm = saved_comm(ctx);
    const SequenceLayout layout = saved_layout(ctx, *comm);
    const int64_t n_params = ctx->saved_data["params"].toInt();
    const int me = comm->rank();
    const int64_t L = layout.chunk_len();
    const auto mine = layout.chunks_of(me);
    const at::Tensor& inputs = saved[0];
    const at::Tensor& initial_state = saved[1];
    std::vector<at::Tensor> params(saved.end() - n_params, saved.end());
    const at::Tensor grad_out = grads[0].defined() ? grads[0] : at::Tensor();

    at::Tensor grad_inputs = at::zeros_like(inputs);
    at::Tensor grad_initial = at::zeros_like(initial_state);
    std::vector<at::Tensor> grad_params;
    for (const auto& p : params) grad_params.push_back(at::zeros_like(p));
    std::vector<WorkPtr> sends;
    at::Tensor carried;  // gradient of the state leaving my previous-in-reverse chunk
    for (size_t k = mine.size(); k-- > 0;) {
      const int64_t c = mine[k];
      const at::Tensor state_in = saved[2 + k];
      at::Tensor grad_state_out;
      if (c + 1 < layout.num_chunks()) {
        if (layout.owner_of(c + 1) == me) {
          grad_state_out = carried;
        } else {
          grad_state_out = at::empty_like(state_in);
          comm->irecv(grad_state_out, layout.owner_of(c + 1), static_cast<int>(c + 1))->wait();
        }
      }
      // Recompute this chunk with autograd.
      at::AutoGradMode enable(true);
      at::Tensor x = inputs.narrow(1, static_cast<int64_t>(k) * L, L).detach().requires_grad_(true);
      at::Tensor init = initial_state.detach().requires_grad_(true);
      at::Tensor s_in = c == 0 ? init.expand({inputs.size(0), init.size(-1)})
                               : state_in.detach().requires_grad_(true);
      auto [out, s_out] = step->step(x, s_in);
      std::vector<at::Tensor> outs{out}, outs_grad{grad_out.defined() ? grad_out.narrow(1, static_cast<int64_t>(k) * L, L)
                                                                        : at::zeros_like(out)};
      if (grad_state_out.defined()) {
        outs.push_back(s_out);
        outs_grad.push_back(grad_state_out);
      }
      std::vector<at::Tensor> wrt{x, c == 0 ? init : s_in};
      for (const auto& p : params) wrt.push_back(p);
      const auto g = torch::autograd::grad(outs, wrt, outs_grad, /*retain_graph=*/false, /*create_graph=*/false,
                                           /*allow_unused=*/true);
      if (g[0].defined()) grad_inputs.narrow(1, static_cast<int64_t>(k) * L, L).add_(g[0]);
      for (int64_t i = 0; i < n_params; ++i)
        if (g[2 + i].defined()) grad_params[i].add_(g[2 + i]);
      if (c == 0) {
        if (g[1].defined()) grad_initial.add_(g[1]);
      } else {
        const at::Tensor grad_state_in = g[1].defined() ? g[1] : at::zeros_like(state_in);
        if (layout.owner_of(c - 1) == me)
          carried = grad_state_in;
        else
          sends.push_back(comm->isend(grad_state_in.contiguous(), layout.owner_of(c - 1), static_cast<int>(c)));
      }
    }
    wait_all(sends);
    variable_list result{at::Tensor(), grad_inputs, grad_initial};
    for (auto& gp : grad_params) result.push_back(gp);
    result.push_back(at::Tensor());  // step id
    result.push_back(at::Tensor());  // layout
    result.push_back(at::Tensor());  // comm
    return result;
  }
};

}  // namespace

at::Tensor run_state_chain(const std::shared_ptr<ChainStep>& step, const at::Tensor& inputs,
                           const at::Tensor& initial_state, at::TensorList params, const SequenceLayout& layout,
                           const CommPtr& comm) {
  TORCH_CHECK(step && step->step, "state chain: no step function");
  TORCH_CHECK(inputs.dim() == 3 && inputs.size(1) == layout.local_len(), "state chain: inputs ", inputs.sizes(),
              " must be [B, ", layout.local_len(), ", F] for ", layout.describe());
  TORCH_CHECK(initial_state.dim() == 1, "state chain: initial state must be a flat [S] tensor, got ",
              initial_state.sizes());
  return apply_in_order<ChainFunction>(inputs, initial_state, params, register_step(step), layout, comm)[0];
}

}  // namespace loom
