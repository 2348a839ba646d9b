#include "loom/runtime/train/trainer.h"

#include <fcntl.h>
#include <google/protobuf/text_format.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <filesystem>
#include <optional>
#include <random>
#include <sstream>
#include <unordered_map>

#include "loom/runtime/comm/comm_order.h"
#include "loom/runtime/comm/documents.h"
#include "loom/runtime/core/logging.h"
#include "loom/runtime/core/memory_tracker.h"
#include "loom/runtime/core/profile.h"
#include "loom/runtime/train/step_profile.h"
#include "loom/runtime/core/stop_signals.h"
#include "loom/runtime/data/token_file.h"

namespace loom {
namespace {

double all_reduce_scalar(Communicator& comm, double v, ReduceOp op = ReduceOp::kSum) {
  at::Tensor t = at::tensor({v}, at::kDouble).to(comm.device());
  comm.all_reduce(t, op)->wait();
  return t.item<double>();
}

// Rank 0's `text` on every rank (a collective): how a check that only rank 0
// can make (the files it writes) becomes an error every rank throws alike.
std::string from_root(Communicator& comm, const std::string& text) {
  at::Tensor length = at::tensor({static_cast<int64_t>(comm.rank() == 0 ? text.size() : 0)}, at::kLong);
  length = length.to(comm.device());
  comm.broadcast(length, 0)->wait();
  const int64_t n = length.item<int64_t>();
  if (n == 0) return "";
  at::Tensor bytes = at::empty({n}, at::kByte);
  if (comm.rank() == 0) std::memcpy(bytes.data_ptr(), text.data(), static_cast<size_t>(n));
  bytes = bytes.to(comm.device());
  comm.broadcast(bytes, 0)->wait();
  bytes = bytes.cpu();
  return std::string(static_cast<const char*>(bytes.data_ptr()), static_cast<size_t>(n));
}

std::string format_duration(double seconds) {
  const int64_t s = static_cast<int64_t>(seconds + 0.5);
  std::ostringstream out;
  if (s >= 3600) out << s / 3600 << "h";
  if (s >= 60) out << (s / 60) % 60 << "m";
  out << s % 60 << "s";
  return out.str();
}

std::string utc_time(const char* format) {
  const std::time_t now = std::time(nullptr);
  std::tm tm{};
  gmtime_r(&now, &tm);
  char text[40];
  std::strftime(text, sizeof(text), format, &tm);
  return text;
}

std::string json_string(const std::string& s) {
  std::string out = "\"";
  for (char c : s) {
    if (c == '"' || c == '\\') {
      out += '\\';
      out += c;
    } else if (static_cast<unsigned char>(c) < 0x20) {
      char esc[8];
      std::snprintf(esc, sizeof(esc), "\\u%04x", c);
      out += esc;
    } else {
      out += c;
    }
  }
  return out + "\"";
}

std::string hex64(uint64_t v) {
  char text[17];
  std::snprintf(text, sizeof(text), "%016llx", static_cast<unsigned long long>(v));
  return text;
}

// The metrics file, appended to with every write checked: a failed write
// (disk full) is reported, not lost in a stream's state.
class MetricsFile {
 public:
  ~MetricsFile() {
    if (fd_ >= 0) ::close(fd_);
  }
  void open(const std::string& path) {
    path_ = path;
    std::error_code ec;
    const auto parent = std::filesystem::path(path).parent_path();
    if (!parent.empty()) std::filesystem::create_directories(parent, ec);
    fd_ = ::open(path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (fd_ < 0) throw LoomError("cannot open the metrics file '" + path + "': " + std::strerror(errno));
  }
  void write(const std::string& line) {
    const std::string text = line + "\n";
    size_t done = 0;
    while (done < text.size()) {
      const ssize_t n = ::write(fd_, text.data() + done, text.size() - done);
      if (n < 0 && errno == EINTR) continue;
      if (n <= 0)
        throw LoomError("writing the metrics file '" + path_ + "' failed: " +
                        (n < 0 ? std::strerror(errno) : std::string("nothing written")));
      done += static_cast<size_t>(n);
    }
  }

 private:
  int fd_ = -1;
  std::string path_;
};

// Every field of two messages of one type whose values differ (unset fields
// read as their defaults), as "section.field saved -> current".
void collect_differences(const google::protobuf::Message& saved, const google::protobuf::Message& current,
                         const std::string& prefix, std::vector<std::pair<std::string, std::string>>& out) {
  const auto* descriptor = current.GetDescriptor();
  const auto* saved_reflection = saved.GetReflection();
  const auto* current_reflection = current.GetReflection();
  for (int i = 0; i < descriptor->field_count(); ++i) {
    const auto* field = descriptor->field(i);
    const std::string name = prefix + field->name();
    if (!field->is_repeated() && field->cpp_type() == google::protobuf::FieldDescriptor::CPPTYPE_MESSAGE) {
      collect_differences(saved_reflection->GetMessage(saved, field), current_reflection->GetMessage(current, field),
                          name + ".", out);
      continue;
    }
    auto text = [&](const google::protobuf::Message& m, const google::protobuf::Reflection* r) {
      std::string all, one;
      if (!field->is_repeated()) {
        google::protobuf::TextFormat::PrintFieldValueToString(m, field, -1, &all);
        return all;
      }
      for (int k = 0; k < r->FieldSize(m, field); ++k) {
        google::protobuf::TextFormat::PrintFieldValueToString(m, field, k, &one);
        all += (k ? ", " : "[") + one;
      }
      return all.empty() ? std::string("[]") : all + "]";
    };
    const std::string a = text(saved, saved_reflection), b = text(current, current_reflection);
    if (a != b) out.emplace_back(name, name + " " + a + " -> " + b);
  }
}

// Model fields change the parameters (or what they compute); block_size is
// only the chunking of the kernels.
bool is_model_field(const std::string& name) { return name.rfind("model.", 0) == 0 && name != "model.block_size"; }

std::string join(const std::vector<std::string>& items, const std::string& separator) {
  std::string out;
  for (const auto& item : items) out += (out.empty() ? "" : separator) + item;
  return out;
}

}  // namespace

Trainer::Trainer(const pb::LoomConfig& config, ProcessMesh& mesh, std::shared_ptr<torch::nn::Module> model,
                 LossFn loss, BatchFn train, BatchFn validation, Hooks hooks)
    : config_(config), mesh_(mesh), model_(std::move(model)), loss_(std::move(loss)), train_(std::move(train)),
      validation_(std::move(validation)), hooks_(std::move(hooks)) {
  for (const auto& item : model_->named_parameters()) params_.emplace_back(item.key(), item.value());
  if (!params_.empty()) device_ = params_.front().second.device();
  optimizer_ = std::make_unique<AdamW>(params_, config_.train().weight_decay());
  std::random_device random;
  run_id_ = utc_time("%Y%m%dT%H%M%SZ") + "-" + hex64((uint64_t(random()) << 32) ^ random()).substr(8);
}

Trainer::~Trainer() = default;

SequenceLayout Trainer::layout() const {
  const auto& c = config_;
  return SequenceLayout(c.parallel().layout() == pb::ZIGZAG ? LayoutKind::kZigzag : LayoutKind::kContiguous,
                        c.train().seq_len(), mesh_.sp_size());
}

std::pair<Batch, Batch> Trainer::shard(const Batch& batch) const {
  const SequenceLayout l = layout();
  const int r = mesh_.sp_index();
  // Batches are drawn on the host; they go to the model's device here.
  Batch local{l.shard(batch.inputs, r, 1, 0).to(device_), l.shard(batch.labels, r, 1, -100).to(device_)};
  if (batch.doc_start.defined()) local.doc_start = shard_document_starts(batch.doc_start, l, r).to(device_);
  return {local, Batch{}};
}

void Trainer::check_resume_compatible(const CheckpointData& data, const std::string& path, bool starting) const {
  std::vector<std::string> refused, allowed;
  if (!data.manifest.config_text().empty()) {
    pb::LoomConfig saved;
    bool parsed = true;
    try {
      parse_config_text(data.manifest.config_text(), path + "/manifest.pb (config_text)", &saved);
    } catch (const ConfigError& e) {
      parsed = false;
      LOOM_LOG(kWarn) << "checkpoint '" << path << "': its config does not parse here (" << e.what()
                      << "): only the parameters are compared";
    }
    if (parsed) {
      std::vector<std::pair<std::string, std::string>> differences;
      collect_differences(saved, config_, "", differences);
      for (const auto& [name, text] : differences) (is_model_field(name) ? refused : allowed).push_back(text);
    }
  }
  // The parameters themselves: exactly the model's, by name and shape.
  std::vector<std::string> mismatched;
  std::unordered_map<std::string, const at::Tensor*> saved_params;
  for (const auto& [name, t] : data.tensors)
    if (name.rfind("model/", 0) == 0) saved_params.emplace(name.substr(6), &t);
  for (const auto& [name, p] : params_) {
    auto it = saved_params.find(name);
    if (it == saved_params.end()) {
      mismatched.push_back("'" + name + "' is not in the checkpoint");
      continue;
    }
    if (it->second->sizes() != p.sizes())
      mismatched.push_back("'" + name + "' is " + c10::str(it->second->sizes()) + " in the checkpoint, " +
                           c10::str(p.sizes()) + " here");
    saved_params.erase(it);
  }
  for (const auto& [name, t] : saved_params) mismatched.push_back("'" + name + "' of the checkpoint is not in this model");
  if (!refused.empty() || !mismatched.empty()) {
    if (mismatched.size() > 6) {
      const size_t more = mismatched.size() - 5;
      mismatched.resize(5);
      mismatched.push_back("and " + std::to_string(more) + " more");
    }
    throw RunRefused(std::string(starting ? "--init-from: cannot start from '" : "cannot resume from '") + path +
                     "': it holds a different model" +
                     (refused.empty() ? std::string() : " (model fields, checkpoint -> this run: " + join(refused, "; ") + ")") +
                     (mismatched.empty() ? std::string() : "; parameters: " + join(mismatched, "; ")) +
                     (starting ? std::string(". Loading it would drop or misplace weights: run with the checkpoint's "
                                             "model settings, or leave out --init-from")
                               : std::string(". Resuming would drop or misplace weights: run with the checkpoint's model "
                                             "settings, or start over with --overwrite (its checkpoints are moved "
                                             "aside, not deleted)")));
  }
  if (starting) return;  // a new run: the old run's data position, seed and schedule do not carry over
  const auto& t = config_.train();
  if (data.manifest.version() >= 2) {  // version 1 recorded micro-batches, not samples
    const int64_t here = data.manifest.step() * t.grad_accum() * mesh_.dp_size() * t.batch_size();
    if (here != data.manifest.data_position())
      allowed.push_back("data position: the checkpoint had drawn " + std::to_string(data.manifest.data_position()) +
                        " samples; with this run's dp x batch_size x grad_accum the next step starts at sample " +
                        std::to_string(here));
  }
  if (data.manifest.seed() != t.seed() &&
      std::none_of(allowed.begin(), allowed.end(), [](const std::string& s) { return s.rfind("train.seed ", 0) == 0; }))
    allowed.push_back("seed " + std::to_string(data.manifest.seed()) + " -> " + std::to_string(t.seed()));
  if (!allowed.empty())
    LOOM_LOG(kInfo) << "resuming from '" << path << "' with settings that differ from the checkpoint's (allowed): "
                    << join(allowed, "; ");
}

std::string Trainer::resume() {
  const auto latest = latest_checkpoint(config_.train().checkpoint_dir());
  // Every rank must agree that there is one (a directory visible on rank 0 only
  // would split the job).
  const double found = all_reduce_scalar(*mesh_.world(), latest ? 1.0 : 0.0);
  if (found == 0) {
    LOOM_LOG(kInfo) << "no checkpoint to resume in '" << config_.train().checkpoint_dir() << "': starting at step 0";
    return "";
  }
  if (found != mesh_.world()->size())
    throw LoomError("checkpoint directory '" + config_.train().checkpoint_dir() +
                    "' is visible on some ranks only; put it on a shared filesystem");
  const CheckpointData data = load_checkpoint(*latest);
  const bool has_optimizer = std::any_of(data.tensors.begin(), data.tensors.end(),
                                         [](const auto& t) { return t.first.rfind("optimizer/", 0) == 0; });
  if (!has_optimizer)
    throw RunRefused("cannot resume from '" + *latest +
                     "': it holds the model only (no optimizer state; e.g. made by loom-ckpt import). Start a new run "
                     "from its weights with --init-from " + *latest +
                     " (step 0, fresh optimizer state), into another train.checkpoint_dir or with --overwrite");
  check_resume_compatible(data, *latest);
  std::unordered_map<std::string, at::Tensor> by_name(data.tensors.begin(), data.tensors.end());
  at::NoGradGuard no_grad;
  for (auto& [name, p] : params_) p.copy_(by_name.at("model/" + name));
  NamedTensors opt;
  for (const auto& [name, t] : data.tensors)
    if (name.rfind("optimizer/", 0) == 0) opt.emplace_back(name.substr(10), t);
  optimizer_->load_state(opt);
  step_ = data.manifest.step();
  resumed_from_ = *latest;
  if (data.manifest.dp() != mesh_.dp_size() || data.manifest.sp() != mesh_.sp_size())
    LOOM_LOG(kWarn) << "resuming a dp=" << data.manifest.dp() << " x sp=" << data.manifest.sp()
                    << " checkpoint as dp=" << mesh_.dp_size() << " x sp=" << mesh_.sp_size()
                    << ": parameters are replicated, the data order changes with dp";
  LOOM_LOG(kInfo) << "resumed from " << *latest << " at step " << step_;
  return *latest;
}

void Trainer::init_from(const std::string& path) {
  // Every rank must read it (a path visible on rank 0 only would split the job).
  CheckpointData data;
  std::string error;
  try {
    data = load_checkpoint(path);
  } catch (const std::exception& e) {
    error = e.what();
  }
  const double readable = all_reduce_scalar(*mesh_.world(), error.empty() ? 1.0 : 0.0);
  if (readable != mesh_.world()->size())
    throw RunRefused("--init-from '" + path + "': " +
                     (error.empty() ? std::string("not readable on every rank; put it on a shared filesystem")
                                    : error));
  check_resume_compatible(data, path, /*starting=*/true);
  std::unordered_map<std::string, at::Tensor> by_name(data.tensors.begin(), data.tensors.end());
  at::NoGradGuard no_grad;
  for (auto& [name, p] : params_) p.copy_(by_name.at("model/" + name));
  // The float32 master copies of bf16/fp16 parameters: the checkpoint's own
  // master when it has one, else its parameter as saved (a float32 run's,
  // unrounded).
  NamedTensors masters;
  for (const auto& [name, p] : params_) {
    auto master = by_name.find("optimizer/" + name + "/master");
    masters.emplace_back(name + "/master", master != by_name.end() ? master->second : by_name.at("model/" + name));
  }
  optimizer_->restart(masters);
  init_from_ = path;
  LOOM_LOG(kInfo) << "initialised the model from '" << path << "' (step " << data.manifest.step()
                  << " of its run); training starts at step 0 with fresh optimizer state";
}

void Trainer::prepare_checkpoint_dir() {
  if (directory_ready_) return;
  const auto& t = config_.train();
  std::string error;
  if (mesh_.world()->rank() == 0) {
    try {
      check_directory_writable(t.checkpoint_dir());
      lock_ = std::make_unique<CheckpointDirLock>(t.checkpoint_dir(), run_id_);
      if (!lock_->takeover_note().empty()) LOOM_LOG(kWarn) << lock_->takeover_note();
      writer_ = std::make_unique<CheckpointWriter>(t.checkpoint_dir(), t.keep_checkpoints());
    } catch (const std::exception& e) {
      error = e.what();
    }
  }
  error = from_root(*mesh_.world(), error);
  if (!error.empty()) throw RunRefused("train.checkpoint_dir: " + error);
  directory_ready_ = true;
}

void Trainer::refuse_checkpoints_of_another_run() {
  if (foreign_checked_) return;
  const std::string& dir = config_.train().checkpoint_dir();
  std::string error;
  if (mesh_.world()->rank() == 0 && resumed_from_.empty() && !overwritten_) error = unresumed_checkpoints_refusal(dir);
  error = from_root(*mesh_.world(), error);
  if (!error.empty()) throw RunRefused(error);
  foreign_checked_ = true;
}

std::string Trainer::overwrite() {
  prepare_checkpoint_dir();
  const std::string& dir = config_.train().checkpoint_dir();
  std::string moved, error;
  if (mesh_.world()->rank() == 0) {
    try {
      moved = move_checkpoints_aside(dir);
    } catch (const std::exception& e) {
      error = e.what();
    }
  }
  error = from_root(*mesh_.world(), error);
  if (!error.empty()) throw LoomError(error);
  if (!moved.empty())
    LOOM_LOG(kInfo) << "starting over: moved the earlier checkpoints of '" << dir << "' into '" << moved
                    << "' (nothing deleted)";
  overwritten_ = true;
  return moved;
}

std::string Trainer::save(double last_loss) {
  prepare_checkpoint_dir();
  const auto& t = config_.train();
  std::string path, error;
  if (mesh_.world()->rank() == 0) {
    try {
      CheckpointData data;
      data.manifest.set_step(step_);
      data.manifest.set_seed(t.seed());
      // Samples drawn so far over all dp ranks (the sampler is a function of it).
      data.manifest.set_data_position(step_ * t.grad_accum() * mesh_.dp_size() * t.batch_size());
      data.manifest.set_dp(mesh_.dp_size());
      data.manifest.set_sp(mesh_.sp_size());
      data.manifest.set_config_text(config_to_text(config_));
      data.manifest.set_last_loss(last_loss);
      for (const auto& [name, p] : params_) data.tensors.emplace_back("model/" + name, p);
      for (const auto& [name, s] : optimizer_->state()) data.tensors.emplace_back("optimizer/" + name, s);
      data.manifest.set_version(2);
      path = writer_->save(data);
      LOOM_LOG(kInfo) << "checkpoint " << path;
    } catch (const std::exception& e) {
      error = e.what();
    }
  }
  error = from_root(*mesh_.world(), error);  // also the barrier: the checkpoint is complete on return
  if (!error.empty()) throw LoomError(error);
  last_saved_step_ = step_;
  last_saved_path_ = path;
  return path;
}

void Trainer::check_parameters_finite() {
  at::NoGradGuard no_grad;
  // One sum per tensor, in double: NaN or Inf anywhere makes its sum
  // non-finite (finite float parameters cannot overflow a double sum).
  std::vector<at::Tensor> sums;
  sums.reserve(params_.size());
  for (const auto& [name, p] : params_) sums.push_back(p.detach().sum(at::kDouble).reshape({1}));
  bool local_bad = !sums.empty() && !std::isfinite(at::cat(sums).sum().item<double>());
  // Fault injection for tests: a NaN on the last rank only, after the update
  // of step k, so that the all-reduce is what stops rank 0 from saving it.
  const char* fault = std::getenv("LOOM_FAULT_NAN_PARAMS_AT_STEP");
  if (fault != nullptr && std::atoll(fault) == step_ && mesh_.world()->rank() == mesh_.world()->size() - 1 &&
      !params_.empty()) {
    params_.front().second.detach().reshape({-1})[0].fill_(std::nan(""));
    local_bad = true;
  }
  if (all_reduce_scalar(*mesh_.world(), local_bad ? 1.0 : 0.0, ReduceOp::kMax) == 0) return;
  std::string where;
  for (const auto& [name, p] : params_)
    if (local_bad && !at::isfinite(p.detach()).all().item<bool>()) {
      where = " ('" + name + "' on rank " + std::to_string(mesh_.world()->rank()) + ")";
      break;
    }
  throw NonFiniteParameters("parameters are not finite after the update of step " + std::to_string(step_) + where +
                            "; stopping without saving (the latest checkpoint stays the last finite one)");
}

double Trainer::train_step() {
  const auto& t = config_.train();
  const SequenceLayout l = layout();
  model_->train();
  model_->zero_grad();
  // --profile: each part of the step into the profile accumulator (profile.h).
  // Draw every micro-batch first: the loss is the mean over the labelled
  // tokens (labels -100 are ignored) of all of them on all ranks, so each
  // backward needs that global count.
  profile::ScopedTimer timer("data", profile_);
  std::vector<Batch> micro;
  double local_count = 0;
  for (int64_t m = 0; m < t.grad_accum(); ++m) {
    const int64_t first = ((step_ * t.grad_accum() + m) * mesh_.dp_size() + mesh_.dp_index()) * t.batch_size();
    micro.push_back(shard(train_(first, t.batch_size())).first);
    local_count += static_cast<double>(micro.back().labels.ne(-100).sum().item<int64_t>());
  }
  timer.stop();
  const double total_tokens = std::max(1.0, all_reduce_scalar(*mesh_.world(), local_count));
  double local_loss = 0;
  for (const Batch& local : micro) {
    CommOrder::reset();
    timer.start("model forward+backward");
    at::Tensor loss;
    {
      const profile::LayersActiveScope layers(profile_);  // the model times its blocks while this is on
      loss = loss_(*model_, local, l, mesh_.sp()) / total_tokens;
      loss.backward();
    }
    timer.stop();
    local_loss += loss.item<double>();
  }
  timer.start("gradient all-reduce");
  all_reduce_gradients(params_, *mesh_.world());
  timer.stop();
  const double loss = all_reduce_scalar(*mesh_.world(), local_loss);
  if (!std::isfinite(loss))
    throw NonFiniteLoss("loss is " + std::to_string(loss) + " at step " + std::to_string(step_ + 1) +
                        "; stopping without saving (the last good checkpoint stays the latest)");
  timer.start("gradient clipping");
  grad_norm_ = clip_gradients(params_, t.grad_clip());
  timer.start("optimizer step");
  optimizer_->step(learning_rate(t, step_));
  ++step_;
  timer.start("parameter check");
  check_parameters_finite();
  timer.stop();
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
  Result result;
  const int64_t last = stop_after >= 0 ? std::min(stop_after, t.steps()) : t.steps();
  if (step_ >= last) {
    // Nothing to train: change nothing (no checkpoint, no metrics line).
    LOOM_LOG(kInfo) << "nothing to train: "
                    << (resumed_from_.empty() ? std::string("at step ") : "the checkpoint '" + resumed_from_ + "' is at step ")
                    << step_ << " and " << (last < t.steps() ? "this fit stops at step " : "train.steps = ") << last
                    << " (raise train.steps to train on); no checkpoint or metrics written";
    result.steps = step_;
    result.nothing_to_do = true;
    result.checkpoint = resumed_from_;
    return result;
  }
  prepare_checkpoint_dir();
  refuse_checkpoints_of_another_run();
  // A resumed run continues the checkpoints in its directory: keep_checkpoints
  // counts them (each session pruning only its own kept every session's last
  // ones, without bound on a preemptible cluster). Only rank 0 writes.
  if (writer_ && !resumed_from_.empty()) {  // idempotent: a second fit() counts nothing twice
    const std::string note = writer_->adopt_earlier(resumed_from_);
    if (!note.empty()) LOOM_LOG(kWarn) << note;
  }
  std::string metrics_path = t.metrics_path();
  if (metrics_path.empty()) metrics_path = (std::filesystem::path(t.checkpoint_dir()) / "metrics.jsonl").string();
  MetricsFile metrics;
  std::string metrics_error;  // rank 0: the first failed write
  {
    std::string error;
    if (root) {
      try {
        metrics.open(metrics_path);
        std::ostringstream header;
        header << "{\"run\": " << json_string(run_id_) << ", \"config_hash\": "
               << json_string(hex64(fnv1a64(config_to_text(config_).data(), config_to_text(config_).size())))
               << ", \"start_step\": " << step_ << ", \"resumed_from_step\": "
               << (resumed_from_.empty() ? std::string("null") : std::to_string(step_))
               << ", \"resumed_from\": " << (resumed_from_.empty() ? std::string("null") : json_string(resumed_from_))
               << ", \"init_from\": " << (init_from_.empty() ? std::string("null") : json_string(init_from_))
               << ", \"dp\": " << mesh_.dp_size() << ", \"sp\": " << mesh_.sp_size() << ", \"time\": "
               << json_string(utc_time("%Y-%m-%dT%H:%M:%SZ")) << "}";
        metrics.write(header.str());
      } catch (const std::exception& e) {
        error = e.what();
      }
    }
    error = from_root(*mesh_.world(), error);
    if (!error.empty()) throw RunRefused("train.metrics_path: " + error);
  }
  auto write_metrics = [&](const std::string& line) {
    if (!root || !metrics_error.empty()) return;
    try {
      metrics.write(line);
    } catch (const std::exception& e) {
      metrics_error = e.what();
    }
  };
  const std::string rank_prefix =
      "[loom r" + std::to_string(mesh_.world()->rank()) + "/" + std::to_string(mesh_.world()->size()) + "] ";
  // Until fit() returns or throws; the handlers found are restored then.
  const StopSignalScope signals(rank_prefix, "every rank stops after its current step and one checkpoint is saved",
                                "ignored while the step and the checkpoint finish (SIGKILL stops at once; a "
                                "checkpoint cut short is never taken for the latest)");
  const int64_t tokens_per_step = t.batch_size() * t.seq_len() * mesh_.dp_size() * t.grad_accum();
  const auto run_start = std::chrono::steady_clock::now();
  const int64_t first_step = step_;
  double loss = 0;
  // --profile: the window is every step of this fit (the loop body, periodic
  // evaluation and checkpoints included) plus the final save and evaluation.
  std::optional<CommSnapshot> comm_at_start;
  if (profile_) {
    profile::global().clear();
    comm_at_start.emplace();
  }
  std::optional<profile::Clock::time_point> step_start;
  while (step_ < last) {
    if (profile_) step_start = profile::Clock::now();
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
      std::ostringstream line;
      line << "{\"step\": " << m.step << ", \"loss\": " << m.loss << ", \"lr\": " << m.lr << ", \"grad_norm\": ";
      if (std::isfinite(m.grad_norm))
        line << m.grad_norm;
      else
        line << "null";  // JSON has no NaN or Infinity
      line << ", \"tokens_per_s\": " << m.tokens_per_s << ", \"ms_per_step\": " << m.ms_per_step
           << (m.peak_bytes >= 0 ? ", \"peak_mib\": " + std::to_string(m.peak_bytes / 1048576.0) : std::string())
           << "}";
      write_metrics(line.str());
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
      profile::ScopedTimer eval_timer("evaluation", profile_);
      const double val = evaluate(t.eval_batches());
      eval_timer.stop();
      LOOM_LOG(kInfo) << "step " << step_ << " validation loss " << val << " perplexity " << std::exp(val);
      std::ostringstream line;
      line << "{\"step\": " << step_ << ", \"validation_loss\": " << val << "}";
      write_metrics(line.str());
      if (hooks_.on_eval) hooks_.on_eval(step_, val);
    }
    if (t.checkpoint_interval() > 0 && step_ % t.checkpoint_interval() == 0 && step_ < last) {
      const profile::ScopedTimer save_timer("checkpoint", profile_);
      save(loss);
    }
    // Any rank interrupted (a signal, a stop request, a failed metrics
    // write): all stop together after this step.
    std::string requested = hooks_.stop_requested ? hooks_.stop_requested() : std::string();
    at::Tensor stop = at::tensor({static_cast<double>(signals.last_signal()), metrics_error.empty() ? 0.0 : 1.0,
                                  requested.empty() ? 0.0 : 1.0},
                                 at::kDouble)
                          .to(mesh_.world()->device());
    mesh_.world()->all_reduce(stop, ReduceOp::kMax)->wait();
    stop = stop.cpu();
    const int signal = static_cast<int>(stop[0].item<double>());
    if (profile_) profile::global().add_step(profile::seconds_since(*step_start));
    if (signal > 0 || stop[1].item<double>() > 0 || stop[2].item<double>() > 0) {
      result.stop_reason = signal > 0                  ? signal_name(signal)
                           : stop[1].item<double>() > 0 ? std::string("a failed write of the metrics file")
                           : !requested.empty()        ? requested
                                                       : std::string("a stop request on another rank");
      LOOM_LOG(kWarn) << "interrupted by " << result.stop_reason << ": saving a checkpoint at step " << step_
                      << " and stopping";
      result.interrupted = true;
      break;
    }
  }
  result.steps = step_;
  result.loss = loss;
  {
    const profile::ScopedTimer save_timer("checkpoint", profile_, profile::ScopedTimer::Window::kOutsideStep);
    result.checkpoint = last_saved_step_ == step_ ? last_saved_path_ : save(loss);
  }
  if (result.interrupted && root)
    LOOM_LOG(kInfo) << "stopped by " << result.stop_reason << " after step " << step_ << ": checkpoint "
                    << result.checkpoint << " is the latest; continue with --resume";
  auto throw_if_metrics_failed = [&] {
    const std::string error = from_root(*mesh_.world(), metrics_error);
    if (!error.empty())
      throw MetricsWriteError(error + " (after step " + std::to_string(step_) + "; the run stopped, checkpoint " +
                              (result.checkpoint.empty() ? std::string("saved") : "'" + result.checkpoint + "'") + ")");
  };
  throw_if_metrics_failed();
  if (!result.interrupted) {
    profile::ScopedTimer eval_timer("evaluation", profile_, profile::ScopedTimer::Window::kOutsideStep);
    result.validation_loss = evaluate(t.eval_batches());
    eval_timer.stop();
    LOOM_LOG(kInfo) << "final validation loss " << result.validation_loss << " perplexity "
                    << std::exp(result.validation_loss) << " after " << step_ << " steps";
    std::ostringstream line;
    line << "{\"step\": " << step_ << ", \"validation_loss\": " << result.validation_loss << "}";
    write_metrics(line.str());
    throw_if_metrics_failed();
    if (hooks_.on_eval) hooks_.on_eval(step_, result.validation_loss);
  }
  if (profile_) {
    const std::string note =
        t.recompute() == pb::TrainConfig::NONE
            ? std::string()
            : "train.recompute = " + pb::TrainConfig::Recompute_Name(t.recompute()) +
                  ": each layer's backward row includes the rerun of its forward";
    const StepProfile report = make_step_profile(profile::global(), comm_at_start->since(), *mesh_.world(), note);
    result.profile_table = report.table();
    write_metrics(report.json());
    throw_if_metrics_failed();
  }
  return result;
}

}  // namespace loom
