// Job: the start-up every Loom executable (and an embedding trainer) shares.
//
// resolve_config_on_all_ranks() resolves the config on every rank (with
// `resolve`: loom-train passes models::resolve_run_config, which applies the
// model preset; the default applies none) and then agrees, collectively over
// MPI_COMM_WORLD: if any rank failed (a file missing on one node, say), every
// rank throws the same ConfigError naming the first failing rank; if the ranks
// resolved different configs (different files, --set options or LOOM_*
// environment variables per rank), every rank throws a ConfigError naming
// the ranks that differ from rank 0 and the first differing fields. Either
// way no rank goes on into a collective that the others will never join.
// Agreement compares config_hash() (every default filled, deterministic
// serialization) all-gathered from every rank.
// Job then applies the config: logging with the rank prefix, threads per rank,
// the world communicator with the watchdog timeout, and the dp x sp mesh.
// parallel.backend picks the mesh's communicator (AUTO: NCCL for
// train.device = cuda with several compute ranks, else MPI; see loom.proto).
// With train.device = cuda each rank takes the GPU of its node-local rank and,
// with more than one rank, the mesh is built on NCCL communicators (their
// unique ids travel over MPI); UnsupportedError names what is missing: a
// libtorch or GPU without CUDA, a build without NCCL, fewer GPUs than ranks on
// a node. With offload.memory_ranks = M > 0 the last M ranks are memory nodes
// (is_memory_node(); they serve, runtime/offload/offload_server.h) and the mesh is
// built from the other ranks, which get an OffloadClient. Both are collective
// over MPI_COMM_WORLD.
#pragma once

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "loom/runtime/core/config.h"
#include "loom/runtime/comm/mpi_communicator.h"
#include "loom/runtime/comm/process_mesh.h"

#include "loom/runtime/offload/offload_client.h"
#include "loom/runtime/offload/offload_server.h"

namespace loom {

using ConfigResolver = std::function<pb::LoomConfig(const std::string& path, const std::vector<std::string>& overrides)>;
pb::LoomConfig resolve_config_on_all_ranks(const std::string& path, const std::vector<std::string>& overrides,
                                           const ConfigResolver& resolve = resolve_config);

class Job {
 public:
  explicit Job(pb::LoomConfig config);
  ~Job();
  const pb::LoomConfig& config() const { return config_; }
  // The compute ranks' communicator (all ranks without memory nodes).
  const CommPtr& world() const { return mesh_->world(); }
  ProcessMesh& mesh() { return *mesh_; }
  // Memory nodes: serve() with the attention arithmetic (parallel/'s
  // offload_kernels()) until every compute rank has called finish().
  bool is_memory_node() const { return !mesh_; }
  void serve(const offload::OffloadKernels& kernels);
  // Compute ranks: the memory nodes' client (null without memory nodes).
  offload::OffloadClient* offload_client() const { return offload_.get(); }
  // Compute ranks, at the end of the job: releases the memory nodes.
  void finish();
  int threads_per_rank() const { return threads_; }
  // This rank's device for the model and its tensors (cpu, or cuda:<local rank>).
  at::Device device() const { return device_; }
  // The mesh's communicator backend as chosen from parallel.backend ("mpi",
  // "nccl"); empty on memory nodes.
  const std::string& backend() const { return backend_; }

 private:
  pb::LoomConfig config_;
  std::unique_ptr<ProcessMesh> mesh_;  // null on memory nodes
  std::shared_ptr<MpiCommunicator> mpi_world_;
  std::vector<int> compute_ranks_, memory_ranks_;
  std::unique_ptr<offload::OffloadClient> offload_;
  int threads_ = 1;
  at::Device device_{at::kCPU};
  std::string backend_;
};

}  // namespace loom
