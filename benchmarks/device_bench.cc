// loom-device-bench: Loom's operators on one device (a GPU, or the CPU),
// each next to a matrix product measured in the same run and dtype:
//   - the same-run matmul roofline (n x n x n in --dtype),
//   - chunked linear attention forward+backward: the raw kernel in --dtype
//     and the training path (linear_attention(), whose states accumulate in
//     float32 for bf16 inputs), TFLOP/s from the kernel's nominal FLOPs,
//   - causal softmax attention forward+backward (nominal FLOPs: 2 N^2 d per
//     head forward with the causal half, backward 2.5x forward): the blockwise
//     kernel, and libtorch's fused flash kernel where this build and device
//     have it (fused_attention.h), each timed in the same run,
//   - ring attention at one rank (zigzag: three chunk pairs merged as across
//     ranks) against the same attention as one block: the ring's own overhead
//     (nothing travels at one rank; exposed communication needs >= 2 ranks),
//   - tokens/s of a tiny HybridLM training step (forward, backward, AdamW).
// Launched by launch/device-check.sh on the GPU machine; CI runs it on the CPU
// at small sizes so that it keeps working. Results go to stdout and --json.
#include <CLI/CLI.hpp>
#include <torch/cuda.h>

#include <chrono>
#include <fstream>
#include <functional>
#include <sstream>

#include "bench_util.h"
#include "loom/models/hybrid_lm.h"
#include "loom/parallel/linear_attention/chunked_kernel.h"
#include "loom/parallel/linear_attention/lasp.h"
#include "loom/parallel/softmax_attention/fused_attention.h"
#include "loom/parallel/softmax_attention/softmax_attention.h"
#include "loom/runtime/core/config.h"
#include "loom/runtime/core/dtypes.h"
#include "loom/runtime/core/error.h"
#include "loom/runtime/comm/mpi_communicator.h"
#include "loom/runtime/train/optimizer.h"

namespace {

struct Options {
  std::string device = "cpu", dtype = "float32", json, preset = "tiny-linear-llama-hybrid", model_config;
  int64_t matmul_n = 1024, seq = 4096, heads = 8, dim = 64, block = 64, batch = 1, model_seq = 1024,
          model_batch = 4;
  int reps = 5;
};

}  // namespace

int main(int argc, char** argv) {
  loom::MpiEnvironment mpi(&argc, &argv);
  Options o;
  CLI::App app{"loom-device-bench: operator TFLOP/s next to the same-run matmul, and model tokens/s"};
  app.add_option("--device", o.device, "cpu or cuda");
  app.add_option("--dtype", o.dtype, "float32, bfloat16 or float16");
  app.add_option("--matmul-n", o.matmul_n, "Size of the reference matmul");
  app.add_option("--seq", o.seq, "Sequence length of the attention kernels");
  app.add_option("--heads", o.heads, "Heads");
  app.add_option("--dim", o.dim, "Head dimension");
  app.add_option("--block", o.block, "Block of the chunked linear attention kernel");
  app.add_option("--batch", o.batch, "Batch of the attention kernels");
  app.add_option("--preset", o.preset, "Model preset of the tokens/s measurement");
  app.add_option("--model-config", o.model_config,
                 "Config file whose model section the tokens/s measurement uses instead of --preset");
  app.add_option("--model-seq", o.model_seq, "Sequence length of the model step");
  app.add_option("--model-batch", o.model_batch, "Sequences per model step");
  app.add_option("--reps", o.reps, "Timed repetitions (median reported)");
  app.add_option("--json", o.json, "Also write the results to this JSON file");
  CLI11_PARSE(app, argc, argv);
  try {
    const bool cuda = o.device == "cuda";
    if (!cuda && o.device != "cpu") throw loom::ConfigError("--device " + o.device + ": allowed values are cpu, cuda");
    if (cuda && !torch::cuda::is_available()) throw loom::UnsupportedError("--device cuda: no CUDA device is visible");
    const auto parsed = loom::scalar_type_from_name(o.dtype);
    if (!parsed || !at::isFloatingType(*parsed))
      throw loom::ConfigError("--dtype " + o.dtype + ": allowed values are float32, bfloat16, float16, float64");
    const at::ScalarType dtype = *parsed;
    // The model of the tokens/s measurement, read first so that a bad --model-config fails before the kernels run.
    loom::pb::ModelConfig user;
    if (!o.model_config.empty()) {
      user = loom::load_config_file(o.model_config).model();
    } else {
      user.set_preset(o.preset);
    }
    const std::function<void()> sync = [cuda] {
      if (cuda) torch::cuda::synchronize();
    };
    auto median_seconds = [&](const std::function<void()>& fn) {
      return loom::bench::time_it(fn, 1, o.reps, sync).median_s;
    };
    if (cuda) at::globalContext().setAllowTF32CuBLAS(true);  // float32 paths may use TF32 tensor cores
    const auto opts = at::TensorOptions().dtype(dtype).device(cuda ? at::kCUDA : at::kCPU);
    std::ostringstream json;
    json << "{\"device\": \"" << o.device << "\", \"dtype\": \"" << o.dtype << "\"";
    // Every result is written at once (the file is complete JSON after each), so a run cut short by a
    // timeout still leaves what it measured.
    auto save_json = [&] {
      if (!o.json.empty()) std::ofstream(o.json) << json.str() << "}\n";
    };
    auto report = [&](const std::string& key, double value, const std::string& line) {
      std::printf("%s\n", line.c_str());
      std::fflush(stdout);
      json << ", \"" << key << "\": " << value;
      save_json();
    };
    char line[256];

    // 1. matmul roofline.
    const double mm_tflops = loom::bench::matmul_gflops(o.matmul_n, o.reps, opts, sync) / 1e3;
    std::snprintf(line, sizeof line, "matmul %ldx%ldx%ld %s: %.2f TFLOP/s", long(o.matmul_n), long(o.matmul_n),
                  long(o.matmul_n), o.dtype.c_str(), mm_tflops);
    report("matmul_tflops", mm_tflops, line);

    // 2. chunked linear attention, forward + backward.
    const int64_t B = o.batch, H = o.heads, N = o.seq, d = o.dim;
    auto leaf = [&](double scale) { return (at::randn({B, H, N, d}, opts) * scale).requires_grad_(true); };
    at::Tensor q = leaf(0.1), k = leaf(0.1), v = leaf(1.0);
    const at::Tensor g = at::randn({B, H, N, d}, opts);
    auto fwd_bwd = [&](const std::function<at::Tensor()>& op) {
      return [&, op] {
        for (auto* t : {&q, &k, &v}) t->mutable_grad().reset();
        op().backward(g);
      };
    };
    const double lin_flops = B * H * loom::linear_attention::chunked_linear_attention_flops(N, o.block, d, d);
    const double raw_s = median_seconds(fwd_bwd([&] {
      return loom::linear_attention::chunked_linear_attention(q, k, v, at::Tensor(), o.block);
    }));
    std::snprintf(line, sizeof line, "chunked linear attention fwd+bwd (kernel, %s) N=%ld H=%ld d=%ld: %.2f TFLOP/s = %.1f%% of matmul",
                  o.dtype.c_str(), long(N), long(H), long(d), lin_flops / raw_s / 1e12,
                  100.0 * lin_flops / raw_s / 1e12 / mm_tflops);
    report("linear_kernel_tflops", lin_flops / raw_s / 1e12, line);
    loom::linear_attention::LinearAttentionOptions lin;
    lin.block_size = o.block;
    const double path_s = median_seconds(fwd_bwd([&] { return loom::linear_attention::linear_attention(q, k, v, lin); }));
    std::snprintf(line, sizeof line, "chunked linear attention fwd+bwd (training path, float32 states): %.2f TFLOP/s = %.1f%% of matmul",
                  lin_flops / path_s / 1e12, 100.0 * lin_flops / path_s / 1e12 / mm_tflops);
    report("linear_training_path_tflops", lin_flops / path_s / 1e12, line);

    // 3. causal softmax attention, forward + backward, as one positioned block: the blockwise kernel, then
    //    the fused kernel where available; "softmax_tflops" is the path training takes.
    namespace sa = loom::softmax_attention;
    const bool fused_default = sa::fused_attention_enabled();
    sa::AttentionSpec spec;
    const double soft_flops = 3.5 * 2.0 * B * H * double(N) * N * d;
    auto time_softmax = [&](bool fused) {
      sa::set_fused_attention_enabled(fused);
      return median_seconds(fwd_bwd([&] { return sa::positioned_attention(q, 0, k, v, 0, spec).first; }));
    };
    const double blockwise_s = time_softmax(false);
    std::snprintf(line, sizeof line,
                  "blockwise softmax attention fwd+bwd (causal, fallback kernel): %.2f TFLOP/s = %.1f%% of matmul",
                  soft_flops / blockwise_s / 1e12, 100.0 * soft_flops / blockwise_s / 1e12 / mm_tflops);
    report("softmax_blockwise_tflops", soft_flops / blockwise_s / 1e12, line);
    double soft_s = blockwise_s;
    const bool fused_dtype = dtype == at::kBFloat16 || dtype == at::kHalf;
    if (!sa::fused_attention_supported(opts.device()) || !fused_dtype) {
      std::printf("fused softmax attention: not measured (%s)\n",
                  !sa::fused_attention_compiled() ? "not in this build: LOOM_FUSED_ATTENTION, CUDA, libtorch >= 2.1"
                  : !fused_dtype                   ? "float16/bfloat16 only"
                                                   : "this device is not CUDA with compute capability >= 8.0");
    } else {
      const sa::FusedAttentionCounts before = sa::fused_attention_counts();
      const double fused_s = time_softmax(true);
      if (sa::fused_attention_counts().forward == before.forward) {
        std::printf("fused softmax attention: declined at run time (see the warning above); not measured\n");
      } else {
        std::snprintf(line, sizeof line,
                      "fused softmax attention fwd+bwd (causal, libtorch flash): %.2f TFLOP/s = %.1f%% of matmul, "
                      "%.2fx the blockwise kernel",
                      soft_flops / fused_s / 1e12, 100.0 * soft_flops / fused_s / 1e12 / mm_tflops,
                      blockwise_s / fused_s);
        report("softmax_fused_tflops", soft_flops / fused_s / 1e12, line);
        soft_s = fused_s;
      }
    }
    sa::set_fused_attention_enabled(fused_default);
    std::snprintf(line, sizeof line,
                  "softmax attention fwd+bwd as training runs it (%s): %.2f TFLOP/s = %.1f%% of matmul",
                  soft_s == blockwise_s ? "blockwise" : "fused", soft_flops / soft_s / 1e12,
                  100.0 * soft_flops / soft_s / 1e12 / mm_tflops);
    report("softmax_tflops", soft_flops / soft_s / 1e12, line);

    // 3b. ring attention at one rank against the single block above (the same FLOPs, the same kernel choice).
    auto world = loom::MpiCommunicator::world();
    auto self = world->split(world->rank(), 0);
    const loom::SequenceLayout ring_layout(loom::LayoutKind::kZigzag, N, 1);
    const double ring_s = median_seconds(fwd_bwd([&] {
      return sa::attention(q, k, v, ring_layout, self, sa::SoftmaxMethod::kRing, spec);
    }));
    std::snprintf(line, sizeof line,
                  "ring attention fwd+bwd at one rank (zigzag, 3 chunk pairs): %.2f TFLOP/s, %.2fx the one-block time "
                  "(ring overhead without communication; exposed communication needs >= 2 ranks)",
                  soft_flops / ring_s / 1e12, ring_s / soft_s);
    report("ring_one_rank_tflops", soft_flops / ring_s / 1e12, line);
    json << ", \"ring_one_rank_time_ratio\": " << ring_s / soft_s;
    save_json();

    // 4. a model training step: a preset, or the model of a config file (the demo's: --model-config).
    const auto config = loom::models::resolve_model_config(user);
    loom::models::HybridLM model(config, at::TensorOptions().device(opts.device()));
    model->set_precision(dtype);
    loom::NamedTensors params;
    for (const auto& p : model->named_parameters()) params.emplace_back(p.key(), p.value());
    loom::AdamW opt(params, 0.1);
    const loom::SequenceLayout layout(loom::LayoutKind::kContiguous, o.model_seq, 1);
    const auto ctx = loom::models::make_context(loom::pb::ParallelConfig(), layout, self);
    const at::Tensor tokens =
        at::randint(0, config.vocab_size(), {o.model_batch, o.model_seq + 1}, at::TensorOptions().dtype(at::kLong))
            .to(opts.device());
    const at::Tensor in = tokens.narrow(1, 0, o.model_seq), labels = tokens.narrow(1, 1, o.model_seq);
    const double step_s = median_seconds([&] {
      model->zero_grad();
      const at::Tensor logits = model(in, ctx);
      at::nll_loss(at::log_softmax(logits.reshape({-1, logits.size(-1)}).to(at::kFloat), -1), labels.reshape({-1}))
          .backward();
      opt.step(1e-4);
    });
    const double tps = o.model_batch * o.model_seq / step_s;
    const std::string model_name = o.model_config.empty() ? o.preset : o.model_config;
    std::snprintf(line, sizeof line, "%s training step (%ld x %ld tokens, %s): %.0f tokens/s", model_name.c_str(),
                  long(o.model_batch), long(o.model_seq), o.dtype.c_str(), tps);
    report("model_tokens_per_s", tps, line);
    save_json();
  } catch (const loom::UnsupportedError& e) {
    std::fprintf(stderr, "loom-device-bench: %s\n", e.what());
    return 3;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "loom-device-bench: %s\n", e.what());
    return 2;
  }
  return 0;
}
