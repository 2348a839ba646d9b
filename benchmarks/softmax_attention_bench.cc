// Softmax attention benchmark:
//  1. one rank: local blockwise (FlashAttention-2 style) vs naive attention,
//     forward+backward time and peak tensor memory at N = 1K..32K (naive only
//     while it fits under --naive-max-n);
//  2. 1, 2, 4 ranks: ring vs all-gather forward+backward time and the
//     communicator's counted bytes and calls, both layouts;
//  3. the ring's overlap ratio: ring forward time over the time of the same
//     compute with K,V already gathered (1.0 = communication fully hidden).
// Ratios are measured in the same run.
//   mpirun -np 4 --oversubscribe build/benchmarks/loom-softmax-attention-bench
#include <ATen/Parallel.h>
#include <CLI/CLI.hpp>

#include <algorithm>
#include <cstdio>
#include <string>
#include <vector>

#include "bench_util.h"
#include "loom/parallel/linear_attention/cpu_blas.h"
#include "loom/parallel/softmax_attention/softmax_attention.h"
#include "loom/runtime/core/memory_tracker.h"
#include "loom/runtime/comm/mpi_communicator.h"

namespace sa = loom::softmax_attention;
using loom::bench::mib;
using loom::bench::Measured;
using loom::bench::measure_attention;
using loom::bench::time_it;

namespace {

// Issue 19's kernel table: the blockwise kernel's forward+backward on one
// causal sequence (attend_pair, rowsum(dout * out), attend_pair_backward:
// what method 'local' runs under autograd) against the 2048^3 float32 matmul
// measured right before each point, best of `reps` for both; the kernel's
// ATen path (main's kernel before the BLAS path, and what non-CPU devices and
// bfloat16 run) and its BLAS path (cpu_blas.h), interleaved in this process. FLOPs: the causal count, half of full attention
// (the FlashAttention convention): forward 2 N^2 d, forward+backward 3.5x
// that = 7 N^2 d per head.
void kernel_table(const std::vector<int64_t>& lengths, int64_t heads, int64_t d, int reps,
                  const std::vector<int64_t>& blocks) {
  std::printf("== issue 19 kernel table: blockwise causal softmax attention forward+backward, B=1 H=%ld d=%ld "
              "float32, one thread, best of %d ==\n"
              "FLOPs per head 7 N^2 d (causal: half of full; backward 2.5x forward); %% mm = kernel GFLOP/s over the "
              "best of 3 2048^3 matmuls run just before the point\n",
              static_cast<long>(heads), static_cast<long>(d), reps);
  std::printf("%8s %-7s %5s | %10s %10s %9s %9s %8s\n", "N", "kernel", "block", "ms", "us/token", "GFLOP/s",
              "mm GF/s", "% mm");
  loom::bench::matmul_gflops_best(2048, 1);  // a process's first matmul runs cold (~25% slow): not a reference
  for (const int64_t n : lengths) {
    const at::Tensor q = at::randn({1, heads, n, d}), k = at::randn({1, heads, n, d}), v = at::randn({1, heads, n, d});
    const at::Tensor g = at::randn({1, heads, n, d});
    const double flops = 7.0 * heads * static_cast<double>(n) * n * d;
    struct Row {
      const char* name;
      int64_t block;
      bool blas, small;
    };
    std::vector<Row> rows;  // "blas": CBLAS per block product; "xsmm": libxsmm's kernels (cpu_blas.h)
    for (const int64_t b : blocks) {
      rows.push_back({"aten", b, false, false});
      if (loom::cpu_blas::available()) rows.push_back({"blas", b, true, false});
      if (loom::cpu_blas::small_kernels_usable()) rows.push_back({"xsmm", b, true, true});
    }
    for (const Row& row : rows) {
      sa::AttentionSpec spec;
      spec.block = row.block;
      loom::cpu_blas::set_enabled(row.blas);
      loom::cpu_blas::set_small_kernels_enabled(row.small);
      auto step = [&] {
        const sa::Partial p = sa::attend_pair(q, 0, k, v, 0, spec);
        at::Tensor dq = at::zeros_like(q), dk = at::zeros_like(k), dv = at::zeros_like(v);
        const at::Tensor delta = (g * p.out).sum(-1);
        sa::attend_pair_backward(q, 0, k, v, 0, spec, p.lse, g, delta, dq, dk, dv);
      };
      const double mm = loom::bench::matmul_gflops_best(2048, 3);
      const double s = time_it(step, 1, reps).min_s;
      const double gf = flops / s / 1e9;
      std::printf("%8ld %-7s %5ld | %10.1f %10.3f %9.2f %9.2f %7.1f%%\n", static_cast<long>(n), row.name,
                  static_cast<long>(row.block), s * 1e3, s / n * 1e6, gf, mm, 100.0 * gf / mm);
      std::fflush(stdout);
    }
    loom::cpu_blas::set_enabled(true);
    loom::cpu_blas::set_small_kernels_enabled(true);
  }
  std::printf("\n");
}

void single_rank_study(const loom::CommPtr& self, int64_t max_n, int64_t naive_max_n, int64_t heads, int64_t d,
                       int64_t block, int reps) {
  std::printf("== one rank, one thread: blockwise vs naive causal softmax attention, B=1 H=%ld d=%ld float32, "
              "block %ld ==\n",
              static_cast<long>(heads), static_cast<long>(d), static_cast<long>(block));
  std::printf("%8s | %12s %12s %10s | %12s %10s\n", "N", "blockwise ms", "tokens/s", "peak MiB", "naive ms",
              "peak MiB");
  sa::AttentionSpec spec;
  spec.block = block;
  double m8k = 0, m32k = 0;
  for (int64_t n = 1024; n <= max_n; n *= 2) {
    const loom::SequenceLayout layout(loom::LayoutKind::kContiguous, n, 1);
    const Measured b = measure_attention(
        [&](auto& q, auto& k, auto& v) { return sa::attention(q, k, v, layout, self, sa::SoftmaxMethod::kLocal, spec); },
        heads, n, d, reps);
    std::printf("%8ld | %12.1f %12.0f %10.1f |", static_cast<long>(n), b.seconds * 1e3, n / b.seconds,
                mib(b.peak_bytes));
    if (n <= naive_max_n) {
      const Measured nv =
          measure_attention([&](auto& q, auto& k, auto& v) { return sa::naive_attention(q, k, v, spec).first; }, heads, n, d, reps);
      std::printf(" %12.1f %10.1f\n", nv.seconds * 1e3, mib(nv.peak_bytes));
    } else {
      std::printf(" %12s %10s\n", "-", "-");
    }
    if (n == 8192) m8k = static_cast<double>(b.peak_bytes);
    if (n == 32768) m32k = static_cast<double>(b.peak_bytes);
  }
  if (m8k > 0 && m32k > 0)
    std::printf("blockwise peak memory(32K)/(8K) = %.2f (4x the tokens; linear is 4, target <= 4.5)\n", m32k / m8k);
  std::printf("\n");
}

void ring_study(const std::shared_ptr<loom::MpiCommunicator>& world, int64_t tokens_per_rank, int64_t heads,
                int64_t d, int64_t block) {
  if (world->rank() == 0)
    std::printf("== ring vs all-gather attention per rank (B=1 H=%ld d=%ld float32, counted, max over ranks) ==\n"
                "%3s %-10s %-10s %7s | %10s %12s %6s | %11s | %8s\n",
                static_cast<long>(heads), static_cast<long>(d), "W", "layout", "method", "N", "fwd+bwd ms",
                "fwd recv B", "calls", "fwd only ms", "overlap");
  sa::AttentionSpec spec;
  spec.block = block;
  for (int w : {1, 2, 4}) {
    if (w > world->size()) break;
    auto sub = world->split(world->rank() < w ? 0 : -1, world->rank());
    if (sub) {
      for (auto kind : {loom::LayoutKind::kContiguous, loom::LayoutKind::kZigzag}) {
        const int64_t n = tokens_per_rank * w;
        const loom::SequenceLayout layout(kind, n, w);
        at::Tensor q = at::randn({1, heads, layout.local_len(), d}).requires_grad_(true);
        at::Tensor k = at::randn({1, heads, layout.local_len(), d}).requires_grad_(true);
        // Compute-only baseline: the same pairs with K,V gathered beforehand.
        at::Tensor all = at::empty({w, 2, 1, heads, layout.local_len(), d});
        sub->all_gather(all, at::stack({k.detach(), k.detach()}).unsqueeze(0).contiguous())->wait();
        sub->barrier()->wait();
        const double compute_only = time_it([&] { sa::attend_gathered(q, all, layout, sub->rank(), spec); }, 1, 3).median_s;
        for (auto method : {sa::SoftmaxMethod::kRing, sa::SoftmaxMethod::kAllGather}) {
          sub->barrier()->wait();
          const double fwd = time_it([&] { sa::attention(q, k, k, layout, sub, method, spec); }, 1, 3).median_s;
          const loom::CommStats s0 = sub->stats();
          const double both = time_it([&] { sa::attention(q, k, k, layout, sub, method, spec).sum().backward(); }, 0, 1)
                                  .median_s;
          const loom::CommStats s1 = sub->stats();
          const loom::CommStats once = s1 - s0;
          at::Tensor row = at::tensor({static_cast<int64_t>(both * 1e6), static_cast<int64_t>(fwd * 1e6),
                                       static_cast<int64_t>(compute_only * 1e6), once.total_calls()},
                                      at::kLong);
          sub->all_reduce(row, loom::ReduceOp::kMax)->wait();
          // Forward bytes of one call, from a separate counted forward.
          const loom::CommStats f0 = sub->stats();
          sa::attention(q, k, k, layout, sub, method, spec);
          const loom::CommStats f = sub->stats() - f0;
          const auto* r = row.data_ptr<int64_t>();
          if (sub->rank() == 0)
            std::printf("%3d %-10s %-10s %7ld | %10.1f %12ld %6ld | %11.1f | %8.2f\n", w, loom::layout_kind_name(kind),
                        sa::method_name(method), static_cast<long>(n), r[0] / 1e3,
                        static_cast<long>(f.total_bytes_received()), static_cast<long>(r[3]), r[1] / 1e3,
                        static_cast<double>(r[1]) / static_cast<double>(r[2]));
        }
      }
    }
    world->barrier()->wait();
  }
  if (world->rank() == 0)
    std::printf("(ring formula: (W-1) * 2 * (N/W) * H_kv * d * 4 bytes forward; 'overlap' = forward time over the "
                "compute-only time of the same pairs: 1.00 means the ring's communication is fully hidden)\n");
}

}  // namespace

int main(int argc, char** argv) {
  loom::bench::keep_freed_memory();
  loom::MpiEnvironment mpi(&argc, &argv);
  CLI::App app{"Softmax attention benchmark: blockwise vs naive on one rank, ring vs all-gather on 1/2/4 ranks"};
  int64_t max_n = 32768, naive_max_n = 4096, heads = 4, d = 64, block = 128, ring_tokens = 1024;
  int reps = 2, threads = 1;
  std::vector<int64_t> kernel_lengths{2048, 4096, 8192}, kernel_blocks{128};
  bool kernel_table_only = false;
  app.add_option("--kernel-lengths", kernel_lengths, "Lengths of the issue 19 kernel table (rows aten, blas, xsmm)")
      ->check(CLI::Range(int64_t(1), int64_t(1) << 20));
  app.add_option("--kernel-blocks", kernel_blocks, "Blocks the kernel runs at in the kernel table")
      ->check(CLI::Range(int64_t(1), int64_t(4096)));
  app.add_flag("--kernel-table-only", kernel_table_only, "Print the issue 19 kernel table and stop");
  app.add_option("--max-n", max_n, "Longest sequence of the one-rank study")
      ->check(CLI::Range(int64_t(1), int64_t(1) << 20));
  app.add_option("--naive-max-n", naive_max_n, "Longest sequence for the naive reference")
      ->check(CLI::Range(int64_t(1), int64_t(1) << 16));
  app.add_option("--heads", heads, "Heads")->check(CLI::Range(int64_t(1), int64_t(256)));
  app.add_option("--dim", d, "Head dimension")->check(CLI::Range(int64_t(1), int64_t(1024)));
  app.add_option("--block", block, "Block of the blockwise kernel")->check(CLI::Range(int64_t(1), int64_t(4096)));
  app.add_option("--reps", reps, "Timed repetitions (the kernel table reports the best, the studies the median)")
      ->check(CLI::Range(1, 1000));
  app.add_option("--threads", threads, "Intra-op threads per rank")->check(CLI::Range(1, 1024));
  app.add_option("--ring-tokens", ring_tokens, "Tokens per rank in the ring study")
      ->check(CLI::Range(int64_t(1), int64_t(1) << 20));
  CLI11_PARSE(app, argc, argv);
  at::set_num_threads(threads);
  loom::MemoryTracker::install();
  auto world = loom::MpiCommunicator::world();
  auto self = world->split(world->rank(), 0);
  if (world->rank() == 0) kernel_table(kernel_lengths, heads, d, reps, kernel_blocks);
  if (kernel_table_only) return 0;
  if (world->rank() == 0) single_rank_study(self, max_n, naive_max_n, heads, d, block, reps);
  world->barrier()->wait();
  ring_study(world, ring_tokens, heads, d, block);
  return 0;
}
