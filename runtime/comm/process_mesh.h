// ProcessMesh: the world viewed as a grid of dp x sp ranks.
//
// Rank r of the world sits at (dp_index, sp_index) = (r / sp, r % sp): the ranks
// of one sequence-parallel group are adjacent, so that on a multi-GPU node they
// share the fast links. The mesh owns three communicators:
//   world()  all dp x sp ranks (gradient all-reduce: parameters are replicated);
//   sp()     the sp ranks that share one sequence (LASP-2, ring attention, halos);
//   dp()     the dp ranks holding the same sequence position (data parallel).
// With ulysses_degree U > 0 (2D / USP sequence parallelism, sp = U x R) the
// mesh also builds ulysses_grid(sp(), U): sp rank s = g U + u belongs to the
// all-to-all group g (U consecutive ranks, on one node when sp groups are) and
// is rank g of ring u (the R ranks with the same u, one per group).
// Construction is collective over the world communicator (it calls split
// twice, and twice more for U > 0, in the same order on every rank). A world
// size that is not dp x sp, or an sp that U does not divide, is rejected with
// a message naming the numbers.
#pragma once

#include <memory>
#include <string>

#include "loom/runtime/comm/communicator.h"

namespace loom {

// The two sub-communicators of 2D sequence parallelism over `sp` (see above).
struct UlyssesGrid {
  int degree = 1;  // U: ranks of one all-to-all group
  CommPtr ulysses;  // this rank's all-to-all group (size U)
  CommPtr ring;     // this rank's ring across the groups (size sp / U)
};
// Built by two splits of `sp` on the first call for (sp, degree), which is
// therefore collective over sp, and kept for sp's lifetime: later calls (one
// per layer and step) communicate nothing. Throws ConfigError naming
// parallel.ulysses_degree when degree < 1 or does not divide sp's size.
UlyssesGrid ulysses_grid(const CommPtr& sp, int degree);

class ProcessMesh {
 public:
  // sp <= 0 means "all ranks not used by dp": sp = world / dp.
  // ulysses_degree > 0 also builds the 2D grid over sp (see above).
  ProcessMesh(CommPtr world, int dp, int sp, int ulysses_degree = 0);

  int dp_size() const { return dp_; }
  int sp_size() const { return sp_; }
  int dp_index() const { return dp_index_; }
  int sp_index() const { return sp_index_; }
  const CommPtr& world() const { return world_; }
  const CommPtr& sp() const { return sp_comm_; }
  const CommPtr& dp() const { return dp_comm_; }
  // The 2D grid (ulysses_degree > 0 only; else degree 1 and null communicators).
  const UlyssesGrid& ulysses_grid() const { return grid_; }
  std::string describe() const;

 private:
  CommPtr world_, sp_comm_, dp_comm_;
  UlyssesGrid grid_;
  int dp_ = 1, sp_ = 1, dp_index_ = 0, sp_index_ = 0;
};

}  // namespace loom
