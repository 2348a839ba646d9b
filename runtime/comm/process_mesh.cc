#include "loom/runtime/comm/process_mesh.h"

#include <map>
#include <mutex>
#include <sstream>
#include <utility>

#include "loom/runtime/core/error.h"

namespace loom {

UlyssesGrid ulysses_grid(const CommPtr& sp, int degree) {
  TORCH_CHECK(sp, "ulysses_grid: sequence-parallel communicator is null");
  const int W = sp->size();
  if (degree < 1 || W % degree != 0)
    throw ConfigError("parallel.ulysses_degree = " + std::to_string(degree) +
                      ": must be >= 1 and divide the sequence-parallel size " + std::to_string(W) +
                      " (sp = ulysses_degree x ring degree)");
  // Keyed by the communicator's process-unique id; an entry holds only the
  // sub-communicators, never sp itself.
  static std::mutex mutex;
  static std::map<std::pair<int64_t, int>, UlyssesGrid> grids;
  {
    std::lock_guard<std::mutex> lock(mutex);
    auto it = grids.find({sp->id(), degree});
    if (it != grids.end()) return it->second;
  }
  const int s = sp->rank(), g = s / degree, u = s % degree;
  UlyssesGrid grid;
  grid.degree = degree;
  grid.ulysses = sp->split(/*color=*/g, /*key=*/u);
  grid.ring = sp->split(/*color=*/u, /*key=*/g);
  std::lock_guard<std::mutex> lock(mutex);
  grids[{sp->id(), degree}] = grid;
  return grid;
}

ProcessMesh::ProcessMesh(CommPtr world, int dp, int sp, int ulysses_degree) : world_(std::move(world)) {
  TORCH_CHECK(world_, "ProcessMesh: world communicator is null");
  const int w = world_->size();
  if (dp < 1) throw ConfigError("parallel.dp = " + std::to_string(dp) + ": must be >= 1");
  if (sp <= 0) {
    if (w % dp != 0)
      throw ConfigError("parallel.dp = " + std::to_string(dp) + " does not divide the world size " +
                        std::to_string(w) + " (sp = 0 asks for sp = world / dp)");
    sp = w / dp;
  }
  if (static_cast<int64_t>(dp) * sp != w)
    throw ConfigError("world size " + std::to_string(w) + " does not factor as parallel.dp x parallel.sp = " +
                      std::to_string(dp) + " x " + std::to_string(sp) + " = " + std::to_string(dp * sp) +
                      "; launch dp x sp ranks or change the config");
  dp_ = dp;
  sp_ = sp;
  dp_index_ = world_->rank() / sp;
  sp_index_ = world_->rank() % sp;
  sp_comm_ = world_->split(/*color=*/dp_index_, /*key=*/sp_index_);
  dp_comm_ = world_->split(/*color=*/sp_index_, /*key=*/dp_index_);
  if (ulysses_degree > 0) grid_ = loom::ulysses_grid(sp_comm_, ulysses_degree);
}

std::string ProcessMesh::describe() const {
  std::ostringstream out;
  out << "mesh dp=" << dp_ << " x sp=" << sp_ << " (this rank: dp " << dp_index_ << ", sp " << sp_index_ << ")";
  return out.str();
}

}  // namespace loom
