// ProcessMesh: the world viewed as a grid of dp x sp ranks.
//
// Rank r of the world sits at (dp_index, sp_index) = (r / sp, r % sp): the ranks
// of one sequence-parallel group are adjacent, so that on a multi-GPU node they
// share the fast links. The mesh owns three communicators:
//   world()  all dp x sp ranks (gradient all-reduce: parameters are replicated);
//   sp()     the sp ranks that share one sequence (LASP-2, ring attention, halos);
//   dp()     the dp ranks holding the same sequence position (data parallel).
// Construction is collective over the world communicator (it calls split
// twice, in the same order on every rank). A world size that is not dp x sp is
// rejected with a message naming both numbers.
#pragma once

#include <memory>
#include <string>

#include "loom/runtime/comm/communicator.h"

namespace loom {

class ProcessMesh {
 public:
  // sp <= 0 means "all ranks not used by dp": sp = world / dp.
  ProcessMesh(CommPtr world, int dp, int sp);

  int dp_size() const { return dp_; }
  int sp_size() const { return sp_; }
  int dp_index() const { return dp_index_; }
  int sp_index() const { return sp_index_; }
  const CommPtr& world() const { return world_; }
  const CommPtr& sp() const { return sp_comm_; }
  const CommPtr& dp() const { return dp_comm_; }
  std::string describe() const;

 private:
  CommPtr world_, sp_comm_, dp_comm_;
  int dp_ = 1, sp_ = 1, dp_index_ = 0, sp_index_ = 0;
};

}  // namespace loom
