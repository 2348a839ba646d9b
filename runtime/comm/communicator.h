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
// Every backend counts calls and bytes per operation (stats()). Bytes are the
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
};

// Per-operation counters of one communicator.
class CommStats {
 public:
  const OpCounters& operator[](OpType op) const { return counters_[static_cast<int>(op)]; }
  void record(OpType op, int64_t bytes_sent, int64_t bytes_received);
  int64_t total_calls() const;
  int64_t total_bytes_sent() const;
  int64_t total_bytes_received() const;
  CommStats operator-(const CommStats& earlier) const;  // counts since `earlier`
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

  // Collectives. Defaults throw CommError naming the backend and the operation.
  virtual WorkPtr all_gather(const at::Tensor& output, const at::Tensor& input);
  virtual WorkPtr all_reduce(const at::Tensor& tensor, ReduceOp op = ReduceOp::kSum);
  virtual WorkPtr reduce_scatter(const at::Tensor& output, const at::Tensor& input,
                                 ReduceOp op = ReduceOp::kSum);
  virtual WorkPtr broadcast(const at::Tensor& tensor, int root);
  virtual WorkPtr exscan(const at::Tensor& output, const at::Tensor& input, const ScanOp& op);
  virtual WorkPtr all_to_all(const at::Tensor& output, const at::Tensor& input);
  // Uneven blocks: split sizes count dim-0 rows, one entry per rank.
  virtual WorkPtr all_to_all(const at::Tensor& output, const at::Tensor& input,
                             const std::vector<int64_t>& output_splits, const std::vector<int64_t>& input_splits);
  virtual WorkPtr barrier();

  // Point-to-point. tag >= 0.
  virtual WorkPtr isend(const at::Tensor& tensor, int dst, int tag);
  virtual WorkPtr irecv(const at::Tensor& tensor, int src, int tag);
  void send(const at::Tensor& tensor, int dst, int tag) { isend(tensor, dst, tag)->wait(); }
  void recv(const at::Tensor& tensor, int src, int tag) { irecv(tensor, src, tag)->wait(); }

  // Sub-communicator of the ranks that pass the same color, ordered by key.
  // color < 0 means "not a member": returns nullptr on that rank.
  virtual std::shared_ptr<Communicator> split(int color, int key);

  // The same ranks in reverse order (rank r becomes size-1-r): made by split()
  // on the first call, which is therefore collective, and kept for the
  // lifetime of this communicator. Scans that run right to left use it.
  CommPtr reversed();

  // Counters of this communicator (not of its splits).
  const CommStats& stats() const { return stats_; }
  void reset_stats() { stats_ = CommStats(); }

  // Time after which an unfinished Work triggers the watchdog.
  std::chrono::milliseconds timeout() const { return timeout_; }
  void set_timeout(std::chrono::milliseconds timeout) { timeout_ = timeout; }

  // Process-unique id: autograd functions save it (an IValue cannot hold a
  // communicator) and find the communicator again in backward with by_id().
  int64_t id() const { return id_; }
  static std::shared_ptr<Communicator> by_id(int64_t id);
  // Makes this communicator findable by by_id(); factories call it once the
  // shared_ptr exists.
  void register_self();

 protected:
  [[noreturn]] void throw_unsupported(const char* op) const;
  void record(OpType op, int64_t bytes_sent, int64_t bytes_received) {
    stats_.record(op, bytes_sent, bytes_received);
  }

 private:
  CommStats stats_;
  std::shared_ptr<Communicator> reversed_;
  std::chrono::milliseconds timeout_;
  int64_t id_;
};

// Default watchdog timeout of a new communicator: LOOM_COMM_TIMEOUT_S if set,
// else parallel.comm_timeout_s's default (600 s). A Job sets its communicators'
// timeout from the resolved config instead.
std::chrono::milliseconds default_comm_timeout();

}  // namespace loom
