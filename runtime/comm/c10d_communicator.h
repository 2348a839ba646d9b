// C10dCommunicator: the Communicator backend over a PyTorch c10d process group,
// so that Loom's operators run inside a torchrun job (Gloo on CPU here; NCCL
// groups on GPU).
//
// Built when CMake finds c10d's Gloo headers (libtorch-dev + libgloo-dev),
// option LOOM_WITH_C10D; build_config.h says LOOM_WITH_C10D. Who calls it: the
// Python module `loom` (python/loom_module.cc) wraps the group a
// torch.distributed program passes in; C++ programs can wrap their own group
// or make a Gloo group over a store with create_gloo().
//
// Contract: the one of communicator.h (ordering, async Work, byte counters by
// the operation's definition, watchdog). How each operation maps onto c10d:
//   all_gather      allgather into views of the output (one buffer)
//   all_reduce      allreduce (bfloat16: reduced in a float32 copy, as MPI does)
//   reduce_scatter  alltoall of the input blocks, then the W received blocks
//                   reduced locally in rank order (Gloo has no reduce_scatter)
//   broadcast       broadcast
//   exscan          recursive doubling over send/recv on tags >= kReservedTagBase,
//                   the user operation applied between rounds (as NCCL does)
//   all_to_all      alltoall_base with equal splits, or the split sizes given
//   barrier         barrier
//   isend / irecv   send / recv (a rank's messages to itself are matched locally,
//                   Gloo has no self-connection); user tags < kReservedTagBase
// Tensors: CPU for Gloo (CUDA for an NCCL group), dtypes float32, float64,
// bfloat16 (moved as 2-byte words, since Gloo has no bfloat16), int64, int32
// and uint8; non-contiguous tensors are staged through contiguous copies.
// Waiting: collectives are polled (Work::isCompleted) under the watchdog, so a
// collective that a peer skipped ends with the watchdog's message after
// timeout() (abort, or CommTimeout with LOOM_WATCHDOG=throw). Gloo cannot poll
// a send or receive: they wait in Gloo with timeout() and, when it passes,
// report through the watchdog the same way. Any other error of the process
// group becomes a CommError naming the operation, rank and host.
// Threads: one thread at a time per communicator (autograd runs CPU backward
// on the calling thread); the process group may run its own threads.
// split(): needs the store the group was made from (create_gloo() keeps it;
// a group from Python passes its store, or split() says it cannot).
#pragma once

#include <torch/csrc/distributed/c10d/ProcessGroup.hpp>
#include <torch/csrc/distributed/c10d/Store.hpp>

#include <deque>
#include <map>
#include <memory>
#include <string>

#include "loom/runtime/comm/communicator.h"

namespace loom {

class C10dCommunicator final : public Communicator {
 public:
  // Point-to-point tags from here up belong to the communicator's own exchanges.
  static constexpr int kReservedTagBase = 1 << 30;

  // Wraps a process group made elsewhere (torch.distributed, a trainer).
  // `store` (may be null) is the group's store: split() builds sub-groups of
  // Gloo over it under a prefix.
  static std::shared_ptr<C10dCommunicator> create(c10::intrusive_ptr<c10d::ProcessGroup> group,
                                                  c10::intrusive_ptr<c10d::Store> store, std::string name);
  // A Gloo group of `size` ranks over `store` (FileStore, TCPStore, ...), this
  // process being `rank`. Collective over the ranks that share the store.
  // Gloo's own timeout is set to max(timeout(), 30 min) so that Loom's
  // watchdog, not Gloo, reports a hang.
  static std::shared_ptr<C10dCommunicator> create_gloo(c10::intrusive_ptr<c10d::Store> store, int rank, int size,
                                                       std::string name);
  ~C10dCommunicator() override;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  std::string backend_name() const override { return "c10d"; }
  const std::string& name() const { return name_; }
  // c10d's name of the group's backend ("gloo", "nccl", ...).
  std::string group_backend() const;

  std::shared_ptr<Communicator> split(int color, int key) override;

  // The process group's operations behind a version-neutral interface (c10d's
  // ProcessGroup in PyTorch 1.x; ProcessGroup or Backend in 2.x).
  class Group;
  // Messages a rank sends to itself, matched in posting order per tag.
  struct SelfMailbox;

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

  C10dCommunicator(std::unique_ptr<Group> group, c10::intrusive_ptr<c10d::Store> store, std::string name);
  std::string describe(OpType op, int64_t bytes) const;
  WorkPtr send_internal(const at::Tensor& tensor, int dst, int tag, const std::string& what);
  WorkPtr recv_internal(const at::Tensor& tensor, int src, int tag, const std::string& what);

  std::unique_ptr<Group> group_;
  c10::intrusive_ptr<c10d::Store> store_;
  std::string name_;
  int rank_ = 0;
  int size_ = 1;
  int64_t seq_ = 0;     // operations issued, for the watchdog's messages
  int splits_ = 0;      // split() calls, for the sub-groups' store prefixes
  std::shared_ptr<SelfMailbox> mailbox_;
};

}  // namespace loom
