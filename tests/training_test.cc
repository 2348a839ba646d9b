// Training: the trainer at sp = W matches one rank; checkpoint save + resume
// reproduces the next losses exactly; truncated or corrupt checkpoints and
// token files are refused with messages naming the file.
#include <gtest/gtest.h>
#include <torch/utils.h>

#include <filesystem>
#include <fstream>

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

// A small shared scratch directory (rank 0 creates, everyone uses).
std::string scratch(const CommPtr& world, const std::string& name) {
  const std::string dir = (fs::temp_directory_path() / ("loom-test-" + name)).string();
  if (world->rank() == 0) {
    fs::remove_all(dir);
    fs::create_directories(dir);
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
std::shared_ptr<TokenWindowSampler> sampler(const CommPtr& world, const std::string& dir) {
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

TrainingRun train(const pb::LoomConfig& config, ProcessMesh& mesh, const std::shared_ptr<TokenWindowSampler>& data,
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
  const std::string path = save_checkpoint(dir, data, 2);
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
    std::ifstream metrics(dir + "/ckpt/metrics.jsonl");
    std::string line;
    std::getline(metrics, line);
    EXPECT_NE(line.find("\"grad_norm\": "), std::string::npos) << line;
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

}  // namespace
}  // namespace loom
