// loom-train: Loom's main executable, launched with mpirun.
//
//   mpirun -np 4 loom-train --config configs/demo.pbtxt [--set section.field=value ...]
//
// Modes: train (default; --resume continues from the newest checkpoint,
// --overwrite starts over in a directory that holds checkpoints, moving them
// aside),
// --eval-only (validation loss of the newest checkpoint), --generate TEXT
// (greedy continuation; after training, or of the newest checkpoint with
// --eval-only), --print-config, --dry-run.
// Exit codes: 0 success, 2 bad command line, config or data (the message names
// the field or file), 3 the requested action is not supported by this build,
// 4 the loss or the parameters became NaN/Inf (the last good checkpoint is
// kept), 1 any other error. SIGINT/SIGTERM to a rank (or a memory node) stop
// the run after its current step with a checkpoint and exit 0; for signals to
// mpirun see runtime/train/trainer.h (odls_base_sigkill_timeout). Errors found
// during set-up are agreed on by all ranks before any collective; an error in
// the middle of a step aborts the whole job.
#include <CLI/CLI.hpp>

#include <iostream>

#include <torch/utils.h>

#include "loom/runtime/core/build_config.h"
#include "loom/models/hybrid_lm.h"
#include "loom/models/run_config.h"
#include "loom/parallel/softmax_attention/offload_attention.h"
#include "loom/runtime/data/data.h"
#include "loom/runtime/core/dtypes.h"
#include "loom/runtime/core/error.h"
#include "loom/runtime/train/job.h"
#include "loom/runtime/core/logging.h"
#include "loom/runtime/core/memory_tracker.h"
#include "loom/runtime/comm/mpi_communicator.h"
#include "loom/runtime/data/synthetic_tasks.h"
#include "loom/runtime/data/token_file.h"
#include "loom/runtime/data/tokenizer.h"
#include "loom/runtime/train/trainer.h"

namespace {

struct Options {
  std::string config_path;
  std::vector<std::string> overrides;
  bool print_config = false;
  bool dry_run = false;
  bool resume = false;
  bool overwrite = false;
  bool eval_only = false;
  std::string generate;
  int64_t max_new_tokens = 64;
};

int world_rank() {
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  return rank;
}

// Set-up errors every rank sees alike (config, data, lengths): exit code 2.
struct SetupError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

int run_job(loom::Job& job, const Options& opt) {
  namespace lm = loom::models;
  const auto& config = job.config();
  const bool root = job.world()->rank() == 0;
  lm::HybridLM model{nullptr};
  loom::Trainer::BatchFn train_batches, val_batches;
  try {
    const auto& model_config = config.model();  // resolved: preset and derived defaults applied
    const loom::SequenceLayout layout(config.parallel().layout() == loom::pb::ZIGZAG ? loom::LayoutKind::kZigzag
                                                                                      : loom::LayoutKind::kContiguous,
                                      config.train().seq_len(), job.mesh().sp_size());
    lm::check_sequence_length(model_config, layout);
    LOOM_LOG(kInfo) << "model '" << model_config.pattern() << "' d_model " << model_config.d_model() << ": "
                    << lm::count_parameters(model_config) << " parameters; " << layout.describe();
    torch::manual_seed(config.train().seed());  // identical parameters on every rank
    model = lm::HybridLM(model_config, at::TensorOptions().device(job.device()));
    model->set_precision(*loom::scalar_type_from_name(config.train().dtype()));  // validated above
    if (config.data().task() == "text") {
      auto data = loom::open_data(config.data().train_path(), config.data().val_fraction(), config.train().seq_len(),
                                  model_config.vocab_size(), config.train().seed(), config.data().val_path());
      train_batches = [s = data.train](int64_t first, int64_t n) { return s->batch(first, n); };
      val_batches = [s = data.validation](int64_t first, int64_t n) { return s->batch(first, n); };
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
    }
  } catch (const std::exception& e) {
    throw SetupError(e.what());
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
    if (root) std::cout << "validation loss " << val << " perplexity " << std::exp(val) << std::endl;
  } else {
    if (opt.resume) trainer.resume();
    if (opt.overwrite) trainer.overwrite();
    const auto result = trainer.fit();
    if (root && result.nothing_to_do)
      std::cout << "nothing to train: already at step " << result.steps << " of train.steps = "
                << config.train().steps() << "; nothing changed" << std::endl;
    else if (root && result.interrupted)
      std::cout << "stopped by " << result.stop_reason << " after step " << result.steps << ": last loss "
                << result.loss << ", checkpoint " << result.checkpoint << " saved; continue with --resume" << std::endl;
    else if (root)
      std::cout << "trained " << result.steps << " steps: last loss " << result.loss << ", validation loss "
                << result.validation_loss << ", checkpoint " << result.checkpoint << std::endl;
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
  if (!opt.generate.empty()) {
    const auto tokenizer = loom::make_tokenizer(config.data().tokenizer(), config.data().tokenizer_model());
    std::vector<int64_t> prompt;
    for (uint32_t t : tokenizer->encode(opt.generate)) prompt.push_back(t);
    std::vector<int64_t> out;
    if (job.offload_client()) {
      // Lamina: rank 0 decodes token by token with the softmax layers' KV cache
      // on the memory nodes; the other compute ranks wait.
      if (root) {
        const auto before = job.offload_client()->payload_bytes_sent() + job.offload_client()->payload_bytes_received();
        out = lm::generate_incremental(*model, {prompt}, opt.max_new_tokens, job.offload_client())[0];
        const auto bytes =
            job.offload_client()->payload_bytes_sent() + job.offload_client()->payload_bytes_received() - before;
        LOOM_LOG(kInfo) << "generation with the KV cache on " << config.offload().memory_ranks()
                        << " memory node(s): " << bytes / static_cast<int64_t>(out.size() - 1)
                        << " payload bytes per token";
      }
      job.world()->barrier()->wait();
    } else {
      out = lm::generate_greedy(*model, prompt, opt.max_new_tokens, config.parallel(), job.mesh().sp());
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
  app.add_flag("--dry-run", opt.dry_run, "Set up MPI, threads and the process mesh, report them, and exit");
  auto* resume_flag =
      app.add_flag("--resume", opt.resume, "Continue from the newest complete checkpoint in train.checkpoint_dir");
  app.add_flag("--overwrite", opt.overwrite,
               "Start over in a train.checkpoint_dir that holds checkpoints: they are moved into "
               "<dir>/superseded-<UTC time>/, not deleted")
      ->excludes(resume_flag);
  app.add_flag("--eval-only", opt.eval_only, "Evaluate the newest checkpoint (validation loss) instead of training");
  app.add_option("--generate", opt.generate, "Greedy continuation of this prompt (after training or with --eval-only)");
  app.add_option("--max-new-tokens", opt.max_new_tokens, "Tokens generated by --generate")->check(CLI::Range(1, 100000));
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
    if (is_root) std::cout << loom::config_to_text(config) << std::flush;
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
    if (opt.dry_run) {
      job->world()->barrier()->wait();
      LOOM_LOG(kInfo) << "dry run complete";
    } else {
      code = run_job(*job, opt);
    }
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
