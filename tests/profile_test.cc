// Issue 19, loom-train --profile:
// - the profile accumulator sums parts, steps and prefixes; the report's
//   "other" is the wall time minus the parts, "embedding + head/loss" the
//   model's forward+backward minus the layers, and its max column is the max
//   over ranks;
// - the Communicator base class times every backend's Work::wait() per
//   operation (exposed communication) into its CommStats (MPI here; an
//   in-process backend whose Work sleeps; c10d Gloo in communicator_test.cc),
//   and CommSnapshot sums calls, bytes and waits of every live communicator
//   since its start (later ones from 0);
// - profiling changes no loss and no gradient (bit-identical, float64) of any
//   tiny preset (together every mixer letter), with and without recompute
//   (BLOCK, SELECTIVE),
//   and times every layer kind forward and backward once per layer.
#include <gtest/gtest.h>
#include <torch/utils.h>

#include <algorithm>
#include <chrono>
#include <map>
#include <thread>

#include "loom/models/hybrid_lm.h"
#include "loom/runtime/comm/comm_order.h"
#include "loom/runtime/comm/mpi_communicator.h"
#include "loom/runtime/core/profile.h"
#include "loom/runtime/train/step_profile.h"

namespace loom {
namespace {

TEST(Profile, AccumulatorSumsPartsStepsAndPrefixes) {
  profile::Accumulator acc;
  acc.add("forward L", 1.0);
  acc.add("forward L", 0.5);
  acc.add("forward A", 0.25);
  acc.add("backward L", 2.0);
  acc.add("forwards", 8.0);  // not a "forward " part
  acc.add_step(3.0);
  acc.add_step(4.0);
  acc.add_wall(1.0);
  EXPECT_DOUBLE_EQ(acc.seconds("forward L"), 1.5);
  EXPECT_EQ(acc.parts().at("forward L").count, 2);
  EXPECT_DOUBLE_EQ(acc.seconds("never added"), 0.0);
  EXPECT_DOUBLE_EQ(acc.sum_with_prefix("forward "), 1.75);
  EXPECT_DOUBLE_EQ(acc.sum_with_prefix("backward "), 2.0);
  EXPECT_EQ(acc.steps(), 2);
  EXPECT_DOUBLE_EQ(acc.wall_seconds(), 8.0);
  EXPECT_EQ(profiled_layer_kinds(acc), "AL");
  acc.clear();
  EXPECT_TRUE(acc.parts().empty());
  EXPECT_EQ(acc.steps(), 0);
  EXPECT_DOUBLE_EQ(acc.wall_seconds(), 0.0);
}

TEST(Profile, ScopedTimerAndLayersActiveScope) {
  profile::global().clear();
  {
    profile::ScopedTimer timer("sleep");
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  EXPECT_GE(profile::global().seconds("sleep"), 0.015);
  EXPECT_EQ(profile::global().parts().at("sleep").count, 1);
  EXPECT_DOUBLE_EQ(profile::global().wall_seconds(), 0.0);  // inside a step: the step's wall holds it
  {
    // Profiling off: nothing is added, whatever the timer is asked to do.
    profile::ScopedTimer off("off", /*enabled=*/false);
    off.start("off again");
    off.stop();
  }
  EXPECT_EQ(profile::global().parts().count("off"), 0u);
  EXPECT_EQ(profile::global().parts().count("off again"), 0u);
  {
    // One timer through consecutive parts; stop() ends one, the destructor nothing more.
    profile::ScopedTimer timer("first", true, profile::ScopedTimer::Window::kOutsideStep);
    std::this_thread::sleep_for(std::chrono::milliseconds(10));
    timer.start("second");
    timer.stop();
    timer.stop();
  }
  EXPECT_GE(profile::global().seconds("first"), 0.009);
  EXPECT_EQ(profile::global().parts().at("second").count, 1);
  EXPECT_GE(profile::global().wall_seconds(), 0.009);  // outside a step: added to the wall
  EXPECT_FALSE(profile::layers_active());
  try {
    const profile::LayersActiveScope on(true);
    EXPECT_TRUE(profile::layers_active());
    throw std::runtime_error("leave the scope");
  } catch (const std::runtime_error&) {
  }
  EXPECT_FALSE(profile::layers_active()) << "an exception must not leave the layers timing";
  profile::global().clear();
}

TEST(Profile, ReportRowsAddUpAndTakeTheMaxOverRanks) {
  auto world = MpiCommunicator::world();
  const int r = world->rank(), W = world->size();
  profile::Accumulator acc;
  acc.add("data", 0.5);
  acc.add("forward L", 1.0 + r);  // the max over ranks is rank W-1's
  acc.add("backward L", 2.0);
  acc.add("forward W", 0.25);
  acc.add("backward W", 0.5);
  acc.add("model forward+backward", 5.0);
  acc.add("optimizer step", 0.75);
  acc.add_step(10.0);
  acc.add_step(10.0);
  CommSnapshot::Totals comm{};
  comm[static_cast<int>(OpType::kAllGather)] = CollectiveCounters{4, 100, 200, 0.125 * (r + 1)};
  const StepProfile p = make_step_profile(acc, comm, *world, "a note");
  std::map<std::string, ProfileRow> rows;
  for (const auto& row : p.parts) rows[row.name] = row;
  ASSERT_EQ(p.parts.back().name, "other");
  EXPECT_DOUBLE_EQ(rows.at("layers L forward").seconds, 1.0 + r);
  EXPECT_DOUBLE_EQ(rows.at("layers L forward").max_seconds, static_cast<double>(W));
  EXPECT_DOUBLE_EQ(rows.at("embedding + head/loss").seconds, 5.0 - (1.0 + r) - 2.0 - 0.25 - 0.5);
  double sum = 0;
  for (const auto& row : p.parts) sum += row.seconds;
  EXPECT_NEAR(sum, 20.0, 1e-12) << "the parts and other add up to the wall time";
  EXPECT_EQ(p.steps, 2);
  ASSERT_EQ(p.collectives.size(), 1u);
  EXPECT_EQ(p.collectives[0].name, "all_gather");
  EXPECT_EQ(p.collectives[0].counters.calls, 4);
  EXPECT_DOUBLE_EQ(p.collectives[0].max_wait_seconds, 0.125 * W);
  const std::string table = p.table();
  for (const char* needle : {"layers L forward", "layers L backward", "layers W forward", "layers W backward",
                             "embedding + head/loss", "optimizer step", "other", "all_gather", "a note"})
    EXPECT_NE(table.find(needle), std::string::npos) << needle << " missing in\n" << table;
  const std::string json = p.json();
  EXPECT_EQ(json.rfind("{\"profile\": {", 0), 0u) << json;
  EXPECT_NE(json.find("\"layers L backward\": {\"s\": 2,"), std::string::npos) << json;
  EXPECT_NE(json.find("\"all_gather\": {\"calls\": 4, \"bytes_sent\": 100, \"bytes_received\": 200"),
            std::string::npos)
      << json;
}

TEST(Profile, MpiWorkTimesItsWaitPerOperation) {
  auto world = MpiCommunicator::world();
  if (world->size() < 2) GTEST_SKIP() << "needs a peer to wait for";
  const CommSnapshot snapshot;
  auto comm = world->split(0, world->rank());  // made after the snapshot: counts from 0
  const CommStats before = world->stats();
  // Rank 0 arrives 200 ms late: everyone else blocks in wait() that long.
  if (world->rank() == 0) std::this_thread::sleep_for(std::chrono::milliseconds(200));
  world->barrier()->wait();
  const double barrier_wait = (world->stats() - before)[OpType::kBarrier].wait_seconds;
  if (world->rank() != 0) EXPECT_GE(barrier_wait, 0.15);
  // Point-to-point: rank 1 receives what rank 0 sends 200 ms late.
  at::Tensor t = at::zeros({16}, at::kFloat);
  if (comm->rank() == 0) {
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
    comm->send(at::ones({16}, at::kFloat), 1, 3);
  } else if (comm->rank() == 1) {
    comm->recv(t, 0, 3);
    EXPECT_GE(comm->stats()[OpType::kRecv].wait_seconds, 0.15);
    EXPECT_EQ(t.sum().item<float>(), 16.0f);
  }
  comm->all_reduce(t)->wait();
  const CommSnapshot::Totals totals = snapshot.since();
  EXPECT_EQ(totals[static_cast<int>(OpType::kBarrier)].calls, 1);
  if (world->rank() != 0) EXPECT_GE(totals[static_cast<int>(OpType::kBarrier)].wait_seconds, 0.15);
  EXPECT_EQ(totals[static_cast<int>(OpType::kAllReduce)].calls, 1);
  if (world->rank() == 1) {
    EXPECT_EQ(totals[static_cast<int>(OpType::kRecv)].calls, 1);
    EXPECT_EQ(totals[static_cast<int>(OpType::kRecv)].bytes_received, 64);
    EXPECT_GE(totals[static_cast<int>(OpType::kRecv)].wait_seconds, 0.15);
  }
  // Gone communicators are no longer summed.
  const int64_t id = comm->id();
  comm.reset();
  for (const CommPtr& live : Communicator::live()) EXPECT_NE(live->id(), id);
}

// An in-process backend of one rank whose barrier takes 100 ms to complete:
// its Work knows nothing of timing, so the seconds can only come from the
// base class's wrapper.
class SlowBarrierCommunicator final : public Communicator {
 public:
  static std::shared_ptr<SlowBarrierCommunicator> create() {
    std::shared_ptr<SlowBarrierCommunicator> c(new SlowBarrierCommunicator());
    c->register_self();
    return c;
  }
  int rank() const override { return 0; }
  int size() const override { return 1; }
  std::string backend_name() const override { return "slow-barrier"; }

 private:
  SlowBarrierCommunicator() = default;
  class SleepingWork final : public Work {
   public:
    void wait() override {
      if (!done_) std::this_thread::sleep_for(std::chrono::milliseconds(100));
      done_ = true;
    }
    bool is_completed() override { return done_; }

   private:
    bool done_ = false;
  };
  WorkPtr post_barrier() override {
    record(OpType::kBarrier, 0, 0);
    return std::make_shared<SleepingWork>();
  }
};

TEST(Profile, EveryBackendsWaitIsTimedByTheBaseClass) {
  const CommSnapshot snapshot;
  auto comm = SlowBarrierCommunicator::create();
  WorkPtr work = comm->barrier();
  EXPECT_EQ(comm->stats()[OpType::kBarrier].wait_seconds, 0.0);  // posted, not waited
  work->wait();
  const double waited = comm->stats()[OpType::kBarrier].wait_seconds;
  EXPECT_GE(waited, 0.09);
  EXPECT_LT(waited, 30.0);
  work->wait();  // a second wait adds nothing
  EXPECT_EQ(comm->stats()[OpType::kBarrier].wait_seconds, waited);
  const CommSnapshot::Totals totals = snapshot.since();
  EXPECT_EQ(totals[static_cast<int>(OpType::kBarrier)].calls, 1);
  EXPECT_GE(totals[static_cast<int>(OpType::kBarrier)].wait_seconds, 0.09);
  // A Work waited after its communicator is gone counts into nothing, safely.
  WorkPtr late = comm->barrier();
  comm.reset();
  late->wait();
  EXPECT_TRUE(late->is_completed());
}

// ---- profiling a model changes nothing ----

struct Step {
  at::Tensor loss;
  std::vector<at::Tensor> grads;
};

Step model_step(models::HybridLM& model, const at::Tensor& tokens, const CommPtr& comm, bool profiled) {
  const int64_t n = tokens.size(1) - 1;
  const SequenceLayout layout(LayoutKind::kZigzag, n, comm->size());
  Batch local;
  local.inputs = layout.shard(tokens.narrow(1, 0, n), comm->rank(), 1, 0);
  local.labels = layout.shard(tokens.narrow(1, 1, n), comm->rank(), 1, -100);
  model->zero_grad();
  at::Tensor loss;
  {
    const profile::LayersActiveScope layers(profiled);
    loss = models::language_model_loss(pb::ParallelConfig())(*model, local, layout, comm);
    loss.backward();
  }
  Step step{loss.detach().clone(), {}};
  for (auto& p : model->parameters()) step.grads.push_back(p.grad().defined() ? p.grad().clone() : at::Tensor());
  // The graph CommOrder still holds stays until the next forward or the end of
  // the process (CommOrder's state is never destroyed, so exit is safe).
  return step;
}

class ProfileModel : public ::testing::TestWithParam<std::string> {};

TEST_P(ProfileModel, ChangesNoLossOrGradientAndTimesEveryLayerKind) {
  auto comm = MpiCommunicator::world();
  pb::ModelConfig user;
  user.set_preset(GetParam());
  const pb::ModelConfig config = models::resolve_model_config(user);
  torch::manual_seed(42);
  models::HybridLM model(config);
  model->to(at::kDouble);
  at::Generator gen = at::detail::createCPUGenerator(7);
  const at::Tensor tokens = at::randint(0, 256, {2, 24 * comm->size() + 1}, gen, at::kLong);
  std::map<char, int64_t> layers_of;
  for (char letter : config.pattern()) ++layers_of[letter];
  for (auto mode : {RecomputeMode::kNone, RecomputeMode::kBlock, RecomputeMode::kSelective}) {
    const std::string where = GetParam() + (mode == RecomputeMode::kNone    ? " NONE"
                                            : mode == RecomputeMode::kBlock ? " BLOCK"
                                                                            : " SELECTIVE");
    model->set_recompute(mode);
    profile::global().clear();
    const Step ref = model_step(model, tokens, comm, false);
    EXPECT_TRUE(profile::global().parts().empty()) << where << ": profiling off must time nothing";
    const Step got = model_step(model, tokens, comm, true);
    EXPECT_TRUE(at::equal(got.loss, ref.loss)) << where << " loss";
    ASSERT_EQ(got.grads.size(), ref.grads.size());
    for (size_t i = 0; i < ref.grads.size(); ++i) {
      ASSERT_EQ(got.grads[i].defined(), ref.grads[i].defined()) << where << " grad " << i;
      if (ref.grads[i].defined()) EXPECT_TRUE(at::equal(got.grads[i], ref.grads[i])) << where << " grad " << i;
    }
    for (const auto& [letter, count] : layers_of) {
      for (const char* direction : {"forward ", "backward "}) {
        const std::string part = direction + std::string(1, letter);
        const auto it = profile::global().parts().find(part);
        ASSERT_NE(it, profile::global().parts().end()) << where << ": no '" << part << "'";
        EXPECT_EQ(it->second.count, count) << where << ": '" << part << "' once per layer";
        EXPECT_GT(it->second.seconds, 0.0) << where << ": '" << part << "'";
      }
    }
    EXPECT_EQ(profiled_layer_kinds(profile::global()).size(), layers_of.size()) << where;
  }
  profile::global().clear();
}

// Together every mixer letter: L W C (based), A (hybrid), K (gla), D (qwen35), X G M (titans).
INSTANTIATE_TEST_SUITE_P(Presets, ProfileModel,
                         ::testing::Values("tiny-based", "tiny-linear-llama-hybrid", "tiny-gla", "tiny-qwen35",
                                           "tiny-titans-mac", "tiny-titans-mag", "tiny-titans-mal"),
                         [](const auto& info) {
                           std::string name = info.param;
                           for (char& c : name)
                             if (c == '-') c = '_';
                           return name;
                         });

}  // namespace
}  // namespace loom
