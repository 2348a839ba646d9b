// NcclCommunicator: the Communicator backend for CUDA tensors over NCCL.
//
// Built whenever the CUDA toolkit and NCCL are found (LOOM_WITH_NCCL), so CI
// compiles and links it on machines without a GPU; it runs only where there
// is one. Each operation runs on the communicator's own CUDA stream, ordered
// after the caller's current stream by an event; Work::wait() makes the
// caller's current stream wait for the operation's completion event (no host
// synchronisation). The caller's current stream comes from a provider that the
// torch-CUDA glue installs (set_current_stream_provider); without it, the
// legacy default stream is used. The wait time that stats() counts (and
// `loom-train --profile` prints) is therefore the host's time to flush queued
// point-to-point operations and enqueue that stream dependency: microseconds,
// not the time the GPU waits for the communication, which surfaces in the
// next host synchronisation with the stream (see communicator.h). Point-to-point operations are queued and
// issued together in one NCCL group at the next wait() or collective, so a
// ring of irecv/isend cannot deadlock. all_to_all (equal or uneven) is one
// group of ncclSend/ncclRecv per peer. exscan runs by recursive doubling over
// send/recv with the user operation applied between rounds. A watchdog thread
// aborts the NCCL communicator (ncclCommAbort) and the job when an operation
// is not complete after timeout(), naming the operation, rank and host.
// The ncclUniqueId travels over the bootstrap MPI communicator. Ordering: see
// communicator.h.
#pragma once

#include <memory>

#include "loom/runtime/comm/communicator.h"
#include "loom/runtime/comm/mpi_communicator.h"

namespace loom {

// Returns the caller's current CUDA stream as an opaque cudaStream_t.
using CurrentStreamProvider = void* (*)();
void set_current_stream_provider(CurrentStreamProvider provider);

class NcclCommunicator final : public Communicator {
 public:
  // Collective over `bootstrap`: every rank names its CUDA device.
  static std::shared_ptr<NcclCommunicator> create(const std::shared_ptr<MpiCommunicator>& bootstrap, int device);
  ~NcclCommunicator() override;

  int rank() const override;
  int size() const override;
  std::string backend_name() const override { return "nccl"; }
  at::Device device() const override;

  std::shared_ptr<Communicator> split(int color, int key) override;

  struct Impl;

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

  explicit NcclCommunicator(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace loom
