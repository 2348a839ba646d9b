#include "loom/runtime/train/trainer.h"

#include <atomic>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "loom/runtime/train/checkpoint.h"
#include "loom/runtime/comm/comm_order.h"
#include "loom/runtime/core/logging.h"
#include "loom/runtime/core/memory_tracker.h"

namespace loom {
namespace {

std::atomic<int> g_stop_signal{0};
extern "C" void on_stop_signal(int sig) { g_stop_signal.store(sig); }

double all_reduce_scalar(Communicator& comm, double v, ReduceOp op = ReduceOp::kSum) {
  at::Tensor t = at::tensor({v}, at::kDouble).to(comm.device());
  comm.all_reduce(t, op)->wait();
  return t.item<double>();
}

std::string format_duration(double seconds) {
  const int64_t s = static_cast<int64_t>(seconds + 0.5);
  std::ostringstream out;
  if (s >= 3600) out << s / 3600 << "h";
  if (s >= 60) out << (s / 60) % 60 << "m";
  out << s % 60 << "s";
  return out.str();
}

}  // namespace

Trainer::Trainer(const pb::LoomConfig& config, ProcessMesh& mesh, std::shared_ptr<torch::nn::Module> model,
                 LossFn loss, BatchFn train, BatchFn validation, Hooks hooks)
    : config_(config), mesh_(mesh), model_(std::move(model)), loss_(std::move(loss)), train_(std::move(train)),
      validation_(std::move(validation)), hooks_(std::move(hooks)) {
  for (const auto& item : model_->named_parameters()) params_.emplace_back(item.key(), item.value());
  if (!params_.empty()) device_ = params_.front().second.device();
  optimizer_ = std::make_unique<AdamW>(params_, config_.train().weight_decay());
}

SequenceLayout Trainer::layout() const {
  const auto& c = config_;
  return SequenceLayout(c.parallel().layout() == pb::ZIGZAG ? LayoutKind::kZigzag : LayoutKind::kContiguous,
                        c.train().seq_len(), mesh_.sp_size());
}

std::pair<Batch, Batch> Trainer::shard(const Batch& batch) const {
  const SequenceLayout l = layout();
  const int r = mesh_.sp_index();
  // Batches are drawn on the host; they go to the model's device here.
  return {Batch{l.shard(batch.inputs, r, 1, 0).to(device_), l.shard(batch.labels, r, 1, -100).to(device_)}, Batch{}};
}

std::string Trainer::resume() {
  const auto latest = latest_checkpoint(config_.train().checkpoint_dir());
  // Every rank must agree that there is one (a directory visible on rank 0 only
  // would split the job).
  const double found = all_reduce_scalar(*mesh_.world(), latest ? 1.0 : 0.0);
  if (found == 0) return "";
  if (found != mesh_.world()->size())
    throw LoomError("checkpoint directory '" + config_.train().checkpoint_dir() +
                    "' is visible on some ranks only; put it on a shared filesystem");
  const CheckpointData data = load_checkpoint(*latest);
  std::unordered_map<std::string, at::Tensor> by_name(data.tensors.begin(), data.tensors.end());
  at::NoGradGuard no_grad;
  for (auto& [name, p] : params_) {
    auto it = by_name.find("model/" + name);
    if (it == by_name.end()) throw LoomError("checkpoint '" + *latest + "' has no parameter '" + name + "' (another model?)");
    if (it->second.sizes() != p.sizes())
      throw LoomError("checkpoint '" + *latest + "': parameter '" + name + "' has a different shape");
    p.copy_(it->second);
  }
  NamedTensors opt;
  for (const auto& [name, t] : data.tensors)
    if (name.rfind("optimizer/", 0) == 0) opt.emplace_back(name.substr(10), t);
  optimizer_->load_state(opt);
  step_ = data.manifest.step();
  if (data.manifest.dp() != mesh_.dp_size() || data.manifest.sp() != mesh_.sp_size())
    LOOM_LOG(kWarn) << "resuming a dp=" << data.manifest.dp() << " x sp=" << data.manifest.sp()
                    << " checkpoint as dp=" << mesh_.dp_size() << " x sp=" << mesh_.sp_size()
                    << ": parameters are replicated, the data order changes with dp";
  LOOM_LOG(kInfo) << "resumed from " << *latest << " at step " << step_;
  return *latest;
}

std::string Trainer::save(double last_loss) {
  std::string path;
  if (mesh_.world()->rank() == 0) {
    CheckpointData data;
    data.manifest.set_step(step_);
    data.manifest.set_seed(config_.train().seed());
    data.manifest.set_data_position(step_ * config_.train().grad_accum());
    data.manifest.set_dp(mesh_.dp_size());
    data.manifest.set_sp(mesh_.sp_size());
    data.manifest.set_config_text(config_to_text(config_));
    data.manifest.set_last_loss(last_loss);
    for (const auto& [name, p] : params_) data.tensors.emplace_back("model/" + name, p);
    for (const auto& [name, t] : optimizer_->state()) data.tensors.emplace_back("optimizer/" + name, t);
    path = save_checkpoint(config_.train().checkpoint_dir(), data, config_.train().keep_checkpoints());
    LOOM_LOG(kInfo) << "checkpoint " << path;
  }
  mesh_.world()->barrier()->wait();
  return path;
}

double Trainer::train_step() {
  const auto& t = config_.train();
  const SequenceLayout l = layout();
  model_->train();
  model_->zero_grad();
  // Draw every micro-batch first: the loss is the mean over the labelled
  // tokens (labels -100 are ignored) of all of them on all ranks, so each
  // backward needs that global count.
  std::vector<Batch> micro;
  double local_count = 0;
  for (int64_t m = 0; m < t.grad_accum(); ++m) {
    const int64_t first = ((step_ * t.grad_accum() + m) * mesh_.dp_size() + mesh_.dp_index()) * t.batch_size();
    micro.push_back(shard(train_(first, t.batch_size())).first);
    local_count += static_cast<double>(micro.back().labels.ne(-100).sum().item<int64_t>());
  }
  const double total_tokens = std::max(1.0, all_reduce_scalar(*mesh_.world(), local_count));
  double local_loss = 0;
  for (const Batch& local : micro) {
    CommOrder::reset();
    at::Tensor loss = loss_(*model_, local, l, mesh_.sp()) / total_tokens;
    loss.backward();
    local_loss += loss.item<double>();
  }
  all_reduce_gradients(params_, *mesh_.world());
  const double loss = all_reduce_scalar(*mesh_.world(), local_loss);
  if (!std::isfinite(loss))
    throw NonFiniteLoss("loss is " + std::to_string(loss) + " at step " + std::to_string(step_ + 1) +
                        "; stopping without saving (the last good checkpoint stays the latest)");
  grad_norm_ = clip_gradients(params_, t.grad_clip());
  optimizer_->step(learning_rate(t, step_));
  ++step_;
  return loss;
}

double Trainer::evaluate(int64_t batches) {
  const auto& t = config_.train();
  const auto& mesh = mesh_;
  const SequenceLayout l = layout();
  at::NoGradGuard no_grad;
  model_->eval();
  double sum = 0, count = 0;
  for (int64_t b = 0; b < batches; ++b) {
    const int64_t first = (b * mesh.dp_size() + mesh.dp_index()) * t.batch_size();
    const Batch local = shard(validation_(first, t.batch_size())).first;
    sum += loss_(*model_, local, l, mesh.sp()).item<double>();
    count += static_cast<double>(local.labels.ne(-100).sum().item<int64_t>());
  }
  model_->train();
  return all_reduce_scalar(*mesh_.world(), sum) / std::max(1.0, all_reduce_scalar(*mesh_.world(), count));
}

Trainer::Result Trainer::fit(int64_t stop_after) {
  const auto& t = config_.train();
  const bool root = mesh_.world()->rank() == 0;
  std::signal(SIGINT, on_stop_signal);
  std::signal(SIGTERM, on_stop_signal);
  std::string metrics_path = t.metrics_path();
  if (metrics_path.empty()) metrics_path = (std::filesystem::path(t.checkpoint_dir()) / "metrics.jsonl").string();
  std::ofstream metrics;
  if (root) {
    std::error_code ec;
    std::filesystem::create_directories(std::filesystem::path(metrics_path).parent_path(), ec);
    metrics.open(metrics_path, std::ios::app);
    if (!metrics) throw LoomError("cannot write the metrics file '" + metrics_path + "'");
  }
  Result result;
  const int64_t tokens_per_step = t.batch_size() * t.seq_len() * mesh_.dp_size() * t.grad_accum();
  const auto run_start = std::chrono::steady_clock::now();
  const int64_t first_step = step_;
  double loss = 0;
  const int64_t last = stop_after >= 0 ? std::min(stop_after, t.steps()) : t.steps();
  while (step_ < last) {
    MemoryTracker::reset_peak(device_);
    const auto start = std::chrono::steady_clock::now();
    loss = train_step();
    losses_.push_back(loss);
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    StepMetrics m;
    m.step = step_;
    m.loss = loss;
    m.lr = learning_rate(t, step_ - 1);
    m.grad_norm = grad_norm_;
    m.ms_per_step = seconds * 1e3;
    m.tokens_per_s = tokens_per_step / seconds;
    // -1 on every rank when this process cannot know (CPU without the
    // counting allocator installed): the max stays -1.
    m.peak_bytes = static_cast<int64_t>(all_reduce_scalar(
        *mesh_.world(), static_cast<double>(MemoryTracker::peak_bytes(device_).value_or(-1)), ReduceOp::kMax));
    if (hooks_.on_step) hooks_.on_step(m);
    if (root) {
      metrics << "{\"step\": " << m.step << ", \"loss\": " << m.loss << ", \"lr\": " << m.lr << ", \"grad_norm\": ";
      if (std::isfinite(m.grad_norm))
        metrics << m.grad_norm;
      else
        metrics << "null";  // JSON has no NaN or Infinity
      metrics << ", \"tokens_per_s\": " << m.tokens_per_s << ", \"ms_per_step\": " << m.ms_per_step
              << (m.peak_bytes >= 0 ? ", \"peak_mib\": " + std::to_string(m.peak_bytes / 1048576.0) : std::string())
              << "}\n";
      metrics.flush();
    }
    if (step_ % t.log_interval() == 0 || step_ == last) {
      const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - run_start).count();
      const double eta = elapsed / static_cast<double>(step_ - first_step) * static_cast<double>(t.steps() - step_);
      char line[256];
      std::snprintf(line, sizeof(line), "step %ld/%ld loss %.4f lr %.2e grad norm %.3g %.0f tok/s %.1f ms/step",
                    static_cast<long>(step_), static_cast<long>(t.steps()), loss, m.lr, m.grad_norm, m.tokens_per_s,
                    m.ms_per_step);
      char peak[64] = "";
      if (m.peak_bytes >= 0) std::snprintf(peak, sizeof(peak), " peak %.1f MiB", m.peak_bytes / 1048576.0);
      LOOM_LOG(kInfo) << line << peak << " eta " << format_duration(eta);
    }
    if (t.eval_interval() > 0 && step_ % t.eval_interval() == 0 && step_ < last) {
      const double val = evaluate(t.eval_batches());
      LOOM_LOG(kInfo) << "step " << step_ << " validation loss " << val << " perplexity " << std::exp(val);
      if (root) metrics << "{\"step\": " << step_ << ", \"validation_loss\": " << val << "}\n" << std::flush;
      if (hooks_.on_eval) hooks_.on_eval(step_, val);
    }
    if (t.checkpoint_interval() > 0 && step_ % t.checkpoint_interval() == 0 && step_ < last) save(loss);
    // Any rank interrupted: all stop together after this step.
    if (all_reduce_scalar(*mesh_.world(), g_stop_signal.load(), ReduceOp::kMax) > 0) {
      LOOM_LOG(kWarn) << "interrupted: saving a checkpoint at step " << step_ << " and stopping";
      result.interrupted = true;
      break;
    }
  }
  result.steps = step_;
  result.loss = loss;
  result.checkpoint = save(loss);
  if (!result.interrupted) {
    result.validation_loss = evaluate(t.eval_batches());
    LOOM_LOG(kInfo) << "final validation loss " << result.validation_loss << " perplexity "
                    << std::exp(result.validation_loss) << " after " << step_ << " steps";
    if (root) metrics << "{\"step\": " << step_ << ", \"validation_loss\": " << result.validation_loss << "}\n";
    if (hooks_.on_eval) hooks_.on_eval(step_, result.validation_loss);
  }
  std::signal(SIGINT, SIG_DFL);
  std::signal(SIGTERM, SIG_DFL);
  return result;
}

}  // namespace loom
