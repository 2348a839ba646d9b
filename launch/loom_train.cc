// loom-train: Loom's main executable, launched with mpirun.
//
//   mpirun -np 4 loom-train --config configs/demo.pbtxt [--set section.field=value ...]
//
// Modes: train (default; --resume continues from the newest checkpoint,
// --overwrite starts over in a directory that holds checkpoints, moving them
// aside),
// --eval-only (validation loss of the newest checkpoint), --generate TEXT
// (greedy continuation; after training, or of the newest checkpoint with
// --eval-only), --print-config, --dry-run (every check a run makes before it
// allocates a model: config, mesh, lengths, every token of the data files
// against model.vocab_size, the tokenizer, the checkpoint directory, memory;
// then the parameter count and memory estimate per rank). --generate checks
// its prompt (not empty, within the vocabulary) and --max-new-tokens (at most
// kMaxNewTokens) before any training, and prints progress every 64 tokens.
// Exit codes: 0 success, 2 bad command line, config or data (the message names
// the field or file), 3 the requested action is not supported by this build,
// 4 the loss or the parameters became NaN/Inf (the last good checkpoint is
// kept), 1 any other error. SIGINT/SIGTERM to a rank (or a memory node) stop
// the run after its current step with a checkpoint and exit 0; for signals to
// mpirun see runtime/train/trainer.h (odls_base_sigkill_timeout). Errors found
// during set-up are agreed on by all ranks before any collective; an error in
// the middle of a step aborts the whole job.
#include <CLI/CLI.hpp>
#include <fcntl.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <sstream>
#include <stdexcept>

#include <torch/utils.h>

#include "loom/runtime/core/build_config.h"
#include "loom/models/hybrid_lm.h"
#include "loom/models/run_config.h"
#include "cli_checks.h"
#include "loom/parallel/softmax_attention/fused_attention.h"
#include "loom/parallel/softmax_attention/offload_attention.h"
#include "loom/runtime/data/data.h"
#include "loom/runtime/core/dtypes.h"
#include "loom/runtime/core/error.h"
#include "loom/runtime/train/job.h"
#include "loom/runtime/core/logging.h"
#include "loom/runtime/core/memory_tracker.h"
#include "loom/runtime/core/stop_signals.h"
#include "loom/runtime/comm/agreement.h"
#include "loom/runtime/comm/mpi_communicator.h"
#include "loom/runtime/data/synthetic_tasks.h"
#include "loom/runtime/data/token_file.h"
#include "loom/runtime/data/tokenizer.h"
#include "loom/runtime/train/trainer.h"
#include "loom/runtime/train/position_loss.h"
#include "loom/runtime/comm/documents.h"

namespace {

struct Options {
  std::string config_path;
  std::vector<std::string> overrides;
  bool print_config = false;
  bool dry_run = false;
  bool resume = false;
  bool overwrite = false;
  bool eval_only = false;
  std::string init_from;  // --init-from: a checkpoint directory whose weights start a new run
  std::string generate;
  bool generate_requested = false;  // --generate given, possibly with an empty prompt
  int64_t max_new_tokens = 64;
  // Long-context evaluations after training or with --eval-only (0 / empty: none).
  int64_t position_loss_rows = 0;
  std::string sniah_lengths_text;  // as given: parsed by parse_lengths
  std::vector<int64_t> sniah_lengths;
  int64_t sniah_examples = 16;
  bool profile = false;  // --profile: where a step's time went, printed at the end
};

// "8192,16384" -> {8192, 16384}. Every item must be a positive whole number
// (spaces around it allowed): an empty item ("8192,,16384"), "8k", 0, -64 or
// a number beyond int64 is an error naming it, not skipped.
std::vector<int64_t> parse_lengths(const std::string& option, const std::string& text) {
  const auto fail = [&](int index, const std::string& item, const std::string& why) {
    return std::invalid_argument(option + " '" + text + "': item " + std::to_string(index) + " ('" + item + "') " + why);
  };
  if (text.find_first_not_of(' ') == std::string::npos)
    throw std::invalid_argument(option + " '" + text + "': no lengths given");
  std::vector<int64_t> lengths;
  std::stringstream items(text);
  std::string raw;
  for (int index = 1; std::getline(items, raw, ','); ++index) {
    const size_t first = raw.find_first_not_of(' '), last = raw.find_last_not_of(' ');
    const std::string item = first == std::string::npos ? "" : raw.substr(first, last - first + 1);
    if (item.empty() || item.find_first_not_of("0123456789") != std::string::npos)
      throw fail(index, raw, item.rfind('-', 0) == 0 ? "is not a positive length" : "is not a whole number");
    int64_t value = 0;
    try {
      value = std::stoll(item);
    } catch (const std::out_of_range&) {
      throw fail(index, raw, "is out of range");
    }
    if (value < 1) throw fail(index, raw, "is not a positive length");
    lengths.push_back(value);
  }
  if (text.back() == ',') throw std::invalid_argument(option + " '" + text + "': ends with an empty item");
  return lengths;
}

// --sniah-examples at most this: each is a forward pass at every length, and
// the evaluation after training cannot be stopped short of the process.
constexpr int64_t kMaxSniahExamples = 4096;

// --max-new-tokens at most this: greedy generation without a cache recomputes
// the whole prefix for every new token (time grows with the square of the
// length); continue a longer text in several calls.
constexpr int64_t kMaxNewTokens = 8192;
// Generation prints a progress line every this many tokens.
constexpr int64_t kGenerationProgressEvery = 64;

int world_rank() {
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  return rank;
}

// Set-up errors every rank sees alike (config, data, lengths): exit code 2.
struct SetupError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Every compute rank calls this once after its set-up checks, with its error
// ("" when none): the checks are local (files on a node's disk, its memory),
// so ranks may disagree. If any rank failed, every rank throws the same
// SetupError with the message of the lowest failing rank (agree_on_error(),
// runtime/comm/agreement.h, over the compute ranks' communicator, which may be
// NCCL), before any rank goes on into a collective the others would never join.
void agree_on_setup_error(const loom::CommPtr& world, const std::string& error) {
  const std::string agreed = loom::agree_on_error(*world, error);
  if (!agreed.empty()) throw SetupError(agreed);
}

// "512.0 GiB", "3.2 MiB", "12.0 KiB".
std::string human_bytes(double bytes) {
  const char* unit = "GiB";
  double scaled = bytes / double(1ull << 30);
  if (bytes < double(1ull << 20)) {
    unit = "KiB";
    scaled = bytes / 1024.0;
  } else if (bytes < double(1ull << 30)) {
    unit = "MiB";
    scaled = bytes / double(1ull << 20);
  }
  std::ostringstream out;
  out << std::fixed << std::setprecision(1) << scaled << " " << unit;
  return out.str();
}

// Memory of this node available to the job: physical memory, or a cgroup v2
// limit (memory.max) when lower.
double node_memory_bytes() {
  double bytes = static_cast<double>(::sysconf(_SC_PHYS_PAGES)) * static_cast<double>(::sysconf(_SC_PAGE_SIZE));
  std::ifstream limit_file("/sys/fs/cgroup/memory.max");
  std::string limit;
  if (limit_file >> limit && limit != "max") {
    const double v = std::atof(limit.c_str());
    if (v > 0) bytes = std::min(bytes, v);
  }
  return bytes;
}

// Memory per rank of one training step, estimated from the config without
// building anything. With P parameters, w bytes per element of train.dtype
// (4 float32, 2 bfloat16/float16, 8 float64), T = train.batch_size x
// train.seq_len / sp tokens per rank and micro-batch, L blocks (model.pattern),
// D = model.d_model, F = model.d_ff, V = model.vocab_size:
//   parameters  = P w  (+ 4 P float32 master weights when w < 4)
//   gradients   = P w
//   optimizer   = 2 P max(w, 4)          (AdamW's two moments)
//   activations = T L (12 D + 3 F) w     (saved for backward: norms, mixer
//                                         projections and outputs, residuals,
//                                         the SwiGLU's three d_ff-wide tensors)
//               + T H 4 phi w per linear-attention block ('L'; H = n_heads,
//                                         phi = feature size: 1 + f + f(f+1)/2
//                                         for taylor, f = feature_dim, else f;
//                                         q and k features and their products)
//   logits      = 3 x 4 T V              (float32 logits, log-softmax, gradient)
// A rough guide, below the measured peak (the progress line's "peak"): chunk
// states, Titans memories, halos and the allocator's slack are not counted;
// on configs/demo.pbtxt the peak is about 1.6x the estimate.
struct MemoryEstimate {
  double parameters = 0, gradients = 0, optimizer = 0, activations = 0, logits = 0;
  double logits_tensor = 0;  // one [batch, seq_len / sp, vocab] float32 tensor
  double total() const { return parameters + gradients + optimizer + activations + logits; }
  std::string describe() const {
    return "parameters " + human_bytes(parameters) + " + gradients " + human_bytes(gradients) + " + AdamW moments " +
           human_bytes(optimizer) + " + activations " + human_bytes(activations) + " + logits " + human_bytes(logits) +
           " = " + human_bytes(total());
  }
};

MemoryEstimate estimate_memory(const loom::pb::LoomConfig& config, const loom::pb::ModelConfig& model, int sp) {
  const auto dtype = loom::scalar_type_from_name(config.train().dtype());
  const double w = dtype ? static_cast<double>(c10::elementSize(*dtype)) : 4.0;
  const double P = static_cast<double>(loom::models::count_parameters(model));
  const double T = static_cast<double>(config.train().batch_size()) * static_cast<double>(config.train().seq_len()) /
                   static_cast<double>(std::max(1, sp));
  const double L = static_cast<double>(model.pattern().size()), D = static_cast<double>(model.d_model()),
               F = static_cast<double>(model.d_ff()), V = static_cast<double>(model.vocab_size());
  MemoryEstimate m;
  m.parameters = P * w + (w < 4 ? 4 * P : 0);
  m.gradients = P * w;
  m.optimizer = 2 * P * std::max(w, 4.0);
  m.activations = T * L * (12 * D + 3 * F) * w;
  const double f = static_cast<double>(model.feature_dim());
  const double phi = model.feature_map() == "taylor" ? 1 + f + f * (f + 1) / 2 : f;
  for (char letter : model.pattern())
    if (letter == 'L') m.activations += T * static_cast<double>(model.n_heads()) * 4 * phi * w;
  m.logits_tensor = 4 * T * V;
  m.logits = 3 * m.logits_tensor;
  return m;
}

// Refuses sizes whose tensors cannot be allocated on this node, naming the
// fields (rather than an allocator's message, or the kernel's OOM killer when
// memory is overcommitted). Only the parts the estimate knows well are hard
// errors: the model's weights and optimizer state, and the logits. CPU only:
// on a GPU the allocator's own limit applies.
void check_memory(const loom::pb::LoomConfig& config, const loom::pb::ModelConfig& model, int sp,
                  const MemoryEstimate& m) {
  if (config.train().device() != "cpu") return;
  const double node = node_memory_bytes();
  const double V = static_cast<double>(model.vocab_size()), D = static_cast<double>(model.d_model());
  const double embedding = V * D * (model.tie_embeddings() ? 1 : 2) * 4;
  if (embedding > node)
    throw loom::ConfigError("model.vocab_size = " + std::to_string(model.vocab_size()) + " x model.d_model = " +
                            std::to_string(model.d_model()) + ": the embedding table alone needs " +
                            human_bytes(embedding) +
                            ", more than the " + human_bytes(node) + " of memory on this node");
  if (m.parameters + m.gradients + m.optimizer > node)
    throw loom::ConfigError(
        "model (model.vocab_size = " + std::to_string(model.vocab_size()) + ", model.d_model = " +
        std::to_string(model.d_model()) + ", " + std::to_string(model.pattern().size()) + " blocks in model.pattern, " +
        "model.d_ff = " + std::to_string(model.d_ff()) + "): " + std::to_string(loom::models::count_parameters(model)) +
        " parameters need " + human_bytes(m.parameters + m.gradients + m.optimizer) +
        " per rank for weights, gradients and AdamW moments, more than the " + human_bytes(node) +
        " of memory on this node");
  if (m.logits > node)
    throw loom::ConfigError(
        "train.batch_size = " + std::to_string(config.train().batch_size()) + " x train.seq_len = " +
        std::to_string(config.train().seq_len()) + " / " + std::to_string(sp) + " sp ranks x model.vocab_size = " +
        std::to_string(model.vocab_size()) + ": the logits need " + human_bytes(m.logits) +
        " per rank (3 float32 tensors of " +
        human_bytes(m.logits_tensor) + "), more than the " + human_bytes(node) +
        " of memory on this node; lower train.batch_size (train.grad_accum keeps the tokens per step), "
        "train.seq_len or model.vocab_size, or use more sp ranks");
  if (m.total() > node)
    LOOM_LOG(kWarn) << "estimated memory per rank (" << m.describe() << ") exceeds the " << human_bytes(node)
                    << " of this node: the run will likely run out of memory (lower train.batch_size or "
                       "train.seq_len, or use more sp ranks)";
}

// The checkpoint directory can be written: a probe file created and removed in
// it, or, when it does not exist yet, in its nearest existing ancestor (a dry
// run creates no directories). Rank 0 writes checkpoints, so rank 0 checks.
void check_checkpoint_dir_writable(const std::string& dir) {
  namespace fs = std::filesystem;
  if (dir.empty()) throw loom::ConfigError("train.checkpoint_dir is empty: name a directory for checkpoints");
  std::error_code ec;
  fs::path existing = fs::absolute(dir, ec);
  if (ec) throw loom::ConfigError("train.checkpoint_dir '" + dir + "': " + ec.message());
  while (!fs::exists(existing, ec) && existing.has_relative_path()) existing = existing.parent_path();
  if (!fs::is_directory(existing, ec))
    throw loom::ConfigError("train.checkpoint_dir '" + dir + "' cannot be created: '" + existing.string() +
                            "' is not a directory");
  const fs::path probe = existing / (".loom-write-probe-" + loom::host_name() + "-" + std::to_string(::getpid()));
  const int fd = ::open(probe.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
  if (fd < 0)
    throw loom::ConfigError("train.checkpoint_dir '" + dir + "' is not writable: cannot create a file in '" +
                            existing.string() + "': " + std::strerror(errno));
  ::close(fd);
  ::unlink(probe.c_str());
}

// data.document_alignment, 0 resolved: Titans memory (letters M, G, X) needs
// documents to start at multiples of model.memory_chunk.
int64_t document_alignment(const loom::pb::DataConfig& data, const loom::pb::ModelConfig& model) {
  if (data.document_alignment() > 0) return data.document_alignment();
  return model.pattern().find_first_of("MGX") != std::string::npos ? model.memory_chunk() : 1;
}

// A token file named by `field`: it opens (exists, not empty, header, size and
// checksum; one pass over the whole file) and every token id is below
// model.vocab_size (the whole file, not the windows a run happens to sample).
int64_t check_token_file(const std::string& path, const std::string& field, int64_t vocab_size) {
  try {
    const loom::TokenFile file(path);
    file.check_vocabulary(vocab_size, field);
    return file.size();
  } catch (const loom::ConfigError&) {
    throw;
  } catch (const loom::LoomError& e) {
    throw loom::ConfigError(field + ": " + e.what());
  }
}

// The --generate prompt as token ids: not empty, every id below the model's
// vocabulary (an embedding lookup would fail on it otherwise).
std::vector<int64_t> encode_prompt(const loom::Tokenizer& tokenizer, const Options& opt,
                                   const loom::pb::LoomConfig& config, int64_t vocab_size) {
  if (opt.generate.empty())
    throw loom::ConfigError("--generate: the prompt is empty; give the text to continue, e.g. --generate \"Abjure\"");
  std::vector<int64_t> prompt;
  for (uint32_t t : tokenizer.encode(opt.generate)) prompt.push_back(t);
  if (prompt.empty())
    throw loom::ConfigError("--generate '" + opt.generate + "': the " + config.data().tokenizer() +
                            " tokenizer turns the prompt into no tokens");
  for (size_t i = 0; i < prompt.size(); ++i)
    if (prompt[i] >= vocab_size) {
      std::string what = "token " + std::to_string(prompt[i]);
      if (config.data().tokenizer() == "byte") {
        std::ostringstream hex;
        hex << " (byte 0x" << std::hex << std::setw(2) << std::setfill('0') << prompt[i] << ")";
        what += hex.str();
      }
      throw loom::ConfigError("--generate: prompt " + what + " at position " + std::to_string(i) +
                              " is not below model.vocab_size " + std::to_string(vocab_size) +
                              ": the model has no embedding for it (use a prompt within its vocabulary)");
    }
  return prompt;
}

// ---- Long-context evaluations after training (--position-loss-rows, --sniah-lengths) ----

// One JSON line appended to the run's metrics file (train.metrics_path, else
// <checkpoint_dir>/metrics.jsonl) by rank 0; a failed write throws
// MetricsWriteError on every rank alike (collective over `world`).
void append_metrics_line(const loom::pb::LoomConfig& config, loom::Communicator& world, const std::string& line) {
  std::string error;
  if (world.rank() == 0) {
    std::string path = config.train().metrics_path();
    if (path.empty()) path = (std::filesystem::path(config.train().checkpoint_dir()) / "metrics.jsonl").string();
    std::ofstream out(path, std::ios::app);
    out << line << "\n";
    out.flush();
    if (!out) error = "appending to the metrics file '" + path + "' failed: " + std::strerror(errno);
  }
  at::Tensor failed = at::tensor({error.empty() ? 0.0 : 1.0}, at::kDouble).to(world.device());
  world.all_reduce(failed, loom::ReduceOp::kMax)->wait();
  if (failed.cpu().item<double>() > 0)
    throw loom::MetricsWriteError(error.empty() ? "appending to the metrics file failed on rank 0" : error);
}

// The validation loss by position bucket (runtime/train/position_loss.h) over
// `rows` validation rows of train.seq_len tokens, each dp group taking its
// own rows as Trainer::evaluate does, summed over the world.
loom::PositionLoss evaluate_position_loss(loom::models::HybridLMImpl& model, loom::Job& job,
                                          const loom::Trainer::BatchFn& validation, int64_t rows) {
  const auto& config = job.config();
  const loom::SequenceLayout layout(config.parallel().layout() == loom::pb::ZIGZAG ? loom::LayoutKind::kZigzag
                                                                                    : loom::LayoutKind::kContiguous,
                                    config.train().seq_len(), job.mesh().sp_size());
  const int r = job.mesh().sp_index();
  const int64_t per_batch = config.train().batch_size();
  const int64_t batches = (rows + per_batch * job.mesh().dp_size() - 1) / (per_batch * job.mesh().dp_size());
  loom::PositionLoss buckets(loom::position_bucket_edges(config.train().seq_len()));
  at::NoGradGuard no_grad;
  model.eval();
  for (int64_t b = 0; b < batches; ++b) {
    const int64_t first = (b * job.mesh().dp_size() + job.mesh().dp_index()) * per_batch;
    const loom::Batch batch = validation(first, per_batch);
    loom::models::SequenceContext ctx =
        loom::models::make_context(config.parallel(), layout, job.mesh().sp(), job.offload_client());
    if (batch.doc_start.defined()) ctx.doc_start = loom::shard_document_starts(batch.doc_start, layout, r).to(job.device());
    const at::Tensor logits = model.forward(layout.shard(batch.inputs, r, 1, 0).to(job.device()), ctx);
    const at::Tensor labels = layout.shard(batch.labels, r, 1, -100);
    buckets.add(loom::token_cross_entropy(logits, labels.to(logits.device())), labels, layout, r);
  }
  model.train();
  buckets.reduce(*job.world());
  return buckets;
}

// Needle retrieval (S-NIAH pass key, runtime/data/synthetic_tasks.h) at one
// length: `examples` rows of `length` tokens, one per forward, spread over the
// dp groups, summed over the world. The answer's 5 digits are uniformly
// random and appear earlier only in the needle, so a model that does not
// retrieve cannot average below ln 10 = 2.303 nats per digit on them (nor,
// beyond chance, above 10% digit accuracy).
struct NeedleResult {
  int64_t length = 0, examples = 0, correct = 0, digits = 0, digits_correct = 0;
  double answer_loss = 0;  // mean nats per answer digit
};

NeedleResult evaluate_needle(loom::models::HybridLMImpl& model, loom::Job& job, int64_t length, int64_t examples,
                             uint64_t seed) {
  const auto& config = job.config();
  const loom::SequenceLayout layout(config.parallel().layout() == loom::pb::ZIGZAG ? loom::LayoutKind::kZigzag
                                                                                    : loom::LayoutKind::kContiguous,
                                    length, job.mesh().sp_size());
  loom::models::check_sequence_length(config.model(), layout);
  const int r = job.mesh().sp_index();
  at::NoGradGuard no_grad;
  model.eval();
  double loss_sum = 0;
  int64_t correct = 0, groups = 0, digit_hits = 0, digits = 0;
  for (int64_t e = job.mesh().dp_index(); e < examples; e += job.mesh().dp_size()) {
    const loom::Batch batch = loom::sniah_batch(e, 1, length, seed);
    const at::Tensor logits = model.forward(
        layout.shard(batch.inputs, r, 1, 0).to(job.device()),
        loom::models::make_context(config.parallel(), layout, job.mesh().sp(), job.offload_client()));
    const at::Tensor labels = layout.shard(batch.labels, r, 1, -100).to(logits.device());
    const auto [c, g] = loom::labelled_accuracy(logits, labels, 5);
    const auto [dc, d] = loom::labelled_accuracy(logits, labels, 1);
    correct += c;
    groups += g;
    digit_hits += dc;
    digits += d;
    loss_sum += loom::token_cross_entropy(logits, labels).sum().item<double>();
  }
  model.train();
  at::Tensor totals = at::tensor({loss_sum, static_cast<double>(correct), static_cast<double>(groups),
                                  static_cast<double>(digit_hits), static_cast<double>(digits)},
                                 at::kDouble)
                          .to(job.world()->device());
  job.world()->all_reduce(totals)->wait();
  totals = totals.cpu();
  NeedleResult result;
  result.length = length;
  result.correct = static_cast<int64_t>(totals[1].item<double>());
  result.examples = static_cast<int64_t>(totals[2].item<double>());
  result.digits_correct = static_cast<int64_t>(totals[3].item<double>());
  result.digits = static_cast<int64_t>(totals[4].item<double>());
  result.answer_loss = totals[0].item<double>() / std::max<double>(1.0, totals[4].item<double>());
  return result;
}

int run_job(loom::Job& job, const Options& opt) {
  namespace lm = loom::models;
  const auto& config = job.config();
  const bool root = job.world()->rank() == 0;
  lm::HybridLM model{nullptr};
  loom::Trainer::BatchFn train_batches, val_batches;
  int64_t validation_rows = 0;  // rows of train.seq_len in the text validation split (0: synthetic task)
  // What a real run checks before it allocates a model; --dry-run stops after
  // the checks and reports. The checks are local to each rank, then agreed.
  std::string setup_error;
  std::unique_ptr<loom::Tokenizer> tokenizer;
  std::vector<int64_t> prompt;
  std::ostringstream report;  // --dry-run's summary (rank 0)
  try {
    const auto& model_config = config.model();  // resolved: preset and derived defaults applied
    const loom::SequenceLayout layout(config.parallel().layout() == loom::pb::ZIGZAG ? loom::LayoutKind::kZigzag
                                                                                      : loom::LayoutKind::kContiguous,
                                      config.train().seq_len(), job.mesh().sp_size());
    lm::check_sequence_length(model_config, layout);
    // LOOM_FUSED_ATTENTION is read here, on every rank, so that a typo stops the
    // run before it starts instead of at the first attention call.
    loom::softmax_attention::fused_attention_enabled();
    const std::string methods = lm::check_parallel_methods(model_config, config.parallel(), job.mesh().sp_size());
    LOOM_LOG(kInfo) << methods;
    report << methods << "\n";
    LOOM_LOG(kInfo) << "model '" << model_config.pattern() << "' d_model " << model_config.d_model() << ": "
                    << lm::count_parameters(model_config) << " parameters; " << layout.describe();
    const MemoryEstimate memory = estimate_memory(config, model_config, job.mesh().sp_size());
    check_memory(config, model_config, job.mesh().sp_size(), memory);
    report << "model '" << model_config.pattern() << "': " << lm::count_parameters(model_config) << " parameters; ";
    if (model_config.n_kv_heads() > 0 && model_config.n_kv_heads() != model_config.n_heads())
      report << model_config.n_heads() << " query heads sharing " << model_config.n_kv_heads()
             << " key/value heads (grouped-query attention); ";
    report << layout.describe() << "\n";
    report << "memory per rank (estimate): " << memory.describe() << " (this node: " << human_bytes(node_memory_bytes())
           << ")\n";
    if (!opt.eval_only && root) {
      check_checkpoint_dir_writable(config.train().checkpoint_dir());
      // The trainer refuses these too, but only once a model exists (and, with
      // --init-from, after loading it); --dry-run must say them as well.
      if (const std::string locked = loom::CheckpointDirLock::holder_refusal(config.train().checkpoint_dir());
          !locked.empty())
        throw loom::RunRefused(locked);
      if (!opt.resume && !opt.overwrite) {
        const std::string refusal = loom::unresumed_checkpoints_refusal(config.train().checkpoint_dir());
        if (!refusal.empty()) throw loom::RunRefused(refusal);
      }
      report << "checkpoint directory '" << config.train().checkpoint_dir() << "' is writable\n";
    }
    if (!opt.init_from.empty()) {  // read in full (and checked against the model) by Trainer::init_from
      if (!std::filesystem::is_regular_file(std::filesystem::path(opt.init_from) / "manifest.pb"))
        throw loom::ConfigError("--init-from '" + opt.init_from +
                                "': not a checkpoint directory (no manifest.pb; give a step-NNNNNNNN directory)");
      report << "--init-from '" << opt.init_from
             << "': a checkpoint directory (its checksums and model are checked when the run starts)\n";
    }
    // The tokenizer: loaded when configured (its model file checked) or needed
    // for --generate, whose prompt is checked against the model here, before
    // any training.
    if (config.data().tokenizer() != "byte" || opt.generate_requested)
      tokenizer = loom::make_tokenizer(config.data().tokenizer(), config.data().tokenizer_model());
    if (tokenizer)
      report << "tokenizer " << config.data().tokenizer() << ": vocabulary " << tokenizer->vocab_size() << "\n";
    if (opt.generate_requested) {
      prompt = encode_prompt(*tokenizer, opt, config, model_config.vocab_size());
      report << "--generate: " << prompt.size() << " prompt tokens + " << opt.max_new_tokens << " new\n";
      // Generation's largest tensors: the logits of the whole text on every
      // rank, 3 float32 copies (as in training).
      const double logits = 3.0 * 4.0 * static_cast<double>(prompt.size() + opt.max_new_tokens) *
                            static_cast<double>(model_config.vocab_size());
      if (config.train().device() == "cpu" && logits > node_memory_bytes())
        throw loom::ConfigError("--max-new-tokens = " + std::to_string(opt.max_new_tokens) + " with " +
                                std::to_string(prompt.size()) + " prompt tokens x model.vocab_size = " +
                                std::to_string(model_config.vocab_size()) + ": generation's logits need " +
                                human_bytes(logits) + ", more than the " + human_bytes(node_memory_bytes()) +
                                " of memory on this node");
    }
    if (config.data().task() == "text") {
      // Every token of every file, before the model exists.
      if (config.data().train_path().empty())
        throw loom::ConfigError("data.train_path is empty: name a token file (loom-data prepare makes one)");
      const int64_t train_tokens =
          check_token_file(config.data().train_path(), "data.train_path", model_config.vocab_size());
      report << "data.train_path '" << config.data().train_path() << "': " << train_tokens
             << " tokens, every id below model.vocab_size " << model_config.vocab_size() << "\n";
      if (!config.data().val_path().empty()) {
        const int64_t val_tokens =
            check_token_file(config.data().val_path(), "data.val_path", model_config.vocab_size());
        report << "data.val_path '" << config.data().val_path() << "': " << val_tokens
               << " tokens, every id below model.vocab_size " << model_config.vocab_size() << "\n";
      }
      auto data = loom::open_data(config.data().train_path(), config.data().val_fraction(), config.train().seq_len(),
                                  model_config.vocab_size(), config.train().seed(), config.data().val_path(),
                                  config.data().packing() == loom::pb::DataConfig::PACK ? loom::Packing::kPack
                                                                                         : loom::Packing::kNone,
                                  document_alignment(config.data(), model_config));
      train_batches = [s = data.train](int64_t first, int64_t n) { return s->batch(first, n); };
      val_batches = [s = data.validation](int64_t first, int64_t n) { return s->batch(first, n); };
      validation_rows = std::max<int64_t>(1, data.validation->tokens() / config.train().seq_len());
    } else {
      const int64_t len = config.train().seq_len(), vocab = model_config.vocab_size(), pairs = config.data().mqar_pairs();
      const uint64_t seed = config.train().seed();
      const bool mqar = config.data().task() == "mqar";
      if (!mqar && vocab < 256) throw loom::ConfigError("S-NIAH uses byte tokens: model.vocab_size must be >= 256");
      auto make = [=](uint64_t s) -> loom::Trainer::BatchFn {
        if (mqar) return [=](int64_t first, int64_t n) { return loom::mqar_batch(first, n, len, pairs, vocab, s); };
        return [=](int64_t first, int64_t n) { return loom::sniah_batch(first, n, len, s); };
      };
      make(seed)(0, 1);  // validates the task's parameters now, on every rank
      train_batches = make(seed);
      val_batches = make(loom::splitmix64(seed + 1));
      report << "data.task " << config.data().task() << ": parameters valid\n";
    }
    // The long-context evaluations' options, checked before any training.
    if (opt.position_loss_rows < 0)
      throw loom::ConfigError("--position-loss-rows = " + std::to_string(opt.position_loss_rows) +
                              ": give a number of validation rows >= 0");
    // More rows than the validation split holds would read the same text again.
    if (opt.position_loss_rows > validation_rows && validation_rows > 0)
      throw loom::ConfigError("--position-loss-rows = " + std::to_string(opt.position_loss_rows) +
                              ": the validation split holds about " + std::to_string(validation_rows) + " rows of " +
                              std::to_string(config.train().seq_len()) + " tokens; give at most that many");
    if (opt.position_loss_rows > 0 && config.data().task() != "text")
      throw loom::ConfigError("--position-loss-rows: the loss by position is of text validation rows, but data.task = " +
                              config.data().task());
    if (opt.sniah_examples < 1)
      throw loom::ConfigError("--sniah-examples = " + std::to_string(opt.sniah_examples) + ": give 1 or more");
    for (const int64_t length : opt.sniah_lengths) {
      if (model_config.vocab_size() < 256)
        throw loom::ConfigError("--sniah-lengths: S-NIAH uses byte tokens, model.vocab_size must be >= 256");
      try {
        loom::check_sniah_length(length);  // the task's own check (at least 160 tokens), building no row
        lm::check_sequence_length(model_config, loom::SequenceLayout(layout.kind(), length, job.mesh().sp_size()));
      } catch (const std::exception& e) {  // the checks name train.seq_len: say which option gave the length
        throw loom::ConfigError("--sniah-lengths " + std::to_string(length) + " (as a sequence length): " + e.what());
      }
      // A forward pass at this length (no gradients: one block's activations
      // and the logits at a time) must fit this node, or the run would train
      // and then fail at the evaluation.
      loom::pb::LoomConfig at_length = config;
      at_length.mutable_train()->set_seq_len(length);
      at_length.mutable_train()->set_batch_size(1);
      const MemoryEstimate m = estimate_memory(at_length, model_config, job.mesh().sp_size());
      const double forward = m.parameters + m.logits_tensor +
                             m.activations / static_cast<double>(std::max<size_t>(1, model_config.pattern().size()));
      if (config.train().device() == "cpu" && forward > node_memory_bytes())
        throw loom::ConfigError("--sniah-lengths " + std::to_string(length) + ": a forward pass at this length needs about " +
                                human_bytes(forward) + " per rank, more than the " + human_bytes(node_memory_bytes()) +
                                " of memory on this node");
    }
    if (opt.position_loss_rows > 0)
      report << "--position-loss-rows: " << opt.position_loss_rows << " validation rows, buckets of "
             << config.train().seq_len() << " positions\n";
    if (!opt.sniah_lengths.empty())
      report << "--sniah-lengths: " << opt.sniah_lengths.size() << " lengths, " << opt.sniah_examples
             << " examples each\n";
    if (!opt.dry_run) {  // the model, only once everything above holds
      torch::manual_seed(config.train().seed());  // identical parameters on every rank
      model = lm::HybridLM(model_config, at::TensorOptions().device(job.device()));
      model->set_precision(*loom::scalar_type_from_name(config.train().dtype()));  // validated above
      model->set_recompute(lm::recompute_mode(config.train().recompute()));
    }
  } catch (const std::exception& e) {
    setup_error = e.what();
    if (setup_error.empty()) setup_error = "set-up failed";
  }
  agree_on_setup_error(job.world(), setup_error);
  if (opt.dry_run) {
    if (root) std::cout << report.str() << std::flush;
    return 0;
  }
  loom::Trainer::Hooks hooks;
  if (job.offload_client() && root)  // a signalled memory node asks the compute ranks to stop
    hooks.stop_requested = [client = job.offload_client()] { return client->stop_requested(); };
  loom::Trainer trainer(job.config(), job.mesh(), model.ptr(), lm::language_model_loss(config.parallel(), job.offload_client()),
                        train_batches, val_batches, hooks);
  if (opt.eval_only) {
    if (trainer.resume().empty())
      throw SetupError("--eval-only: no complete checkpoint in '" + config.train().checkpoint_dir() + "'");
    const double val = trainer.evaluate(config.train().eval_batches());
    // Finite parameters can still overflow in a forward pass (a run that was
    // diverging when it was saved): say so instead of printing NaN with exit 0.
    if (!std::isfinite(val))
      throw loom::NonFiniteLoss("--eval-only: the validation loss of the checkpoint in '" +
                                config.train().checkpoint_dir() + "' is " + std::to_string(val) +
                                " (its parameters are finite but the model overflows: the run was diverging when "
                                "it was saved; resume from an earlier checkpoint or start over with --overwrite)");
    if (root) std::cout << "validation loss " << val << " perplexity " << std::exp(val) << std::endl;
  } else {
    if (opt.resume) trainer.resume();
    if (!opt.init_from.empty()) trainer.init_from(opt.init_from);  // before --overwrite may move it aside
    if (opt.overwrite) trainer.overwrite();
    trainer.set_profile(opt.profile);
    // After a stop signal the job only finishes (final save, exit): signals
    // that arrive between the trainer giving its handlers back and the exit
    // must not kill a rank. This scope takes over from the trainer's without
    // a gap and, after an interrupted run, lives until the process exits
    // (deliberately never destroyed, so the default action never returns).
    auto* after_stop = new loom::StopSignalScope(
        "loom-train: ", "ignored: the job is finishing", "ignored: the job is finishing");
    const auto result = trainer.fit();
    if (!result.interrupted) delete after_stop;  // Ctrl-C stops evaluation or generation as usual
    if (root && result.nothing_to_do)
      std::cout << "nothing to train: already at step " << result.steps << " of train.steps = "
                << config.train().steps() << "; nothing changed" << std::endl;
    else if (root && result.interrupted)
      std::cout << "stopped by " << result.stop_reason << " after step " << result.steps << ": last loss "
                << result.loss << ", checkpoint " << result.checkpoint << " saved; continue with --resume" << std::endl;
    else if (root)
      std::cout << "trained " << result.steps << " steps: last loss " << result.loss << ", validation loss "
                << result.validation_loss << ", checkpoint " << result.checkpoint << std::endl;
    if (root && !result.profile_table.empty()) std::cout << result.profile_table << std::flush;
    if (result.interrupted) return 0;
  }
  if (config.data().task() != "text") {
    // Recall accuracy on fresh validation examples.
    const bool mqar = config.data().task() == "mqar";
    const loom::SequenceLayout layout(config.parallel().layout() == loom::pb::ZIGZAG ? loom::LayoutKind::kZigzag
                                                                                      : loom::LayoutKind::kContiguous,
                                      config.train().seq_len(), job.mesh().sp_size());
    at::NoGradGuard no_grad;
    model->eval();
    int64_t correct = 0, total = 0;
    for (int64_t b = 0; b < config.train().eval_batches(); ++b) {
      const int64_t first = (b * job.mesh().dp_size() + job.mesh().dp_index()) * config.train().batch_size();
      const loom::Batch batch = val_batches(first, config.train().batch_size());
      const int r = job.mesh().sp_index();
      const at::Tensor logits = model->forward(layout.shard(batch.inputs, r, 1, 0).to(job.device()),
                                               lm::make_context(config.parallel(), layout, job.mesh().sp(), job.offload_client()));
      const auto [c, t] =
          loom::labelled_accuracy(logits, layout.shard(batch.labels, r, 1, -100).to(job.device()), mqar ? 1 : 5);
      correct += c;
      total += t;
    }
    at::Tensor counts = at::tensor({correct, total}, at::kLong).to(job.world()->device());
    job.world()->all_reduce(counts)->wait();
    if (root)
      std::cout << (mqar ? "MQAR" : "S-NIAH") << " accuracy " << static_cast<double>(counts[0].item<int64_t>()) /
                                                                   std::max<int64_t>(1, counts[1].item<int64_t>())
                << " (" << counts[0].item<int64_t>() << " of " << counts[1].item<int64_t>()
                << (mqar ? " queries)" : " pass keys)") << std::endl;
  }
  if (opt.position_loss_rows > 0) {
    const auto started = std::chrono::steady_clock::now();
    const loom::PositionLoss buckets = evaluate_position_loss(*model, job, val_batches, opt.position_loss_rows);
    // Rows evaluated: whole batches of train.batch_size on every dp group.
    const int64_t rows_per_round = config.train().batch_size() * job.mesh().dp_size();
    const int64_t position_rows = (opt.position_loss_rows + rows_per_round - 1) / rows_per_round * rows_per_round;
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
    std::ostringstream json;
    json << "{\"step\": " << trainer.step() << ", \"seq_len\": " << config.train().seq_len()
         << ", \"position_loss\": [";
    std::ostringstream text;
    text << "validation loss by position in the row (" << buckets.edges().back() << " tokens; "
         << position_rows << " rows, " << std::fixed
         << std::setprecision(0) << seconds << " s):\n";
    for (size_t k = 0; k < buckets.buckets(); ++k) {
      const int64_t from = buckets.edges()[k], to = buckets.edges()[k + 1];
      const double mean = buckets.mean(k);
      text << "  positions " << std::setw(9) << std::left << loom::bucket_label(from, to) << std::right
           << " loss " << std::setprecision(4) << mean << "  (" << std::setprecision(0) << buckets.count(k)
           << " tokens)\n";
      json << (k ? ", " : "") << "{\"from\": " << from << ", \"to\": " << to << ", \"loss\": ";
      if (std::isfinite(mean))
        json << std::setprecision(6) << mean;
      else
        json << "null";
      json << ", \"tokens\": " << std::llround(buckets.count(k)) << "}";
    }
    json << "]}";
    if (root) std::cout << text.str() << std::flush;
    append_metrics_line(config, *job.world(), json.str());
  }
  for (size_t i = 0; i < opt.sniah_lengths.size(); ++i) {
    const int64_t length = opt.sniah_lengths[i];
    const auto started = std::chrono::steady_clock::now();
    // Examples the training never saw: a seed of their own.
    const NeedleResult needle =
        evaluate_needle(*model, job, length, opt.sniah_examples, loom::splitmix64(config.train().seed() + 17));
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
    const double ratio = static_cast<double>(length) / static_cast<double>(config.train().seq_len());
    std::ostringstream times;
    times << std::setprecision(3) << ratio << "x";
    if (root)
      std::cout << "S-NIAH at " << length << " tokens ("
                << (length == config.train().seq_len() ? std::string("the training length") : times.str() + " it")
                << "): pass key " << needle.correct << " of " << needle.examples << ", digits " << std::fixed
                << std::setprecision(3) << static_cast<double>(needle.digits_correct) / std::max<int64_t>(1, needle.digits)
                << " right (chance 0.1), answer loss " << needle.answer_loss
                << " nats/digit (without retrieval >= ln 10 = 2.303), " << std::setprecision(0) << seconds << " s"
                << std::defaultfloat << std::endl;
    std::ostringstream json;
    json << "{\"step\": " << trainer.step() << ", \"sniah\": {\"length\": " << length
         << ", \"examples\": " << needle.examples << ", \"pass_keys_correct\": " << needle.correct
         << ", \"digit_accuracy\": "
         << static_cast<double>(needle.digits_correct) / std::max<int64_t>(1, needle.digits)
         << ", \"answer_loss\": " << needle.answer_loss << "}}";
    append_metrics_line(config, *job.world(), json.str());
  }
  if (opt.generate_requested) {
    // Progress on rank 0 every kGenerationProgressEvery tokens.
    const auto started = std::chrono::steady_clock::now();
    const int64_t total = opt.max_new_tokens;
    const lm::GenerationProgress progress = [&](int64_t done) {
      if (!root || (done % kGenerationProgressEvery != 0 && done != total) || total < kGenerationProgressEvery) return;
      const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
      LOOM_LOG(kInfo) << "generated " << done << "/" << total << " tokens, " << std::fixed << std::setprecision(1)
                      << static_cast<double>(done) / std::max(seconds, 1e-9) << " tokens/s";
    };
    std::vector<int64_t> out;
    if (job.offload_client()) {
      // Lamina: rank 0 decodes token by token with the softmax layers' KV cache
      // on the memory nodes; the other compute ranks wait.
      if (root) {
        const auto before = job.offload_client()->payload_bytes_sent() + job.offload_client()->payload_bytes_received();
        out = lm::generate_incremental(*model, {prompt}, opt.max_new_tokens, job.offload_client(), 0, progress)[0];
        const auto bytes =
            job.offload_client()->payload_bytes_sent() + job.offload_client()->payload_bytes_received() - before;
        LOOM_LOG(kInfo) << "generation with the KV cache on " << config.offload().memory_ranks()
                        << " memory node(s): " << bytes / static_cast<int64_t>(out.size() - 1)
                        << " payload bytes per token";
      }
      job.world()->barrier()->wait();
    } else {
      out = lm::generate_greedy(*model, prompt, opt.max_new_tokens, config.parallel(), job.mesh().sp(), nullptr,
                                progress);
    }
    if (root) std::cout << "generated: " << tokenizer->decode(out) << std::endl;
  }
  return 0;
}

int run(int argc, char** argv) {
  const bool is_root = world_rank() == 0;
  CLI::App app{"loom-train: train long-context language models with sequence parallelism (mpirun -np N loom-train ...)",
               "loom-train"};
  Options opt;
  app.set_version_flag("--version", std::string("loom-train ") + LOOM_VERSION_STRING);
  app.add_option("--config", opt.config_path, "Config file in protobuf text format (.pbtxt)");
  app.add_option("--set", opt.overrides,
                 "Override a config field: --set section.field=value (repeatable; over LOOM_COMM_TIMEOUT_S and "
                 "LOOM_THREADS_PER_RANK, which are over the --config file)");
  app.add_flag("--print-config", opt.print_config, "Print the resolved config (rank 0) and exit");
  app.add_flag("--dry-run", opt.dry_run,
               "Check everything a run would (config, mesh, lengths, data files over every token, tokenizer, "
               "checkpoint directory, memory), report the parameter count and memory estimate per rank, and exit");
  auto* resume_flag =
      app.add_flag("--resume", opt.resume, "Continue from the newest complete checkpoint in train.checkpoint_dir");
  auto* overwrite_flag = app.add_flag("--overwrite", opt.overwrite,
                                      "Start over in a train.checkpoint_dir that holds checkpoints: they are moved "
                                      "into <dir>/superseded-<UTC time>/, not deleted")
                             ->excludes(resume_flag);
  app.add_flag("--profile", opt.profile,
               "Print where a step's time went at the end of training (layers per mixer letter forward and "
               "backward, data, gradient all-reduce, clipping, optimizer, checkpoint/eval, collectives) and write "
               "it as one {\"profile\": ...} line to the metrics file");
  auto* eval_only_flag =
      app.add_flag("--eval-only", opt.eval_only, "Evaluate the newest checkpoint (validation loss) instead of training")
          ->excludes(overwrite_flag);  // it would move nothing and then find no checkpoint
  app.add_option("--init-from", opt.init_from,
                 "Start a new run (step 0, fresh optimizer state) from the weights of this checkpoint directory "
                 "(step-NNNNNNNN; also a model-only one made by loom-ckpt import); the model must match")
      ->excludes(resume_flag)
      ->excludes(eval_only_flag);
  app.add_option("--generate", opt.generate, "Greedy continuation of this prompt (after training or with --eval-only)");
  app.add_option("--max-new-tokens", opt.max_new_tokens,
                 "Tokens generated by --generate: 1 to " + std::to_string(kMaxNewTokens) +
                     " (each new token recomputes the whole prefix; continue longer texts in several calls)");
  app.add_option("--position-loss-rows", opt.position_loss_rows,
                 "After training (or with --eval-only): the validation loss by position in the row (buckets "
                 "0-64, 64-128, ... doubling to train.seq_len) over this many validation rows, printed and "
                 "appended to metrics.jsonl (data.task = text; default 0: off). Ctrl-C during these "
                 "evaluations ends the process (training's checkpoint is complete)");
  app.add_option("--sniah-lengths", opt.sniah_lengths_text,
                 "After training (or with --eval-only): needle retrieval (S-NIAH pass key) at these lengths, "
                 "comma separated (e.g. 8192,16384,32768): pass keys right, digit accuracy and answer loss, "
                 "printed and appended to metrics.jsonl");
  app.add_option("--sniah-examples", opt.sniah_examples,
                 "Examples per length of --sniah-lengths: 1 to " + std::to_string(kMaxSniahExamples) + " (default 16)");
  if (const std::string bad = loom::cli::option_with_empty_value(argc, argv); !bad.empty()) {
    if (is_root) std::cerr << "loom-train: " << loom::cli::empty_value_message(bad) << std::endl;
    return 2;
  }
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    // --help and --version arrive here too, with exit code 0.
    std::ostringstream out, err;
    const int code = app.exit(e, out, err);
    if (is_root) {
      std::cout << out.str();
      std::cerr << err.str();
    }
    return code == 0 ? 0 : 2;
  }
  opt.generate_requested = app.count("--generate") > 0;
  try {
    if (app.count("--sniah-lengths") > 0) opt.sniah_lengths = parse_lengths("--sniah-lengths", opt.sniah_lengths_text);
    if (app.count("--config") > 0 && opt.config_path.empty())
      throw std::invalid_argument("--config '': give a config file (or leave --config out for the built-in defaults)");
    if (app.count("--init-from") > 0 && opt.init_from.empty())
      throw std::invalid_argument("--init-from '': give a checkpoint directory (step-NNNNNNNN)");
    if (opt.sniah_examples > kMaxSniahExamples)
      throw std::invalid_argument("--sniah-examples = " + std::to_string(opt.sniah_examples) + ": at most " +
                                  std::to_string(kMaxSniahExamples) +
                                  " (each example is a forward pass at every --sniah-lengths length)");
  } catch (const std::invalid_argument& e) {  // the same on every rank: no collective yet
    if (is_root) std::cerr << "loom-train: " << e.what() << std::endl;
    return 2;
  }
  if (opt.max_new_tokens < 1 || opt.max_new_tokens > kMaxNewTokens) {  // the same on every rank: no collective yet
    if (is_root)
      std::cerr << "loom-train: --max-new-tokens = " << opt.max_new_tokens << ": allowed 1 to " << kMaxNewTokens
                << " (greedy generation recomputes the whole prefix for every new token, so its time grows with "
                   "the square of the length; continue a longer text in several calls)"
                << std::endl;
    return 2;
  }

  loom::pb::LoomConfig config;
  try {
    // The resolved config (preset, derived defaults, environment, --set), the
    // same on every rank: what --print-config prints and the Trainer saves.
    config = loom::resolve_config_on_all_ranks(
        opt.config_path, opt.overrides,
        [](const std::string& path, const std::vector<std::string>& overrides) {
          return loom::models::resolve_run_config(path, overrides);
        });
  } catch (const loom::ConfigError& e) {
    if (is_root) std::cerr << "loom-train: " << e.what() << std::endl;
    return 2;
  }
  if (opt.print_config) {
    // The parameter count as a comment: the output still parses as a config.
    if (is_root) {
      std::cout << loom::config_to_text(config);
      // Automatic values, as comments (the config keeps 0 = automatic, so a saved config stays portable).
      if (config.data().task() == "text" && config.data().packing() == loom::pb::DataConfig::PACK &&
          config.data().document_alignment() == 0)
        std::cout << "# data.document_alignment 0 = automatic: "
                  << document_alignment(config.data(), config.model()) << "\n";
      std::cout << "# " << loom::models::count_parameters(config.model()) << " parameters\n" << std::flush;
    }
    return 0;
  }

  std::unique_ptr<loom::Job> job;
  try {
    job = std::make_unique<loom::Job>(config);
  } catch (const loom::ConfigError& e) {
    if (is_root) std::cerr << "loom-train: " << e.what() << std::endl;
    return 2;
  } catch (const loom::UnsupportedError& e) {  // every rank runs the same build on alike nodes
    if (is_root) std::cerr << "loom-train: " << e.what() << std::endl;
    return 3;
  }
  if (job->is_memory_node()) {
    job->serve(loom::softmax_attention::offload_kernels());  // until every compute rank is done
    return 0;
  }
  LOOM_LOG(kInfo) << "loom-train " << LOOM_VERSION_STRING << ": " << job->world()->size() << " compute ranks"
                  << (config.offload().memory_ranks() > 0
                          ? " + " + std::to_string(config.offload().memory_ranks()) + " memory nodes"
                          : std::string())
                  << ", " << job->mesh().describe() << " on " << job->backend() << ", " << job->threads_per_rank()
                  << " threads per rank";
  int code = 0;
  try {
    code = run_job(*job, opt);  // --dry-run returns after the checks
    if (opt.dry_run) LOOM_LOG(kInfo) << "dry run complete";
  } catch (const SetupError&) {  // every compute rank stops alike: release the memory nodes
    job->finish();
    throw;
  } catch (const loom::RunRefused&) {
    job->finish();
    throw;
  } catch (const loom::Divergence&) {
    job->finish();
    throw;
  } catch (const loom::MetricsWriteError&) {
    job->finish();
    throw;
  }
  job->finish();  // releases the memory nodes (any other error aborts the whole job)
  return code;
}

}  // namespace

int main(int argc, char** argv) {
  int code = 1;
  try {
    loom::MpiEnvironment mpi(&argc, &argv);
    // Opt in to exact CPU memory accounting (the progress line's peak) before
    // any tensor exists; GPU runs read the CUDA allocator's statistics.
    loom::MemoryTracker::install();
    try {
      code = run(argc, argv);
    } catch (const SetupError& e) {
      // Every rank met the same set-up error (they all read the same config and data).
      if (world_rank() == 0) std::cerr << "loom-train: " << e.what() << std::endl;
      code = 2;
    } catch (const loom::RunRefused& e) {  // thrown on every compute rank alike, before training
      if (world_rank() == 0) std::cerr << "loom-train: " << e.what() << std::endl;
      code = 2;
    } catch (const loom::Divergence& e) {
      if (world_rank() == 0) std::cerr << "loom-train: " << e.what() << std::endl;
      code = 4;
    } catch (const loom::MetricsWriteError& e) {  // every rank alike, after a checkpoint
      if (world_rank() == 0) std::cerr << "loom-train: " << e.what() << std::endl;
      code = 1;
    } catch (const std::exception& e) {
      std::cerr << "loom-train: error on rank " << world_rank() << ": " << e.what() << std::endl;
      // Other ranks may be inside a collective waiting for this one.
      MPI_Abort(MPI_COMM_WORLD, 1);
    }
  } catch (const std::exception& e) {
    std::cerr << "loom-train: " << e.what() << std::endl;
    return 1;
  }
  return code;
}
