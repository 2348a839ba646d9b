// Communicator: the one interface through which Loom moves tensors between ranks.
//
// What it does: collectives (all_gather, all_reduce, reduce_scatter, broadcast,
// exscan with a user operation, all_to_all, barrier) and point-to-point
// (isend/irecv, send/recv) over a fixed group of ranks, plus split() to make
// sub-groups. Every operation is asynchronous and returns a Work handle; the
// blocking form is op(...)->wait().
//
// Who calls it: parallel/ operators (LASP-2, ring attention, halos, ...), the
// differentiable collectives, the ProcessMesh and the trainer. Models never do.
//
// Ordering rules (the contract every caller keeps):
//  * Collectives are called in the same order on every rank of a communicator,
//    with matching shapes and dtypes. This includes collectives issued from
//    autograd backward: every rank must run the same backward graph.
//  * Point-to-point messages between a pair of ranks with the same tag match in
//    posting order. Post receives before waiting on sends when a pattern could
//    otherwise cycle (a ring): isend/irecv both, then wait both.
//  * Tensors passed to an operation must stay untouched until its Work is waited
//    on (the Work keeps them alive, but does not stop you writing into them).
//  * Work::wait() makes the result usable by the caller's next operations: a CPU
//    backend blocks the host; a stream backend (NCCL) orders the caller's current
//    stream after the communication stream and returns without a host sync.
//  * A Work that is not finished within timeout() triggers the watchdog: by
//    default a clear message on stderr and an abort of the whole job, never a
//    silent hang (see watchdog.h).
//
// Shapes: all_gather concatenates along dim 0 (output has size(0) = W * input
// size(0)); reduce_scatter splits its input along dim 0 into W equal blocks;
// all_to_all sends block r of dim 0 to rank r (equal blocks), or, with split
// sizes, the rows input_splits[0] .. of dim 0 to rank 0, the next
// input_splits[1] rows to rank 1, ..., and receives output_splits[q] rows from
// rank q into consecutive rows of the output (uneven blocks; each rank's
// input_splits[q] must equal rank q's output_splits[r]; rows are dim-0 slices
// and input and output rows must have the same number of elements).
// Contiguous tensors are used in place, others are staged through a
// contiguous copy.
//
// Every backend counts calls and bytes per operation (stats()), and the base
// class adds the seconds spent in each operation's Work::wait(): the public
// operations are non-virtual and wrap the Work that a backend's post_*()
// returns, so no backend can skip the timing. The wait time is host time from
// wait() entry until it returns, by backend:
//   MPI, c10d (Gloo):  the host blocked until the operation completed (the
//                      watchdog's polling included): exposed communication.
//   NCCL:              the host time to flush queued point-to-point operations
//                      and make the caller's stream wait on the completion
//                      event (cudaStreamWaitEvent); the host does not wait for
//                      the GPU, so on a GPU this stays near zero and exposed
//                      communication shows up later, in whatever synchronises
//                      with the stream (a .item(), a copy to the host).
// A Work dropped without wait() (its destructor completes it) and an idempotent
// second wait() add nothing; a wait() that throws adds nothing either. An
// operation that a backend completes inside the call (exscan on c10d and NCCL:
// recursive doubling, each round waited before the next; NCCL's rounds use the
// public isend/irecv, so they count under send and recv) returns a finished
// Work, and its exscan wait is about zero.
// Bytes are the
// payload that crosses the rank boundary by the operation's definition, not by
// the algorithm the library picks:
//   all_gather / reduce_scatter:  sent = received = (W-1) * block bytes
//   all_reduce:                   sent = received = 2 (W-1)/W * tensor bytes (ring)
//   broadcast:                    root sends (W-1) * bytes, others receive bytes
//   exscan:                       received = bytes on ranks > 0, sent = bytes on ranks < W-1
//   all_to_all:                   sent = received = (W-1)/W * tensor bytes
//   all_to_all (split sizes):     sent = input rows to other ranks, received =
//                                 output rows from other ranks (never rank r's own)
//   send / recv:                  the message bytes
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <chrono>
#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

namespace loom {

enum class ReduceOp { kSum, kProd, kMin, kMax };
const char* reduce_op_name(ReduceOp op);

enum class OpType : int {
  kAllGather = 0,
  kAllReduce,
  kReduceScatter,
  kBroadcast,
  kExscan,
  kAllToAll,
  kBarrier,
  kSend,
  kRecv,
  kCount  // number of op types, not an op
};
const char* op_type_name(OpType op);

struct OpCounters {
  int64_t calls = 0;
  int64_t bytes_sent = 0;
  int64_t bytes_received = 0;
  double wait_seconds = 0;  // in Work::wait() (see above)
};

// Per-operation counters of one communicator.
class CommStats {
 public:
  const OpCounters& operator[](OpType op) const { return counters_[static_cast<int>(op)]; }
  void record(OpType op, int64_t bytes_sent, int64_t bytes_received);
  void record_wait(OpType op, double seconds);
  int64_t total_calls() const;
  int64_t total_bytes_sent() const;
  int64_t total_bytes_received() const;
  double total_wait_seconds() const;
  CommStats operator-(const CommStats& earlier) const;  // counts and seconds since `earlier`
  std::string to_string() const;                        // one line per used op

 private:
  std::array<OpCounters, static_cast<int>(OpType::kCount)> counters_{};
};

// Handle to an operation in flight.
class Work {
 public:
  virtual ~Work() = default;
  // Blocks (CPU) or orders the current stream (CUDA) until the operation is
  // done; runs the watchdog; rethrows a backend error. Idempotent.
  virtual void wait() = 0;
  // Non-blocking progress check.
  virtual bool is_completed() = 0;
};
using WorkPtr = std::shared_ptr<Work>;

// A Work that is already done (local-only operations, W = 1 shortcuts).
class CompletedWork final : public Work {
 public:
  void wait() override {}
  bool is_completed() override { return true; }
};

// Waits for every handle in order.
void wait_all(const std::vector<WorkPtr>& works);

// A user operation for exscan: an associative (not necessarily commutative)
// combine of two elements, each element being a whole tensor of the input's
// shape. combine(earlier, later) must overwrite `later` with earlier (+) later.
// identity(out) writes the neutral element: rank 0 receives it from exscan.
struct ScanOp {
  std::string name;
  std::function<void(const at::Tensor& earlier, at::Tensor& later)> combine;
  std::function<void(at::Tensor& out)> identity;
};

// Elementwise sum as a ScanOp (exscan(sum) == MPI_Exscan with MPI_SUM, with 0 on rank 0).
ScanOp sum_scan_op();

// An uneven all_to_all resolved into element counts and offsets per peer,
// after checking the split sizes against the tensors (one entry per rank,
// none negative, summing to each tensor's rows, rows of equal element count,
// the same dtype). Backends call it before counting or posting anything.
struct AllToAllPlan {
  std::vector<int64_t> send_counts, send_offsets;  // elements, per destination rank
  std::vector<int64_t> recv_counts, recv_offsets;  // elements, per source rank
  int64_t bytes_sent = 0;      // to ranks other than `rank`
  int64_t bytes_received = 0;  // from ranks other than `rank`
};
AllToAllPlan plan_all_to_all(const at::Tensor& output, const at::Tensor& input,
                             const std::vector<int64_t>& output_splits, const std::vector<int64_t>& input_splits,
                             int rank, int size);

class Communicator;
using CommPtr = std::shared_ptr<Communicator>;

class Communicator : public std::enable_shared_from_this<Communicator> {
 public:
  Communicator();
  virtual ~Communicator();
  Communicator(const Communicator&) = delete;
  Communicator& operator=(const Communicator&) = delete;

  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual std::string backend_name() const = 0;
  // Where this backend's tensors live (MPI: the CPU; NCCL: its GPU). Small
  // control tensors (loss sums, agreements) are created here.
  virtual at::Device device() const { return at::Device(at::kCPU); }

  // Collectives. Each calls the backend's post_*() and returns its Work
  // wrapped so that wait() adds its seconds to stats().
  WorkPtr all_gather(const at::Tensor& output, const at::Tensor& input);
  WorkPtr all_reduce(const at::Tensor& tensor, ReduceOp op = ReduceOp::kSum);
  WorkPtr reduce_scatter(const at::Tensor& output, const at::Tensor& input, ReduceOp op = ReduceOp::kSum);
  WorkPtr broadcast(const at::Tensor& tensor, int root);
  WorkPtr exscan(const at::Tensor& output, const at::Tensor& input, const ScanOp& op);
  WorkPtr all_to_all(const at::Tensor& output, const at::Tensor& input);
  // Uneven blocks: split sizes count dim-0 rows, one entry per rank.
  WorkPtr all_to_all(const at::Tensor& output, const at::Tensor& input, const std::vector<int64_t>& output_splits,
                     const std::vector<int64_t>& input_splits);
  WorkPtr barrier();

  // Point-to-point. tag >= 0.
  WorkPtr isend(const at::Tensor& tensor, int dst, int tag);
  WorkPtr irecv(const at::Tensor& tensor, int src, int tag);
  void send(const at::Tensor& tensor, int dst, int tag) { isend(tensor, dst, tag)->wait(); }
  void recv(const at::Tensor& tensor, int src, int tag) { irecv(tensor, src, tag)->wait(); }

  // Sub-communicator of the ranks that pass the same color, ordered by key.
  // color < 0 means "not a member": returns nullptr on that rank.
  virtual std::shared_ptr<Communicator> split(int color, int key);

  // The same ranks in reverse order (rank r becomes size-1-r): made by split()
  // on the first call, which is therefore collective, and kept for the
  // lifetime of this communicator. Scans that run right to left use it.
  CommPtr reversed();

  // Counters of this communicator (not of its splits). Updated by the thread
  // that posts or waits (one thread at a time per communicator).
  const CommStats& stats() const { return *stats_; }
  void reset_stats() { *stats_ = CommStats(); }

  // Time after which an unfinished Work triggers the watchdog.
  std::chrono::milliseconds timeout() const { return timeout_; }
  void set_timeout(std::chrono::milliseconds timeout) { timeout_ = timeout; }

  // Process-unique id: autograd functions save it (an IValue cannot hold a
  // communicator) and find the communicator again in backward with by_id().
  int64_t id() const { return id_; }
  static std::shared_ptr<Communicator> by_id(int64_t id);
  // The registered communicators alive now (splits and reversed() included),
  // by ascending id: what `loom-train --profile` sums.
  static std::vector<std::shared_ptr<Communicator>> live();
  // Makes this communicator findable by by_id(); factories call it once the
  // shared_ptr exists.
  void register_self();

 protected:
  // What a backend implements: post the operation and return its Work (a
  // CompletedWork when nothing is left to wait for). Defaults throw CommError
  // naming the backend and the operation.
  virtual WorkPtr post_all_gather(const at::Tensor& output, const at::Tensor& input);
  virtual WorkPtr post_all_reduce(const at::Tensor& tensor, ReduceOp op);
  virtual WorkPtr post_reduce_scatter(const at::Tensor& output, const at::Tensor& input, ReduceOp op);
  virtual WorkPtr post_broadcast(const at::Tensor& tensor, int root);
  virtual WorkPtr post_exscan(const at::Tensor& output, const at::Tensor& input, const ScanOp& op);
  virtual WorkPtr post_all_to_all(const at::Tensor& output, const at::Tensor& input);
  virtual WorkPtr post_all_to_all(const at::Tensor& output, const at::Tensor& input,
                                  const std::vector<int64_t>& output_splits, const std::vector<int64_t>& input_splits);
  virtual WorkPtr post_barrier();
  virtual WorkPtr post_isend(const at::Tensor& tensor, int dst, int tag);
  virtual WorkPtr post_irecv(const at::Tensor& tensor, int src, int tag);

  [[noreturn]] void throw_unsupported(const char* op) const;
  void record(OpType op, int64_t bytes_sent, int64_t bytes_received) {
    stats_->record(op, bytes_sent, bytes_received);
  }

 private:
  // `work` wrapped so that its wait() adds to stats_ under `op`.
  WorkPtr timed(OpType op, WorkPtr work);

  // Shared with the wrapped Works, which may be waited on after this
  // communicator is gone.
  std::shared_ptr<CommStats> stats_;
  std::shared_ptr<Communicator> reversed_;
  std::chrono::milliseconds timeout_;
  int64_t id_;
};

// Default watchdog timeout of a new communicator: LOOM_COMM_TIMEOUT_S if set,
// else parallel.comm_timeout_s's default (600 s). A Job sets its communicators'
// timeout from the resolved config instead.
std::chrono::milliseconds default_comm_timeout();

}  // namespace loom
