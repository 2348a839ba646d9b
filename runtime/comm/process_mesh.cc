#include "loom/runtime/comm/process_mesh.h"

#include <sstream>

#include "loom/runtime/core/error.h"

namespace loom {

ProcessMesh::ProcessMesh(CommPtr world, int dp, int sp) : world_(std::move(world)) {
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
}

std::string ProcessMesh::describe() const {
  std::ostringstream out;
  out << "mesh dp=" << dp_ << " x sp=" << sp_ << " (this rank: dp " << dp_index_ << ", sp " << sp_index_ << ")";
  return out.str();
}

}  // namespace loom
