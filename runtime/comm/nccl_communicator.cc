#include "loom/runtime/comm/nccl_communicator.h"

#include <mpi.h>

#include <atomic>
#include <cstring>
#include <chrono>
#include <condition_variable>
#include <iostream>
#include <list>
#include <mutex>
#include <sstream>
#include <thread>

#include "loom/runtime/comm/nccl_check.h"
#include "loom/runtime/comm/watchdog.h"

namespace loom {
namespace {

std::atomic<CurrentStreamProvider> g_stream_provider{nullptr};

cudaStream_t current_stream() {
  const auto provider = g_stream_provider.load();
  return provider ? static_cast<cudaStream_t>(provider()) : cudaStreamLegacy;
}

ncclDataType_t nccl_type(at::ScalarType t, const char* op) {
  switch (t) {
    case at::kFloat: return ncclFloat32;
    case at::kDouble: return ncclFloat64;
    case at::kBFloat16: return ncclBfloat16;
    case at::kHalf: return ncclFloat16;
    case at::kLong: return ncclInt64;
    case at::kInt: return ncclInt32;
    case at::kByte: return ncclUint8;
    default: break;
  }
  TORCH_CHECK(false, "nccl communicator: ", op, " does not support dtype ", t);
}

ncclRedOp_t nccl_op(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum: return ncclSum;
    case ReduceOp::kProd: return ncclProd;
    case ReduceOp::kMin: return ncclMin;
    case ReduceOp::kMax: return ncclMax;
  }
  return ncclSum;
}

void check_cuda(const at::Tensor& t, const char* op) {
  TORCH_CHECK(t.defined() && t.device().is_cuda(), "nccl communicator: ", op, " takes CUDA tensors, got ",
              t.defined() ? t.device().str() : std::string("an undefined tensor"),
              " (use the MPI backend for CPU tensors)");
  TORCH_CHECK(t.is_contiguous(), "nccl communicator: ", op, " takes contiguous tensors");
  (void)nccl_type(t.scalar_type(), op);
}

}  // namespace

void set_current_stream_provider(CurrentStreamProvider provider) { g_stream_provider.store(provider); }

// Completion of one operation: an event on the communication stream.
class NcclWork final : public Work {
 public:
  NcclWork(cudaEvent_t done, std::vector<at::Tensor> keep_alive, std::function<void()> flush)
      : done_(done), keep_alive_(std::move(keep_alive)), flush_(std::move(flush)) {}
  ~NcclWork() override { cudaEventDestroy(done_); }
  void wait() override {
    if (flush_) flush_();
    // Order the caller's stream after the operation; the host does not wait.
    LOOM_CUDA_CHECK(cudaStreamWaitEvent(current_stream(), done_, 0), "wait");
  }
  bool is_completed() override {
    if (flush_) flush_();
    const cudaError_t rc = cudaEventQuery(done_);
    if (rc == cudaErrorNotReady) return false;
    LOOM_CUDA_CHECK(rc, "is_completed");
    return true;
  }

 private:
  cudaEvent_t done_;
  std::vector<at::Tensor> keep_alive_;
  std::function<void()> flush_;
};

struct NcclCommunicator::Impl {
  const Communicator* owner = nullptr;  // for its timeout()
  std::shared_ptr<MpiCommunicator> bootstrap;
  int device = 0;
  ncclComm_t comm = nullptr;
  cudaStream_t stream = nullptr;
  int rank = 0, size = 1;
  int64_t seq = 0;
  // Queued point-to-point operations, issued together in one group.
  std::vector<std::function<void()>> pending_p2p;
  std::vector<cudaEvent_t> pending_events;
  // Watchdog: events with deadlines, polled by a thread.
  struct Watched {
    cudaEvent_t event;
    std::chrono::steady_clock::time_point deadline;
    std::string what;
  };
  std::mutex watch_mutex;
  std::list<Watched> watched;
  std::atomic<bool> stop{false};
  std::thread watchdog;

  std::string describe(const char* op, int64_t bytes) {
    std::ostringstream out;
    out << "operation " << op << " #" << ++seq << " on nccl communicator (rank " << rank << " of " << size << ", "
        << bytes << " bytes)";
    return out.str();
  }

  // The communication stream waits for the caller's stream.
  void order_after_caller() {
    cudaEvent_t ready;
    LOOM_CUDA_CHECK(cudaEventCreateWithFlags(&ready, cudaEventDisableTiming), "order");
    LOOM_CUDA_CHECK(cudaEventRecord(ready, current_stream()), "order");
    LOOM_CUDA_CHECK(cudaStreamWaitEvent(stream, ready, 0), "order");
    LOOM_CUDA_CHECK(cudaEventDestroy(ready), "order");
  }

  cudaEvent_t record_done(const std::string& what) {
    cudaEvent_t done, watch;
    LOOM_CUDA_CHECK(cudaEventCreateWithFlags(&done, cudaEventDisableTiming), "record");
    LOOM_CUDA_CHECK(cudaEventRecord(done, stream), "record");
    LOOM_CUDA_CHECK(cudaEventCreateWithFlags(&watch, cudaEventDisableTiming), "record");
    LOOM_CUDA_CHECK(cudaEventRecord(watch, stream), "record");
    std::lock_guard<std::mutex> lock(watch_mutex);
    watched.push_back({watch, std::chrono::steady_clock::now() + owner->timeout(), what});
    return done;
  }

  void flush() {
    if (pending_p2p.empty()) return;
    order_after_caller();
    LOOM_NCCL_CHECK(ncclGroupStart(), "p2p group");
    for (auto& launch : pending_p2p) launch();
    LOOM_NCCL_CHECK(ncclGroupEnd(), "p2p group");
    for (cudaEvent_t e : pending_events) LOOM_CUDA_CHECK(cudaEventRecord(e, stream), "p2p group");
    pending_p2p.clear();
    pending_events.clear();
  }

  void run_watchdog() {
    while (!stop.load()) {
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
      std::lock_guard<std::mutex> lock(watch_mutex);
      for (auto it = watched.begin(); it != watched.end();) {
        if (cudaEventQuery(it->event) == cudaSuccess) {
          cudaEventDestroy(it->event);
          it = watched.erase(it);
          continue;
        }
        if (std::chrono::steady_clock::now() > it->deadline) {
          std::cerr << "loom watchdog: rank " << world_rank_or_minus_one() << " on host " << host_name() << ": "
                    << it->what << " did not complete within " << owner->timeout().count() / 1000.0
                    << " s; aborting the NCCL communicator and the job" << std::endl;
          ncclCommAbort(comm);
          MPI_Abort(MPI_COMM_WORLD, kWatchdogExitCode);
        }
        ++it;
      }
    }
  }

  template <typename Launch>
  WorkPtr collective(const char* op, int64_t bytes, std::vector<at::Tensor> keep, Launch launch) {
    flush();
    const std::string what = describe(op, bytes);
    order_after_caller();
    launch();
    return std::make_shared<NcclWork>(record_done(what), std::move(keep), nullptr);
  }
};

NcclCommunicator::NcclCommunicator(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {
  impl_->owner = this;
  impl_->watchdog = std::thread([impl = impl_.get()] { impl->run_watchdog(); });
}

std::shared_ptr<NcclCommunicator> NcclCommunicator::create(const std::shared_ptr<MpiCommunicator>& bootstrap,
                                                           int device) {
  auto impl = std::make_unique<Impl>();
  impl->bootstrap = bootstrap;
  impl->device = device;
  impl->rank = bootstrap->rank();
  impl->size = bootstrap->size();
  LOOM_CUDA_CHECK(cudaSetDevice(device), "create");
  ncclUniqueId id;
  if (impl->rank == 0) LOOM_NCCL_CHECK(ncclGetUniqueId(&id), "create");
  at::Tensor blob = at::empty({static_cast<int64_t>(sizeof(id))}, at::kByte);
  if (impl->rank == 0) std::memcpy(blob.data_ptr(), &id, sizeof(id));
  bootstrap->broadcast(blob, 0)->wait();
  std::memcpy(&id, blob.data_ptr(), sizeof(id));
  LOOM_NCCL_CHECK(ncclCommInitRank(&impl->comm, impl->size, id, impl->rank), "create");
  LOOM_CUDA_CHECK(cudaStreamCreateWithFlags(&impl->stream, cudaStreamNonBlocking), "create");
  std::shared_ptr<NcclCommunicator> c(new NcclCommunicator(std::move(impl)));
  c->register_self();
  return c;
}

NcclCommunicator::~NcclCommunicator() {
  impl_->stop = true;
  if (impl_->watchdog.joinable()) impl_->watchdog.join();
  if (impl_->comm) ncclCommDestroy(impl_->comm);
  if (impl_->stream) cudaStreamDestroy(impl_->stream);
}

int NcclCommunicator::rank() const { return impl_->rank; }
at::Device NcclCommunicator::device() const { return at::Device(at::kCUDA, static_cast<c10::DeviceIndex>(impl_->device)); }
int NcclCommunicator::size() const { return impl_->size; }

WorkPtr NcclCommunicator::post_all_gather(const at::Tensor& output, const at::Tensor& input) {
  check_cuda(input, "all_gather");
  check_cuda(output, "all_gather");
  TORCH_CHECK(output.numel() == input.numel() * size() && output.scalar_type() == input.scalar_type(),
              "all_gather: output must hold world size x input elements of the same dtype");
  const int64_t bytes = input.nbytes();
  record(OpType::kAllGather, (size() - 1) * bytes, (size() - 1) * bytes);
  return impl_->collective("all_gather", bytes, {input, output}, [&] {
    LOOM_NCCL_CHECK(ncclAllGather(input.data_ptr(), output.data_ptr(), input.numel(),
                                  nccl_type(input.scalar_type(), "all_gather"), impl_->comm, impl_->stream),
                    "all_gather");
  });
}

WorkPtr NcclCommunicator::post_all_reduce(const at::Tensor& tensor, ReduceOp op) {
  check_cuda(tensor, "all_reduce");
  const int64_t bytes = tensor.nbytes(), ring = size() > 1 ? 2 * (size() - 1) * bytes / size() : 0;
  record(OpType::kAllReduce, ring, ring);
  return impl_->collective("all_reduce", bytes, {tensor}, [&] {
    LOOM_NCCL_CHECK(ncclAllReduce(tensor.data_ptr(), tensor.data_ptr(), tensor.numel(),
                                  nccl_type(tensor.scalar_type(), "all_reduce"), nccl_op(op), impl_->comm,
                                  impl_->stream),
                    "all_reduce");
  });
}

WorkPtr NcclCommunicator::post_reduce_scatter(const at::Tensor& output, const at::Tensor& input, ReduceOp op) {
  check_cuda(input, "reduce_scatter");
  check_cuda(output, "reduce_scatter");
  TORCH_CHECK(input.numel() == output.numel() * size() && output.scalar_type() == input.scalar_type(),
              "reduce_scatter: input must hold world size x output elements of the same dtype");
  const int64_t bytes = output.nbytes();
  record(OpType::kReduceScatter, (size() - 1) * bytes, (size() - 1) * bytes);
  return impl_->collective("reduce_scatter", bytes, {input, output}, [&] {
    LOOM_NCCL_CHECK(ncclReduceScatter(input.data_ptr(), output.data_ptr(), output.numel(),
                                      nccl_type(input.scalar_type(), "reduce_scatter"), nccl_op(op), impl_->comm,
                                      impl_->stream),
                    "reduce_scatter");
  });
}

WorkPtr NcclCommunicator::post_broadcast(const at::Tensor& tensor, int root) {
  check_cuda(tensor, "broadcast");
  TORCH_CHECK(root >= 0 && root < size(), "broadcast: root ", root, " is not a rank of ", size());
  const int64_t bytes = tensor.nbytes();
  record(OpType::kBroadcast, rank() == root ? (size() - 1) * bytes : 0, rank() == root ? 0 : bytes);
  return impl_->collective("broadcast", bytes, {tensor}, [&] {
    LOOM_NCCL_CHECK(ncclBroadcast(tensor.data_ptr(), tensor.data_ptr(), tensor.numel(),
                                  nccl_type(tensor.scalar_type(), "broadcast"), root, impl_->comm, impl_->stream),
                    "broadcast");
  });
}

WorkPtr NcclCommunicator::post_all_to_all(const at::Tensor& output, const at::Tensor& input) {
  check_cuda(input, "all_to_all");
  check_cuda(output, "all_to_all");
  TORCH_CHECK(input.numel() == output.numel() && input.numel() % size() == 0 &&
                  input.scalar_type() == output.scalar_type(),
              "all_to_all: input and output must have the same dtype and a multiple of world size elements");
  const int64_t block = input.numel() / size(), bytes = input.nbytes();
  record(OpType::kAllToAll, (size() - 1) * bytes / size(), (size() - 1) * bytes / size());
  const size_t esize = input.element_size();
  return impl_->collective("all_to_all", bytes, {input, output}, [&] {
    const ncclDataType_t type = nccl_type(input.scalar_type(), "all_to_all");
    LOOM_NCCL_CHECK(ncclGroupStart(), "all_to_all");
    for (int peer = 0; peer < size(); ++peer) {
      LOOM_NCCL_CHECK(ncclSend(static_cast<char*>(input.data_ptr()) + peer * block * esize, block, type, peer,
                               impl_->comm, impl_->stream),
                      "all_to_all");
      LOOM_NCCL_CHECK(ncclRecv(static_cast<char*>(output.data_ptr()) + peer * block * esize, block, type, peer,
                               impl_->comm, impl_->stream),
                      "all_to_all");
    }
    LOOM_NCCL_CHECK(ncclGroupEnd(), "all_to_all");
  });
}

WorkPtr NcclCommunicator::post_all_to_all(const at::Tensor& output, const at::Tensor& input,
                                     const std::vector<int64_t>& output_splits,
                                     const std::vector<int64_t>& input_splits) {
  check_cuda(input, "all_to_all");
  check_cuda(output, "all_to_all");
  const AllToAllPlan plan = plan_all_to_all(output, input, output_splits, input_splits, rank(), size());
  record(OpType::kAllToAll, plan.bytes_sent, plan.bytes_received);
  const size_t esize = input.element_size();
  return impl_->collective("all_to_all", input.nbytes(), {input, output}, [&] {
    const ncclDataType_t type = nccl_type(input.scalar_type(), "all_to_all");
    LOOM_NCCL_CHECK(ncclGroupStart(), "all_to_all");
    // An empty block is skipped on both sides: rank q's send count to r is
    // r's receive count from q.
    for (int peer = 0; peer < size(); ++peer) {
      if (plan.send_counts[peer] > 0)
        LOOM_NCCL_CHECK(ncclSend(static_cast<char*>(input.data_ptr()) + plan.send_offsets[peer] * esize,
                                 plan.send_counts[peer], type, peer, impl_->comm, impl_->stream),
                        "all_to_all");
      if (plan.recv_counts[peer] > 0)
        LOOM_NCCL_CHECK(ncclRecv(static_cast<char*>(output.data_ptr()) + plan.recv_offsets[peer] * esize,
                                 plan.recv_counts[peer], type, peer, impl_->comm, impl_->stream),
                        "all_to_all");
    }
    LOOM_NCCL_CHECK(ncclGroupEnd(), "all_to_all");
  });
}

WorkPtr NcclCommunicator::post_barrier() {
  record(OpType::kBarrier, 0, 0);
  at::Tensor one = at::zeros({1}, at::TensorOptions().dtype(at::kFloat).device(at::Device(at::kCUDA, impl_->device)));
  return impl_->collective("barrier", 4, {one}, [&] {
    LOOM_NCCL_CHECK(ncclAllReduce(one.data_ptr(), one.data_ptr(), 1, ncclFloat32, ncclSum, impl_->comm, impl_->stream),
                    "barrier");
  });
}

WorkPtr NcclCommunicator::post_isend(const at::Tensor& tensor, int dst, int tag) {
  check_cuda(tensor, "isend");
  TORCH_CHECK(dst >= 0 && dst < size(), "isend: destination ", dst, " is not a rank of ", size());
  (void)tag;  // NCCL matches point-to-point messages by order between a pair of ranks
  record(OpType::kSend, tensor.nbytes(), 0);
  const std::string what = impl_->describe("send", tensor.nbytes());
  Impl* impl = impl_.get();
  impl->pending_p2p.push_back([impl, tensor, dst] {
    LOOM_NCCL_CHECK(ncclSend(tensor.data_ptr(), tensor.numel(), nccl_type(tensor.scalar_type(), "isend"), dst,
                             impl->comm, impl->stream),
                    "isend");
  });
  cudaEvent_t done;
  LOOM_CUDA_CHECK(cudaEventCreateWithFlags(&done, cudaEventDisableTiming), "isend");
  impl->pending_events.push_back(done);
  return std::make_shared<NcclWork>(done, std::vector<at::Tensor>{tensor}, [impl] { impl->flush(); });
}

WorkPtr NcclCommunicator::post_irecv(const at::Tensor& tensor, int src, int tag) {
  check_cuda(tensor, "irecv");
  TORCH_CHECK(src >= 0 && src < size(), "irecv: source ", src, " is not a rank of ", size());
  (void)tag;
  record(OpType::kRecv, 0, tensor.nbytes());
  Impl* impl = impl_.get();
  impl->pending_p2p.push_back([impl, tensor, src] {
    LOOM_NCCL_CHECK(ncclRecv(tensor.data_ptr(), tensor.numel(), nccl_type(tensor.scalar_type(), "irecv"), src,
                             impl->comm, impl->stream),
                    "irecv");
  });
  cudaEvent_t done;
  LOOM_CUDA_CHECK(cudaEventCreateWithFlags(&done, cudaEventDisableTiming), "irecv");
  impl->pending_events.push_back(done);
  return std::make_shared<NcclWork>(done, std::vector<at::Tensor>{tensor}, [impl] { impl->flush(); });
}

WorkPtr NcclCommunicator::post_exscan(const at::Tensor& output, const at::Tensor& input, const ScanOp& op) {
  check_cuda(input, "exscan");
  check_cuda(output, "exscan");
  TORCH_CHECK(op.combine && op.identity, "exscan: scan operation '", op.name, "' needs combine and identity");
  const int W = size(), r = rank();
  const int64_t bytes = input.nbytes();
  record(OpType::kExscan, r < W - 1 ? bytes : 0, r > 0 ? bytes : 0);
  // Recursive doubling (Hillis-Steele): after the round with distance d, `acc`
  // holds the inclusive composition of ranks max(0, r-2d+1)..r, and `excl` the
  // exclusive one; each round sends acc to r+d and folds what r-d sent in.
  at::Tensor acc = input.clone();
  at::Tensor excl = output;
  op.identity(excl);
  bool has_excl = false;
  for (int d = 1; d < W; d *= 2) {
    at::Tensor incoming = at::empty_like(acc);
    std::vector<WorkPtr> works;
    if (r - d >= 0) works.push_back(irecv(incoming, r - d, d));
    if (r + d < W) works.push_back(isend(acc, r + d, d));
    wait_all(works);
    if (r - d >= 0) {
      // incoming = composition of ranks (r-2d+1)..(r-d): it goes on the left.
      at::Tensor left = incoming;
      op.combine(left, acc);  // acc := incoming (+) acc
      if (has_excl) {
        at::Tensor left_excl = incoming.clone();
        op.combine(left_excl, excl);  // excl := incoming (+) excl
      } else {
        excl.copy_(incoming);
        has_excl = true;
      }
    }
  }
  return std::make_shared<CompletedWork>();
}

std::shared_ptr<Communicator> NcclCommunicator::split(int color, int key) {
  auto sub = impl_->bootstrap->split(color, key);  // collective on the bootstrap
  if (!sub) return nullptr;
  auto mpi_sub = std::dynamic_pointer_cast<MpiCommunicator>(sub);
  TORCH_CHECK(mpi_sub, "nccl split: the bootstrap split is not an MPI communicator");
  auto c = create(mpi_sub, impl_->device);
  c->set_timeout(timeout());
  return c;
}

}  // namespace loom
