// TimedCommunicator: a Communicator that forwards every operation to another
// one and accounts the wall time this rank spends posting operations and
// blocked in Work::wait(): loom-bench's split of a step into compute (the
// rest), transfer (the alpha-beta time of the bytes moved) and waiting
// (blocked beyond the transfer: late peers, load imbalance). Bytes and calls
// are the wrapped communicator's stats().
#pragma once

#include <chrono>
#include <memory>
#include <string>

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

  WorkPtr all_gather(const at::Tensor& out, const at::Tensor& in) override { return timed([&] { return inner_->all_gather(out, in); }); }
  WorkPtr all_reduce(const at::Tensor& t, ReduceOp op) override { return timed([&] { return inner_->all_reduce(t, op); }); }
  WorkPtr reduce_scatter(const at::Tensor& out, const at::Tensor& in, ReduceOp op) override {
    return timed([&] { return inner_->reduce_scatter(out, in, op); });
  }
  WorkPtr broadcast(const at::Tensor& t, int root) override { return timed([&] { return inner_->broadcast(t, root); }); }
  WorkPtr exscan(const at::Tensor& out, const at::Tensor& in, const ScanOp& op) override {
    return timed([&] { return inner_->exscan(out, in, op); });
  }
  WorkPtr all_to_all(const at::Tensor& out, const at::Tensor& in) override { return timed([&] { return inner_->all_to_all(out, in); }); }
  WorkPtr all_to_all(const at::Tensor& out, const at::Tensor& in, const std::vector<int64_t>& out_splits,
                     const std::vector<int64_t>& in_splits) override {
    return timed([&] { return inner_->all_to_all(out, in, out_splits, in_splits); });
  }
  WorkPtr barrier() override { return timed([&] { return inner_->barrier(); }); }
  WorkPtr isend(const at::Tensor& t, int dst, int tag) override { return timed([&] { return inner_->isend(t, dst, tag); }); }
  WorkPtr irecv(const at::Tensor& t, int src, int tag) override { return timed([&] { return inner_->irecv(t, src, tag); }); }
  std::shared_ptr<Communicator> split(int color, int key) override { return inner_->split(color, key); }

 private:
  explicit TimedCommunicator(CommPtr inner) : inner_(std::move(inner)) {}
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
  std::shared_ptr<double> blocked_ = std::make_shared<double>(0);
};

}  // namespace loom::bench
