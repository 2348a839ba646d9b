// Activation recompute (train.recompute) of a model block, and the tape that
// lets communicating operators skip their forward communication when rerun.
//
// recompute_block(block, x, params, mode):
//   kNone       block(x), autograd keeps every activation.
//   kBlock      block(x) runs without autograd; one node keeps x alone and,
//               in backward, reruns block(x) under autograd and backpropagates
//               through it (torch::autograd::grad on x and `params`, the
//               block's parameters, whose gradients the node returns so that
//               the outer backward accumulates them). The rerun issues the
//               block's forward collectives again.
//   kSelective  as kBlock, but the first run records on a CommTape what each
//               communicating operator received (LASP-2 entering states,
//               attention outputs with their LSE, halos, ...) and the rerun
//               replays it: the rerun issues no collective, only backward's
//               own (so a step communicates exactly as with kNone), and
//               recomputes only token-local work (norms, projections, feature
//               maps, the conv's local part, the MLP, intra-chunk kernels).
//
// Ordering (CommOrder, comm_order.h): the recompute node is itself a
// communicating node of the outer chain (it takes the order token and returns
// one), so the blocks' backwards run in reverse block order on every rank. The
// rerun happens inside that node's backward under a CommOrder::Isolation: the
// rerun's communicating nodes chain among themselves on a fresh chain, the
// rerun's output is closed onto it (CommOrder::close) so that the nested
// backward reaches all of them on every rank, and the outer chain is restored
// afterwards. The rerun runs the same code on the same inputs as the first
// run, so every rank issues the same collectives in the same order (kBlock)
// or none (kSelective); the nested backward issues backward collectives in the
// reverse order, as without recompute.
//
// Who calls it: HybridLM::forward for each block (models/hybrid_lm.cc).
// The block function and params must stay alive until backward (the model
// owns them). Not for graphs run backward twice (retain_graph): each backward
// reruns the block, which is correct, but a kSelective tape is replayed anew
// each time, which is correct too; double backward (create_graph) is not
// supported.
#pragma once

#include <ATen/ATen.h>

#include <functional>
#include <string>
#include <vector>

namespace loom {

enum class RecomputeMode { kNone, kBlock, kSelective };

using BlockFunction = std::function<at::Tensor(const at::Tensor&)>;

at::Tensor recompute_block(const BlockFunction& block, const at::Tensor& x, const std::vector<at::Tensor>& params,
                           RecomputeMode mode);

// What communicating operators do with the tape, in their forward:
//   if (CommTape::replaying()) { kept = CommTape::replay("name"); use them; }
//   else { communicate; CommTape::record("name", {what was received}); }
// Outside a kSelective block both are no-ops (replaying() is false, record()
// keeps nothing). `name` names the operator: a replay that finds another
// operator's record (the rerun differs from the first run) is an error.
// Thread-local: the operator's forward runs on the thread that runs the block.
class CommTape {
 public:
  static bool replaying();
  static std::vector<at::Tensor> replay(const std::string& name);
  static void record(const std::string& name, std::vector<at::Tensor> tensors);
  // True while a kSelective first run records.
  static bool recording();
};

}  // namespace loom
