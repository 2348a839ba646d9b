// MpiCommunicator: the Communicator backend over MPI, for CPU tensors.
//
// Always built; it is also the bootstrap for NCCL (which broadcasts its unique
// id over MPI). Supported dtypes: float32, float64, bfloat16 (reduced in float32
// by user operations, since MPI has no bf16), int64, int32 and uint8.
// Every operation maps to a non-blocking MPI call (MPI_Iallgather, ...,
// MPI_Ialltoallv for uneven all_to_all,
// MPI_Isend/Irecv); Work::wait() drives MPI progress under the watchdog.
// Contiguous tensors are passed to MPI without copies.
//
// Threading: MPI is initialised with MPI_THREAD_SERIALIZED; one thread at a time
// may use a communicator (autograd runs CPU backward on the calling thread).
// Ordering: see communicator.h.
#pragma once

#include <mpi.h>

#include <memory>
#include <string>

#include "loom/runtime/comm/communicator.h"

namespace loom {

class MpiCommunicator final : public Communicator {
 public:
  // Wraps a duplicate of `comm` (Loom's traffic never mixes with the caller's).
  static std::shared_ptr<MpiCommunicator> create(MPI_Comm comm, std::string name);
  // A duplicate of MPI_COMM_WORLD named "world".
  static std::shared_ptr<MpiCommunicator> world();
  ~MpiCommunicator() override;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string backend_name() const override { return "mpi"; }
  const std::string& name() const { return name_; }
  MPI_Comm handle() const { return comm_; }

  std::shared_ptr<Communicator> split(int color, int key) override;

 private:
  // The operations; the base class's public ones call them and time their waits (communicator.h).
  WorkPtr post_all_gather(const at::Tensor& output, const at::Tensor& input) override;
  WorkPtr post_all_reduce(const at::Tensor& tensor, ReduceOp op) override;
  WorkPtr post_reduce_scatter(const at::Tensor& output, const at::Tensor& input, ReduceOp op) override;
  WorkPtr post_broadcast(const at::Tensor& tensor, int root) override;
  WorkPtr post_exscan(const at::Tensor& output, const at::Tensor& input, const ScanOp& op) override;
  WorkPtr post_all_to_all(const at::Tensor& output, const at::Tensor& input) override;
  WorkPtr post_all_to_all(const at::Tensor& output, const at::Tensor& input, const std::vector<int64_t>& output_splits,
                          const std::vector<int64_t>& input_splits) override;
  WorkPtr post_barrier() override;
  WorkPtr post_isend(const at::Tensor& tensor, int dst, int tag) override;
  WorkPtr post_irecv(const at::Tensor& tensor, int src, int tag) override;

  MpiCommunicator(MPI_Comm owned, std::string name);
  std::string describe(OpType op, int64_t seq, int64_t bytes) const;

  MPI_Comm comm_;
  std::string name_;
  int rank_ = 0;
  int size_ = 1;
  // A communicator of one rank moves nothing: its collectives end here as
  // local copies (output <- input; nothing when output is undefined), which
  // work on any device (a single-GPU run, the meta-device test).
  WorkPtr complete_locally(const at::Tensor& output, const at::Tensor& input);
  int64_t seq_ = 0;  // operations issued on this communicator, for watchdog messages
};

// RAII for MPI itself. Initialises MPI (MPI_THREAD_SERIALIZED) unless the
// embedding program already did, and finalises only what it initialised.
class MpiEnvironment {
 public:
  MpiEnvironment(int* argc, char*** argv);
  ~MpiEnvironment();
  MpiEnvironment(const MpiEnvironment&) = delete;
  MpiEnvironment& operator=(const MpiEnvironment&) = delete;

 private:
  bool owns_ = false;
  MPI_Comm peer_channel_ = MPI_COMM_NULL;
};

}  // namespace loom
