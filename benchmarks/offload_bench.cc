// loom-offload-bench: attention offload onto memory nodes, measured.
//
//   mpirun -np 3 --oversubscribe build/benchmarks/loom-offload-bench --memory-ranks 1
//
// The last --memory-ranks ranks serve; the others compute.
//  1. Decode (Lamina): tokens/s and payload bytes per token with the KV cache
//     on the memory nodes and without (local cache), at several context lengths
//     and batch sizes, next to the Lamina model's (2 + 2/G) e d per token per
//     full-attention layer (they must match exactly).
//  2. Training: forward+backward time and peak tensor memory per compute rank
//     of one softmax layer with offload, ring and all-gather: with offload a
//     compute rank never holds another rank's K,V.
//  3. Crossover: when offload pays for decode under the stated device prices
//     and bandwidths (the Lamina cost model; a projection, not a measurement).
#include <CLI/CLI.hpp>

#include <chrono>
#include <cstdio>

#include "bench_util.h"
#include "loom/models/hybrid_lm.h"
#include "loom/parallel/softmax_attention/offload_attention.h"
#include "loom/runtime/comm/comm_order.h"
#include "loom/runtime/core/memory_tracker.h"
#include "loom/runtime/comm/mpi_communicator.h"

namespace {

using loom::bench::mib;
namespace sa = loom::softmax_attention;
using Clock = std::chrono::steady_clock;

struct Options {
  int memory_ranks = 1;
  std::string preset = "tiny-linear-llama-hybrid";
  std::vector<int64_t> contexts{128, 512, 2048}, batches{1, 4}, train_lengths{2048, 8192};
  int64_t new_tokens = 16, heads = 4, head_dim = 32;
  // Defaults: an H100-class compute device and an H20-class memory device (as
  // in Lamina), 400 Gb/s links; prices are rental-like assumptions.
  double hbm_gbs = 3350, memory_gbs = 4000, link_gbs = 50, compute_price = 4.0, memory_price = 1.5;
};

double seconds_since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

// Returns false when a measured bytes-per-token differs from the model.
bool decode_study(const Options& o, sa::OffloadClient& client) {
  loom::pb::ModelConfig user;
  user.set_preset(o.preset);
  const auto config = loom::models::resolve_model_config(user);
  torch::manual_seed(1);
  loom::models::HybridLM model(config);
  int64_t full_attention_layers = 0;
  for (char c : config.pattern()) full_attention_layers += c == 'A';
  const int64_t d = config.d_model(), G = config.n_heads() / config.n_kv_heads(), e = 4;
  const int64_t lamina = full_attention_layers * (2 * d + 2 * d / G) * e;  // (2 + 2/G) e d per layer
  std::printf("== decode: %s ('%s', d=%ld, G=%ld, float32), %ld new tokens after the context ==\n", o.preset.c_str(),
              config.pattern().c_str(), long(d), long(G), long(o.new_tokens));
  std::printf("%8s %6s | %12s %12s | %16s %16s\n", "context", "batch", "local tok/s", "offload tok/s",
              "bytes/token", "Lamina model");
  int64_t sequence = 0;
  bool all_match = true;
  for (int64_t context : o.contexts)
    for (int64_t batch : o.batches) {
      double rate[2] = {0, 0};
      int64_t per_token = 0;
      for (int offloaded = 0; offloaded < 2; ++offloaded) {
        at::NoGradGuard no_grad;
        loom::models::DecodeContext ctx;
        ctx.offload = offloaded ? &client : nullptr;
        for (int64_t s = 0; s < batch; ++s) ctx.sequences.push_back(sequence++);
        std::vector<loom::models::DecodeCache> caches;
        const at::Tensor token = at::full({batch, 1}, 65, at::kLong);
        for (ctx.position = 0; ctx.position < context; ++ctx.position) model->decode_step(token, caches, ctx);  // prefill
        const int64_t before = client.payload_bytes_sent() + client.payload_bytes_received();
        const auto start = Clock::now();
        for (int64_t t = 0; t < o.new_tokens; ++t, ++ctx.position) model->decode_step(token, caches, ctx);
        rate[offloaded] = batch * o.new_tokens / seconds_since(start);
        const int64_t bytes = client.payload_bytes_sent() + client.payload_bytes_received() - before;
        if (offloaded) {
          per_token = bytes / (batch * o.new_tokens);
          client.close_sequences(ctx.sequences);
        }
      }
      std::printf("%8ld %6ld | %12.0f %12.0f | %16ld %16ld%s\n", long(context), long(batch), rate[0], rate[1],
                  long(per_token), long(lamina), per_token == lamina ? "" : "  MISMATCH");
      all_match = all_match && per_token == lamina;
    }
  return all_match;
}

void training_study(const Options& o, sa::OffloadClient& client, const loom::CommPtr& compute) {
  const int C = compute->size(), r = compute->rank();
  if (r == 0)
    std::printf("\n== training: one softmax layer forward+backward on %d compute ranks (H=%ld, d=%ld, float32) ==\n"
                "%8s %14s | %10s %14s | %s\n",
                C, long(o.heads), long(o.head_dim), "N", "method", "ms", "peak MiB/rank", "(max over compute ranks)");
  for (int64_t n : o.train_lengths) {
    const loom::SequenceLayout layout(loom::LayoutKind::kZigzag, n, C);
    for (auto method : {sa::SoftmaxMethod::kOffload, sa::SoftmaxMethod::kRing, sa::SoftmaxMethod::kAllGather}) {
      auto leaf = [&] {
        return at::randn({1, o.heads, layout.local_len(), o.head_dim}).mul_(0.3).requires_grad_(true);
      };
      at::Tensor q = leaf(), k = leaf(), v = leaf();
      const at::Tensor g = at::randn_like(q);
      auto step = [&] {
        for (auto* t : {&q, &k, &v}) t->mutable_grad().reset();
        loom::CommOrder::reset();
        sa::attention(q, k, v, layout, compute, method, sa::AttentionSpec(), &client).backward(g);
        client.close_calls(compute);
      };
      step();
      loom::MemoryTracker::reset_peak();
      const int64_t base = loom::MemoryTracker::current_bytes();
      const auto start = Clock::now();
      step();
      at::Tensor stats = at::tensor({seconds_since(start), double(loom::MemoryTracker::peak_bytes() - base)}, at::kDouble);
      compute->all_reduce(stats, loom::ReduceOp::kMax)->wait();
      if (r == 0)
        std::printf("%8ld %14s | %10.1f %14.2f |\n", long(n), sa::method_name(method), stats[0].item<double>() * 1e3,
                    mib(static_cast<int64_t>(stats[1].item<double>())));
    }
  }
  if (r == 0)
    std::printf("(offload: a compute rank holds its own q, K, V and results; ring: two K,V chunks in flight; "
                "all-gather: every rank's K,V)\n");
}

void crossover(const Options& o) {
  loom::pb::ModelConfig user;
  user.set_preset(o.preset);
  const auto c = loom::models::resolve_model_config(user);
  const double d = c.d_model(), G = double(c.n_heads()) / c.n_kv_heads(), e = 2;  // bf16 serving
  std::printf("\n== crossover (Lamina cost model, bf16, per token per full-attention layer; projection) ==\n"
              "assumed: compute device %.0f GB/s at $%.2f/h, memory device %.0f GB/s at $%.2f/h, link %.0f GB/s\n",
              o.hbm_gbs, o.compute_price, o.memory_gbs, o.memory_price, o.link_gbs);
  std::printf("%10s | %14s %14s | %s\n", "context", "local $/Mtok", "offload $/Mtok", "pays?");
  for (double l : {64.0, 256.0, 1024.0, 8192.0, 65536.0, 524288.0}) {
    const double kv = 2 * e * d * l / G, net = (2 + 2 / G) * e * d;
    const double local = kv / (o.hbm_gbs * 1e9), offload = std::max(kv / (o.memory_gbs * 1e9), net / (o.link_gbs * 1e9));
    const double local_cost = local * o.compute_price / 3600 * 1e6, offload_cost = offload * o.memory_price / 3600 * 1e6;
    std::printf("%10.0f | %14.3g %14.3g | %s\n", l, local_cost, offload_cost, offload_cost < local_cost ? "yes" : "no");
  }
  std::printf("network bytes stop bounding offload above l = (G + 1) B_memory / B_link = %.0f tokens\n",
              (G + 1) * o.memory_gbs / o.link_gbs);
}

}  // namespace

int main(int argc, char** argv) {
  loom::MpiEnvironment mpi(&argc, &argv);
  Options o;
  CLI::App app{"loom-offload-bench: attention offload onto memory nodes (launch with mpirun)"};
  app.add_option("--memory-ranks", o.memory_ranks, "The last N ranks are memory nodes");
  app.add_option("--preset", o.preset, "Model of the decode study (needs full-attention layers, no Titans)");
  app.add_option("--contexts", o.contexts, "Context lengths of the decode study");
  app.add_option("--batches", o.batches, "Batch sizes of the decode study");
  app.add_option("--new-tokens", o.new_tokens, "Tokens decoded per measurement");
  app.add_option("--train-lengths", o.train_lengths, "Sequence lengths of the training study");
  app.add_option("--hbm-gbs", o.hbm_gbs, "Compute device memory bandwidth (GB/s)");
  app.add_option("--memory-gbs", o.memory_gbs, "Memory device bandwidth (GB/s)");
  app.add_option("--link-gbs", o.link_gbs, "Network bandwidth per direction (GB/s)");
  app.add_option("--compute-price", o.compute_price, "Compute device price ($/h)");
  app.add_option("--memory-price", o.memory_price, "Memory device price ($/h)");
  CLI11_PARSE(app, argc, argv);
  auto world = loom::MpiCommunicator::world();
  const int S = world->size(), M = o.memory_ranks;
  if (M < 1 || M >= S) {
    if (world->rank() == 0)
      std::fprintf(stderr, "loom-offload-bench: --memory-ranks %d needs a world of more than %d ranks (got %d)\n", M, M,
                   S);
    return 2;
  }
  at::set_num_threads(1);
  loom::MemoryTracker::install();
  std::vector<int> memory, compute_ranks;
  for (int r = 0; r < S; ++r) (r >= S - M ? memory : compute_ranks).push_back(r);
  const bool is_memory = world->rank() >= S - M;
  auto compute = world->split(is_memory ? 1 : 0, world->rank());
  if (is_memory) {
    loom::offload::OffloadServer(world, compute_ranks, int64_t(8) << 30, sa::offload_kernels()).serve();
    return 0;
  }
  sa::OffloadClient client(world, memory, 0);
  const bool bytes_match = compute->rank() != 0 || decode_study(o, client);
  compute->barrier()->wait();
  training_study(o, client, compute);
  if (compute->rank() == 0) crossover(o);
  client.shutdown();
  if (!bytes_match) std::fprintf(stderr, "loom-offload-bench: measured bytes per token differ from the Lamina model\n");
  return bytes_match ? 0 : 1;
}
