// Job: the start-up every Loom executable (and an embedding trainer) shares.
//
// resolve_config_on_all_ranks() parses the config on every rank and then
// agrees: if any rank failed (a file missing on one node, say), every rank
// throws the same ConfigError naming the first failing rank, so that no rank
// goes on into a collective that the others will never join.
// Job then applies the config: logging with the rank prefix, threads per rank,
// the world communicator with the watchdog timeout, and the dp x sp mesh.
// With train.device = cuda each rank takes the GPU of its node-local rank and,
// with more than one rank, the mesh is built on NCCL communicators (their
// unique ids travel over MPI); UnsupportedError names what is missing: a
// libtorch or GPU without CUDA, a build without NCCL, fewer GPUs than ranks on
// a node. Both are collective over MPI_COMM_WORLD.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "runtime/config.h"
#include "runtime/mpi_communicator.h"
#include "runtime/process_mesh.h"

namespace loom {

pb::LoomConfig resolve_config_on_all_ranks(const std::string& path, const std::vector<std::string>& overrides);

class Job {
 public:
  explicit Job(pb::LoomConfig config);
  const pb::LoomConfig& config() const { return config_; }
  const CommPtr& world() const { return mesh_->world(); }
  ProcessMesh& mesh() { return *mesh_; }
  int threads_per_rank() const { return threads_; }
  // This rank's device for the model and its tensors (cpu, or cuda:<local rank>).
  at::Device device() const { return device_; }

 private:
  pb::LoomConfig config_;
  std::unique_ptr<ProcessMesh> mesh_;
  int threads_ = 1;
  at::Device device_{at::kCPU};
};

}  // namespace loom
