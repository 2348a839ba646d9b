#include "loom/runtime/train/job.h"
#include "loom/runtime/core/build_config.h"

#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <utility>

#include <torch/cuda.h>
#include <torch/version.h>

#include "loom/runtime/comm/agreement.h"
#include "loom/runtime/core/error.h"
#include "loom/runtime/core/env_flag.h"
#include "loom/runtime/core/host_memory.h"
#ifdef LOOM_HAVE_NCCL
#include "loom/runtime/comm/nccl_communicator.h"
#endif
#include "loom/runtime/core/logging.h"
#include "loom/runtime/core/threads.h"

namespace loom {

namespace {

// `config` of rank `root`, on every rank.
pb::LoomConfig broadcast_config(const pb::LoomConfig& config, int root, int rank) {
  std::string bytes;
  if (rank == root) config.SerializeToString(&bytes);
  int length = static_cast<int>(bytes.size());
  LOOM_MPI_CHECK(MPI_Bcast(&length, 1, MPI_INT, root, MPI_COMM_WORLD), "config agreement");
  bytes.resize(static_cast<size_t>(length));
  LOOM_MPI_CHECK(MPI_Bcast(bytes.data(), length, MPI_CHAR, root, MPI_COMM_WORLD), "config agreement");
  pb::LoomConfig received;
  if (!received.ParseFromString(bytes)) throw LoomError("config agreement: rank " + std::to_string(root) + "'s config does not parse");
  return received;
}

}  // namespace

pb::LoomConfig resolve_config_on_all_ranks(const std::string& path, const std::vector<std::string>& overrides,
                                           const ConfigResolver& resolve) {
  pb::LoomConfig config;
  agree_on_failure(MPI_COMM_WORLD, [&] { config = resolve(path, overrides); });
  int rank = 0, size = 1;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  MPI_Comm_size(MPI_COMM_WORLD, &size);

  // Every rank must run the same resolved config: all-gather the hashes.
  const uint64_t mine = config_hash(config);
  std::vector<uint64_t> hashes(static_cast<size_t>(size));
  LOOM_MPI_CHECK(MPI_Allgather(&mine, 1, MPI_UINT64_T, hashes.data(), 1, MPI_UINT64_T, MPI_COMM_WORLD),
                 "config agreement");
  std::vector<int> differing;
  for (int r = 1; r < size; ++r)
    if (hashes[static_cast<size_t>(r)] != hashes[0]) differing.push_back(r);
  if (differing.empty()) return config;
  // Every rank learns rank 0's config and the first differing rank's, so that
  // every rank throws the same message, naming the fields.
  const int other = differing.front();
  const pb::LoomConfig reference = broadcast_config(config, 0, rank);
  const pb::LoomConfig different = broadcast_config(config, other, rank);
  // Ranks grouped by the config they hold, in order of their first rank.
  std::vector<std::vector<int>> groups;
  std::vector<uint64_t> group_hash;
  for (int r = 0; r < size; ++r) {
    const auto it = std::find(group_hash.begin(), group_hash.end(), hashes[static_cast<size_t>(r)]);
    if (it == group_hash.end()) {
      group_hash.push_back(hashes[static_cast<size_t>(r)]);
      groups.push_back({r});
    } else {
      groups[static_cast<size_t>(it - group_hash.begin())].push_back(r);
    }
  }
  std::string grouped;
  for (size_t k = 0; k < groups.size(); ++k) {
    if (k == 8) {
      grouped += " and " + std::to_string(groups.size() - 8) + " more";
      break;
    }
    const auto& g = groups[k];
    std::string ranks;
    for (size_t i = 0; i < g.size() && i < 16; ++i) ranks += (i ? ", " : "") + std::to_string(g[i]);
    if (g.size() > 16) ranks += " and " + std::to_string(g.size() - 16) + " more";
    grouped += std::string(grouped.empty() ? "" : ", ") + "{" + ranks + "}";
  }
  // One line, so that it reads well after "loom-train: " and in a log.
  std::string fields = config_differences(reference, different);
  for (size_t at = fields.find('\n'); at != std::string::npos; at = fields.find('\n', at)) fields.replace(at, 1, "; ");
  if (fields.empty()) fields = "(no field prints differently; the serialized configs differ)";
  throw ConfigError("the ranks resolved " + std::to_string(groups.size()) +
                    " different configs (each rank reads its own --config file, --set options and LOOM_* environment "
                    "variables); ranks with equal configs: " + grouped + "; rank " + std::to_string(other) + " differs from rank 0 in: " +
                    fields + " (rank 0's value first)");
}

namespace {

// Rank among the ranks of this node, and how many there are (collective).
std::pair<int, int> node_local_rank(MPI_Comm world) {
  MPI_Comm node = MPI_COMM_NULL;
  LOOM_MPI_CHECK(MPI_Comm_split_type(world, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &node), "node-local rank");
  int rank = 0, size = 1;
  MPI_Comm_rank(node, &rank);
  MPI_Comm_size(node, &size);
  MPI_Comm_free(&node);
  return {rank, size};
}

// The communicator the mesh is built on, from parallel.backend: the MPI world,
// or for CUDA with several ranks an NCCL communicator over it.
CommPtr mesh_world(const std::shared_ptr<MpiCommunicator>& world, const pb::ParallelConfig& parallel,
                   const pb::TrainConfig& train, at::Device& device) {
  const bool cuda = train.device() == "cuda";
  // validate_config refuses these too; a Job built from an unvalidated config must not get further.
  if (parallel.backend() == pb::MPI && cuda)
    throw ConfigError("parallel.backend = MPI: the MPI communicator takes CPU tensors; with train.device = cuda use "
                      "NCCL or AUTO");
  if (parallel.backend() == pb::NCCL && !cuda)
    throw ConfigError("parallel.backend = NCCL: NCCL takes CUDA tensors; with train.device = " + train.device() +
                      " use MPI or AUTO");
  if (!cuda) return world;
  if (!torch::cuda::is_available())
    throw UnsupportedError("train.device = cuda: no CUDA device is visible to this process (libtorch " +
                           std::string(TORCH_VERSION) + " built without CUDA, or no GPU)");
  const auto [local, local_size] = node_local_rank(world->handle());
  const int gpus = static_cast<int>(torch::cuda::device_count());
  if (local_size > gpus)
    throw UnsupportedError("train.device = cuda: " + std::to_string(local_size) + " ranks on this node but only " +
                           std::to_string(gpus) + " CUDA device(s); start one rank per GPU");
  device = at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(local));
  if (world->size() == 1) return world;  // one rank: collectives are local copies on any device
#ifdef LOOM_HAVE_NCCL
  auto nccl = NcclCommunicator::create(world, local);
  nccl->set_timeout(world->timeout());
  return nccl;
#else
  throw UnsupportedError("train.device = cuda with " + std::to_string(world->size()) +
                         " ranks needs the NCCL communicator: this build has LOOM_WITH_NCCL=OFF (no CUDA toolkit or "
                         "NCCL found at configure time)");
#endif
}

}  // namespace

Job::Job(pb::LoomConfig config) : config_(std::move(config)) {
  mpi_world_ = MpiCommunicator::world();
  const auto& world = mpi_world_;
  configure_logging(world->rank(), world->size(), config_.log().all_ranks(), parse_log_level(config_.log().level()));
  world->set_timeout(std::chrono::milliseconds(static_cast<int64_t>(config_.parallel().comm_timeout_s() * 1000.0)));
  threads_ = configure_threads(config_.parallel().threads_per_rank(), world->handle());
  // Read from each rank's own environment, which may differ between nodes: a
  // bad value on one rank must stop every rank (with its message), not leave
  // the others waiting in the first collective.
  std::string host_memory, env_error;
  try {
    keep_freed_host_memory(&host_memory);
    env_flag("LOOM_TRACE_COMM", false);  // the communicators read it too, but cannot refuse a typo
  } catch (const ConfigError& e) {
    env_error = e.what();
  }
  env_error = agree_on_error(*world, env_error);
  if (!env_error.empty()) throw ConfigError(env_error);
  LOOM_LOG(kInfo) << host_memory;
  const int M = config_.offload().memory_ranks(), S = world->size();
  if (M >= S)
    throw ConfigError("offload.memory_ranks = " + std::to_string(M) + " leaves no compute rank in a world of " +
                      std::to_string(S) + " ranks");
  for (int r = 0; r < S; ++r) (r >= S - M ? memory_ranks_ : compute_ranks_).push_back(r);
  const bool memory = world->rank() >= S - M;
  // Compute ranks (color 0) get the mesh; memory nodes (color 1) serve.
  auto compute = M > 0 ? std::dynamic_pointer_cast<MpiCommunicator>(world->split(memory ? 1 : 0, world->rank())) : world;
  // The mesh may not fit the compute ranks (or their devices) while memory
  // nodes have nothing to check: all ranks agree, so that memory nodes stop
  // with the same error instead of serving forever.
  agree_on_failure(*world, [&] {
    if (memory) return;
    try {
      // USP's all-to-all groups and rings are built with the mesh (collective here, not in a layer).
      const int ulysses_degree =
          config_.parallel().softmax_method() == pb::USP ? config_.parallel().ulysses_degree() : 0;
      mesh_ = std::make_unique<ProcessMesh>(mesh_world(compute, config_.parallel(), config_.train(), device_),
                                            config_.parallel().dp(), config_.parallel().sp(), ulysses_degree);
    } catch (const ConfigError& e) {
      if (M == 0) throw;
      throw ConfigError(std::to_string(S) + " ranks - offload.memory_ranks " + std::to_string(M) + " = " +
                        std::to_string(S - M) + " compute ranks: " + e.what());
    }
  });
  if (memory) return;
  backend_ = mesh_->world()->backend_name();
  if (M > 0) offload_ = std::make_unique<offload::OffloadClient>(world, memory_ranks_, mesh_->dp_index());
}

Job::~Job() = default;

void Job::serve(const offload::OffloadKernels& kernels) {
  TORCH_CHECK(is_memory_node(), "Job::serve: rank ", mpi_world_->rank(), " is a compute rank");
  LOOM_LOG(kInfo) << "memory node: serving " << compute_ranks_.size() << " compute ranks, capacity "
                  << config_.offload().capacity_mb() << " MiB";
  offload::OffloadServer(mpi_world_, compute_ranks_, config_.offload().capacity_mb() << 20, kernels).serve();
}

void Job::finish() {
  if (offload_) offload_->shutdown();
}

}  // namespace loom
