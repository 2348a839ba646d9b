#include "loom/runtime/comm/comm_order.h"

#include <ATen/core/grad_mode.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/variable.h>

#include <mutex>

namespace loom {
namespace {
// The head is held strongly: a communicating node whose output this rank does
// not use (rank 0 needs no earlier chunk's state) must still run its backward,
// since the other ranks will call the matching collective; the chain is what
// keeps it alive and reachable from the loss.
struct State {
  std::mutex mutex;
  std::shared_ptr<torch::autograd::Node> head;
  uint32_t head_output = 0;
  int64_t head_id = 0;
  int64_t pending_id = 0;
  int64_t next_id = 1;
  bool head_consumed = true;
};
// Never destroyed: at exit the head may still hold the last step's graph
// (a program that ends right after a backward), and destroying autograd nodes
// during static destruction, after libtorch's own statics, corrupted the heap
// (seen with --profile's markers in that graph).
State& state() {
  static State* s = new State;
  return *s;
}
}  // namespace

at::Tensor CommOrder::token() {
  if (!at::GradMode::is_enabled()) return at::zeros({});
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mutex);
  const auto& node = s.head;
  if (!node || s.head_consumed) return at::zeros({}).requires_grad_(true);  // a new chain
  at::Tensor t = at::zeros({});
  torch::autograd::impl::set_gradient_edge(t, torch::autograd::Edge(node, s.head_output));
  return t;
}

int64_t CommOrder::claim() {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mutex);
  s.pending_id = s.next_id++;
  return s.pending_id;
}

at::Tensor CommOrder::new_token() { return at::zeros({}); }

void CommOrder::advance(const at::Tensor& token_out) {
  if (!at::GradMode::is_enabled() || !token_out.requires_grad()) return;
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mutex);
  s.head = token_out.grad_fn();
  s.head_output = token_out.output_nr();
  s.head_id = s.pending_id;
  s.head_consumed = false;
}

void CommOrder::backward_ran(int64_t id) {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mutex);
  if (id == s.head_id) s.head_consumed = true;
}

at::Tensor CommOrder::close(const at::Tensor& out) {
  // Meta tensors (shape checks) run no communication and cannot send their
  // gradient back to the token's CPU zero.
  if (!at::GradMode::is_enabled() || out.is_meta()) return out;
  {
    State& s = state();
    std::lock_guard<std::mutex> lock(s.mutex);
    if (!s.head || s.head_consumed) return out;
  }
  return out + token().to(out.options());
}

void CommOrder::reset() {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mutex);
  s.head.reset();
  s.head_consumed = true;
}

CommOrder::Isolation::Isolation() {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mutex);
  head_ = std::move(s.head);
  head_output_ = s.head_output;
  head_id_ = s.head_id;
  pending_id_ = s.pending_id;
  head_consumed_ = s.head_consumed;
  s.head.reset();
  s.head_consumed = true;
}

CommOrder::Isolation::~Isolation() {
  State& s = state();
  std::lock_guard<std::mutex> lock(s.mutex);
  s.head = std::move(head_);
  s.head_output = head_output_;
  s.head_id = head_id_;
  s.pending_id = pending_id_;
  s.head_consumed = head_consumed_;
}

}  // namespace loom
