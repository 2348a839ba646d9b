// CommOrder: makes autograd run every communicating node's backward in exactly
// the reverse of the forward order, on every rank.
//
// Why: the autograd engine runs ready nodes in an order that depends on the
// graph's shape, and the shape differs between ranks (rank 0's first chunk
// needs no state from anyone). Two ranks could then enter two different
// blocking communications in backward (a halo on one, a reduce-scatter on
// the other) and wait for each other forever.
// How: every differentiable communication (differentiable_collectives.h,
// LASP, ring/all-gather attention, state chains) takes the current order
// token as an extra input and returns a new token, which becomes current. The
// tokens chain all communicating nodes of a graph, so a node's backward waits
// for the backward of the node created after it. The token carries no values
// (zero-dimensional zeros). The chain also keeps every communicating node
// reachable from the loss, so a collective whose output one rank does not use
// still runs its backward there (with zero gradients), as the other ranks need.
// A new chain starts when the previous chain's newest node has run its
// backward, when grad mode is off, or on reset(). A graph built with grad mode
// on and then dropped without backward would be linked into the next one:
// evaluate under NoGradGuard, or call reset() (HybridLM::forward and the
// trainer do at every step).
// Nested graphs (activation recompute, recompute.h): a forward rerun inside a
// backward builds a graph of its own, whose communicating nodes must chain
// among themselves, not onto the outer chain (whose head may be a node that
// has not run yet), and must leave the outer chain as it was. An Isolation
// saves the chain, starts a fresh one, and restores the saved one when it
// ends; ids keep counting, so an inner node's id never equals an outer one's.
#pragma once

#include <ATen/ATen.h>
#include <torch/csrc/autograd/variable.h>

#include <memory>
#include <utility>
#include <vector>

namespace loom {

class CommOrder {
 public:
  // The token to pass into the next communicating autograd function.
  static at::Tensor token();
  // In a communicating function's forward: claims an id (save it in the ctx)
  // and returns the token output to append to the function's outputs.
  static int64_t claim();
  static at::Tensor new_token();
  // After Function::apply: the returned token becomes current.
  static void advance(const at::Tensor& token_out);
  // In the function's backward.
  static void backward_ran(int64_t id);
  // Starts a new chain (a model calls it at the start of each forward).
  static void reset();
  // `out` plus a zero that depends on the chain's newest node: call it on a
  // forward's final output, so that the loss reaches the newest
  // communication (and through the chain every older one) even on a rank
  // whose output does not use its result (rank 0 needs no earlier chunk's
  // state); otherwise that rank would skip the node's backward while the
  // others wait in its collective. Values are unchanged.
  static at::Tensor close(const at::Tensor& out);

  // Scope of a nested graph (see above). Not copyable; nest freely (each
  // restores what it found).
  class Isolation {
   public:
    Isolation();
    ~Isolation();
    Isolation(const Isolation&) = delete;
    Isolation& operator=(const Isolation&) = delete;

   private:
    std::shared_ptr<torch::autograd::Node> head_;
    uint32_t head_output_;
    int64_t head_id_, pending_id_;
    bool head_consumed_;
  };
};

// F::apply(token, args...) for an F whose forward takes the order token first
// and appends a token to its outputs; returns the outputs without the token.
template <typename F, typename... Args>
std::vector<at::Tensor> apply_in_order(Args&&... args) {
  auto outs = F::apply(CommOrder::token(), std::forward<Args>(args)...);
  CommOrder::advance(outs.back());
  outs.pop_back();
  return outs;
}

}  // namespace loom
