#include "loom/runtime/comm/mpi_communicator.h"

#include <c10/util/BFloat16.h>

#include <array>
#include <climits>
#include <cstdlib>
#include <iostream>
#include <sstream>

#include "loom/runtime/core/env_flag.h"
#include "loom/runtime/core/error.h"
#include "loom/runtime/comm/watchdog.h"

namespace loom {
namespace {

// ---- bfloat16: a 2-byte MPI type with user reductions computed in float32 ----

template <typename Combine>
void bf16_reduce(void* in, void* inout, int* len, Combine combine) {
  auto* a = static_cast<const c10::BFloat16*>(in);
  auto* b = static_cast<c10::BFloat16*>(inout);
  for (int i = 0; i < *len; ++i) b[i] = c10::BFloat16(combine(static_cast<float>(a[i]), static_cast<float>(b[i])));
}
void bf16_sum(void* in, void* inout, int* len, MPI_Datatype*) {
  bf16_reduce(in, inout, len, [](float x, float y) { return x + y; });
}
void bf16_prod(void* in, void* inout, int* len, MPI_Datatype*) {
  bf16_reduce(in, inout, len, [](float x, float y) { return x * y; });
}
void bf16_min(void* in, void* inout, int* len, MPI_Datatype*) {
  bf16_reduce(in, inout, len, [](float x, float y) { return x < y ? x : y; });
}
void bf16_max(void* in, void* inout, int* len, MPI_Datatype*) {
  bf16_reduce(in, inout, len, [](float x, float y) { return x > y ? x : y; });
}

struct Bf16Mpi {
  MPI_Datatype type;
  MPI_Op sum, prod, min, max;
};
const Bf16Mpi& bf16_mpi() {
  static const Bf16Mpi v = [] {
    Bf16Mpi b{};
    LOOM_MPI_CHECK(MPI_Type_contiguous(2, MPI_BYTE, &b.type), "bf16 type");
    LOOM_MPI_CHECK(MPI_Type_commit(&b.type), "bf16 type");
    LOOM_MPI_CHECK(MPI_Op_create(&bf16_sum, 1, &b.sum), "bf16 op");
    LOOM_MPI_CHECK(MPI_Op_create(&bf16_prod, 1, &b.prod), "bf16 op");
    LOOM_MPI_CHECK(MPI_Op_create(&bf16_min, 1, &b.min), "bf16 op");
    LOOM_MPI_CHECK(MPI_Op_create(&bf16_max, 1, &b.max), "bf16 op");
    return b;
  }();
  return v;
}

MPI_Datatype mpi_type(at::ScalarType t, const char* op) {
  switch (t) {
    case at::kFloat: return MPI_FLOAT;
    case at::kDouble: return MPI_DOUBLE;
    case at::kLong: return MPI_INT64_T;
    case at::kInt: return MPI_INT32_T;
    case at::kByte: return MPI_UINT8_T;
    case at::kBFloat16: return bf16_mpi().type;
    default: break;
  }
  TORCH_CHECK(false, "mpi communicator: ", op, " does not support dtype ", t,
              " (supported: float32, float64, bfloat16, int64, int32, uint8)");
}

MPI_Op mpi_op(ReduceOp op, at::ScalarType t) {
  if (t == at::kBFloat16) {
    const auto& b = bf16_mpi();
    switch (op) {
      case ReduceOp::kSum: return b.sum;
      case ReduceOp::kProd: return b.prod;
      case ReduceOp::kMin: return b.min;
      case ReduceOp::kMax: return b.max;
    }
  }
  switch (op) {
    case ReduceOp::kSum: return MPI_SUM;
    case ReduceOp::kProd: return MPI_PROD;
    case ReduceOp::kMin: return MPI_MIN;
    case ReduceOp::kMax: return MPI_MAX;
  }
  return MPI_SUM;
}

int checked_count(int64_t numel, const char* op) {
  TORCH_CHECK(numel <= INT_MAX, "mpi communicator: ", op, " of ", numel,
              " elements exceeds MPI's int count; split the tensor");
  return static_cast<int>(numel);
}

// Validates before anything is counted or posted, so that a rejected call
// leaves the communicator exactly as it was. `any_device`: the operation never
// reaches MPI (a collective on one rank, see complete_locally).
void check_cpu(const at::Tensor& t, const char* op, const char* which, bool any_device) {
  TORCH_CHECK(t.defined(), "mpi communicator: ", op, ": ", which, " tensor is undefined");
  TORCH_CHECK(any_device || t.device().is_cpu(), "mpi communicator: ", op, ": ", which, " tensor is on ", t.device(),
              "; the MPI backend takes CPU tensors (use the NCCL backend for CUDA)");
  (void)mpi_type(t.scalar_type(), op);
}

// An output that MPI writes into: the tensor itself when contiguous, else a
// contiguous staging buffer copied back when the operation completes.
struct Output {
  at::Tensor target;
  at::Tensor buffer;
  explicit Output(const at::Tensor& t) : target(t), buffer(t.is_contiguous() ? t : at::empty_like(t, at::MemoryFormat::Contiguous)) {}
  void finish() {
    if (!buffer.is_same(target)) target.copy_(buffer);
  }
};

// ---- exscan with a user operation ----
// MPI user functions get no closure, so the ScanOp travels as an attribute of
// a per-call datatype ("one element = the whole tensor").

struct ScanContext {
  ScanOp op;
  std::vector<int64_t> sizes;
  at::ScalarType dtype;
};

int scan_keyval() {
  static const int keyval = [] {
    int k = MPI_KEYVAL_INVALID;
    LOOM_MPI_CHECK(MPI_Type_create_keyval(MPI_TYPE_NULL_COPY_FN, MPI_TYPE_NULL_DELETE_FN, &k, nullptr), "exscan");
    return k;
  }();
  return keyval;
}

void scan_user_function(void* in, void* inout, int* len, MPI_Datatype* type) {
  void* attr = nullptr;
  int found = 0;
  MPI_Type_get_attr(*type, scan_keyval(), &attr, &found);
  if (!found) return;  // cannot happen: only Loom's scan types reach here
  auto* ctx = static_cast<ScanContext*>(attr);
  const auto options = at::TensorOptions().dtype(ctx->dtype);
  int64_t item_bytes = at::elementSize(ctx->dtype);
  for (auto s : ctx->sizes) item_bytes *= s;
  for (int i = 0; i < *len; ++i) {
    const at::Tensor earlier = at::from_blob(static_cast<char*>(in) + i * item_bytes, ctx->sizes, options);
    at::Tensor later = at::from_blob(static_cast<char*>(inout) + i * item_bytes, ctx->sizes, options);
    ctx->op.combine(earlier, later);
  }
}

MPI_Op scan_mpi_op() {
  static const MPI_Op op = [] {
    MPI_Op o;
    LOOM_MPI_CHECK(MPI_Op_create(&scan_user_function, /*commute=*/0, &o), "exscan");
    return o;
  }();
  return op;
}

// ---- Work ----

class MpiWork final : public Work {
 public:
  MpiWork(std::chrono::milliseconds timeout, std::string description, std::vector<at::Tensor> keep_alive,
          std::function<void()> on_complete)
      : timeout_(timeout),
        description_(std::move(description)),
        keep_alive_(std::move(keep_alive)),
        on_complete_(std::move(on_complete)) {}
  ~MpiWork() override {
    // A Work dropped unwaited must not leave MPI writing into freed memory.
    if (!done_ && !requests_.empty()) {
      try {
        wait();
      } catch (...) {
      }
    }
  }

  MPI_Request* add_request() {
    requests_.push_back(MPI_REQUEST_NULL);
    return &requests_.back();
  }
  void reserve(size_t n) { requests_.reserve(n); }

  void wait() override {
    if (done_) return;
    wait_with_watchdog([this] { return test(); }, timeout_, [this] { return description_; });
    finish();
  }
  bool is_completed() override {
    if (done_) return true;
    if (!test()) return false;
    finish();
    return true;
  }

 private:
  bool test() {
    int flag = 0;
    LOOM_MPI_CHECK(MPI_Testall(static_cast<int>(requests_.size()), requests_.data(), &flag, MPI_STATUSES_IGNORE),
                   description_.c_str());
    return flag != 0;
  }
  void finish() {
    if (done_) return;
    done_ = true;
    if (on_complete_) on_complete_();
    keep_alive_.clear();
  }

  std::chrono::milliseconds timeout_;
  std::string description_;
  std::vector<at::Tensor> keep_alive_;
  std::function<void()> on_complete_;
  std::vector<MPI_Request> requests_;
  bool done_ = false;
};

}  // namespace

// ---- MpiCommunicator ----

MpiCommunicator::MpiCommunicator(MPI_Comm owned, std::string name) : comm_(owned), name_(std::move(name)) {
  LOOM_MPI_CHECK(MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN), "create communicator");
  LOOM_MPI_CHECK(MPI_Comm_rank(comm_, &rank_), "create communicator");
  LOOM_MPI_CHECK(MPI_Comm_size(comm_, &size_), "create communicator");
}

std::shared_ptr<MpiCommunicator> MpiCommunicator::create(MPI_Comm comm, std::string name) {
  MPI_Comm dup = MPI_COMM_NULL;
  LOOM_MPI_CHECK(MPI_Comm_dup(comm, &dup), "create communicator");
  std::shared_ptr<MpiCommunicator> c(new MpiCommunicator(dup, std::move(name)));
  c->register_self();
  return c;
}

std::shared_ptr<MpiCommunicator> MpiCommunicator::world() { return create(MPI_COMM_WORLD, "world"); }

MpiCommunicator::~MpiCommunicator() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (!finalized && comm_ != MPI_COMM_NULL) MPI_Comm_free(&comm_);
}

std::string MpiCommunicator::describe(OpType op, int64_t seq, int64_t bytes) const {
  std::ostringstream out;
  out << "operation " << op_type_name(op) << " #" << seq << " on mpi communicator '" << name_ << "' (rank " << rank_
      << " of " << size_ << ", " << bytes << " bytes)";
  // LOOM_TRACE_COMM=1 prints every operation as it is issued: the way to find
  // which rank's sequence of collectives diverged.
  // Never throws here (this runs inside every collective, the first of them
  // before Job exists): a bad value reads as off; Job refuses it on every rank.
  static const bool trace = env_flag_nothrow("LOOM_TRACE_COMM", false);
  if (trace) std::cerr << "[loom trace r" << world_rank_or_minus_one() << "] " << out.str() << std::endl;
  return out.str();
}

WorkPtr MpiCommunicator::post_all_gather(const at::Tensor& output, const at::Tensor& input) {
  check_cpu(input, "all_gather", "input", size_ == 1);
  check_cpu(output, "all_gather", "output", size_ == 1);
  TORCH_CHECK(output.scalar_type() == input.scalar_type(), "all_gather: output dtype ", output.scalar_type(),
              " differs from input dtype ", input.scalar_type());
  TORCH_CHECK(output.numel() == input.numel() * size_,
              "all_gather: output has ", output.numel(), " elements, expected world size ", size_, " x ",
              input.numel());
  const at::Tensor in = input.contiguous();
  auto out = std::make_shared<Output>(output);
  const int64_t bytes = in.nbytes();
  record(OpType::kAllGather, (size_ - 1) * bytes, (size_ - 1) * bytes);
  if (size_ == 1) return complete_locally(output, in);
  auto work = std::make_shared<MpiWork>(
      timeout(), describe(OpType::kAllGather, ++seq_, bytes),
      std::vector<at::Tensor>{in, out->buffer}, [out] { out->finish(); });
  const MPI_Datatype type = mpi_type(in.scalar_type(), "all_gather");
  const int count = checked_count(in.numel(), "all_gather");
  LOOM_MPI_CHECK(MPI_Iallgather(in.data_ptr(), count, type, out->buffer.data_ptr(), count, type, comm_,
                                work->add_request()),
                 "all_gather");
  return work;
}

WorkPtr MpiCommunicator::post_all_reduce(const at::Tensor& tensor, ReduceOp op) {
  check_cpu(tensor, "all_reduce", "input/output", size_ == 1);
  const int64_t bytes = tensor.nbytes();
  const int64_t ring = size_ > 1 ? 2 * (size_ - 1) * bytes / size_ : 0;
  record(OpType::kAllReduce, ring, ring);
  if (size_ == 1) return complete_locally({}, {});
  auto out = std::make_shared<Output>(tensor);
  if (!out->buffer.is_same(tensor)) out->buffer.copy_(tensor);
  auto work = std::make_shared<MpiWork>(
      timeout(), describe(OpType::kAllReduce, ++seq_, bytes),
      std::vector<at::Tensor>{out->buffer}, [out] { out->finish(); });
  LOOM_MPI_CHECK(MPI_Iallreduce(MPI_IN_PLACE, out->buffer.data_ptr(), checked_count(tensor.numel(), "all_reduce"),
                                mpi_type(tensor.scalar_type(), "all_reduce"), mpi_op(op, tensor.scalar_type()),
                                comm_, work->add_request()),
                 "all_reduce");
  return work;
}

WorkPtr MpiCommunicator::post_reduce_scatter(const at::Tensor& output, const at::Tensor& input, ReduceOp op) {
  check_cpu(input, "reduce_scatter", "input", size_ == 1);
  check_cpu(output, "reduce_scatter", "output", size_ == 1);
  TORCH_CHECK(output.scalar_type() == input.scalar_type(), "reduce_scatter: output dtype ", output.scalar_type(),
              " differs from input dtype ", input.scalar_type());
  TORCH_CHECK(input.numel() == output.numel() * size_, "reduce_scatter: input has ", input.numel(),
              " elements, expected world size ", size_, " x output ", output.numel());
  const at::Tensor in = input.contiguous();
  auto out = std::make_shared<Output>(output);
  const int64_t bytes = out->buffer.nbytes();
  record(OpType::kReduceScatter, (size_ - 1) * bytes, (size_ - 1) * bytes);
  if (size_ == 1) return complete_locally(output, in);
  auto work = std::make_shared<MpiWork>(
      timeout(), describe(OpType::kReduceScatter, ++seq_, bytes),
      std::vector<at::Tensor>{in, out->buffer}, [out] { out->finish(); });
  LOOM_MPI_CHECK(MPI_Ireduce_scatter_block(in.data_ptr(), out->buffer.data_ptr(),
                                           checked_count(output.numel(), "reduce_scatter"),
                                           mpi_type(in.scalar_type(), "reduce_scatter"),
                                           mpi_op(op, in.scalar_type()), comm_, work->add_request()),
                 "reduce_scatter");
  return work;
}

WorkPtr MpiCommunicator::post_broadcast(const at::Tensor& tensor, int root) {
  check_cpu(tensor, "broadcast", "input/output", size_ == 1);
  TORCH_CHECK(root >= 0 && root < size_, "broadcast: root ", root, " is not a rank of a communicator of size ", size_);
  if (size_ == 1) {
    record(OpType::kBroadcast, 0, 0);
    ++seq_;
    return std::make_shared<CompletedWork>();
  }
  auto out = std::make_shared<Output>(tensor);
  if (!out->buffer.is_same(tensor) && rank_ == root) out->buffer.copy_(tensor);
  const int64_t bytes = tensor.nbytes();
  if (rank_ == root)
    record(OpType::kBroadcast, (size_ - 1) * bytes, 0);
  else
    record(OpType::kBroadcast, 0, bytes);
  auto work = std::make_shared<MpiWork>(
      timeout(), describe(OpType::kBroadcast, ++seq_, bytes),
      std::vector<at::Tensor>{out->buffer}, [out] { out->finish(); });
  LOOM_MPI_CHECK(MPI_Ibcast(out->buffer.data_ptr(), checked_count(tensor.numel(), "broadcast"),
                            mpi_type(tensor.scalar_type(), "broadcast"), root, comm_, work->add_request()),
                 "broadcast");
  return work;
}

WorkPtr MpiCommunicator::post_exscan(const at::Tensor& output, const at::Tensor& input, const ScanOp& op) {
  check_cpu(input, "exscan", "input", size_ == 1);
  check_cpu(output, "exscan", "output", size_ == 1);
  TORCH_CHECK(op.combine && op.identity, "exscan: scan operation '", op.name, "' needs combine and identity");
  TORCH_CHECK(output.sizes() == input.sizes() && output.scalar_type() == input.scalar_type(),
              "exscan: output (", output.sizes(), ", ", output.scalar_type(), ") must match input (", input.sizes(),
              ", ", input.scalar_type(), ")");
  const at::Tensor in = input.contiguous();
  auto out = std::make_shared<Output>(output);
  const int64_t bytes = in.nbytes();
  record(OpType::kExscan, rank_ < size_ - 1 ? bytes : 0, rank_ > 0 ? bytes : 0);
  const int64_t seq = ++seq_;
  if (size_ == 1) {
    op.identity(out->buffer);
    out->finish();
    return std::make_shared<CompletedWork>();
  }
  auto ctx = std::make_shared<ScanContext>(ScanContext{op, in.sizes().vec(), in.scalar_type()});
  auto type = std::make_shared<MPI_Datatype>(MPI_DATATYPE_NULL);
  const at::ScalarType base_dtype = in.scalar_type();
  LOOM_MPI_CHECK(MPI_Type_contiguous(checked_count(in.numel(), "exscan"), mpi_type(base_dtype, "exscan"), type.get()),
                 "exscan");
  LOOM_MPI_CHECK(MPI_Type_commit(type.get()), "exscan");
  LOOM_MPI_CHECK(MPI_Type_set_attr(*type, scan_keyval(), ctx.get()), "exscan");
  const bool is_first = rank_ == 0;
  auto work = std::make_shared<MpiWork>(
      timeout(), describe(OpType::kExscan, seq, bytes),
      std::vector<at::Tensor>{in, out->buffer}, [out, ctx, type, is_first] {
        if (is_first) ctx->op.identity(out->buffer);  // MPI leaves rank 0 undefined
        out->finish();
        MPI_Type_free(type.get());
      });
  LOOM_MPI_CHECK(MPI_Iexscan(in.data_ptr(), out->buffer.data_ptr(), 1, *type, scan_mpi_op(), comm_, work->add_request()),
                 "exscan");
  return work;
}

WorkPtr MpiCommunicator::post_all_to_all(const at::Tensor& output, const at::Tensor& input) {
  check_cpu(input, "all_to_all", "input", size_ == 1);
  check_cpu(output, "all_to_all", "output", size_ == 1);
  TORCH_CHECK(output.scalar_type() == input.scalar_type() && output.numel() == input.numel(),
              "all_to_all: output must have the input's dtype and element count");
  TORCH_CHECK(input.numel() % size_ == 0, "all_to_all: ", input.numel(), " elements do not split into ", size_,
              " equal blocks");
  const at::Tensor in = input.contiguous();
  auto out = std::make_shared<Output>(output);
  const int64_t bytes = in.nbytes();
  record(OpType::kAllToAll, (size_ - 1) * bytes / size_, (size_ - 1) * bytes / size_);
  if (size_ == 1) return complete_locally(output, in);
  auto work = std::make_shared<MpiWork>(
      timeout(), describe(OpType::kAllToAll, ++seq_, bytes),
      std::vector<at::Tensor>{in, out->buffer}, [out] { out->finish(); });
  const int count = checked_count(in.numel() / size_, "all_to_all");
  const MPI_Datatype type = mpi_type(in.scalar_type(), "all_to_all");
  LOOM_MPI_CHECK(MPI_Ialltoall(in.data_ptr(), count, type, out->buffer.data_ptr(), count, type, comm_,
                               work->add_request()),
                 "all_to_all");
  return work;
}

WorkPtr MpiCommunicator::post_all_to_all(const at::Tensor& output, const at::Tensor& input,
                                    const std::vector<int64_t>& output_splits,
                                    const std::vector<int64_t>& input_splits) {
  check_cpu(input, "all_to_all", "input", size_ == 1);
  check_cpu(output, "all_to_all", "output", size_ == 1);
  const AllToAllPlan plan = plan_all_to_all(output, input, output_splits, input_splits, rank_, size_);
  // MPI counts and displacements are ints: check them all before posting.
  std::vector<int> send_counts, send_displs, recv_counts, recv_displs;
  for (int q = 0; q < size_; ++q) {
    send_counts.push_back(checked_count(plan.send_counts[q], "all_to_all"));
    send_displs.push_back(checked_count(plan.send_offsets[q], "all_to_all"));
    recv_counts.push_back(checked_count(plan.recv_counts[q], "all_to_all"));
    recv_displs.push_back(checked_count(plan.recv_offsets[q], "all_to_all"));
  }
  const at::Tensor in = input.contiguous();
  auto out = std::make_shared<Output>(output);
  record(OpType::kAllToAll, plan.bytes_sent, plan.bytes_received);
  if (size_ == 1) return complete_locally(output, in);
  // MPI may read the count vectors until the request completes: the
  // completion callback owns them.
  auto counts = std::make_shared<std::array<std::vector<int>, 4>>(
      std::array<std::vector<int>, 4>{std::move(send_counts), std::move(send_displs), std::move(recv_counts),
                                      std::move(recv_displs)});
  auto work = std::make_shared<MpiWork>(
      timeout(), describe(OpType::kAllToAll, ++seq_, in.nbytes()),
      std::vector<at::Tensor>{in, out->buffer}, [out, counts] { out->finish(); });
  const MPI_Datatype type = mpi_type(in.scalar_type(), "all_to_all");
  LOOM_MPI_CHECK(MPI_Ialltoallv(in.data_ptr(), (*counts)[0].data(), (*counts)[1].data(), type, out->buffer.data_ptr(),
                                (*counts)[2].data(), (*counts)[3].data(), type, comm_, work->add_request()),
                 "all_to_all");
  return work;
}

WorkPtr MpiCommunicator::post_barrier() {
  record(OpType::kBarrier, 0, 0);
  auto work = std::make_shared<MpiWork>(
      timeout(), describe(OpType::kBarrier, ++seq_, 0), std::vector<at::Tensor>{},
      nullptr);
  LOOM_MPI_CHECK(MPI_Ibarrier(comm_, work->add_request()), "barrier");
  return work;
}

WorkPtr MpiCommunicator::post_isend(const at::Tensor& tensor, int dst, int tag) {
  check_cpu(tensor, "isend", "input", /*any_device=*/false);  // MPI moves even a self-send
  TORCH_CHECK(dst >= 0 && dst < size_, "isend: destination ", dst, " is not a rank of a communicator of size ", size_);
  TORCH_CHECK(tag >= 0, "isend: tag must be >= 0, got ", tag);
  const at::Tensor in = tensor.contiguous();
  record(OpType::kSend, in.nbytes(), 0);
  std::ostringstream what;
  what << describe(OpType::kSend, ++seq_, in.nbytes()) << " to rank " << dst << " tag " << tag;
  auto work = std::make_shared<MpiWork>(
      timeout(), what.str(), std::vector<at::Tensor>{in}, nullptr);
  LOOM_MPI_CHECK(MPI_Isend(in.data_ptr(), checked_count(in.numel(), "isend"), mpi_type(in.scalar_type(), "isend"), dst,
                           tag, comm_, work->add_request()),
                 "isend");
  return work;
}

WorkPtr MpiCommunicator::post_irecv(const at::Tensor& tensor, int src, int tag) {
  check_cpu(tensor, "irecv", "output", /*any_device=*/false);
  TORCH_CHECK(src >= 0 && src < size_, "irecv: source ", src, " is not a rank of a communicator of size ", size_);
  TORCH_CHECK(tag >= 0, "irecv: tag must be >= 0, got ", tag);
  auto out = std::make_shared<Output>(tensor);
  record(OpType::kRecv, 0, tensor.nbytes());
  std::ostringstream what;
  what << describe(OpType::kRecv, ++seq_, tensor.nbytes()) << " from rank " << src << " tag " << tag;
  auto work = std::make_shared<MpiWork>(
      timeout(), what.str(), std::vector<at::Tensor>{out->buffer},
      [out] { out->finish(); });
  LOOM_MPI_CHECK(MPI_Irecv(out->buffer.data_ptr(), checked_count(tensor.numel(), "irecv"),
                           mpi_type(tensor.scalar_type(), "irecv"), src, tag, comm_, work->add_request()),
                 "irecv");
  return work;
}

WorkPtr MpiCommunicator::complete_locally(const at::Tensor& output, const at::Tensor& input) {
  ++seq_;
  if (output.defined()) output.view(input.sizes()).copy_(input);
  return std::make_shared<CompletedWork>();
}

std::shared_ptr<Communicator> MpiCommunicator::split(int color, int key) {
  MPI_Comm sub = MPI_COMM_NULL;
  LOOM_MPI_CHECK(MPI_Comm_split(comm_, color < 0 ? MPI_UNDEFINED : color, key, &sub), "split");
  if (sub == MPI_COMM_NULL) return nullptr;
  std::shared_ptr<MpiCommunicator> c(new MpiCommunicator(sub, name_ + "/" + std::to_string(color)));
  c->set_timeout(timeout());
  c->register_self();
  return c;
}

// ---- MpiEnvironment ----

MpiEnvironment::MpiEnvironment(int* argc, char*** argv) {
  int initialized = 0;
  MPI_Initialized(&initialized);
  if (!initialized) {
    // Started without mpirun, Open MPI forks a daemon for the singleton (about
    // a second of start-up); Loom never spawns processes, so it needs none.
    // A user's own setting of the variable wins; other MPIs ignore it.
    const bool launched = std::getenv("OMPI_COMM_WORLD_SIZE") || std::getenv("PMIX_RANK") || std::getenv("PMI_RANK");
    if (!launched) setenv("OMPI_MCA_ess_singleton_isolated", "1", /*overwrite=*/0);
    int provided = 0;
    LOOM_MPI_CHECK(MPI_Init_thread(argc, argv, MPI_THREAD_SERIALIZED, &provided), "MPI_Init_thread");
    owns_ = true;
    MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
  }
  // The watchdog's side channel (who has not arrived), collective like MPI_Init.
  LOOM_MPI_CHECK(MPI_Comm_dup(MPI_COMM_WORLD, &peer_channel_), "MPI_Comm_dup (watchdog peer status)");
  enable_peer_status(peer_channel_);
}

MpiEnvironment::~MpiEnvironment() {
  int finalized = 0;
  MPI_Finalized(&finalized);
  if (finalized) return;
  enable_peer_status(MPI_COMM_NULL);
  if (peer_channel_ != MPI_COMM_NULL) MPI_Comm_free(&peer_channel_);
  if (owns_) MPI_Finalize();
}

}  // namespace loom
