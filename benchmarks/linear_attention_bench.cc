// Linear attention benchmark (one operator, not a model):
//  1. one rank, one thread: chunked (Lightning-2 tiling) vs naive quadratic
//     forward+backward at N = 1K..64K: time, tokens/s, peak tensor memory and
//     achieved GFLOP/s next to the same-run float32 matmul GFLOP/s;
//     the same for the gated kernel (log gates per token and head, GLA style)
//     and for Gated DeltaNet's chunked WY kernel (forward alone and
//     forward+backward, time per token, GFLOP/s counted at a fixed reference
//     block);
//  2. 1, 2, 4 ranks: the bytes and calls the communicator counts for LASP-2,
//     LASP-2 all-scan and LASP-1, in both layouts, at two lengths.
// Ratios are measured in the same run; nothing is compared with numbers from
// another machine or run.
//   mpirun -np 4 --oversubscribe build/benchmarks/loom-linear-attention-bench
#include <ATen/Parallel.h>
#include <CLI/CLI.hpp>

#include <cmath>
#include <functional>
#include <iostream>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "bench_util.h"
#include "loom/parallel/gated_delta/chunked_kernel.h"
#include "loom/parallel/gated_delta/gated_delta.h"
#include "loom/parallel/linear_attention/chunked_kernel.h"
#include "loom/parallel/linear_attention/cpu_blas.h"
#include "loom/parallel/linear_attention/decay.h"
#include "loom/parallel/linear_attention/lasp.h"
#include "loom/runtime/core/memory_tracker.h"
#include "loom/runtime/comm/mpi_communicator.h"

namespace la = loom::linear_attention;
namespace gd = loom::gated_delta;
using loom::bench::mib;
using loom::bench::Measured;
using loom::bench::measure_attention;
using loom::bench::time_it;

namespace {

// Useful FLOPs are counted at this block whatever block runs (issue 19), so
// that a block doing more masked work per token cannot look faster.
constexpr int64_t kReferenceBlock = 64;

// Issue 19's kernel table: forward+backward of the differentiable chunked
// kernel (autograd included) against the 2048^3 float32 matmul measured
// right before each point, best of `reps` for both; the kernel's ATen path
// (main's kernel before the BLAS path) and its BLAS path, decay on and off,
// interleaved in this process. FLOPs: chunked_linear_attention_flops at C = 64.
void kernel_table(const std::vector<int64_t>& lengths, int64_t heads, int64_t d, int reps,
                  const std::vector<int64_t>& blocks) {
  std::printf("== issue 19 kernel table: chunked linear attention forward+backward, B=1 H=%ld d=%ld float32, one "
              "thread, best of %d ==\n"
              "FLOPs per head at C=%ld whatever block runs: 2NC(dk+dv) + 4N dk dv + 2NC(3dk+2dv) + 8N dk dv; "
              "%% mm = kernel GFLOP/s over the best of 3 2048^3 matmuls run just before the point\n",
              static_cast<long>(heads), static_cast<long>(d), reps, static_cast<long>(kReferenceBlock));
  std::printf("%8s %-6s %-7s %5s | %10s %10s %9s %9s %8s\n", "N", "decay", "kernel", "C", "ms", "us/token",
              "GFLOP/s", "mm GF/s", "% mm");
  loom::bench::matmul_gflops_best(2048, 1);  // a process's first matmul runs cold (~25% slow): not a reference
  const at::Tensor decay = la::default_decay(heads);
  for (const int64_t n : lengths) {
    at::Tensor q = (at::randn({1, heads, n, d}) * 0.1).requires_grad_(true);
    at::Tensor k = (at::randn({1, heads, n, d}) * 0.1).requires_grad_(true);
    at::Tensor v = at::randn({1, heads, n, d}).requires_grad_(true);
    const at::Tensor g = at::randn({1, heads, n, d});
    const double flops = heads * la::chunked_linear_attention_flops(n, kReferenceBlock, d, d);
    for (const bool with_decay : {true, false}) {
      const at::Tensor dec = with_decay ? decay : at::Tensor();
      // "aten": the kernel's ATen path (bmm per segment of blocks), which is
      // main's kernel before the BLAS path and what non-CPU devices and other
      // dtypes run; "blas": one CBLAS call per block product; "xsmm": the same
      // loop with libxsmm's generated kernels (cpu_blas.h), the default.
      struct Row {
        const char* name;
        int64_t block;
        bool blas, small;
      };
      std::vector<Row> rows;
      for (const int64_t c : blocks) {
        rows.push_back({"aten", c, false, false});
        if (loom::cpu_blas::available()) rows.push_back({"blas", c, true, false});
        if (loom::cpu_blas::small_kernels_usable()) rows.push_back({"xsmm", c, true, true});
      }
      for (const Row& row : rows) {
        loom::cpu_blas::set_enabled(row.blas);
        loom::cpu_blas::set_small_kernels_enabled(row.small);
        auto step = [&] {
          for (at::Tensor* t : {&q, &k, &v}) t->mutable_grad().reset();
          la::chunked_linear_attention(q, k, v, dec, row.block).backward(g);
        };
        const double mm = loom::bench::matmul_gflops_best(2048, 3);
        const double s = time_it(step, 1, reps).min_s;
        const double gf = flops / s / 1e9;
        std::printf("%8ld %-6s %-7s %5ld | %10.2f %10.3f %9.2f %9.2f %7.1f%%\n", static_cast<long>(n),
                    with_decay ? "on" : "off", row.name, static_cast<long>(row.block), s * 1e3, s / n * 1e6, gf, mm,
                    100.0 * gf / mm);
        std::fflush(stdout);
      }
      loom::cpu_blas::set_enabled(true);
      loom::cpu_blas::set_small_kernels_enabled(true);
    }
  }
  std::printf("\n");
}

// The gated kernel (data-dependent log gates, g = exp(-softplus(x)) per token
// and head) at the ungated kernel's block size, forward+backward including
// d(log_gate). FLOPs per (batch, head), gated_linear_attention_flops():
//   forward 2NC(dk+dv) + 4N dk dv, backward 2NC(3dk+2dv) + 8N dk dv + 4N dk
// (the exponentials of the per-block gate factors are not counted).
// Returns the gated kernel's forward+backward seconds per N (for the Gated DeltaNet comparison).
std::map<int64_t, double> gated_study(int64_t max_n, int64_t heads, int64_t d, int reps, int64_t block,
                                      double peak_gflops) {
  std::map<int64_t, double> seconds;
  std::printf("== one rank, one thread: gated chunked kernel (log gates per token and head), block C=%ld ==\n"
              "FLOPs per head = 2NC(dk+dv) + 4N dk dv + 2NC(3dk+2dv) + 8N dk dv + 4N dk (gate factors' exp not "
              "counted)\n",
              static_cast<long>(block));
  std::printf("%8s | %12s %12s %10s %9s %8s | %14s\n", "N", "gated ms", "tokens/s", "peak MiB", "GFLOP/s", "% mm",
              "gated/ungated");
  la::LinearAttentionOptions plain;
  plain.block_size = block;
  plain.decay = la::default_decay(heads);
  for (int64_t n = 1024; n <= max_n; n *= 2) {
    la::LinearAttentionOptions opt;
    opt.block_size = block;
    opt.log_gate = (-at::softplus(at::randn({1, heads, n}))).requires_grad_(true);
    const Measured g = measure_attention(
        [&](const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) { return la::linear_attention(q, k, v, opt); },
        heads, n, d, reps, 0.1);
    const Measured u = measure_attention(
        [&](const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
          return la::linear_attention(q, k, v, plain);
        },
        heads, n, d, reps, 0.1);
    seconds[n] = g.seconds;
    const double gf = heads * la::gated_linear_attention_flops(n, kReferenceBlock, d, d) / g.seconds / 1e9;
    std::printf("%8ld | %12.2f %12.0f %10.1f %9.1f %7.1f%% | %14.2f\n", static_cast<long>(n), g.seconds * 1e3,
                n / g.seconds, mib(g.peak_bytes), gf, 100.0 * gf / peak_gflops, g.seconds / u.seconds);
  }
  std::printf("\n");
  return seconds;
}

// Gated DeltaNet's chunked kernel (WY/UT, parallel/gated_delta/chunked_kernel.h)
// on q, k (L2-normalised), v [1, H, n, d], beta = sigmoid(x), log alpha =
// -softplus(x) / 8: forward alone (no autograd graph) and forward+backward
// (gradients of q, k, v, beta and log alpha through autograd). FLOPs are
// gated_delta_forward_flops / gated_delta_flops at the reference block
// C_ref = kGatedDeltaReferenceBlock whatever block runs (so a block that does
// more work per token cannot look faster); the block is the fastest of a few
// at N = 8K.
void gated_delta_study(int64_t max_n, int64_t heads, int64_t d, int reps, double peak_gflops,
                       const std::map<int64_t, double>& gla_seconds) {
  const int64_t ref = gd::kGatedDeltaReferenceBlock;
  std::printf("== one rank, one thread: Gated DeltaNet chunked kernel (WY/UT), H=%ld d_k=d_v=%ld, float32 ==\n"
              "FLOPs per head at C_ref=%ld: forward N[C(7dk+3dv) + 2dk^2 + 4dk dv] + 2(N/C)dk^2 dv; forward+backward\n"
              "N[C(22dk+10dv) + 6dk^2 + 12dk dv] + 6(N/C)dk^2 dv (products x3, the triangular solve x4; exp, masks,\n"
              "gates not counted)\n",
              static_cast<long>(heads), static_cast<long>(d), static_cast<long>(ref));
  struct Inputs {
    at::Tensor q, k, v, beta, log_alpha;
  };
  auto inputs = [&](int64_t n) {
    const at::Tensor raw = at::randn({1, heads, n, d});
    return Inputs{(at::randn({1, heads, n, d}) * 0.1).requires_grad_(true),
                  (raw / raw.norm(2, {-1}, /*keepdim=*/true)).requires_grad_(true),
                  at::randn({1, heads, n, d}).requires_grad_(true),
                  at::sigmoid(at::randn({1, heads, n})).requires_grad_(true),
                  (-at::softplus(at::randn({1, heads, n})) / 8).requires_grad_(true)};
  };
  auto run = [&](const Inputs& x, int64_t block) {
    gd::GatedDeltaOptions opt;
    opt.block_size = block;
    return gd::gated_delta_rule(x.q, x.k, x.v, x.beta, x.log_alpha, opt);
  };
  auto forward_backward = [&](Inputs& x, int64_t block, const at::Tensor& g) {
    for (at::Tensor* t : {&x.q, &x.k, &x.v, &x.beta, &x.log_alpha}) t->mutable_grad().reset();
    run(x, block).backward(g);
  };
  int64_t best_block = ref;
  double best_time = 1e30;
  const int64_t sweep_n = std::min<int64_t>(8192, max_n);
  std::printf("block sweep at N=%ld (forward+backward):", static_cast<long>(sweep_n));
  {
    Inputs x = inputs(sweep_n);
    const at::Tensor g = at::randn({1, heads, sweep_n, d});
    for (int64_t c : {32, 64, 128}) {
      const double t = time_it([&] { forward_backward(x, c, g); }, 1, reps).median_s;
      std::printf("  C=%ld %.1f ms", static_cast<long>(c), t * 1e3);
      if (t < best_time) best_time = t, best_block = c;
    }
  }
  std::printf("\nusing block C=%ld (FLOPs still counted at C_ref=%ld)\n", static_cast<long>(best_block),
              static_cast<long>(ref));
  std::printf("%8s | %10s %9s %7s | %10s %10s %11s %9s %7s %10s | %8s\n", "N", "fwd ms", "GFLOP/s", "% mm",
              "fwd+bwd ms", "us/token", "tokens/s", "GFLOP/s", "% mm", "peak MiB", "x GLA");
  for (int64_t n = 1024; n <= max_n; n *= 2) {
    Inputs x = inputs(n);
    const at::Tensor g = at::randn({1, heads, n, d});
    double fwd = 0;
    {
      at::NoGradGuard no_grad;
      fwd = time_it([&] { run(x, best_block); }, 1, reps).median_s;
    }
    forward_backward(x, best_block, g);  // warm-up outside the peak
    loom::MemoryTracker::reset_peak();
    const int64_t base = loom::MemoryTracker::current_bytes();
    const double both = time_it([&] { forward_backward(x, best_block, g); }, 0, reps).median_s;
    const int64_t peak = loom::MemoryTracker::peak_bytes() - base;
    const double fwd_gf = heads * gd::gated_delta_forward_flops(n, ref, d, d) / fwd / 1e9;
    const double gf = heads * gd::gated_delta_flops(n, ref, d, d) / both / 1e9;
    const auto gla = gla_seconds.find(n);
    char ratio[16] = "-";
    if (gla != gla_seconds.end()) std::snprintf(ratio, sizeof ratio, "%.2f", both / gla->second);
    std::printf("%8ld | %10.2f %9.1f %6.1f%% | %10.2f %10.3f %11.0f %9.1f %6.1f%% %10.1f | %8s\n", static_cast<long>(n),
                fwd * 1e3, fwd_gf, 100.0 * fwd_gf / peak_gflops, both * 1e3, both / n * 1e6, n / both, gf,
                100.0 * gf / peak_gflops, mib(peak), ratio);
  }
  std::printf("(x GLA: forward+backward time over the gated linear kernel's above, same N, H and d)\n\n");
}

void single_rank_study(int64_t max_n, int64_t naive_max_n, int64_t heads, int64_t d, int reps) {
  std::printf("== one rank, one thread: chunked vs naive linear attention, B=1 H=%ld d_k=d_v=%ld, float32 ==\n",
              static_cast<long>(heads), static_cast<long>(d));
  const double peak_gflops = loom::bench::matmul_gflops();
  std::printf("same-run matmul 2048x2048x2048 float32: %.1f GFLOP/s\n\n", peak_gflops);

  la::LinearAttentionOptions opt;
  opt.decay = la::default_decay(heads);
  // Block size: the best of a few at N = 8K (bigger blocks do more masked
  // work but run the small matmuls more efficiently).
  int64_t best_block = 64;
  double best_time = 1e30;
  const int64_t sweep_n = std::min<int64_t>(8192, max_n);
  std::printf("block sweep at N=%ld:", static_cast<long>(sweep_n));
  auto chunked = [&](const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
    return la::linear_attention(q, k, v, opt);
  };
  for (int64_t c : {32, 64, 128, 256}) {
    opt.block_size = c;
    const Measured m = measure_attention(chunked, heads, sweep_n, d, reps, 0.1);
    const double gf = heads * la::chunked_linear_attention_flops(sweep_n, kReferenceBlock, d, d) / m.seconds / 1e9;
    std::printf("  C=%ld %.1f ms (%.1f GFLOP/s)", static_cast<long>(c), m.seconds * 1e3, gf);
    if (m.seconds < best_time) best_time = m.seconds, best_block = c;
  }
  std::printf("\nusing block C=%ld\n\n", static_cast<long>(best_block));
  opt.block_size = best_block;

  std::printf("%8s | %12s %12s %10s %9s %8s | %12s %10s\n", "N", "chunked ms", "tokens/s", "peak MiB", "GFLOP/s",
              "% mm", "naive ms", "peak MiB");
  double t8k = 0, t64k = 0, m8k = 0, m64k = 0;
  for (int64_t n = 1024; n <= max_n; n *= 2) {
    const Measured c = measure_attention(chunked, heads, n, d, reps, 0.1);
    const double gf = heads * la::chunked_linear_attention_flops(n, kReferenceBlock, d, d) / c.seconds / 1e9;
    std::printf("%8ld | %12.2f %12.0f %10.1f %9.1f %7.1f%% |", static_cast<long>(n), c.seconds * 1e3, n / c.seconds,
                mib(c.peak_bytes), gf, 100.0 * gf / peak_gflops);
    if (n <= naive_max_n) {
      const Measured nv = measure_attention(
          [&](auto& q, auto& k, auto& v) { return la::naive_linear_attention(q, k, v, opt); }, heads, n, d, reps, 0.1);
      std::printf(" %12.2f %10.1f\n", nv.seconds * 1e3, mib(nv.peak_bytes));
    } else {
      std::printf(" %12s %10s\n", "-", "-");
    }
    if (n == 8192) t8k = c.seconds, m8k = static_cast<double>(c.peak_bytes);
    if (n == 65536) t64k = c.seconds, m64k = static_cast<double>(c.peak_bytes);
  }
  if (t8k > 0 && t64k > 0)
    std::printf("\nchunked time(64K)/time(8K) = %.2f (8x the tokens; linear scaling is 8, target <= 9)\n"
                "chunked peak memory(64K)/(8K) = %.2f (linear is 8)\n",
                t64k / t8k, m64k / m8k);
  std::printf("\n");
  const auto gla_seconds = gated_study(max_n, heads, d, reps, best_block, peak_gflops);
  gated_delta_study(max_n, heads, d, reps, peak_gflops, gla_seconds);
}

void communication_study(const std::shared_ptr<loom::MpiCommunicator>& world, int64_t tokens_per_rank,
                         int64_t heads, int64_t d) {
  if (world->rank() == 0)
    std::printf("== communication per rank per layer call (B=1 H=%ld d_k=d_v=%ld float32, counted) ==\n"
                "%3s %-10s %-14s %8s | %9s %12s | %9s %12s | %10s\n",
                static_cast<long>(heads), static_cast<long>(d), "W", "layout", "method", "N", "fwd calls",
                "fwd recv B", "bwd calls", "bwd recv B", "fwd+bwd ms");
  for (int w : {1, 2, 4}) {
    if (w > world->size()) break;
    auto sub = world->split(world->rank() < w ? 0 : -1, world->rank());
    if (sub) {
      for (auto kind : {loom::LayoutKind::kContiguous, loom::LayoutKind::kZigzag}) {
        // LASP-2 also with gates: each chunk's decay travels per row and head.
        const std::vector<std::pair<la::LinearAttentionMethod, bool>> methods{
            {la::LinearAttentionMethod::kLasp2, false},
            {la::LinearAttentionMethod::kLasp2, true},
            {la::LinearAttentionMethod::kLasp2AllScan, false},
            {la::LinearAttentionMethod::kLasp1, false}};
        for (const auto& [method, gated] : methods) {
          for (int64_t scale : {1, 4}) {
            const int64_t n = tokens_per_rank * w * scale;
            const loom::SequenceLayout layout(kind, n, w);
            la::LinearAttentionOptions opt;
            opt.decay = la::default_decay(heads);
            opt.block_size = 64;
            if (gated) opt.log_gate = -at::softplus(at::randn({1, heads, layout.local_len()}));
            at::Tensor q = (at::randn({1, heads, layout.local_len(), d}) * 0.1).requires_grad_(true);
            at::Tensor v = at::randn({1, heads, layout.local_len(), d}).requires_grad_(true);
            // All-scan also scans over the reversed communicator: count both.
            auto counted = [&] { return std::make_pair(sub->stats(), sub->reversed()->stats()); };
            const auto c0 = counted();
            const auto start = std::chrono::steady_clock::now();
            at::Tensor out = la::sequence_parallel_linear_attention(q, q, v, layout, sub, method, opt);
            const auto c1 = counted();
            out.sum().backward();
            const double ms =
                std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() * 1e3;
            const auto c2 = counted();
            const loom::CommStats fwd = c1.first - c0.first, bwd = c2.first - c1.first;
            const loom::CommStats fwd_rev = c1.second - c0.second, bwd_rev = c2.second - c1.second;
            // The busiest rank of the group: scans and chains are not symmetric.
            at::Tensor row = at::tensor({fwd.total_calls() + fwd_rev.total_calls(),
                                         fwd.total_bytes_received() + fwd_rev.total_bytes_received(),
                                         bwd.total_calls() + bwd_rev.total_calls(),
                                         bwd.total_bytes_received() + bwd_rev.total_bytes_received(),
                                         static_cast<int64_t>(ms * 1000)},
                                        at::kLong);
            sub->all_reduce(row, loom::ReduceOp::kMax)->wait();
            const auto* r = row.data_ptr<int64_t>();
            if (sub->rank() == 0)
              std::printf("%3d %-10s %-14s %8ld | %9ld %12ld | %9ld %12ld | %10.1f\n", w,
                          loom::layout_kind_name(kind),
                          (std::string(la::method_name(method)) + (gated ? "+gates" : "")).c_str(),
                          static_cast<long>(n),
                          static_cast<long>(r[0]), static_cast<long>(r[1]), static_cast<long>(r[2]),
                          static_cast<long>(r[3]), r[4] / 1000.0);
          }
        }
      }
    }
    world->barrier()->wait();
  }
  if (world->rank() == 0)
    std::printf("(maximum over the ranks of each group; LASP-2 formula: (W-1) * chunks_per_rank * B*H*d_k*d_v * 4 bytes, "
                "with gates (W-1) * chunks_per_rank * (B*H*d_k*d_v + B*H) * 4 bytes, independent of N)\n");
}

}  // namespace

int main(int argc, char** argv) {
  loom::bench::keep_freed_memory();
  loom::MpiEnvironment mpi(&argc, &argv);
  CLI::App app{"Linear attention benchmark: chunked vs naive on one rank, LASP communication on 1/2/4 ranks"};
  int64_t max_n = 65536, naive_max_n = 8192, heads = 4, d = 64, comm_tokens = 1024;
  int reps = 3, threads = 1;
  std::vector<int64_t> kernel_lengths{4096, 16384, 65536}, kernel_blocks{64};
  bool kernel_table_only = false;
  app.add_option("--kernel-lengths", kernel_lengths, "Lengths of the issue 19 kernel table (rows aten, blas, xsmm)")
      ->check(CLI::Range(int64_t(1), int64_t(1) << 20));
  app.add_option("--kernel-blocks", kernel_blocks, "Blocks the kernel runs at in the kernel table")
      ->check(CLI::Range(int64_t(1), int64_t(4096)));
  app.add_flag("--kernel-table-only", kernel_table_only, "Print the issue 19 kernel table and stop");
  app.add_option("--max-n", max_n, "Longest sequence of the one-rank study")
      ->check(CLI::Range(int64_t(1), int64_t(1) << 20));
  app.add_option("--naive-max-n", naive_max_n, "Longest sequence for the naive quadratic reference")
      ->check(CLI::Range(int64_t(1), int64_t(1) << 16));
  app.add_option("--heads", heads, "Heads")->check(CLI::Range(int64_t(1), int64_t(256)));
  app.add_option("--dim", d, "Head dimension (d_k = d_v)")->check(CLI::Range(int64_t(1), int64_t(1024)));
  app.add_option("--reps", reps, "Timed repetitions (the kernel table reports the best, the studies the median)")
      ->check(CLI::Range(1, 1000));
  app.add_option("--threads", threads, "Intra-op threads per rank")->check(CLI::Range(1, 1024));
  app.add_option("--comm-tokens", comm_tokens, "Tokens per rank in the communication study")
      ->check(CLI::Range(int64_t(1), int64_t(1) << 20));
  CLI11_PARSE(app, argc, argv);
  at::set_num_threads(threads);
  loom::MemoryTracker::install();
  auto world = loom::MpiCommunicator::world();
  if (world->rank() == 0) kernel_table(kernel_lengths, heads, d, reps, kernel_blocks);
  if (kernel_table_only) return 0;
  if (world->rank() == 0) single_rank_study(max_n, naive_max_n, heads, d, reps);
  world->barrier()->wait();
  communication_study(world, comm_tokens, heads, d);
  return 0;
}
