#include "loom/runtime/comm/communicator.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <mutex>
#include <sstream>
#include <unordered_map>

#include "loom/runtime/core/config.h"
#include "loom/runtime/core/error.h"

namespace loom {

const char* reduce_op_name(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum: return "sum";
    case ReduceOp::kProd: return "prod";
    case ReduceOp::kMin: return "min";
    case ReduceOp::kMax: return "max";
  }
  return "?";
}

const char* op_type_name(OpType op) {
  switch (op) {
    case OpType::kAllGather: return "all_gather";
    case OpType::kAllReduce: return "all_reduce";
    case OpType::kReduceScatter: return "reduce_scatter";
    case OpType::kBroadcast: return "broadcast";
    case OpType::kExscan: return "exscan";
    case OpType::kAllToAll: return "all_to_all";
    case OpType::kBarrier: return "barrier";
    case OpType::kSend: return "send";
    case OpType::kRecv: return "recv";
    case OpType::kCount: break;
  }
  return "?";
}

void CommStats::record(OpType op, int64_t bytes_sent, int64_t bytes_received) {
  auto& c = counters_[static_cast<int>(op)];
  c.calls += 1;
  c.bytes_sent += bytes_sent;
  c.bytes_received += bytes_received;
}

void CommStats::record_wait(OpType op, double seconds) { counters_[static_cast<int>(op)].wait_seconds += seconds; }

int64_t CommStats::total_calls() const {
  int64_t n = 0;
  for (const auto& c : counters_) n += c.calls;
  return n;
}
int64_t CommStats::total_bytes_sent() const {
  int64_t n = 0;
  for (const auto& c : counters_) n += c.bytes_sent;
  return n;
}
int64_t CommStats::total_bytes_received() const {
  int64_t n = 0;
  for (const auto& c : counters_) n += c.bytes_received;
  return n;
}
double CommStats::total_wait_seconds() const {
  double s = 0;
  for (const auto& c : counters_) s += c.wait_seconds;
  return s;
}

CommStats CommStats::operator-(const CommStats& earlier) const {
  CommStats d;
  for (size_t i = 0; i < counters_.size(); ++i) {
    d.counters_[i].calls = counters_[i].calls - earlier.counters_[i].calls;
    d.counters_[i].bytes_sent = counters_[i].bytes_sent - earlier.counters_[i].bytes_sent;
    d.counters_[i].bytes_received = counters_[i].bytes_received - earlier.counters_[i].bytes_received;
    d.counters_[i].wait_seconds = counters_[i].wait_seconds - earlier.counters_[i].wait_seconds;
  }
  return d;
}

std::string CommStats::to_string() const {
  std::ostringstream out;
  for (int i = 0; i < static_cast<int>(OpType::kCount); ++i) {
    const auto& c = counters_[i];
    if (c.calls == 0) continue;
    out << op_type_name(static_cast<OpType>(i)) << ": calls=" << c.calls << " sent=" << c.bytes_sent
        << "B received=" << c.bytes_received << "B\n";
  }
  return out.str();
}

void wait_all(const std::vector<WorkPtr>& works) {
  for (const auto& w : works)
    if (w) w->wait();
}

AllToAllPlan plan_all_to_all(const at::Tensor& output, const at::Tensor& input,
                             const std::vector<int64_t>& output_splits, const std::vector<int64_t>& input_splits,
                             int rank, int size) {
  TORCH_CHECK(input.defined() && output.defined(), "all_to_all: input and output must be defined");
  TORCH_CHECK(input.dim() >= 1 && output.dim() >= 1, "all_to_all (split sizes): input and output need a dim 0 to split");
  TORCH_CHECK(output.scalar_type() == input.scalar_type(), "all_to_all: output dtype ", output.scalar_type(),
              " differs from input dtype ", input.scalar_type());
  TORCH_CHECK(static_cast<int>(input_splits.size()) == size && static_cast<int>(output_splits.size()) == size,
              "all_to_all: ", input_splits.size(), " input and ", output_splits.size(),
              " output split sizes for a communicator of ", size, " ranks (one per rank)");
  const int64_t in_row = input.size(0) > 0 ? input.numel() / input.size(0) : 0;
  const int64_t out_row = output.size(0) > 0 ? output.numel() / output.size(0) : 0;
  TORCH_CHECK(input.size(0) == 0 || output.size(0) == 0 || in_row == out_row, "all_to_all: input rows hold ", in_row,
              " elements, output rows ", out_row, "; rows must match");
  const int64_t row = std::max(in_row, out_row), esize = static_cast<int64_t>(input.element_size());
  AllToAllPlan plan;
  int64_t in_total = 0, out_total = 0;
  for (int q = 0; q < size; ++q) {
    TORCH_CHECK(input_splits[q] >= 0 && output_splits[q] >= 0, "all_to_all: split sizes for rank ", q,
                " are negative (input ", input_splits[q], ", output ", output_splits[q], ")");
    plan.send_offsets.push_back(in_total * row);
    plan.send_counts.push_back(input_splits[q] * row);
    plan.recv_offsets.push_back(out_total * row);
    plan.recv_counts.push_back(output_splits[q] * row);
    in_total += input_splits[q];
    out_total += output_splits[q];
    if (q != rank) {
      plan.bytes_sent += input_splits[q] * row * esize;
      plan.bytes_received += output_splits[q] * row * esize;
    }
  }
  TORCH_CHECK(in_total == input.size(0), "all_to_all: input split sizes sum to ", in_total, " rows, the input has ",
              input.size(0));
  TORCH_CHECK(out_total == output.size(0), "all_to_all: output split sizes sum to ", out_total,
              " rows, the output has ", output.size(0));
  return plan;
}

ScanOp sum_scan_op() {
  ScanOp op;
  op.name = "sum";
  op.combine = [](const at::Tensor& earlier, at::Tensor& later) { later.add_(earlier); };
  op.identity = [](at::Tensor& out) { out.zero_(); };
  return op;
}

namespace {
std::mutex& registry_mutex() {
  static std::mutex m;
  return m;
}
std::unordered_map<int64_t, std::weak_ptr<Communicator>>& registry() {
  static std::unordered_map<int64_t, std::weak_ptr<Communicator>> r;
  return r;
}
std::atomic<int64_t> next_comm_id{1};

// The Work every public operation returns: the backend's, with the seconds of
// its first completed wait() added to the communicator's counters.
class WaitTimedWork final : public Work {
 public:
  WaitTimedWork(WorkPtr inner, OpType op, std::shared_ptr<CommStats> stats)
      : inner_(std::move(inner)), op_(op), stats_(std::move(stats)) {}
  void wait() override {
    if (waited_) return;
    const auto start = std::chrono::steady_clock::now();
    inner_->wait();
    waited_ = true;
    stats_->record_wait(op_, std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
  }
  bool is_completed() override { return inner_->is_completed(); }

 private:
  WorkPtr inner_;
  OpType op_;
  std::shared_ptr<CommStats> stats_;
  bool waited_ = false;
};
}  // namespace

std::chrono::milliseconds default_comm_timeout() {
  // The schema's default, or LOOM_COMM_TIMEOUT_S parsed and range-checked as
  // the config does it (ConfigError naming the variable).
  pb::LoomConfig config;
  apply_environment(&config);
  return std::chrono::milliseconds(static_cast<int64_t>(config.parallel().comm_timeout_s() * 1000.0));
}

Communicator::Communicator()
    : stats_(std::make_shared<CommStats>()), timeout_(default_comm_timeout()), id_(next_comm_id++) {}

Communicator::~Communicator() {
  std::lock_guard<std::mutex> lock(registry_mutex());
  registry().erase(id_);
}

void Communicator::register_self() {
  std::lock_guard<std::mutex> lock(registry_mutex());
  registry()[id_] = weak_from_this();
}

std::shared_ptr<Communicator> Communicator::by_id(int64_t id) {
  std::lock_guard<std::mutex> lock(registry_mutex());
  auto it = registry().find(id);
  std::shared_ptr<Communicator> comm = it == registry().end() ? nullptr : it->second.lock();
  if (!comm)
    throw CommError("communicator #" + std::to_string(id) +
                    " no longer exists (was it destroyed before autograd backward ran?)");
  return comm;
}

std::vector<std::shared_ptr<Communicator>> Communicator::live() {
  std::vector<std::pair<int64_t, std::shared_ptr<Communicator>>> found;
  {
    std::lock_guard<std::mutex> lock(registry_mutex());
    for (const auto& [id, weak] : registry())
      if (auto comm = weak.lock()) found.emplace_back(id, std::move(comm));
  }
  // (The last reference may be dropped here, outside the lock: a destructor takes it.)
  std::sort(found.begin(), found.end(), [](const auto& a, const auto& b) { return a.first < b.first; });
  std::vector<std::shared_ptr<Communicator>> comms;
  for (auto& entry : found) comms.push_back(std::move(entry.second));
  return comms;
}

CommPtr Communicator::reversed() {
  if (!reversed_) reversed_ = split(0, size() - 1 - rank());
  return reversed_;
}

void Communicator::throw_unsupported(const char* op) const {
  throw CommError("operation '" + std::string(op) + "' is not supported by the " + backend_name() +
                  " communicator (rank " + std::to_string(rank()) + " on host " + host_name() + ")");
}

WorkPtr Communicator::timed(OpType op, WorkPtr work) {
  return std::make_shared<WaitTimedWork>(std::move(work), op, stats_);
}

WorkPtr Communicator::all_gather(const at::Tensor& output, const at::Tensor& input) {
  return timed(OpType::kAllGather, post_all_gather(output, input));
}
WorkPtr Communicator::all_reduce(const at::Tensor& tensor, ReduceOp op) {
  return timed(OpType::kAllReduce, post_all_reduce(tensor, op));
}
WorkPtr Communicator::reduce_scatter(const at::Tensor& output, const at::Tensor& input, ReduceOp op) {
  return timed(OpType::kReduceScatter, post_reduce_scatter(output, input, op));
}
WorkPtr Communicator::broadcast(const at::Tensor& tensor, int root) {
  return timed(OpType::kBroadcast, post_broadcast(tensor, root));
}
WorkPtr Communicator::exscan(const at::Tensor& output, const at::Tensor& input, const ScanOp& op) {
  return timed(OpType::kExscan, post_exscan(output, input, op));
}
WorkPtr Communicator::all_to_all(const at::Tensor& output, const at::Tensor& input) {
  return timed(OpType::kAllToAll, post_all_to_all(output, input));
}
WorkPtr Communicator::all_to_all(const at::Tensor& output, const at::Tensor& input,
                                 const std::vector<int64_t>& output_splits, const std::vector<int64_t>& input_splits) {
  return timed(OpType::kAllToAll, post_all_to_all(output, input, output_splits, input_splits));
}
WorkPtr Communicator::barrier() { return timed(OpType::kBarrier, post_barrier()); }
WorkPtr Communicator::isend(const at::Tensor& tensor, int dst, int tag) {
  return timed(OpType::kSend, post_isend(tensor, dst, tag));
}
WorkPtr Communicator::irecv(const at::Tensor& tensor, int src, int tag) {
  return timed(OpType::kRecv, post_irecv(tensor, src, tag));
}

WorkPtr Communicator::post_all_gather(const at::Tensor&, const at::Tensor&) { throw_unsupported("all_gather"); }
WorkPtr Communicator::post_all_reduce(const at::Tensor&, ReduceOp) { throw_unsupported("all_reduce"); }
WorkPtr Communicator::post_reduce_scatter(const at::Tensor&, const at::Tensor&, ReduceOp) {
  throw_unsupported("reduce_scatter");
}
WorkPtr Communicator::post_broadcast(const at::Tensor&, int) { throw_unsupported("broadcast"); }
WorkPtr Communicator::post_exscan(const at::Tensor&, const at::Tensor&, const ScanOp&) { throw_unsupported("exscan"); }
WorkPtr Communicator::post_all_to_all(const at::Tensor&, const at::Tensor&) { throw_unsupported("all_to_all"); }
WorkPtr Communicator::post_all_to_all(const at::Tensor&, const at::Tensor&, const std::vector<int64_t>&,
                                      const std::vector<int64_t>&) {
  throw_unsupported("all_to_all (split sizes)");
}
WorkPtr Communicator::post_barrier() { throw_unsupported("barrier"); }
WorkPtr Communicator::post_isend(const at::Tensor&, int, int) { throw_unsupported("isend"); }
WorkPtr Communicator::post_irecv(const at::Tensor&, int, int) { throw_unsupported("irecv"); }
std::shared_ptr<Communicator> Communicator::split(int, int) { throw_unsupported("split"); }

}  // namespace loom
