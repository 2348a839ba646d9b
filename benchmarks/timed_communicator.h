// TimedCommunicator: a Communicator that forwards every operation to another
// one and accounts the wall time this rank spends posting operations and
// blocked in Work::wait(): loom-bench's split of a step into compute (the
// rest), transfer (the alpha-beta time of the bytes moved) and waiting
// (blocked beyond the transfer: late peers, load imbalance). Bytes and calls
// are the wrapped communicator's stats() plus those of the smaller groups
// split from this one (USP's all-to-all groups and rings, built by
// ulysses_grid() through split()): counters() sums them. A split over all the
// ranks (reversed(), all-scan's backward) is timed but not counted, as before
// USP existed, so that all-scan's byte columns stay comparable across runs.
// Every split is timed into the same blocked seconds.
#pragma once

#include <chrono>
#include <memory>
#include <string>
#include <vector>

#include "loom/runtime/comm/communicator.h"

namespace loom::bench {

class TimedCommunicator final : public Communicator {
 public:
  // Registered like every backend, so that autograd nodes find it by id.
  static std::shared_ptr<TimedCommunicator> create(CommPtr inner) {
    std::shared_ptr<TimedCommunicator> c(new TimedCommunicator(std::move(inner)));
    c->register_self();
    return c;
  }
  int rank() const override { return inner_->rank(); }
  int size() const override { return inner_->size(); }
  std::string backend_name() const override { return inner_->backend_name(); }
  at::Device device() const override { return inner_->device(); }
  const Communicator& inner() const { return *inner_; }
  double blocked_seconds() const { return *blocked_; }
  void reset_timers() { *blocked_ = 0; }

  // The split is wrapped, registered and kept, so that its bytes, calls and
  // blocked time count as this communicator's (it is collective like the inner split).
  std::shared_ptr<Communicator> split(int color, int key) override {
    std::shared_ptr<TimedCommunicator> child(new TimedCommunicator(inner_->split(color, key), blocked_));
    child->register_self();
    children_.push_back(child);
    return child;
  }
  // Bytes received and calls of this communicator and of everything split from it.
  struct Counters {
    int64_t bytes_received = 0, calls = 0;
  };
  Counters counters() const {
    Counters c{inner_->stats().total_bytes_received(), inner_->stats().total_calls()};
    for (const auto& child : children_) {
      if (child->size() == size()) continue;  // reversed(): see above
      const Counters d = child->counters();
      c.bytes_received += d.bytes_received;
      c.calls += d.calls;
    }
    return c;
  }

 private:
  // Every operation forwarded to the inner communicator (whose own stats count its waits).
  WorkPtr post_all_gather(const at::Tensor& out, const at::Tensor& in) override { return timed([&] { return inner_->all_gather(out, in); }); }
  WorkPtr post_all_reduce(const at::Tensor& t, ReduceOp op) override { return timed([&] { return inner_->all_reduce(t, op); }); }
  WorkPtr post_reduce_scatter(const at::Tensor& out, const at::Tensor& in, ReduceOp op) override {
    return timed([&] { return inner_->reduce_scatter(out, in, op); });
  }
  WorkPtr post_broadcast(const at::Tensor& t, int root) override { return timed([&] { return inner_->broadcast(t, root); }); }
  WorkPtr post_exscan(const at::Tensor& out, const at::Tensor& in, const ScanOp& op) override {
    return timed([&] { return inner_->exscan(out, in, op); });
  }
  WorkPtr post_all_to_all(const at::Tensor& out, const at::Tensor& in) override { return timed([&] { return inner_->all_to_all(out, in); }); }
  WorkPtr post_all_to_all(const at::Tensor& out, const at::Tensor& in, const std::vector<int64_t>& out_splits,
                          const std::vector<int64_t>& in_splits) override {
    return timed([&] { return inner_->all_to_all(out, in, out_splits, in_splits); });
  }
  WorkPtr post_barrier() override { return timed([&] { return inner_->barrier(); }); }
  WorkPtr post_isend(const at::Tensor& t, int dst, int tag) override { return timed([&] { return inner_->isend(t, dst, tag); }); }
  WorkPtr post_irecv(const at::Tensor& t, int src, int tag) override { return timed([&] { return inner_->irecv(t, src, tag); }); }

  explicit TimedCommunicator(CommPtr inner, std::shared_ptr<double> blocked = std::make_shared<double>(0))
      : inner_(std::move(inner)), blocked_(std::move(blocked)) {}
  using Clock = std::chrono::steady_clock;
  class TimedWork final : public Work {
   public:
    TimedWork(WorkPtr inner, std::shared_ptr<double> blocked) : inner_(std::move(inner)), blocked_(std::move(blocked)) {}
    void wait() override {
      const auto start = Clock::now();
      inner_->wait();
      *blocked_ += std::chrono::duration<double>(Clock::now() - start).count();
    }
    bool is_completed() override { return inner_->is_completed(); }

   private:
    WorkPtr inner_;
    std::shared_ptr<double> blocked_;
  };
  template <typename F>
  WorkPtr timed(F post) {
    const auto start = Clock::now();
    WorkPtr w = post();
    *blocked_ += std::chrono::duration<double>(Clock::now() - start).count();
    return std::make_shared<TimedWork>(std::move(w), blocked_);
  }

  CommPtr inner_;
  std::shared_ptr<double> blocked_;
  std::vector<std::shared_ptr<TimedCommunicator>> children_;
};

}  // namespace loom::bench
