#include "loom/runtime/comm/recompute.h"

#include <torch/autograd.h>

#include <memory>
#include <utility>

#include "loom/runtime/comm/comm_order.h"

namespace loom {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

struct Tape {
  std::vector<std::pair<std::string, std::vector<at::Tensor>>> entries;
  size_t next = 0;
};

enum class TapeMode { kOff, kRecord, kReplay };

struct TapeState {
  TapeMode mode = TapeMode::kOff;
  Tape* tape = nullptr;
};
thread_local TapeState current_tape;

// Sets the thread's tape mode for a scope and restores the previous one.
class TapeScope {
 public:
  TapeScope(TapeMode mode, Tape* tape) : saved_(current_tape) {
    current_tape = TapeState{mode, tape};
    if (tape && mode == TapeMode::kRecord) tape->entries.clear();
    if (tape) tape->next = 0;
  }
  ~TapeScope() { current_tape = saved_; }
  TapeScope(const TapeScope&) = delete;
  TapeScope& operator=(const TapeScope&) = delete;

 private:
  TapeState saved_;
};

// What the recompute node needs again in backward (held in saved_data as a capsule).
struct Recomputation : torch::CustomClassHolder {
  BlockFunction block;
  std::vector<at::Tensor> params;
  bool selective = false;
  Tape tape;
};

struct RecomputedBlock : public torch::autograd::Function<RecomputedBlock> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& order, const at::Tensor& x,
                               at::TensorList params, const c10::intrusive_ptr<Recomputation>& r) {
    ctx->saved_data["order"] = CommOrder::claim();
    at::Tensor out;
    {
      // Grad mode is off here: the block's communicating operators build no nodes and leave the chain alone.
      TapeScope scope(r->selective ? TapeMode::kRecord : TapeMode::kOff, &r->tape);
      out = r->block(x);
    }
    ctx->save_for_backward({x});
    ctx->saved_data["recomputation"] = c10::IValue::make_capsule(r);
    return {out, CommOrder::new_token()};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    CommOrder::backward_ran(ctx->saved_data["order"].toInt());
    const auto r = c10::static_intrusive_pointer_cast<Recomputation>(ctx->saved_data["recomputation"].toCapsule());
    const at::Tensor x = ctx->get_saved_variables()[0];
    std::vector<at::Tensor> wrt;
    std::vector<size_t> trained;  // indices of the params that take gradients
    at::Tensor input = x.detach().requires_grad_(true);
    wrt.push_back(input);
    for (size_t i = 0; i < r->params.size(); ++i)
      if (r->params[i].requires_grad()) {
        wrt.push_back(r->params[i]);
        trained.push_back(i);
      }
    std::vector<at::Tensor> g;
    {
      CommOrder::Isolation isolation;  // the rerun's nodes form a chain of their own
      TapeScope scope(r->selective ? TapeMode::kReplay : TapeMode::kOff, &r->tape);
      at::AutoGradMode enable_grad(true);
      const at::Tensor out = CommOrder::close(r->block(input));
      TORCH_CHECK(!r->selective || r->tape.next == r->tape.entries.size(), "recompute: the rerun of a block replayed ",
                  r->tape.next, " of the ", r->tape.entries.size(), " communications its first run recorded");
      const at::Tensor grad_out = grads[0].defined() ? grads[0] : at::zeros_like(out);
      g = torch::autograd::grad({out}, wrt, {grad_out}, /*retain_graph=*/false, /*create_graph=*/false,
                                /*allow_unused=*/true);
    }
    variable_list result{at::Tensor(), g[0]};
    std::vector<at::Tensor> param_grads(r->params.size());
    for (size_t j = 0; j < trained.size(); ++j) param_grads[trained[j]] = g[1 + j];
    for (auto& pg : param_grads) result.push_back(pg);
    result.push_back(at::Tensor());  // the recomputation
    return result;
  }
};

}  // namespace

at::Tensor recompute_block(const BlockFunction& block, const at::Tensor& x, const std::vector<at::Tensor>& params,
                           RecomputeMode mode) {
  // Nothing to save without grad mode (evaluation), nor without recompute.
  if (mode == RecomputeMode::kNone || !at::GradMode::is_enabled()) return block(x);
  auto r = c10::make_intrusive<Recomputation>();
  r->block = block;
  r->params = params;
  r->selective = mode == RecomputeMode::kSelective;
  return apply_in_order<RecomputedBlock>(x, at::TensorList(params), r)[0];
}

bool CommTape::replaying() { return current_tape.mode == TapeMode::kReplay; }
bool CommTape::recording() { return current_tape.mode == TapeMode::kRecord; }

std::vector<at::Tensor> CommTape::replay(const std::string& name) {
  TORCH_CHECK(current_tape.mode == TapeMode::kReplay && current_tape.tape, "CommTape::replay('", name,
              "') outside a selective recompute");
  Tape& t = *current_tape.tape;
  TORCH_CHECK(t.next < t.entries.size(), "recompute: the rerun of a block asks for communication ", t.next + 1, " ('",
              name, "') but its first run recorded only ", t.entries.size());
  const auto& entry = t.entries[t.next];
  TORCH_CHECK(entry.first == name, "recompute: communication ", t.next + 1, " of the rerun is '", name,
              "' but the first run's was '", entry.first, "'");
  ++t.next;
  return entry.second;
}

void CommTape::record(const std::string& name, std::vector<at::Tensor> tensors) {
  if (current_tape.mode != TapeMode::kRecord || !current_tape.tape) return;
  current_tape.tape->entries.emplace_back(name, std::move(tensors));
}

}  // namespace loom
