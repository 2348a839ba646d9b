#include "loom/runtime/comm/c10d_communicator.h"

// ProcessGroupGloo.hpp declares its class only for builds with Gloo, which
// LOOM_WITH_C10D established; defined here rather than on the command line so
// that the shared precompiled header stays valid for this file.
#ifndef USE_C10D_GLOO
#define USE_C10D_GLOO
#endif
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>

#include <algorithm>
#include <cstdlib>
#include <iostream>
#include <sstream>

#include "loom/runtime/comm/watchdog.h"
#include "loom/runtime/core/env_flag.h"
#include "loom/runtime/core/error.h"

namespace loom {

using GroupWork = c10::intrusive_ptr<c10d::Work>;

// ---- the process group behind a version-neutral interface ----

class C10dCommunicator::Group {
 public:
  virtual ~Group() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  virtual std::string backend() const = 0;
  virtual GroupWork allgather(std::vector<std::vector<at::Tensor>>& outputs, std::vector<at::Tensor>& inputs) = 0;
  virtual GroupWork allreduce(std::vector<at::Tensor>& tensors, ReduceOp op) = 0;
  virtual GroupWork broadcast(std::vector<at::Tensor>& tensors, int root) = 0;
  // Split sizes count dim-0 rows; empty: W equal blocks.
  virtual GroupWork alltoall(at::Tensor& output, at::Tensor& input, std::vector<int64_t>& output_splits,
                             std::vector<int64_t>& input_splits) = 0;
  virtual GroupWork barrier() = 0;
  virtual GroupWork send(std::vector<at::Tensor>& tensors, int dst, int tag) = 0;
  virtual GroupWork recv(std::vector<at::Tensor>& tensors, int src, int tag) = 0;
};

namespace {

c10d::ReduceOp c10d_op(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum: return c10d::ReduceOp::SUM;
    case ReduceOp::kProd: return c10d::ReduceOp::PRODUCT;
    case ReduceOp::kMin: return c10d::ReduceOp::MIN;
    case ReduceOp::kMax: return c10d::ReduceOp::MAX;
  }
  return c10d::ReduceOp::SUM;
}

// The same calls on c10d::ProcessGroup (PyTorch 1.x and 2.x) and on a backend
// class such as ProcessGroupGloo (a ProcessGroup in 1.x, a Backend in 2.x).
template <typename G>
class GroupOf final : public C10dCommunicator::Group {
 public:
  explicit GroupOf(c10::intrusive_ptr<G> group) : group_(std::move(group)) {}
  int rank() const override { return group_->getRank(); }
  int size() const override { return group_->getSize(); }
  std::string backend() const override { return group_->getBackendName(); }
  GroupWork allgather(std::vector<std::vector<at::Tensor>>& outputs, std::vector<at::Tensor>& inputs) override {
    return group_->allgather(outputs, inputs, c10d::AllgatherOptions());
  }
  GroupWork allreduce(std::vector<at::Tensor>& tensors, ReduceOp op) override {
    c10d::AllreduceOptions options;
    options.reduceOp = c10d_op(op);
    return group_->allreduce(tensors, options);
  }
  GroupWork broadcast(std::vector<at::Tensor>& tensors, int root) override {
    c10d::BroadcastOptions options;
    options.rootRank = root;
    return group_->broadcast(tensors, options);
  }
  GroupWork alltoall(at::Tensor& output, at::Tensor& input, std::vector<int64_t>& output_splits,
                     std::vector<int64_t>& input_splits) override {
    return group_->alltoall_base(output, input, output_splits, input_splits, c10d::AllToAllOptions());
  }
  GroupWork barrier() override { return group_->barrier(c10d::BarrierOptions()); }
  GroupWork send(std::vector<at::Tensor>& tensors, int dst, int tag) override {
    return group_->send(tensors, dst, tag);
  }
  GroupWork recv(std::vector<at::Tensor>& tensors, int src, int tag) override {
    return group_->recv(tensors, src, tag);
  }

 private:
  c10::intrusive_ptr<G> group_;
};

void check_dtype(const at::Tensor& t, const char* op, const char* which) {
  TORCH_CHECK(t.defined(), "c10d communicator: ", op, ": ", which, " tensor is undefined");
  switch (t.scalar_type()) {
    case at::kFloat:
    case at::kDouble:
    case at::kBFloat16:
    case at::kLong:
    case at::kInt:
    case at::kByte:
      return;
    default:
      break;
  }
  TORCH_CHECK(false, "c10d communicator: ", op, " does not support dtype ", t.scalar_type(),
              " (supported: float32, float64, bfloat16, int64, int32, uint8)");
}

// What travels: the contiguous tensor flattened, bfloat16 reinterpreted as
// 2-byte float16 words (Gloo moves no bfloat16; moving bits is exact).
at::Tensor wire(const at::Tensor& contiguous) {
  const at::Tensor flat = contiguous.view({-1});
  return flat.scalar_type() == at::kBFloat16 ? flat.view(at::kHalf) : flat;
}

// An output the group writes into: the tensor itself when contiguous, else a
// contiguous buffer copied back when the operation completes.
struct Output {
  at::Tensor target;
  at::Tensor buffer;
  explicit Output(const at::Tensor& t)
      : target(t), buffer(t.is_contiguous() ? t : at::empty_like(t, at::MemoryFormat::Contiguous)) {}
  void finish() {
    if (!buffer.is_same(target)) target.copy_(buffer);
  }
};

// c10d's kNoTimeout (a global in PyTorch 1.x, in namespace c10d in 2.x).
constexpr std::chrono::milliseconds kWaitWithoutTimeout{0};

// A c10d operation (or several) in flight. Collectives are polled under the
// watchdog; a send or receive of Gloo cannot be polled and waits in Gloo with
// the deadline instead.
class C10dWork final : public Work {
 public:
  C10dWork(std::vector<GroupWork> works, bool pollable, std::chrono::milliseconds timeout, std::string description,
           std::vector<at::Tensor> keep_alive, std::function<void()> on_complete)
      : works_(std::move(works)),
        pollable_(pollable),
        timeout_(timeout),
        description_(std::move(description)),
        keep_alive_(std::move(keep_alive)),
        on_complete_(std::move(on_complete)) {}
  ~C10dWork() override {
    // A Work dropped unwaited must not leave the group writing into freed memory.
    if (!done_) {
      try {
        wait();
      } catch (...) {
      }
    }
  }

  void wait() override {
    if (done_) return;
    if (pollable_) {
      wait_with_watchdog([this] { return all_completed(); }, timeout_, [this] { return description_; });
    }
    const auto start = std::chrono::steady_clock::now();
    for (auto& work : works_) {
      bool finished = true;
      try {
        finished = work->wait(pollable_ ? kWaitWithoutTimeout : timeout_);
      } catch (const std::exception& e) {
        if (!pollable_ && std::chrono::steady_clock::now() - start >= timeout_) report_timeout(timeout_, description_);
        done_ = true;  // the group reported the failure; nothing is left in flight
        throw CommError(description_ + " failed on host " + host_name() + ": " + first_line(e.what()));
      }
      if (!finished) {
        done_ = true;
        report_timeout(timeout_, description_);
      }
    }
    finish();
  }
  // A send or receive of Gloo reports completion only once waited.
  bool is_completed() override {
    if (done_) return true;
    if (!pollable_ || !all_completed()) return false;
    wait();  // completed: collects an error, runs the completion
    return true;
  }

 private:
  static std::string first_line(const std::string& text) {
    // c10::Error's what() carries a C++ backtrace after the message.
    const auto end = text.find('\n');
    return end == std::string::npos ? text : text.substr(0, end);
  }
  bool all_completed() {
    for (auto& work : works_)
      if (!work->isCompleted()) return false;
    return true;
  }
  void finish() {
    done_ = true;
    if (on_complete_) on_complete_();
    on_complete_ = nullptr;
    keep_alive_.clear();
  }

  std::vector<GroupWork> works_;
  bool pollable_;
  std::chrono::milliseconds timeout_;
  std::string description_;
  std::vector<at::Tensor> keep_alive_;
  std::function<void()> on_complete_;
  bool done_ = false;
};

}  // namespace

// ---- messages to oneself ----

struct C10dCommunicator::SelfMailbox {
  struct Slot {
    at::Tensor target;
    bool done = false;
  };
  std::map<int, std::deque<at::Tensor>> sent;                 // sent, not yet received
  std::map<int, std::deque<std::shared_ptr<Slot>>> waiting;   // receives posted first
};

namespace {

class SelfRecvWork final : public Work {
 public:
  SelfRecvWork(std::shared_ptr<C10dCommunicator::SelfMailbox::Slot> slot, std::chrono::milliseconds timeout,
               std::string description)
      : slot_(std::move(slot)), timeout_(timeout), description_(std::move(description)) {}
  void wait() override {
    // Only this thread can post the matching send: waiting first is a hang
    // that the watchdog reports, as a peer's missing send would be.
    wait_with_watchdog([this] { return slot_->done; }, timeout_, [this] { return description_; });
  }
  bool is_completed() override { return slot_->done; }

 private:
  std::shared_ptr<C10dCommunicator::SelfMailbox::Slot> slot_;
  std::chrono::milliseconds timeout_;
  std::string description_;
};

}  // namespace

namespace {

// Posts one operation on the group; an error the group raises at once becomes
// a CommError naming the operation, rank and host.
template <typename Post>
GroupWork post(const std::string& what, Post&& post_it) {
  try {
    return post_it();
  } catch (const std::exception& e) {
    const std::string text = e.what();
    throw CommError(what + " failed on host " + host_name() + ": " + text.substr(0, text.find('\n')));
  }
}

// A collective of one rank moves nothing: output <- input, on any device.
WorkPtr complete_locally(const at::Tensor& output, const at::Tensor& input) {
  if (output.defined()) output.view(input.sizes()).copy_(input);
  return std::make_shared<CompletedWork>();
}

}  // namespace

// ---- C10dCommunicator ----

C10dCommunicator::C10dCommunicator(std::unique_ptr<Group> group, c10::intrusive_ptr<c10d::Store> store,
                                   std::string name)
    : group_(std::move(group)),
      store_(std::move(store)),
      name_(std::move(name)),
      rank_(group_->rank()),
      size_(group_->size()),
      mailbox_(std::make_shared<SelfMailbox>()) {}

C10dCommunicator::~C10dCommunicator() = default;

std::shared_ptr<C10dCommunicator> C10dCommunicator::create(c10::intrusive_ptr<c10d::ProcessGroup> group,
                                                           c10::intrusive_ptr<c10d::Store> store, std::string name) {
  TORCH_CHECK(group, "C10dCommunicator::create: the process group is null");
  std::shared_ptr<C10dCommunicator> c(new C10dCommunicator(
      std::make_unique<GroupOf<c10d::ProcessGroup>>(std::move(group)), std::move(store), std::move(name)));
  c->register_self();
  return c;
}

std::shared_ptr<C10dCommunicator> C10dCommunicator::create_gloo(c10::intrusive_ptr<c10d::Store> store, int rank,
                                                                int size, std::string name) {
  TORCH_CHECK(store, "C10dCommunicator::create_gloo: the store is null");
  TORCH_CHECK(size >= 1 && rank >= 0 && rank < size, "C10dCommunicator::create_gloo: rank ", rank,
              " is not a rank of a group of size ", size);
  const auto gloo_timeout = std::max<std::chrono::milliseconds>(default_comm_timeout(), std::chrono::minutes(30));
  auto options = c10d::ProcessGroupGloo::Options::create(gloo_timeout);
  // The interface as torch.distributed picks it: GLOO_SOCKET_IFNAME, else the
  // address the host name resolves to (loopback when it resolves to none).
  const char* ifname = std::getenv("GLOO_SOCKET_IFNAME");
  options->devices.push_back(ifname && *ifname ? c10d::ProcessGroupGloo::createDeviceForInterface(ifname)
                                               : c10d::ProcessGroupGloo::createDefaultDevice());
  c10::intrusive_ptr<c10d::ProcessGroupGloo> gloo;
  try {
    gloo = c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, size, options);
  } catch (const std::exception& e) {
    const std::string what = e.what();
    throw CommError("cannot create the Gloo group '" + name + "' (rank " + std::to_string(rank) + " of " +
                    std::to_string(size) + ", host " + host_name() + "): " + what.substr(0, what.find('\n')));
  }
  std::shared_ptr<C10dCommunicator> c(
      new C10dCommunicator(std::make_unique<GroupOf<c10d::ProcessGroupGloo>>(gloo), std::move(store),
                           std::move(name)));
  // A rank's constructor returns once its own connections are up, while a
  // peer may still be connecting to a third rank: were this rank to destroy
  // the group at once, that peer would see its connection closed. The
  // barrier (not counted) returns only when every rank is connected.
  if (size > 1) {
    const std::string what = "creation barrier of c10d communicator '" + c->name() + "' (rank " +
                             std::to_string(rank) + " of " + std::to_string(size) + ")";
    auto work = post(what, [&] { return gloo->barrier(c10d::BarrierOptions()); });
    C10dWork(std::vector<GroupWork>{work}, true, c->timeout(), what, {}, nullptr).wait();
  }
  c->register_self();
  return c;
}

std::string C10dCommunicator::group_backend() const { return group_->backend(); }

std::string C10dCommunicator::describe(OpType op, int64_t bytes) const {
  std::ostringstream out;
  out << "operation " << op_type_name(op) << " #" << seq_ << " on c10d communicator '" << name_ << "' (rank "
      << rank_ << " of " << size_ << ", " << bytes << " bytes)";
  // Never throws here (this runs inside every collective, the first of them
  // before Job exists): a bad value reads as off; Job refuses it on every rank.
  static const bool trace = env_flag_nothrow("LOOM_TRACE_COMM", false);
  if (trace) std::cerr << "[loom trace r" << world_rank_or_minus_one() << "] " << out.str() << std::endl;
  return out.str();
}


WorkPtr C10dCommunicator::post_all_gather(const at::Tensor& output, const at::Tensor& input) {
  check_dtype(input, "all_gather", "input");
  check_dtype(output, "all_gather", "output");
  TORCH_CHECK(output.scalar_type() == input.scalar_type(), "all_gather: output dtype ", output.scalar_type(),
              " differs from input dtype ", input.scalar_type());
  TORCH_CHECK(output.numel() == input.numel() * size_, "all_gather: output has ", output.numel(),
              " elements, expected world size ", size_, " x ", input.numel());
  const at::Tensor in = input.contiguous();
  const int64_t bytes = in.nbytes();
  record(OpType::kAllGather, (size_ - 1) * bytes, (size_ - 1) * bytes);
  ++seq_;
  if (size_ == 1) return complete_locally(output, in);
  auto out = std::make_shared<Output>(output);
  std::vector<at::Tensor> inputs{wire(in)};
  const at::Tensor gathered = wire(out->buffer);
  std::vector<std::vector<at::Tensor>> outputs(1);
  for (int q = 0; q < size_; ++q) outputs[0].push_back(gathered.narrow(0, q * in.numel(), in.numel()));
  const std::string what = describe(OpType::kAllGather, bytes);
  auto work = post(what, [&] { return group_->allgather(outputs, inputs); });
  return std::make_shared<C10dWork>(std::vector<GroupWork>{work}, true, timeout(), what,
                                    std::vector<at::Tensor>{in, out->buffer}, [out] { out->finish(); });
}

WorkPtr C10dCommunicator::post_all_reduce(const at::Tensor& tensor, ReduceOp op) {
  check_dtype(tensor, "all_reduce", "input/output");
  const int64_t bytes = tensor.nbytes();
  const int64_t ring = size_ > 1 ? 2 * (size_ - 1) * bytes / size_ : 0;
  record(OpType::kAllReduce, ring, ring);
  ++seq_;
  if (size_ == 1) return complete_locally({}, {});
  // bfloat16 is reduced in a float32 copy (Gloo has no bfloat16 arithmetic).
  const bool widen = tensor.scalar_type() == at::kBFloat16;
  const at::Tensor buffer = widen ? tensor.to(at::kFloat).contiguous() : tensor.contiguous();
  std::vector<at::Tensor> tensors{buffer};
  const std::string what = describe(OpType::kAllReduce, bytes);
  auto work = post(what, [&] { return group_->allreduce(tensors, op); });
  const at::Tensor target = tensor;
  return std::make_shared<C10dWork>(std::vector<GroupWork>{work}, true, timeout(), what,
                                    std::vector<at::Tensor>{buffer}, [target, buffer] {
                                      if (!buffer.is_same(target)) target.copy_(buffer);
                                    });
}

WorkPtr C10dCommunicator::post_reduce_scatter(const at::Tensor& output, const at::Tensor& input, ReduceOp op) {
  check_dtype(input, "reduce_scatter", "input");
  check_dtype(output, "reduce_scatter", "output");
  TORCH_CHECK(output.scalar_type() == input.scalar_type(), "reduce_scatter: output dtype ", output.scalar_type(),
              " differs from input dtype ", input.scalar_type());
  TORCH_CHECK(input.numel() == output.numel() * size_, "reduce_scatter: input has ", input.numel(),
              " elements, expected world size ", size_, " x output ", output.numel());
  const at::Tensor in = input.contiguous();
  const int64_t block = output.numel();
  const int64_t bytes = output.nbytes();
  record(OpType::kReduceScatter, (size_ - 1) * bytes, (size_ - 1) * bytes);
  ++seq_;
  if (size_ == 1) return complete_locally(output, in);
  // Block q of every rank's input comes to rank q; the W blocks are then
  // reduced here, in rank order.
  at::Tensor received = at::empty_like(in);
  at::Tensor send_wire = wire(in), recv_wire = wire(received);
  const std::string what = describe(OpType::kReduceScatter, bytes);
  std::vector<int64_t> equal_splits;
  auto work = post(what, [&] { return group_->alltoall(recv_wire, send_wire, equal_splits, equal_splits); });
  const int world = size_;
  const at::Tensor target = output;
  return std::make_shared<C10dWork>(
      std::vector<GroupWork>{work}, true, timeout(), what, std::vector<at::Tensor>{in, received},
      [target, received, world, block, op] {
        const at::ScalarType dtype = received.scalar_type();
        const at::ScalarType acc = dtype == at::kBFloat16 ? at::kFloat : dtype;
        const at::Tensor blocks = received.view({world, block}).to(acc);
        at::Tensor reduced;
        switch (op) {
          case ReduceOp::kSum: reduced = blocks.sum(0, false, acc); break;
          case ReduceOp::kProd: reduced = blocks.prod(0, false, acc); break;
          case ReduceOp::kMin: reduced = std::get<0>(blocks.min(0)); break;
          case ReduceOp::kMax: reduced = std::get<0>(blocks.max(0)); break;
        }
        target.view(target.sizes()).copy_(reduced.view(target.sizes()));
      });
}

WorkPtr C10dCommunicator::post_broadcast(const at::Tensor& tensor, int root) {
  check_dtype(tensor, "broadcast", "input/output");
  TORCH_CHECK(root >= 0 && root < size_, "broadcast: root ", root, " is not a rank of a communicator of size ", size_);
  const int64_t bytes = tensor.nbytes();
  ++seq_;
  if (size_ == 1) {
    record(OpType::kBroadcast, 0, 0);
    return std::make_shared<CompletedWork>();
  }
  record(OpType::kBroadcast, rank_ == root ? (size_ - 1) * bytes : 0, rank_ == root ? 0 : bytes);
  auto out = std::make_shared<Output>(tensor);
  if (!out->buffer.is_same(tensor) && rank_ == root) out->buffer.copy_(tensor);
  std::vector<at::Tensor> tensors{wire(out->buffer)};
  const std::string what = describe(OpType::kBroadcast, bytes);
  auto work = post(what, [&] { return group_->broadcast(tensors, root); });
  return std::make_shared<C10dWork>(std::vector<GroupWork>{work}, true, timeout(), what,
                                    std::vector<at::Tensor>{out->buffer}, [out] { out->finish(); });
}

WorkPtr C10dCommunicator::post_all_to_all(const at::Tensor& output, const at::Tensor& input) {
  check_dtype(input, "all_to_all", "input");
  check_dtype(output, "all_to_all", "output");
  TORCH_CHECK(output.scalar_type() == input.scalar_type() && output.numel() == input.numel(),
              "all_to_all: output must have the input's dtype and element count");
  TORCH_CHECK(input.numel() % size_ == 0, "all_to_all: ", input.numel(), " elements do not split into ", size_,
              " equal blocks");
  const at::Tensor in = input.contiguous();
  const int64_t bytes = in.nbytes();
  record(OpType::kAllToAll, (size_ - 1) * bytes / size_, (size_ - 1) * bytes / size_);
  ++seq_;
  if (size_ == 1) return complete_locally(output, in);
  auto out = std::make_shared<Output>(output);
  at::Tensor send_wire = wire(in), recv_wire = wire(out->buffer);
  const std::string what = describe(OpType::kAllToAll, bytes);
  std::vector<int64_t> equal_splits;
  auto work = post(what, [&] { return group_->alltoall(recv_wire, send_wire, equal_splits, equal_splits); });
  return std::make_shared<C10dWork>(std::vector<GroupWork>{work}, true, timeout(), what,
                                    std::vector<at::Tensor>{in, out->buffer}, [out] { out->finish(); });
}

WorkPtr C10dCommunicator::post_all_to_all(const at::Tensor& output, const at::Tensor& input,
                                     const std::vector<int64_t>& output_splits,
                                     const std::vector<int64_t>& input_splits) {
  check_dtype(input, "all_to_all", "input");
  check_dtype(output, "all_to_all", "output");
  const AllToAllPlan plan = plan_all_to_all(output, input, output_splits, input_splits, rank_, size_);
  const at::Tensor in = input.contiguous();
  record(OpType::kAllToAll, plan.bytes_sent, plan.bytes_received);
  ++seq_;
  if (size_ == 1) return complete_locally(output, in);
  auto out = std::make_shared<Output>(output);
  // The wire tensors are flat: the plan's element counts are their rows.
  at::Tensor send_wire = wire(in), recv_wire = wire(out->buffer);
  std::vector<int64_t> send_counts = plan.send_counts, recv_counts = plan.recv_counts;
  const std::string what = describe(OpType::kAllToAll, in.nbytes());
  auto work = post(what, [&] { return group_->alltoall(recv_wire, send_wire, recv_counts, send_counts); });
  return std::make_shared<C10dWork>(std::vector<GroupWork>{work}, true, timeout(), what,
                                    std::vector<at::Tensor>{in, out->buffer}, [out] { out->finish(); });
}

WorkPtr C10dCommunicator::post_barrier() {
  record(OpType::kBarrier, 0, 0);
  ++seq_;
  if (size_ == 1) return std::make_shared<CompletedWork>();
  const std::string what = describe(OpType::kBarrier, 0);
  auto work = post(what, [&] { return group_->barrier(); });
  return std::make_shared<C10dWork>(std::vector<GroupWork>{work}, true, timeout(), what, std::vector<at::Tensor>{},
                                    nullptr);
}

WorkPtr C10dCommunicator::send_internal(const at::Tensor& tensor, int dst, int tag, const std::string& what) {
  const at::Tensor in = tensor.contiguous();
  if (dst == rank_) {
    auto& waiting = mailbox_->waiting[tag];
    if (!waiting.empty()) {
      auto slot = waiting.front();
      waiting.pop_front();
      slot->target.copy_(in.view(slot->target.sizes()));
      slot->done = true;
    } else {
      mailbox_->sent[tag].push_back(in.clone());
    }
    return std::make_shared<CompletedWork>();
  }
  std::vector<at::Tensor> tensors{wire(in)};
  auto work = post(what, [&] { return group_->send(tensors, dst, tag); });
  return std::make_shared<C10dWork>(std::vector<GroupWork>{work}, false, timeout(), what,
                                    std::vector<at::Tensor>{in}, nullptr);
}

WorkPtr C10dCommunicator::recv_internal(const at::Tensor& tensor, int src, int tag, const std::string& what) {
  auto out = std::make_shared<Output>(tensor);
  if (src == rank_) {
    auto& sent = mailbox_->sent[tag];
    if (!sent.empty()) {
      out->buffer.copy_(sent.front().view(out->buffer.sizes()));
      sent.pop_front();
      out->finish();
      return std::make_shared<CompletedWork>();
    }
    auto slot = std::make_shared<SelfMailbox::Slot>();
    slot->target = tensor;
    mailbox_->waiting[tag].push_back(slot);
    return std::make_shared<SelfRecvWork>(slot, timeout(), what);
  }
  std::vector<at::Tensor> tensors{wire(out->buffer)};
  auto work = post(what, [&] { return group_->recv(tensors, src, tag); });
  return std::make_shared<C10dWork>(std::vector<GroupWork>{work}, false, timeout(), what,
                                    std::vector<at::Tensor>{out->buffer}, [out] { out->finish(); });
}

WorkPtr C10dCommunicator::post_isend(const at::Tensor& tensor, int dst, int tag) {
  check_dtype(tensor, "isend", "input");
  TORCH_CHECK(dst >= 0 && dst < size_, "isend: destination ", dst, " is not a rank of a communicator of size ", size_);
  TORCH_CHECK(tag >= 0 && tag < kReservedTagBase, "isend: tag must be in [0, ", kReservedTagBase, "), got ", tag);
  record(OpType::kSend, tensor.nbytes(), 0);
  ++seq_;
  std::ostringstream what;
  what << describe(OpType::kSend, tensor.nbytes()) << " to rank " << dst << " tag " << tag;
  return send_internal(tensor, dst, tag, what.str());
}

WorkPtr C10dCommunicator::post_irecv(const at::Tensor& tensor, int src, int tag) {
  check_dtype(tensor, "irecv", "output");
  TORCH_CHECK(src >= 0 && src < size_, "irecv: source ", src, " is not a rank of a communicator of size ", size_);
  TORCH_CHECK(tag >= 0 && tag < kReservedTagBase, "irecv: tag must be in [0, ", kReservedTagBase, "), got ", tag);
  record(OpType::kRecv, 0, tensor.nbytes());
  ++seq_;
  std::ostringstream what;
  what << describe(OpType::kRecv, tensor.nbytes()) << " from rank " << src << " tag " << tag;
  return recv_internal(tensor, src, tag, what.str());
}

WorkPtr C10dCommunicator::post_exscan(const at::Tensor& output, const at::Tensor& input, const ScanOp& op) {
  check_dtype(input, "exscan", "input");
  check_dtype(output, "exscan", "output");
  TORCH_CHECK(op.combine && op.identity, "exscan: scan operation '", op.name, "' needs combine and identity");
  TORCH_CHECK(output.sizes() == input.sizes() && output.scalar_type() == input.scalar_type(), "exscan: output (",
              output.sizes(), ", ", output.scalar_type(), ") must match input (", input.sizes(), ", ",
              input.scalar_type(), ")");
  const int W = size_, r = rank_;
  const int64_t bytes = input.nbytes();
  record(OpType::kExscan, r < W - 1 ? bytes : 0, r > 0 ? bytes : 0);
  ++seq_;
  const std::string what = describe(OpType::kExscan, bytes);
  auto out = std::make_shared<Output>(output);
  op.identity(out->buffer);
  // Recursive doubling (Hillis-Steele): after the round with distance d, `acc`
  // holds the composition of ranks max(0, r-2d+1)..r and `out` the one of the
  // ranks before r reached so far; each round sends acc to r+d and folds what
  // r-d sent in on the left.
  at::Tensor acc = input.contiguous().clone();
  bool has_prefix = false;
  int round = 0;
  for (int d = 1; d < W; d *= 2, ++round) {
    const int tag = kReservedTagBase + round;
    at::Tensor incoming = at::empty_like(acc);
    std::vector<WorkPtr> works;
    if (r - d >= 0) works.push_back(recv_internal(incoming, r - d, tag, what + " (round " + std::to_string(round) + ")"));
    if (r + d < W) works.push_back(send_internal(acc, r + d, tag, what + " (round " + std::to_string(round) + ")"));
    wait_all(works);
    if (r - d >= 0) {
      if (has_prefix) {
        at::Tensor prefix = out->buffer;
        op.combine(incoming, prefix);  // prefix := incoming (+) prefix
      } else {
        out->buffer.copy_(incoming);
        has_prefix = true;
      }
      op.combine(incoming, acc);  // acc := incoming (+) acc
    }
  }
  out->finish();
  return std::make_shared<CompletedWork>();
}

std::shared_ptr<Communicator> C10dCommunicator::split(int color, int key) {
  if (!store_)
    throw CommError("split of c10d communicator '" + name_ + "' (rank " + std::to_string(rank_) + " on host " +
                    host_name() +
                    ") needs the store its process group was made from; pass it when wrapping the group");
  // Every rank learns every (color, key), as MPI_Comm_split does; this
  // exchange is the communicator's own and is not counted.
  at::Tensor mine = at::tensor({static_cast<int64_t>(color), static_cast<int64_t>(key)}, at::kLong);
  at::Tensor all = at::empty({size_, 2}, at::kLong);
  const int split_index = splits_++;
  const std::string what = "split #" + std::to_string(split_index) + " of c10d communicator '" + name_ + "' (rank " +
                           std::to_string(rank_) + " of " + std::to_string(size_) + ")";
  if (size_ == 1) {
    all.copy_(mine.view({1, 2}));
  } else {
    std::vector<at::Tensor> inputs{mine};
    std::vector<std::vector<at::Tensor>> outputs(1);
    for (int q = 0; q < size_; ++q) outputs[0].push_back(all[q]);
    auto work = post(what, [&] { return group_->allgather(outputs, inputs); });
    C10dWork(std::vector<GroupWork>{work}, true, timeout(), what, {}, nullptr).wait();
  }
  if (color < 0) return nullptr;
  std::vector<std::pair<int64_t, int>> members;  // (key, old rank)
  for (int q = 0; q < size_; ++q)
    if (all[q][0].item<int64_t>() == color) members.emplace_back(all[q][1].item<int64_t>(), q);
  std::sort(members.begin(), members.end());
  int new_rank = 0;
  for (size_t i = 0; i < members.size(); ++i)
    if (members[i].second == rank_) new_rank = static_cast<int>(i);
  const std::string sub_name = name_ + "/" + std::to_string(color);
  auto prefixed = c10::make_intrusive<c10d::PrefixStore>(
      "loom/" + name_ + "/split" + std::to_string(split_index) + "/" + std::to_string(color), store_);
  auto sub = create_gloo(prefixed, new_rank, static_cast<int>(members.size()), sub_name);
  sub->set_timeout(timeout());
  return sub;
}

}  // namespace loom
