// Training: the trainer at sp = W matches one rank; checkpoint save + resume
// reproduces the next losses exactly; truncated or corrupt checkpoints and
// token files are refused with messages naming the file. Nothing lost:
// checkpoints order by manifest step, a run never deletes or shadows what it
// did not write, one job per directory (lock), divergence of the parameters
// saves nothing, resume at the end changes nothing, resume from another model
// is refused, signals stop every rank with one checkpoint and the handlers
// found are restored, metrics failures are errors and each run has a header.
#include <gtest/gtest.h>

#include <limits>
#include <sys/wait.h>
#include <torch/nn/modules/embedding.h>
#include <torch/nn/modules/linear.h>
#include <torch/utils.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <csignal>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <regex>

#include "distributed_reference.h"
#include "loom/models/hybrid_lm.h"
#include "loom/runtime/train/checkpoint.h"
#include "loom/runtime/core/error.h"
#include "loom/runtime/comm/mpi_communicator.h"
#include "loom/runtime/data/token_file.h"
#include "loom/runtime/train/optimizer.h"
#include "loom/runtime/train/trainer.h"

namespace loom {
namespace {

namespace fs = std::filesystem;
namespace lm = models;

// A small shared scratch directory (rank 0 creates, everyone uses), named after rank 0's process id so
// that the same test at other rank counts (ctest -j) or in another checkout never shares it; the previous
// one of this process is removed when the next is made, the last when the process exits.
std::string scratch(const CommPtr& world, const std::string& name) {
  at::Tensor pid = at::full({1}, static_cast<int64_t>(::getpid()), at::kLong);
  world->broadcast(pid, 0)->wait();
  const std::string dir =
      (fs::temp_directory_path() / ("loom-test-" + name + "-" + std::to_string(pid.item<int64_t>()))).string();
  static std::vector<std::string> made;  // rank 0: removed at exit
  static const bool cleanup_registered = [] {
    std::atexit([] {
      for (const auto& d : made) {
        std::error_code ec;
        fs::remove_all(d, ec);
      }
    });
    return true;
  }();
  (void)cleanup_registered;
  if (world->rank() == 0) {
    fs::remove_all(dir);
    fs::create_directories(dir);
    made.push_back(dir);
  }
  world->barrier()->wait();
  return dir;
}

pb::LoomConfig tiny_config(const std::string& dir, const std::string& preset) {
  pb::LoomConfig c;
  c.mutable_model()->set_preset(preset);
  auto* t = c.mutable_train();
  t->set_steps(10);
  t->set_batch_size(2);
  t->set_seq_len(48);
  t->set_lr(3e-3);
  t->set_warmup_steps(2);
  t->set_log_interval(100);
  t->set_eval_interval(0);
  t->set_eval_batches(1);
  t->set_checkpoint_dir(dir + "/ckpt");
  t->set_dtype("float64");
  c.mutable_parallel()->set_layout(pb::ZIGZAG);
  return c;
}

// Byte-ish random tokens, the same on every rank.
std::shared_ptr<TokenSampler> sampler(const CommPtr& world, const std::string& dir) {
  const std::string path = dir + "/tokens.tok";
  if (world->rank() == 0) {
    std::vector<uint32_t> tokens;
    for (int i = 0; i < 4000; ++i) tokens.push_back(static_cast<uint32_t>((i * 7 + (i / 13) * 3) % 251));
    write_token_file(path, tokens, 256);
  }
  world->barrier()->wait();
  return open_data(path, 0.1, 48, 256, 7).train;
}

struct TrainingRun {
  std::vector<double> losses;
  std::vector<at::Tensor> params;
};

TrainingRun train(const pb::LoomConfig& config, ProcessMesh& mesh, const std::shared_ptr<TokenSampler>& data,
                  int64_t stop_after, bool resume) {
  const pb::LoomConfig& c = config;
  torch::manual_seed(11);
  lm::HybridLM model(lm::resolve_model_config(c.model()));
  model->to(at::kDouble);
  auto batches = [data](int64_t first, int64_t n) { return data->batch(first, n); };
  Trainer trainer(c, mesh, model.ptr(), lm::language_model_loss(c.parallel()), batches, batches);
  if (resume) trainer.resume();
  trainer.fit(stop_after);
  TrainingRun run{trainer.losses(), {}};
  for (const auto& p : model->parameters()) run.params.push_back(p.detach().clone());
  return run;
}

TEST(Training, SequenceParallelTrainingMatchesOneRank) {
  auto world = MpiCommunicator::world();
  const std::string dir = scratch(world, "sp");
  auto data = sampler(world, dir);
  pb::LoomConfig config = tiny_config(dir, "tiny-based");
  config.mutable_train()->set_checkpoint_dir(dir + "/ckpt-rank" + std::to_string(world->rank()));
  auto self = world->split(world->rank(), 0);
  ProcessMesh one(self, 1, 1), all(world, 1, 0);
  const TrainingRun ref = train(config, one, data, 3, false);
  config.mutable_train()->set_checkpoint_dir(dir + "/ckpt-all");
  const TrainingRun got = train(config, all, data, 3, false);
  testing::ReferenceCheck check(world->rank(), 1e-8);
  check.same("losses", at::tensor(got.losses, at::kDouble), at::tensor(ref.losses, at::kDouble));
  for (size_t i = 0; i < ref.params.size(); ++i) check.same("param" + std::to_string(i), got.params[i], ref.params[i]);
  EXPECT_TRUE(check.verdict());
}

TEST(Training, ResumeReproducesTheNextFiveLossesExactly) {
  auto world = MpiCommunicator::world();
  const std::string dir = scratch(world, "resume");
  auto data = sampler(world, dir);
  ProcessMesh mesh(world, 1, 0);
  pb::LoomConfig straight = tiny_config(dir + "/a", "tiny-titans-mag");
  straight.mutable_train()->set_checkpoint_dir(dir + "/straight");
  const TrainingRun full = train(straight, mesh, data, 10, false);
  pb::LoomConfig split = straight;
  split.mutable_train()->set_checkpoint_dir(dir + "/split");
  train(split, mesh, data, 5, false);                             // stops and saves at step 5
  const TrainingRun second = train(split, mesh, data, 10, true);  // resumes at 5
  ASSERT_EQ(full.losses.size(), 10u);
  ASSERT_EQ(second.losses.size(), 5u);
  for (int i = 0; i < 5; ++i) EXPECT_EQ(second.losses[i], full.losses[5 + i]) << "step " << 6 + i;
  for (size_t i = 0; i < full.params.size(); ++i) EXPECT_TRUE(at::equal(second.params[i], full.params[i]));
}

TEST(Training, IgnoredLabelsDoNotCountInTheMean) {
  // Half the labels ignored: the reported loss is the mean over the other half
  // (all ranks together), not the sum divided by every token.
  auto world = MpiCommunicator::world();
  const std::string dir = scratch(world, "ignored");
  auto data = sampler(world, dir);
  auto half = [data](int64_t first, int64_t n) {
    Batch b = data->batch(first, n);
    b.labels.narrow(1, 0, b.labels.size(1) / 2).fill_(-100);
    return b;
  };
  pb::LoomConfig c = tiny_config(dir, "tiny-based");
  c.mutable_train()->set_checkpoint_dir(dir + "/ckpt");
  ProcessMesh mesh(world, 1, 0);
  torch::manual_seed(11);
  lm::HybridLM model(lm::resolve_model_config(c.model()));
  model->to(at::kDouble);
  // Reference at the initial parameters, whole sequences on this rank.
  const Batch b = half(0, 2);
  auto self = world->split(world->rank(), 0);
  const SequenceLayout one(LayoutKind::kZigzag, 48, 1);
  double expected = 0;
  {
    torch::NoGradGuard no_grad;
    const at::Tensor logits = model->forward(b.inputs, lm::make_context(c.parallel(), one, self));
    expected = at::nll_loss(at::log_softmax(logits.reshape({-1, 256}), -1), b.labels.reshape({-1}), {},
                            at::Reduction::Mean, -100)
                   .item<double>();
  }
  Trainer trainer(c, mesh, model.ptr(), lm::language_model_loss(c.parallel()), half, half);
  trainer.fit(1);
  ASSERT_EQ(trainer.losses().size(), 1u);
  EXPECT_NEAR(trainer.losses()[0], expected, 1e-10 * std::abs(expected));
}

TEST(Training, CorruptOrTruncatedCheckpointIsRefused) {
  auto world = MpiCommunicator::world();
  const std::string dir = scratch(world, "corrupt") + "/r" + std::to_string(world->rank());
  CheckpointData data;
  data.manifest.set_step(3);
  data.tensors.emplace_back("w", at::arange(1000, at::kDouble));
  const std::string path = save_checkpoint(dir, data);
  EXPECT_EQ(latest_checkpoint(dir).value(), path);
  EXPECT_TRUE(at::equal(load_checkpoint(path).tensors[0].second, data.tensors[0].second));
  const std::string state = path + "/state.bin";
  {  // flip one byte
    std::fstream f(state, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(100);
    f.put('\x7f');
  }
  try {
    load_checkpoint(path);
    FAIL() << "expected a checksum error";
  } catch (const LoomError& e) {
    EXPECT_NE(std::string(e.what()).find("state.bin': checksum mismatch"), std::string::npos) << e.what();
  }
  fs::resize_file(state, 4000);
  try {
    load_checkpoint(path);
    FAIL() << "expected a size error";
  } catch (const LoomError& e) {
    EXPECT_NE(std::string(e.what()).find("truncated or corrupt"), std::string::npos) << e.what();
  }
  // An unfinished save directory is never taken for a checkpoint.
  fs::create_directories(dir + "/step-00000009.tmp");
  EXPECT_EQ(latest_checkpoint(dir).value(), path);
}

TEST(Training, TokenFileErrorsNameTheFile) {
  auto world = MpiCommunicator::world();
  const std::string dir = scratch(world, "tokens") + "/r" + std::to_string(world->rank());
  fs::create_directories(dir);
  EXPECT_THROW(TokenFile(dir + "/missing.tok"), LoomError);
  { std::ofstream(dir + "/empty.tok"); }
  try {
    TokenFile f(dir + "/empty.tok");
    FAIL();
  } catch (const LoomError& e) {
    EXPECT_NE(std::string(e.what()).find("empty.tok': file is empty"), std::string::npos) << e.what();
  }
  write_token_file(dir + "/ok.tok", {1, 2, 3, 250}, 256);
  EXPECT_EQ(TokenFile(dir + "/ok.tok").at(3), 250u);
  fs::resize_file(dir + "/ok.tok", 66);
  EXPECT_THROW(TokenFile(dir + "/ok.tok"), LoomError);
  EXPECT_THROW(write_token_file(dir + "/bad.tok", {1, 300}, 256), LoomError);  // id >= vocab
  // A model vocabulary smaller than the file's.
  write_token_file(dir + "/big.tok", std::vector<uint32_t>(200, 5), 256);
  try {
    open_data(dir + "/big.tok", 0.1, 16, 100, 1);
    FAIL();
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("model.vocab_size is 100"), std::string::npos) << e.what();
  }
}

TEST(Training, GradNormIsTheGlobalNormBeforeClipping) {
  // clip_gradients: the norm before clipping, and clipped gradients of norm max_norm.
  at::Tensor a = at::zeros({1}, at::kDouble).requires_grad_(), b = at::zeros({1, 1}, at::kDouble).requires_grad_();
  a.mutable_grad() = at::full({1}, 3.0, at::kDouble);
  b.mutable_grad() = at::full({1, 1}, 4.0, at::kDouble);
  const NamedTensors params = {{"a", a}, {"b", b}};
  EXPECT_DOUBLE_EQ(clip_gradients(params, 0), 5.0);  // 0: no clipping
  EXPECT_DOUBLE_EQ(a.grad().item<double>(), 3.0);
  EXPECT_DOUBLE_EQ(clip_gradients(params, 1.0), 5.0);
  EXPECT_NEAR(std::hypot(a.grad().item<double>(), b.grad().item<double>()), 1.0, 1e-9);
  // Below the limit nothing changes (the scale is exactly 1); a parameter
  // without a gradient is skipped; float32 gradients are scaled in float32.
  at::Tensor c = at::zeros({2}, at::kFloat).requires_grad_(), unused = at::zeros({3}, at::kDouble).requires_grad_();
  c.mutable_grad() = at::tensor({0.3f, 0.4f});
  const NamedTensors mixed = {{"c", c}, {"unused", unused}};
  EXPECT_NEAR(clip_gradients(mixed, 1.0), 0.5, 1e-7);
  EXPECT_TRUE(at::equal(c.grad(), at::tensor({0.3f, 0.4f})));
  EXPECT_FALSE(unused.grad().defined());
  EXPECT_NEAR(clip_gradients(mixed, 0.25), 0.5, 1e-7);
  EXPECT_EQ(c.grad().scalar_type(), at::kFloat);
  EXPECT_NEAR(c.grad().norm().item<double>(), 0.25, 1e-6);
  // A non-finite norm is reported as such and leaves the gradients alone (the
  // trainer stops on it).
  c.mutable_grad() = at::tensor({std::numeric_limits<float>::infinity(), 1.0f});
  EXPECT_FALSE(std::isfinite(clip_gradients(mixed, 1.0)));
  EXPECT_EQ(c.grad()[1].item<float>(), 1.0f);

  // The trainer reports it every step: positive, finite, the same on every rank.
  auto world = MpiCommunicator::world();
  const std::string dir = scratch(world, "grad-norm");
  auto data = sampler(world, dir);
  pb::LoomConfig config = tiny_config(dir, "tiny-based");
  config.mutable_train()->set_grad_clip(1e-6);  // every step clips: the norm reported is the one before
  ProcessMesh mesh(world, 1, 0);
  torch::manual_seed(11);
  lm::HybridLM model(lm::resolve_model_config(config.model()));
  model->to(at::kDouble);
  auto batches = [data](int64_t first, int64_t n) { return data->batch(first, n); };
  std::vector<double> norms;
  Trainer::Hooks hooks;
  hooks.on_step = [&](const StepMetrics& m) { norms.push_back(m.grad_norm); };
  Trainer trainer(config, mesh, model.ptr(), lm::language_model_loss(config.parallel()), batches, batches, hooks);
  trainer.fit(2);
  ASSERT_EQ(norms.size(), 2u);
  for (double n : norms) {
    EXPECT_TRUE(std::isfinite(n));
    EXPECT_GT(n, 1e-6);
    at::Tensor extremes = at::tensor({n, -n}, at::kDouble);  // max and -min over the ranks
    world->all_reduce(extremes, ReduceOp::kMax)->wait();
    EXPECT_EQ(extremes[0].item<double>(), -extremes[1].item<double>());
  }
  // The metrics file carries it too.
  if (world->rank() == 0) {
    // The first line is the run header; the step lines carry the norm.
    std::ifstream metrics(dir + "/ckpt/metrics.jsonl");
    std::string line;
    int step_lines = 0;
    while (std::getline(metrics, line)) {
      if (line.find("\"step\": ") == std::string::npos || line.find("\"loss\": ") == std::string::npos) continue;
      ++step_lines;
      EXPECT_NE(line.find("\"grad_norm\": "), std::string::npos) << line;
    }
    EXPECT_EQ(step_lines, 2);
  }
}

TEST(Training, ValidationWindowsComeFromValPath) {
  auto world = MpiCommunicator::world();
  const std::string dir = scratch(world, "val-path") + "/r" + std::to_string(world->rank());
  fs::create_directories(dir);
  write_token_file(dir + "/train.tok", std::vector<uint32_t>(300, 5), 256);
  write_token_file(dir + "/val.tok", std::vector<uint32_t>(40, 7), 256);
  const DataSplits d = open_data(dir + "/train.tok", 0.5, 16, 256, 1, dir + "/val.tok");
  EXPECT_EQ(d.train->tokens(), 300);  // all of the train file: val_fraction is not used
  EXPECT_EQ(d.validation->tokens(), 40);
  EXPECT_TRUE(d.validation->batch(0, 3).inputs.eq(7).all().item<bool>());
  EXPECT_TRUE(d.train->batch(0, 3).inputs.eq(5).all().item<bool>());
  auto error_of = [&](const std::string& val_path, int64_t vocab) -> std::string {
    try {
      open_data(dir + "/train.tok", 0.5, 16, vocab, 1, val_path);
    } catch (const ConfigError& e) {
      return e.what();
    }
    return "<no error>";
  };
  EXPECT_NE(error_of(dir + "/none.tok", 256).find("data.val_path: token file '" + dir + "/none.tok'"), std::string::npos)
      << error_of(dir + "/none.tok", 256);
  write_token_file(dir + "/short.tok", std::vector<uint32_t>(10, 7), 256);
  EXPECT_NE(error_of(dir + "/short.tok", 256).find("data.val_path: "), std::string::npos);
  write_token_file(dir + "/other-vocab.tok", std::vector<uint32_t>(40, 7), 320);
  EXPECT_NE(error_of(dir + "/other-vocab.tok", 512).find("not made with the same tokenizer"), std::string::npos)
      << error_of(dir + "/other-vocab.tok", 512);
  // The model's vocabulary is checked against the held-out file as against the train file.
  write_token_file(dir + "/train-320.tok", std::vector<uint32_t>(300, 5), 320);
  try {
    open_data(dir + "/train-320.tok", 0.5, 16, 300, 1, dir + "/other-vocab.tok");
    FAIL();
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("model.vocab_size is 300"), std::string::npos) << e.what();
  }
}

// ---- Nothing lost: checkpoint directories, divergence, signals, metrics ----

// A per-token model (no interaction across positions, so any sp sharding is
// exact) that trains in milliseconds.
struct TinyTokenModel : torch::nn::Module {
  torch::nn::Embedding embed{nullptr};
  torch::nn::Linear head{nullptr};
  explicit TinyTokenModel(int64_t d = 8, bool bias = true) {
    embed = register_module("embed", torch::nn::Embedding(16, d));
    head = register_module("head", torch::nn::Linear(torch::nn::LinearOptions(d, 16).bias(bias)));
  }
};

at::Tensor tiny_loss(torch::nn::Module& m, const Batch& local, const SequenceLayout&, const CommPtr&) {
  auto& model = static_cast<TinyTokenModel&>(m);
  const at::Tensor logits = model.head(model.embed(local.inputs));
  return at::nll_loss(at::log_softmax(logits.reshape({-1, 16}), -1), local.labels.reshape({-1}), {},
                      at::Reduction::Sum, -100);
}

Batch tiny_batch(int64_t first, int64_t n) {
  const at::Tensor seq = (at::arange(17, at::kLong).unsqueeze(0) + at::arange(first, first + n, at::kLong).unsqueeze(1)) % 16;
  return Batch{seq.narrow(1, 0, 16).contiguous(), seq.narrow(1, 1, 16).contiguous()};
}

pb::LoomConfig tiny_run_config(const std::string& checkpoint_dir, int64_t steps) {
  pb::LoomConfig c;
  c.mutable_model()->set_d_model(8);
  auto* t = c.mutable_train();
  t->set_steps(steps);
  t->set_batch_size(2);
  t->set_seq_len(16);
  t->set_lr(1e-2);
  t->set_warmup_steps(0);
  t->set_log_interval(100);
  t->set_eval_interval(0);
  t->set_eval_batches(1);
  t->set_checkpoint_dir(checkpoint_dir);
  c.mutable_parallel()->set_layout(pb::CONTIGUOUS);
  return c;
}

enum class Start { kNew, kResume, kOverwrite };

// One run of the tiny model: a new trainer (and model) each time, like a new job.
Trainer::Result run_tiny(const pb::LoomConfig& config, ProcessMesh& mesh, Start start, int64_t stop_after = -1,
                         Trainer::Hooks hooks = {}, int64_t d_model = 8, bool bias = true) {
  torch::manual_seed(3);
  auto model = std::make_shared<TinyTokenModel>(d_model, bias);
  Trainer trainer(config, mesh, model, tiny_loss, tiny_batch, tiny_batch, std::move(hooks));
  if (start == Start::kResume) trainer.resume();
  if (start == Start::kOverwrite) trainer.overwrite();
  return trainer.fit(stop_after);
}

std::vector<int64_t> steps_in(const std::string& dir) {
  std::vector<int64_t> steps;
  for (const auto& c : list_checkpoints(dir)) steps.push_back(c.step);
  return steps;
}

std::string read_text(const std::string& path) {
  std::ifstream in(path);
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

// Sets an environment variable for one scope (fault injection).
struct ScopedEnv {
  std::string name;
  ScopedEnv(const std::string& n, const std::string& value) : name(n) { setenv(n.c_str(), value.c_str(), 1); }
  ~ScopedEnv() { unsetenv(name.c_str()); }
};

template <typename E, typename F>
std::string expect_throw(F&& f) {
  try {
    f();
  } catch (const E& e) {
    return e.what();
  }
  ADD_FAILURE() << "expected an exception";
  return "";
}

CheckpointData tiny_checkpoint(int64_t step, double value) {
  CheckpointData data;
  data.manifest.set_step(step);
  data.tensors.emplace_back("w", at::full({4}, value, at::kDouble));
  return data;
}

TEST(Training, CheckpointsOrderByManifestStepBeyondEightDigits) {
  auto world = MpiCommunicator::world();
  const std::string dir = scratch(world, "order") + "/r" + std::to_string(world->rank());
  // A checkpoint of another run: never pruned by this one.
  const std::string foreign = save_checkpoint(dir, tiny_checkpoint(5, 5));
  CheckpointWriter writer(dir, /*keep=*/2);
  const std::string nine = writer.save(tiny_checkpoint(99999999, 1));
  const std::string ten = writer.save(tiny_checkpoint(100000000, 2));
  const std::string ten_plus = writer.save(tiny_checkpoint(100000001, 3));
  // By name "step-99999999" sorts after "step-100000001"; by step it is older.
  EXPECT_EQ(steps_in(dir), (std::vector<int64_t>{5, 100000000, 100000001}));
  EXPECT_FALSE(fs::exists(nine)) << "the oldest checkpoint of this run is pruned";
  EXPECT_TRUE(fs::exists(foreign)) << "a checkpoint this run did not write is never pruned";
  EXPECT_EQ(latest_checkpoint(dir).value(), ten_plus);
  EXPECT_EQ(load_checkpoint(latest_checkpoint(dir).value()).manifest.step(), 100000001);
  ASSERT_EQ(writer.kept().size(), 2u);
  EXPECT_EQ(writer.kept()[0].path, ten);
}

TEST(Training, ASaveNeverReplacesACheckpointItDidNotWrite) {
  auto world = MpiCommunicator::world();
  const std::string dir = scratch(world, "shadow") + "/r" + std::to_string(world->rank());
  const std::string first = save_checkpoint(dir, tiny_checkpoint(3, 1.0));
  const std::string second = save_checkpoint(dir, tiny_checkpoint(3, 2.0));  // another run, same step
  EXPECT_EQ(first, second);
  EXPECT_EQ(load_checkpoint(second).tensors[0].second[0].item<double>(), 2.0);
  std::vector<std::string> aside;
  for (const auto& e : fs::directory_iterator(dir))
    if (e.path().filename().string().rfind("superseded-", 0) == 0) aside.push_back(e.path().string());
  ASSERT_EQ(aside.size(), 1u) << "the earlier step-3 was moved aside, not deleted";
  EXPECT_EQ(load_checkpoint(aside[0] + "/step-00000003").tensors[0].second[0].item<double>(), 1.0);
  // A writer replaces only its own checkpoint of a step.
  CheckpointWriter writer(dir, 0);
  writer.save(tiny_checkpoint(4, 1.0));
  writer.save(tiny_checkpoint(4, 4.0));
  EXPECT_EQ(load_checkpoint(dir + "/step-00000004").tensors[0].second[0].item<double>(), 4.0);
  int superseded = 0;
  for (const auto& e : fs::directory_iterator(dir)) superseded += e.path().filename().string().rfind("superseded-", 0) == 0;
  EXPECT_EQ(superseded, 1);
}

TEST(Training, NewRunRefusesADirectoryWithCheckpointsOverwriteMovesThemAside) {
  auto world = MpiCommunicator::world();
  const std::string dir = scratch(world, "reuse") + "/ckpt";
  ProcessMesh mesh(world, 1, 0);
  const pb::LoomConfig config = tiny_run_config(dir, 2);
  EXPECT_EQ(run_tiny(config, mesh, Start::kNew).steps, 2);
  const std::string message = expect_throw<RunRefused>([&] { run_tiny(config, mesh, Start::kNew); });
  EXPECT_NE(message.find("already holds 1 checkpoint"), std::string::npos) << message;
  EXPECT_NE(message.find("--resume"), std::string::npos) << message;
  EXPECT_NE(message.find("--overwrite"), std::string::npos) << message;
  EXPECT_EQ(steps_in(dir), std::vector<int64_t>{2});
  const CheckpointData before = load_checkpoint(dir + "/step-00000002");
  world->barrier()->wait();
  // --overwrite: the old checkpoint moves into superseded-<time>/, intact.
  EXPECT_EQ(run_tiny(tiny_run_config(dir, 1), mesh, Start::kOverwrite).steps, 1);
  EXPECT_EQ(steps_in(dir), std::vector<int64_t>{1});
  std::vector<fs::path> aside;
  for (const auto& e : fs::directory_iterator(dir))
    if (e.path().filename().string().rfind("superseded-", 0) == 0) aside.push_back(e.path());
  ASSERT_EQ(aside.size(), 1u);
  const CheckpointData moved = load_checkpoint((aside[0] / "step-00000002").string());  // checksums verified
  EXPECT_EQ(moved.manifest.state_checksum(), before.manifest.state_checksum());
  world->barrier()->wait();
  EXPECT_FALSE(fs::exists(dir + "/" + CheckpointDirLock::kFileName)) << "the lock is released at the end";
}

TEST(Training, LockStopsASecondWriterAndIsTakenOverWhenStale) {
  auto world = MpiCommunicator::world();
  const std::string dir = scratch(world, "lock") + "/r" + std::to_string(world->rank());
  const std::string lock_file = dir + "/" + CheckpointDirLock::kFileName;
  fs::create_directories(dir);
  {
    CheckpointDirLock first(dir, "run-a");
    EXPECT_TRUE(first.takeover_note().empty());
    const std::string message = expect_throw<RunRefused>([&] { CheckpointDirLock second(dir, "run-b"); });
    EXPECT_NE(message.find("host " + host_name() + " pid " + std::to_string(getpid())), std::string::npos) << message;
    EXPECT_NE(message.find(lock_file), std::string::npos) << message;
  }
  EXPECT_FALSE(fs::exists(lock_file)) << "released when its holder ends";
  // A lock left by a process that is gone (this host) is taken over.
  const pid_t child = fork();
  if (child == 0) _exit(0);
  ASSERT_GT(child, 0);
  waitpid(child, nullptr, 0);
  std::ofstream(lock_file) << "host " << host_name() << "\npid " << child << "\nstarted 1\nsince earlier\nrun dead\n";
  {
    CheckpointDirLock taken(dir, "run-c");
    EXPECT_NE(taken.takeover_note().find("pid " + std::to_string(child)), std::string::npos) << taken.takeover_note();
    EXPECT_NE(taken.takeover_note().find("no longer running"), std::string::npos) << taken.takeover_note();
    EXPECT_NE(read_text(lock_file).find("run run-c"), std::string::npos);
  }
  // A pid that lives but started at another time (reused) is not the holder either.
  std::ofstream(lock_file) << "host " << host_name() << "\npid " << getpid() << "\nstarted 1\nsince earlier\nrun old\n";
  { CheckpointDirLock reused(dir, "run-d"); EXPECT_FALSE(reused.takeover_note().empty()); }
  // Another host: its process cannot be checked, so the lock holds.
  std::ofstream(lock_file) << "host some-other-host\npid 4242\nstarted 1\nsince earlier\nrun far\n";
  const std::string message = expect_throw<RunRefused>([&] { CheckpointDirLock other(dir, "run-e"); });
  EXPECT_NE(message.find("host some-other-host pid 4242"), std::string::npos) << message;
  EXPECT_NE(message.find("delete the lock file"), std::string::npos) << message;
  EXPECT_TRUE(fs::exists(lock_file));
}

TEST(Training, UnwritableCheckpointDirectoryIsRefusedBeforeTraining) {
  auto world = MpiCommunicator::world();
  const std::string dir = scratch(world, "unwritable");
  if (world->rank() == 0) std::ofstream(dir + "/a-file") << "not a directory\n";
  world->barrier()->wait();
  ProcessMesh mesh(world, 1, 0);
  int steps_taken = 0;
  Trainer::Hooks hooks;
  hooks.on_step = [&](const StepMetrics&) { ++steps_taken; };
  const std::string message =
      expect_throw<RunRefused>([&] { run_tiny(tiny_run_config(dir + "/a-file/ckpt", 2), mesh, Start::kNew, -1, hooks); });
  EXPECT_NE(message.find("train.checkpoint_dir"), std::string::npos) << message;
  EXPECT_NE(message.find(dir + "/a-file/ckpt"), std::string::npos) << message;
  EXPECT_EQ(steps_taken, 0);
}

// Handlers of the embedding program: fit() must hand them back.
std::atomic<int> g_program_handler_calls{0};
extern "C" void program_handler(int) { g_program_handler_calls.fetch_add(1); }

struct ProgramHandlers {
  struct sigaction old_int {}, old_term {};
  ProgramHandlers() {
    struct sigaction a {};
    a.sa_handler = program_handler;
    sigemptyset(&a.sa_mask);
    sigaction(SIGINT, &a, &old_int);
    sigaction(SIGTERM, &a, &old_term);
  }
  ~ProgramHandlers() {
    sigaction(SIGINT, &old_int, nullptr);
    sigaction(SIGTERM, &old_term, nullptr);
  }
  static bool installed() {
    struct sigaction now_int {}, now_term {};
    sigaction(SIGINT, nullptr, &now_int);
    sigaction(SIGTERM, nullptr, &now_term);
    return now_int.sa_handler == program_handler && now_term.sa_handler == program_handler;
  }
};

TEST(Training, DivergedParametersAreNeverSavedAtStepKOrAtTheLastStep) {
  auto world = MpiCommunicator::world();
  const std::string base = scratch(world, "diverge");
  ProcessMesh mesh(world, 1, 0);
  ProgramHandlers handlers;
  for (const int64_t bad_step : {3, 4}) {  // mid-run, and the last step
    const std::string dir = base + "/at" + std::to_string(bad_step);
    pb::LoomConfig config = tiny_run_config(dir, 4);
    config.mutable_train()->set_checkpoint_interval(2);
    const ScopedEnv fault("LOOM_FAULT_NAN_PARAMS_AT_STEP", std::to_string(bad_step));
    const std::string message = expect_throw<NonFiniteParameters>([&] { run_tiny(config, mesh, Start::kNew); });
    EXPECT_NE(message.find("not finite after the update of step " + std::to_string(bad_step)), std::string::npos)
        << message;
    world->barrier()->wait();
    // The NaN was on the last rank only: the all-reduced check stopped rank 0 too.
    EXPECT_EQ(steps_in(dir), std::vector<int64_t>{2}) << "fault at step " << bad_step;
    const CheckpointData kept = load_checkpoint(dir + "/step-00000002");  // checksums verified
    for (const auto& [name, t] : kept.tensors) EXPECT_TRUE(at::isfinite(t).all().item<bool>()) << name;
    EXPECT_FALSE(fs::exists(dir + "/" + CheckpointDirLock::kFileName)) << "lock released on the error path";
    EXPECT_TRUE(ProgramHandlers::installed()) << "fit() restores the handlers it found when it throws";
    world->barrier()->wait();
  }
}

TEST(Training, NonFiniteLossSavesNothing) {
  auto world = MpiCommunicator::world();
  const std::string dir = scratch(world, "nan-loss") + "/ckpt";
  ProcessMesh mesh(world, 1, 0);
  pb::LoomConfig config = tiny_run_config(dir, 4);
  config.mutable_train()->set_checkpoint_interval(2);
  // The loss of step 3 is NaN on the last rank only (one micro-batch per step).
  int calls = 0;
  const bool last = world->rank() == world->size() - 1;
  auto loss = [&](torch::nn::Module& m, const Batch& b, const SequenceLayout& l, const CommPtr& sp) {
    const at::Tensor value = tiny_loss(m, b, l, sp);
    return ++calls == 3 && last ? value * std::nan("") : value;
  };
  torch::manual_seed(3);
  auto model = std::make_shared<TinyTokenModel>();
  {
    Trainer trainer(config, mesh, model, loss, tiny_batch, tiny_batch);
    const std::string message = expect_throw<NonFiniteLoss>([&] { trainer.fit(); });
    EXPECT_NE(message.find("nan at step 3; stopping without saving"), std::string::npos) << message;
  }
  world->barrier()->wait();
  EXPECT_EQ(steps_in(dir), std::vector<int64_t>{2});
  EXPECT_FALSE(fs::exists(dir + "/" + CheckpointDirLock::kFileName));
}

TEST(Training, ResumeAtOrPastTheEndChangesNothing) {
  auto world = MpiCommunicator::world();
  const std::string dir = scratch(world, "at-end") + "/ckpt";
  ProcessMesh mesh(world, 1, 0);
  run_tiny(tiny_run_config(dir, 3), mesh, Start::kNew);
  world->barrier()->wait();
  auto snapshot = [&] {
    std::vector<std::string> entries;
    for (const auto& e : fs::recursive_directory_iterator(dir))
      entries.push_back(e.path().string() + " " + std::to_string(fs::last_write_time(e.path()).time_since_epoch().count()) +
                        " " + (e.is_regular_file() ? std::to_string(fs::file_size(e.path())) : std::string("dir")));
    std::sort(entries.begin(), entries.end());
    return entries;
  };
  const auto before = snapshot();
  world->barrier()->wait();
  for (const int64_t steps : {3, 2}) {  // at, and past, train.steps
    const Trainer::Result result = run_tiny(tiny_run_config(dir, steps), mesh, Start::kResume);
    EXPECT_TRUE(result.nothing_to_do);
    EXPECT_EQ(result.steps, 3);
    world->barrier()->wait();
    EXPECT_EQ(snapshot(), before) << "no checkpoint, metrics line or lock left behind";
  }
}

TEST(Training, ResumeRefusesAnotherModelAndListsAllowedDifferences) {
  auto world = MpiCommunicator::world();
  const std::string dir = scratch(world, "mismatch") + "/ckpt";
  ProcessMesh mesh(world, 1, 0);
  run_tiny(tiny_run_config(dir, 2), mesh, Start::kNew);
  // A different model.d_model: refused with the field named, nothing written.
  pb::LoomConfig wider = tiny_run_config(dir, 4);
  wider.mutable_model()->set_d_model(12);
  std::string message = expect_throw<RunRefused>([&] { run_tiny(wider, mesh, Start::kResume, -1, {}, 12); });
  EXPECT_NE(message.find("model.d_model 8 -> 12"), std::string::npos) << message;
  EXPECT_NE(message.find("'embed.weight' is [16, 8] in the checkpoint, [16, 12] here"), std::string::npos) << message;
  // The same config but a model without one of the checkpoint's parameters:
  // its weights would be dropped silently.
  message = expect_throw<RunRefused>([&] { run_tiny(tiny_run_config(dir, 4), mesh, Start::kResume, -1, {}, 8, false); });
  EXPECT_NE(message.find("'head.bias' of the checkpoint is not in this model"), std::string::npos) << message;
  world->barrier()->wait();
  EXPECT_EQ(steps_in(dir), std::vector<int64_t>{2});
  // Allowed: steps, lr schedule, intervals.
  pb::LoomConfig longer = tiny_run_config(dir, 4);
  longer.mutable_train()->set_lr(5e-3);
  longer.mutable_train()->set_log_interval(1);
  const Trainer::Result result = run_tiny(longer, mesh, Start::kResume);
  EXPECT_EQ(result.steps, 4);
  world->barrier()->wait();
  EXPECT_EQ(steps_in(dir), (std::vector<int64_t>{2, 4}));
}

TEST(Training, SignalsStopEveryRankWithOneCheckpointAndHandlersAreRestored) {
  auto world = MpiCommunicator::world();
  const std::string dir = scratch(world, "signals") + "/ckpt";
  ProcessMesh mesh(world, 1, 0);
  ProgramHandlers handlers;
  g_program_handler_calls = 0;
  const int last = world->size() - 1;
  Trainer::Hooks hooks;
  hooks.on_step = [&](const StepMetrics& m) {
    if (m.step != 2) return;
    if (world->rank() == 0) {  // rank 0 twice (the second is ignored) ...
      std::raise(SIGINT);
      std::raise(SIGINT);
    }
    if (world->rank() == last) std::raise(SIGTERM);  // ... and the last rank once
  };
  pb::LoomConfig config = tiny_run_config(dir, 10);
  config.mutable_train()->set_checkpoint_interval(2);  // step 2 is saved once, not twice
  const Trainer::Result result = run_tiny(config, mesh, Start::kNew, -1, hooks);
  EXPECT_TRUE(result.interrupted);
  EXPECT_EQ(result.steps, 2);
  EXPECT_EQ(result.stop_reason, "SIGTERM");
  world->barrier()->wait();
  EXPECT_EQ(steps_in(dir), std::vector<int64_t>{2});
  EXPECT_EQ(load_checkpoint(dir + "/step-00000002").manifest.step(), 2);
  EXPECT_TRUE(ProgramHandlers::installed()) << "fit() restores the handlers it found";
  EXPECT_EQ(g_program_handler_calls.load(), 0) << "the program's handlers saw none of fit()'s signals";
  // A stop request from a hook (loom-train: a signalled memory node) stops alike.
  Trainer::Hooks request;
  request.stop_requested = [&] { return world->rank() == 0 ? std::string("a test's request") : std::string(); };
  const Trainer::Result stopped = run_tiny(tiny_run_config(dir, 10), mesh, Start::kResume, -1, request);
  EXPECT_TRUE(stopped.interrupted);
  EXPECT_EQ(stopped.steps, 3);
  if (world->rank() == 0) EXPECT_EQ(stopped.stop_reason, "a test's request");
}

TEST(Training, MetricsWriteFailureIsAnErrorAndEachRunHasAHeader) {
  auto world = MpiCommunicator::world();
  const std::string dir = scratch(world, "metrics") + "/ckpt";
  ProcessMesh mesh(world, 1, 0);
  pb::LoomConfig full = tiny_run_config(dir, 2);
  full.mutable_train()->set_metrics_path("/dev/full");
  const std::string message = expect_throw<RunRefused>([&] { run_tiny(full, mesh, Start::kNew); });
  EXPECT_NE(message.find("'/dev/full'"), std::string::npos) << message;
  EXPECT_NE(message.find(std::strerror(ENOSPC)), std::string::npos) << message;
  world->barrier()->wait();
  EXPECT_TRUE(steps_in(dir).empty());
  EXPECT_FALSE(fs::exists(dir + "/" + CheckpointDirLock::kFileName));
  world->barrier()->wait();
  // Two runs in one file (a new one, then a resumed one): each starts with a header.
  run_tiny(tiny_run_config(dir, 2), mesh, Start::kNew);
  run_tiny(tiny_run_config(dir, 3), mesh, Start::kResume);
  world->barrier()->wait();
  if (world->rank() == 0) {
    const std::string text = read_text(dir + "/metrics.jsonl");
    const std::regex header("\\{\"run\": \"([^\"]+)\", \"config_hash\": \"([0-9a-f]{16})\", \"start_step\": ([0-9]+), "
                            "\"resumed_from_step\": (null|[0-9]+)");
    std::vector<std::smatch> headers;
    for (auto it = std::sregex_iterator(text.begin(), text.end(), header); it != std::sregex_iterator(); ++it)
      headers.push_back(*it);
    ASSERT_EQ(headers.size(), 2u) << text;
    EXPECT_NE(headers[0][1].str(), headers[1][1].str()) << "distinct run ids";
    EXPECT_EQ(headers[0][4].str(), "null");
    EXPECT_EQ(headers[1][4].str(), "2");
    EXPECT_EQ(headers[1][3].str(), "2");
    EXPECT_NE(text.find("{\"step\": 3, \"loss\""), std::string::npos) << text;
  }
}

}  // namespace
}  // namespace loom
