// loom-bench: scaling sweeps of Loom's sequence-parallel methods.
//
//   mpirun -np 4 --oversubscribe build/benchmarks/loom-bench \
//       --sweep benchmarks/sweeps/quick.pbtxt --out results/quick
//
// For every (world size, subject, method, length) of the sweep: median and
// spread of forward+backward time after warm-up, tokens/s, peak tensor memory
// per rank, bytes and calls per rank (forward bytes next to the formula), and
// the slowest rank's split into compute, transfer and waiting. Then: the
// alpha-beta cost model calibrated from this run (network constants from a
// ping-pong; compute per kernel fitted over the sweep) with its error on every
// point, projections to the sweep's clusters, the cost model against the LASP-2 paper's figures,
// and the limits study (longest tiny-model sequence under a memory cap, by
// search). With document_lengths, every point also runs on rows packed with
// documents of each mean length (a seeded log-normal mix) and the report
// compares packed to flat at the same tokens per step: time and bytes per
// rank (the cost model is calibrated on the flat points only; block skipping
// makes packed softmax cheaper than its causal-pairs term). Writes results.jsonl, results.csv, projections.csv, limits.csv and
// report.txt to --out, and PNG plots when gnuplot is installed
// (benchmarks/plot_bench.sh). See benchmarks/README.md.
#include <CLI/CLI.hpp>
#include <torch/utils.h>

#include <cmath>
#include <filesystem>
#include <map>
#include <random>
#include <fstream>
#include <iostream>
#include <set>
#include <sstream>
#include <thread>

#include "benchmarks/allgather_baseline.h"
#include "benchmarks/cost_model.h"
#include "benchmarks/sweep.h"
#include "benchmarks/timed_communicator.h"
#include "loom/models/hybrid_lm.h"
#include "loom/parallel/gated_delta/chunked_kernel.h"
#include "loom/parallel/gated_delta/gated_delta.h"
#include "loom/parallel/linear_attention/lasp.h"
#include "loom/parallel/softmax_attention/softmax_attention.h"
#include "loom/runtime/comm/comm_order.h"
#include "loom/runtime/comm/documents.h"
#include "loom/runtime/core/dtypes.h"
#include "loom/runtime/core/error.h"
#include "loom/runtime/core/memory_tracker.h"
#include "loom/runtime/comm/mpi_communicator.h"

namespace loom::bench {
namespace {

using Clock = std::chrono::steady_clock;
double since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

at::ScalarType dtype_of(const pb::BenchSweep& w) { return *scalar_type_from_name(w.dtype()); }  // validated

struct Point {
  int world = 1;
  Subject subject;
  Method method;
  int64_t n = 0;  // tokens actually run (the tiny model may round up)
  int64_t doc_mean = 0;   // mean document length of packed rows; 0 = flat rows
  int64_t documents = 1;  // documents in the batch's rows
  double median_s = 0, min_s = 0, max_s = 0, tokens_per_s = 0;
  int64_t peak_bytes = 0, fwd_bytes = 0, fwd_bytes_formula = 0, bytes = 0, calls = 0;
  double compute_s = 0, transfer_s = 0, waiting_s = 0, predicted_s = 0;
};

// Maxima over the ranks of `comm`, in one all-reduce.
std::vector<double> max_over(Communicator& comm, const std::vector<double>& values) {
  at::Tensor t = at::tensor(values, at::kDouble);
  comm.all_reduce(t, ReduceOp::kMax)->wait();
  return {t.data_ptr<double>(), t.data_ptr<double>() + t.numel()};
}
double max_over(Communicator& comm, double v) { return max_over(comm, std::vector<double>{v})[0]; }

// USP runs its ring across groups on the zigzag layout (balance); Ulysses on
// the contiguous one (every rank attends whole sequences: nothing to balance,
// and the linear layers need no permutation).
LayoutKind layout_for(Method m) {
  return (m == Method::kRingZigzag || m == Method::kAllGather || is_usp(m)) ? LayoutKind::kZigzag
                                                                            : LayoutKind::kContiguous;
}

// GLA and Gated DeltaNet layers run every method on the contiguous layout (the
// all-gather baseline too: its last rank needs the whole sequence either way,
// and the other ranks only the prefix up to their chunk).
LayoutKind layout_for(Subject s, Method m) { return gated_recurrent(s) ? LayoutKind::kContiguous : layout_for(m); }

pb::ParallelConfig model_parallel(Method m) {
  pb::ParallelConfig p;
  p.set_layout(layout_for(m) == LayoutKind::kZigzag ? pb::ZIGZAG : pb::CONTIGUOUS);
  p.set_linear_method(m == Method::kLasp2AllScan ? pb::LASP2_ALLSCAN : m == Method::kLasp1 ? pb::LASP1 : pb::LASP2);
  p.set_softmax_method(m == Method::kRingContiguous || m == Method::kRingZigzag || m == Method::kLasp1 ? pb::RING
                                                                                                       : pb::ALLGATHER);
  if (m == Method::kUlysses) {  // every layer head-parallel
    p.set_softmax_method(pb::ULYSSES);
    p.set_linear_method(pb::LINEAR_ULYSSES);
  } else if (is_usp(m)) {  // softmax layers 2D; linear layers LASP-2 on the same zigzag layout
    p.set_softmax_method(pb::USP);
    p.set_ulysses_degree(ulysses_degree(m, 0));
  }
  return p;
}

linear_attention::LinearAttentionMethod linear_method(Method m) {
  switch (m) {
    case Method::kLasp2AllScan: return linear_attention::LinearAttentionMethod::kLasp2AllScan;
    case Method::kLasp1: return linear_attention::LinearAttentionMethod::kLasp1;
    case Method::kUlysses: return linear_attention::LinearAttentionMethod::kUlysses;
    default: return linear_attention::LinearAttentionMethod::kLasp2;
  }
}

// Packed rows: documents with log-normal lengths (sigma 1, mean `mean`, at
// least 1 token), the last one cut at the row's end; seeded, so every rank and
// every method sees the same rows. doc_start [B, n] and the document count.
std::pair<at::Tensor, int64_t> packed_rows(int64_t B, int64_t n, int64_t mean) {
  std::mt19937_64 gen(1234);
  std::normal_distribution<double> z(0.0, 1.0);
  std::vector<std::vector<int64_t>> lengths(static_cast<size_t>(B));
  int64_t documents = 0;
  for (auto& row : lengths)
    for (int64_t left = n; left > 0; ++documents) {
      const double len = double(mean) * std::exp(z(gen) - 0.5);
      const int64_t l = std::min<int64_t>(left, std::max<int64_t>(1, std::llround(len)));
      row.push_back(l);
      left -= l;
    }
  return {document_starts_from_lengths(lengths, n), documents};
}

// One step of a GLA or Gated DeltaNet layer: q, k, v [B, H, local, d] (Gated
// DeltaNet: k L2-normalised), the gates per token and head drawn as the
// layers' parametrisations make them (GLA: log g = -softplus(x); Gated
// DeltaNet: beta = sigmoid(x), log alpha = -softplus(x) / 8, alpha near 1 as
// trained models have), all of them differentiated.
std::function<at::Tensor()> gated_recurrent_op(const pb::BenchSweep& w, Subject subject, Method method,
                                               const SequenceLayout& layout, const CommPtr& comm,
                                               const at::Tensor& doc_start, const at::Tensor& global_doc_start,
                                               std::vector<at::Tensor>& leaves) {
  const auto opts = at::TensorOptions().dtype(dtype_of(w));
  const int64_t B = w.batch(), H = w.heads(), d = w.head_dim(), local = layout.local_len(), block = w.block();
  const bool delta = subject == Subject::kGatedDeltaLayer;
  auto leaf = [&](at::Tensor t) { return t.to(opts).requires_grad_(true); };
  const at::Tensor q = leaf(at::randn({B, H, local, d}, at::kDouble) * 0.1);
  const at::Tensor raw_k = at::randn({B, H, local, d}, at::kDouble);
  const at::Tensor k = leaf(delta ? raw_k / raw_k.norm(2, {-1}, /*keepdim=*/true) : raw_k * 0.1);
  const at::Tensor v = leaf(at::randn({B, H, local, d}, at::kDouble));
  // GLA: one gate (log g); Gated DeltaNet: beta, log alpha.
  std::vector<at::Tensor> gates{delta ? leaf(at::sigmoid(at::randn({B, H, local}, at::kDouble)))
                                      : leaf(-at::softplus(at::randn({B, H, local}, at::kDouble)))};
  if (delta) gates.push_back(leaf(-at::softplus(at::randn({B, H, local}, at::kDouble)) / 8));
  leaves = {q, k, v};
  leaves.insert(leaves.end(), gates.begin(), gates.end());
  // The single-rank kernel on (q, k, v, gates) with `docs` (the all-gather baseline's).
  auto kernel = [=](const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_, const std::vector<at::Tensor>& g,
                    const at::Tensor& docs) {
    if (delta) {
      gated_delta::GatedDeltaOptions o;
      o.block_size = block;
      o.doc_start = docs;
      return gated_delta::gated_delta_rule(q_, k_, v_, g[0], g[1], o);
    }
    linear_attention::LinearAttentionOptions o;
    o.block_size = block;
    o.doc_start = docs;
    o.log_gate = g[0];
    return linear_attention::linear_attention(q_, k_, v_, o);
  };
  if (method == Method::kAllGather)  // benchmarks/allgather_baseline.h
    return [=] {
      std::vector<at::Tensor> parts{k, v};
      for (const auto& g : gates) parts.push_back(g.unsqueeze(-1));
      return allgather_recurrent(q, at::cat(parts, -1), layout, comm, global_doc_start,
                                 [&](const at::Tensor& q_, const at::Tensor& x, const at::Tensor& docs) {
                                   std::vector<at::Tensor> g;
                                   for (size_t i = 0; i < gates.size(); ++i) g.push_back(x.select(-1, 2 * d + i));
                                   return kernel(q_, x.narrow(-1, 0, d), x.narrow(-1, d, d), g, docs);
                                 });
    };
  const auto lm = linear_method(method);
  if (method == Method::kNone) return [=] { return kernel(q, k, v, gates, doc_start); };
  if (delta) {
    gated_delta::GatedDeltaOptions o;
    o.block_size = block;
    o.doc_start = doc_start;
    return [=] { return gated_delta::sequence_parallel_gated_delta_rule(q, k, v, gates[0], gates[1], layout, comm, lm, o); };
  }
  return [=] {
    linear_attention::LinearAttentionOptions o;
    o.block_size = block;
    o.doc_start = doc_start;
    o.log_gate = gates[0];
    return linear_attention::sequence_parallel_linear_attention(q, k, v, layout, comm, lm, o);
  };
}

// One forward+backward step of `subject` with `method` on this rank's shard;
// `fwd_done` is called between forward and backward.
using StepFn = std::function<void(const std::function<void()>& fwd_done)>;

StepFn make_step(const pb::BenchSweep& w, Subject subject, Method method, int64_t& n,
                 const std::shared_ptr<TimedCommunicator>& comm, int64_t doc_mean = 0, int64_t* documents = nullptr) {
  const int W = comm->size();
  const auto opts = at::TensorOptions().dtype(dtype_of(w));
  const int64_t B = w.batch(), H = w.heads(), d = w.head_dim();
  // This rank's doc_start of packed rows of n tokens (undefined: flat rows).
  auto local_documents = [&](const SequenceLayout& layout) {
    if (doc_mean == 0) return at::Tensor();
    auto [doc_start, count] = packed_rows(B, n, doc_mean);
    if (documents) *documents = count;
    return shard_document_starts(doc_start, layout, comm->rank());
  };
  if (subject == Subject::kTinyModel) {
    pb::ModelConfig user;
    user.set_preset(w.model_preset());
    const auto config = models::resolve_model_config(user);
    n = models::admissible_length(config, layout_for(method), W, n);
    torch::manual_seed(1);
    models::HybridLM model(config);
    model->set_precision(dtype_of(w));
    const SequenceLayout layout(layout_for(method), n, W);
    auto ctx = models::make_context(model_parallel(method), layout, comm);
    ctx.doc_start = local_documents(layout);
    at::Generator gen = at::detail::createCPUGenerator(2);
    const at::Tensor tokens = at::randint(0, config.vocab_size(), {B, n}, gen, at::kLong);
    const at::Tensor local = layout.shard(tokens, comm->rank(), 1);
    return [model, ctx, local](const std::function<void()>& fwd_done) mutable {
      model->zero_grad();
      const at::Tensor loss = model(local, ctx).to(at::kFloat).logsumexp(-1).sum();
      fwd_done();
      loss.backward();
    };
  }
  const SequenceLayout layout(layout_for(subject, method), n, W);
  const at::Tensor doc_start = local_documents(layout);
  const int64_t local = layout.local_len();
  if (gated_recurrent(subject)) {
    const at::Tensor global_doc_start = doc_mean > 0 ? packed_rows(B, n, doc_mean).first : at::Tensor();
    std::vector<at::Tensor> leaves;
    const auto op = gated_recurrent_op(w, subject, method, layout, comm, doc_start, global_doc_start, leaves);
    const at::Tensor g = at::randn({B, H, local, d}, opts);
    return [=](const std::function<void()>& fwd_done) mutable {
      for (auto& t : leaves) t.mutable_grad().reset();
      CommOrder::reset();
      const at::Tensor out = op();
      fwd_done();
      out.backward(g);
    };
  }
  auto leaf = [&](double scale) { return (at::randn({B, H, local, d}, opts) * scale).requires_grad_(true); };
  auto q = leaf(0.1), k = leaf(0.1), v = leaf(1.0);
  const at::Tensor g = at::randn({B, H, local, d}, opts);
  std::function<at::Tensor()> op;
  if (subject == Subject::kLinearLayer) {
    linear_attention::LinearAttentionOptions lin;
    lin.block_size = w.block();
    lin.doc_start = doc_start;
    const auto lm = linear_method(method);
    op = [=] { return linear_attention::sequence_parallel_linear_attention(q, k, v, layout, comm, lm, lin); };
  } else {
    const auto sm = W == 1                         ? softmax_attention::SoftmaxMethod::kLocal
                    : method == Method::kAllGather ? softmax_attention::SoftmaxMethod::kAllGather
                    : method == Method::kUlysses   ? softmax_attention::SoftmaxMethod::kUlysses
                    : is_usp(method)               ? softmax_attention::SoftmaxMethod::kUsp
                                                   : softmax_attention::SoftmaxMethod::kRing;
    const int degree = ulysses_degree(method, W);
    op = [=] {
      return softmax_attention::attention(q, k, v, layout, comm, sm, softmax_attention::AttentionSpec(), nullptr,
                                          doc_start, degree);
    };
  }
  return [=](const std::function<void()>& fwd_done) mutable {
    for (auto* t : {&q, &k, &v}) t->mutable_grad().reset();
    CommOrder::reset();
    const at::Tensor out = op();
    fwd_done();
    out.backward(g);
  };
}

Point run_point(const pb::BenchSweep& w, Subject subject, Method method, int64_t n,
                const std::shared_ptr<TimedCommunicator>& comm, const Network& net, int64_t doc_mean = 0) {
  Point p;
  p.world = comm->size();
  p.subject = subject;
  p.method = method;
  p.n = n;
  p.doc_mean = doc_mean;
  StepFn step = make_step(w, subject, method, p.n, comm, doc_mean, &p.documents);
  auto nothing = [] {};
  for (int i = 0; i < w.warmup(); ++i) step(nothing);
  // Bytes of one step, forward alone and in all; its time sizes the repetitions.
  // (USP's group and ring communicators, split from comm, count as comm's.)
  const auto s0 = comm->counters();
  TimedCommunicator::Counters s_fwd;
  const auto probe = Clock::now();
  step([&] { s_fwd = comm->counters(); });
  const double one = since(probe);
  const auto s1 = comm->counters();
  p.fwd_bytes = s_fwd.bytes_received - s0.bytes_received;
  p.bytes = s1.bytes_received - s0.bytes_received;
  p.calls = s1.calls - s0.calls;
  // Timed steps: reps, or more for short steps (the same count on every rank).
  const double slowest = max_over(*comm, one);
  const int reps = std::clamp(static_cast<int>(std::ceil(w.min_time_s() / std::max(slowest, 1e-6))), w.reps(), 100);
  std::vector<double> t;
  double blocked = 0;
  MemoryTracker::reset_peak();
  const int64_t base = MemoryTracker::current_bytes();
  for (int i = 0; i < reps; ++i) {
    comm->barrier()->wait();
    comm->reset_timers();
    const auto start = Clock::now();
    step(nothing);
    t.push_back(since(start));
    blocked += comm->blocked_seconds();
  }
  const int64_t peak = MemoryTracker::peak_bytes() - base;
  std::sort(t.begin(), t.end());
  // Split of this rank's median step into compute / transfer / waiting; the
  // maximum over the ranks of each is reported.
  const double median = t[t.size() / 2], blocked_per_step = blocked / reps;
  const double transfer = std::min(blocked_per_step, p.calls * net.alpha_s + p.bytes / net.beta_bytes_per_s);
  const std::vector<double> m =
      max_over(*comm, {median, t.front(), t.back(), double(p.fwd_bytes), double(p.bytes), double(p.calls),
                       double(peak), median - blocked_per_step, transfer, blocked_per_step - transfer});
  p.median_s = m[0], p.min_s = m[1], p.max_s = m[2];
  p.fwd_bytes = int64_t(m[3]), p.bytes = int64_t(m[4]), p.calls = int64_t(m[5]), p.peak_bytes = int64_t(m[6]);
  p.compute_s = m[7], p.transfer_s = m[8], p.waiting_s = m[9];
  p.tokens_per_s = w.batch() * p.n / p.median_s;
  return p;
}

// Ping-pong between ranks 0 and 1 of `comm`: one-way alpha (8 B) and beta (4 MiB).
Network measure_network(Communicator& comm) {
  Network net;
  if (comm.size() < 2) return net;
  auto one_way = [&](int64_t bytes) {
    at::Tensor buf = at::zeros({bytes}, at::kByte);
    const int reps = bytes > 1024 ? 10 : 200;
    std::vector<double> t;
    for (int i = 0; i < reps + 2; ++i) {
      comm.barrier()->wait();
      const auto start = Clock::now();
      if (comm.rank() == 0) {
        comm.isend(buf, 1, 7)->wait();
        comm.irecv(buf, 1, 7)->wait();
      } else if (comm.rank() == 1) {
        comm.irecv(buf, 0, 7)->wait();
        comm.isend(buf, 0, 7)->wait();
      }
      if (i >= 2) t.push_back(since(start) / 2);
    }
    std::sort(t.begin(), t.end());
    return max_over(comm, t[t.size() / 2]);
  };
  const double small = one_way(8), large = one_way(4 << 20);
  net.alpha_s = small;
  net.beta_bytes_per_s = (4 << 20) / std::max(large - small, 1e-9);
  return net;
}

std::string json_line(const Point& p) {
  std::ostringstream o;
  o << "{\"world\": " << p.world << ", \"subject\": \"" << subject_name(p.subject) << "\", \"method\": \""
    << method_name(p.method) << "\", \"seq_len\": " << p.n << ", \"doc_mean\": " << p.doc_mean
    << ", \"documents\": " << p.documents << ", \"median_s\": " << p.median_s
    << ", \"min_s\": " << p.min_s << ", \"max_s\": " << p.max_s << ", \"tokens_per_s\": " << p.tokens_per_s
    << ", \"peak_bytes\": " << p.peak_bytes << ", \"fwd_bytes\": " << p.fwd_bytes
    << ", \"fwd_bytes_formula\": " << p.fwd_bytes_formula << ", \"bytes\": " << p.bytes << ", \"calls\": " << p.calls
    << ", \"compute_s\": " << p.compute_s << ", \"transfer_s\": " << p.transfer_s << ", \"waiting_s\": " << p.waiting_s
    << ", \"predicted_s\": " << p.predicted_s << "}";
  return o.str();
}

// Largest length of the tiny model under the cap for `method` at world size W:
// doubling, then bisection; a trial whose memory, extrapolated linearly from
// the trials so far, exceeds twice the cap is not run but counted as over.
int64_t limits_search(const pb::BenchSweep& w, Method method, const std::shared_ptr<TimedCommunicator>& comm,
                      std::vector<std::pair<int64_t, int64_t>>& trials) {
  pb::ModelConfig user;
  user.set_preset(w.model_preset());
  const auto config = models::resolve_model_config(user);
  const int W = comm->size();
  auto fits = [&](int64_t n) {
    if (trials.size() >= 2) {
      const auto [n1, m1] = trials[trials.size() - 2];
      const auto [n2, m2] = trials.back();
      const double slope = n2 != n1 ? double(m2 - m1) / double(n2 - n1) : 0;
      if (m2 + slope * double(n - n2) > 2.0 * double(w.memory_cap_bytes())) return false;
    }
    int64_t len = n;
    StepFn step = make_step(w, Subject::kTinyModel, method, len, comm);
    MemoryTracker::reset_peak();
    const int64_t base = MemoryTracker::current_bytes();
    step([] {});
    const int64_t peak = static_cast<int64_t>(max_over(*comm, MemoryTracker::peak_bytes() - base));
    trials.emplace_back(len, peak);
    return peak <= w.memory_cap_bytes();
  };
  int64_t lo = 0, hi = models::admissible_length(config, layout_for(method), W, 64 * W);
  while (hi <= w.limit_max_seq_len() && fits(hi)) lo = hi, hi *= 2;
  if (hi > w.limit_max_seq_len()) return lo;
  while (hi - lo > std::max<int64_t>(lo / 16, 64 * W)) {  // to 1/16 of the answer
    const int64_t mid = models::admissible_length(config, layout_for(method), W, (lo + hi) / 2);
    if (mid >= hi) break;
    if (fits(mid)) lo = mid; else hi = mid;
  }
  return lo;
}

int run(int argc, char** argv) {
  std::string sweep_path, out_dir = "results/bench";
  bool lasp2_paper = false;
  CLI::App app{"loom-bench: scaling sweeps of Loom's sequence-parallel methods (launch with mpirun)"};
  auto* sweep_option = app.add_option("--sweep", sweep_path, "Sweep file (protobuf text, BenchSweep)");
  app.add_option("--out", out_dir, "Output folder");
  auto* paper_flag = app.add_flag("--lasp2-paper", lasp2_paper,
                                  "Print the cost model against the LASP-2 paper's figures (no sweep) and exit");
  sweep_option->excludes(paper_flag);
  try {
    app.parse(argc, argv);
    if (!lasp2_paper && sweep_path.empty()) throw CLI::RequiredError("--sweep");
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  auto world = MpiCommunicator::world();
  const bool root = world->rank() == 0;
  if (lasp2_paper) {
    if (root) std::cout << lasp2_paper_report();
    return 0;
  }
  const pb::BenchSweep w = load_sweep(sweep_path, world->size());
  at::set_num_threads(w.threads());
  MemoryTracker::install();
  if (root) std::filesystem::create_directories(out_dir);
  const auto start = Clock::now();

  const Network net = measure_network(*world);
  Shape shape;
  shape.batch = w.batch();
  shape.heads = shape.kv_heads = w.heads();
  shape.head_dim = w.head_dim();
  shape.element_bytes = c10::elementSize(dtype_of(w));
  shape.concurrency = std::max(1, static_cast<int>(std::thread::hardware_concurrency()) / w.threads());
  if (root)
    std::printf("network (ping-pong, this machine): alpha %.2f us, beta %.2f GB/s\n", net.alpha_s * 1e6,
                net.beta_bytes_per_s / 1e9);

  std::vector<int> worlds(w.world_sizes().begin(), w.world_sizes().end());
  if (worlds.empty()) worlds.push_back(world->size());
  std::vector<int64_t> doc_means{0};  // flat rows always: the baseline of packed ones
  for (int64_t mean : w.document_lengths())
    if (mean > 0) doc_means.push_back(mean);
  std::vector<Point> points;
  for (int W : worlds) {
    const bool in = world->rank() < W;
    auto sub = world->split(in ? 0 : -1, world->rank());
    if (in) {
      auto comm = TimedCommunicator::create(sub);
      auto self = TimedCommunicator::create(sub->split(sub->rank(), 0));
      for (const auto& sname : w.subjects())
        for (const auto& mname : w.methods()) {
          const Subject s = parse_subject(sname);
          const Method m = parse_method(mname);
          if (!applies(s, m) || !runs_at(m, W)) continue;
          // Head-parallel methods split the layer subjects' heads over the group: skipped, and said, where
          // they cannot (the tiny model's own head count is checked by the model, as a ConfigError).
          if (s != Subject::kTinyModel && ulysses_degree(m, W) > 0 && w.heads() % ulysses_degree(m, W) != 0) {
            if (root)
              std::printf("W=%d %-13s %-15s skipped: heads = %d do not divide among its all-to-all group of %d\n", W,
                          subject_name(s), method_name(m), int(w.heads()), ulysses_degree(m, W));
            continue;
          }
          if (m == Method::kNone && W != worlds.front()) continue;  // one rank: once
          for (int64_t n : w.seq_lens())
            for (int64_t doc_mean : doc_means) {
              Point p;
              if (m == Method::kNone) {
                if (sub->rank() == 0) p = run_point(w, s, m, n, self, net, doc_mean);
                sub->barrier()->wait();
                if (sub->rank() != 0) continue;
              } else {
                p = run_point(w, s, m, n, comm, net, doc_mean);
              }
              p.fwd_bytes_formula = forward_bytes_formula(s, m, shape, p.n, p.world, p.doc_mean > 0);
              if (root) {
                std::printf("W=%d %-13s %-15s N=%-7ld docs %-6ld %9.2f ms [%.2f, %.2f] %10.0f tok/s %8.1f MiB fwd %9ld B "
                            "(formula %9ld)\n",
                            p.world, subject_name(s), method_name(m), long(p.n), long(p.documents), p.median_s * 1e3,
                            p.min_s * 1e3, p.max_s * 1e3, p.tokens_per_s, p.peak_bytes / 1048576.0, long(p.fwd_bytes),
                            long(p.fwd_bytes_formula));
                std::fflush(stdout);
              }
              points.push_back(p);
            }
        }
    }
    world->barrier()->wait();
  }

  // Limits study.
  std::vector<std::tuple<std::string, int64_t, std::vector<std::pair<int64_t, int64_t>>>> limits;
  for (const auto& mname : w.limit_methods()) {
    const Method m = parse_method(mname);
    auto comm = TimedCommunicator::create(m == Method::kNone ? world->split(world->rank(), 0) : world);
    std::vector<std::pair<int64_t, int64_t>> trials;
    const int64_t best = limits_search(w, m, comm, trials);
    limits.emplace_back(mname, best, trials);
    if (root) std::printf("limits: %-15s longest tiny-model sequence under %.1f MiB per rank: %ld tokens (%zu trials)\n",
                          mname.c_str(), w.memory_cap_bytes() / 1048576.0, long(best), trials.size());
  }
  if (!root) return 0;

  // Cost model: calibrate on everything, report each point's error.
  std::vector<Observation> obs;
  for (const auto& p : points)
    if (p.doc_mean == 0) obs.push_back({p.subject, p.method, p.world, p.n, p.median_s});
  CostModel model(shape, net);
  model.calibrate(obs);
  std::ofstream jsonl(out_dir + "/results.jsonl"), csv(out_dir + "/results.csv"), report(out_dir + "/report.txt");
  csv << "world,subject,method,seq_len,doc_mean,documents,median_s,min_s,max_s,tokens_per_s,peak_bytes,fwd_bytes,fwd_bytes_formula,"
         "bytes,calls,compute_s,transfer_s,waiting_s,predicted_s,error\n";
  double worst = 0;
  report << "loom-bench " << sweep_path << ": " << points.size() << " points, measured on this machine\n"
         << "network (measured): alpha " << net.alpha_s * 1e6 << " us, beta " << net.beta_bytes_per_s / 1e9 << " GB/s\n\n"
         << "compute concurrency: " << shape.concurrency << " ranks at once (cores / threads per rank)\n"
         << "cost model (calibrated from this run's flat rows) vs measured:\n";
  for (auto& p : points) {
    p.predicted_s = model.predict(p.subject, p.method, p.n, p.world);
    const double err = p.predicted_s / p.median_s - 1;
    jsonl << json_line(p) << "\n";
    csv << p.world << ',' << subject_name(p.subject) << ',' << method_name(p.method) << ',' << p.n << ','
        << p.doc_mean << ',' << p.documents << ',' << p.median_s << ',' << p.min_s << ',' << p.max_s << ',' << p.tokens_per_s << ',' << p.peak_bytes << ','
        << p.fwd_bytes << ',' << p.fwd_bytes_formula << ',' << p.bytes << ',' << p.calls << ',' << p.compute_s << ','
        << p.transfer_s << ',' << p.waiting_s << ',' << p.predicted_s << ',' << err << "\n";
    if (p.doc_mean != 0) continue;  // packed rows: compared with flat ones below
    worst = std::max(worst, std::abs(err));
    char line[256];
    std::snprintf(line, sizeof line, "  W=%d %-13s %-15s N=%-7ld measured %9.2f ms predicted %9.2f ms error %+6.1f%%%s\n",
                  p.world, subject_name(p.subject), method_name(p.method), long(p.n), p.median_s * 1e3,
                  p.predicted_s * 1e3, 100 * err, p.fwd_bytes == p.fwd_bytes_formula || p.fwd_bytes_formula == 0 ? "" : "  BYTES != FORMULA");
    report << line;
  }
  report << "fitted per (subject, world): time = c + a tokens^p + b pairs/1e6 + comm\n";
  std::set<std::pair<int, int>> groups;
  for (const auto& p : points) groups.insert({static_cast<int>(p.subject), p.world});
  for (const auto& [s, world] : groups) {
    const auto& f = model.fit(static_cast<Subject>(s), world);
    char line[200];
    std::snprintf(line, sizeof line, "  %-13s W=%d: c %.3g s, a %.3g s, p %.2f, b %.3g s\n",
                  subject_name(static_cast<Subject>(s)), world, f.coef[0], f.coef[1], f.exponent, f.coef[2]);
    report << line;
  }
  char worst_line[128];
  std::snprintf(worst_line, sizeof worst_line, "largest cost-model error: %.1f%% (target: within 25%%)\n\n", 100 * worst);
  report << worst_line;

  // Packed documents against flat rows of the same points (tokens per step).
  if (w.document_lengths_size() > 0) {
    std::map<std::tuple<int, int, int, int64_t>, const Point*> flat;
    for (const auto& p : points)
      if (p.doc_mean == 0) flat[{p.world, int(p.subject), int(p.method), p.n}] = &p;
    report << "packed documents vs flat rows (same tokens per step; time = median forward+backward over the\n"
           << "repetitions, max over ranks: on a shared or oversubscribed machine read ratios near 1 as equal; bytes per\n"
           << "rank are exact):\n";
    for (const auto& p : points) {
      if (p.doc_mean == 0) continue;
      const auto it = flat.find({p.world, int(p.subject), int(p.method), p.n});
      if (it == flat.end()) continue;
      const Point& f = *it->second;
      char line[320];
      std::snprintf(line, sizeof line,
                    "  W=%d %-13s %-15s N=%-7ld mean doc %-6ld (%5ld docs): time x%.2f (%.2f vs %.2f ms), fwd bytes "
                    "%ld vs %ld, all bytes %ld vs %ld%s\n",
                    p.world, subject_name(p.subject), method_name(p.method), long(p.n), long(p.doc_mean),
                    long(p.documents), p.median_s / f.median_s, p.median_s * 1e3, f.median_s * 1e3, long(p.fwd_bytes),
                    long(f.fwd_bytes), long(p.bytes), long(f.bytes),
                    p.doc_mean >= p.n ? " (mean >= N: mostly one document per row, a flat row's work)" : "");
      report << line;
    }
    report << "\n";
  }

  // Projections.
  std::ofstream proj(out_dir + "/projections.csv");
  // `mixer`: the projected model's attention layers (the last column: readers go by name).
  proj << "cluster,world,seq_len,method,seconds,tokens_per_s,compute_s,exposed_comm_s,mixer\n";
  if (!w.clusters().empty()) {
    pb::ModelConfig user;
    user.set_preset(w.projection_model_preset());
    const auto mc = models::resolve_model_config(user);
    ProjectedModel pm;
    pm.layers = mc.pattern().size();
    pm.heads = mc.n_heads();
    pm.kv_heads = mc.n_kv_heads() > 0 ? mc.n_kv_heads() : mc.n_heads();
    pm.head_dim = mc.d_model() / mc.n_heads();
    pm.params_non_embedding = models::count_parameters(mc) - mc.vocab_size() * mc.d_model() * (mc.tie_embeddings() ? 1 : 2);
    report << "projections (cost model with the constants stated in the sweep; not measured): "
           << w.projection_model_preset() << ", " << pm.layers << " layers, bf16, one sequence per step\n"
           << "Loom's own methods, not the paper's baselines (those follow below, as the paper ran them):\n"
           << "assumptions: ring AllGather of states (W-1 messages each way), LASP-2 overlaps it with the intra-chunk\n"
           << "compute, LASP-1 cannot overlap (serial chain), ring attention passes K,V chunks (3(W-1) messages fwd+bwd)\n"
           << "overlapping each step with that step's attention compute (Loom's ring computes linear layers in the\n"
           << "right-product form); dense compute 6 P N / W at compute_flops.\n";
    for (const auto& c : w.clusters())
      for (int W : w.projection_world_sizes())
        for (int64_t n : w.projection_seq_lens()) {
          const Projection l2 = project(Method::kLasp2, pm, c, n, W), l1 = project(Method::kLasp1, pm, c, n, W),
                           ring = project(Method::kRingZigzag, pm, c, n, W);
          for (auto [m, pr] : {std::pair{Method::kLasp2, l2}, std::pair{Method::kLasp1, l1}, std::pair{Method::kRingZigzag, ring}})
            proj << c.name() << ',' << W << ',' << n << ',' << method_name(m) << ',' << pr.seconds << ','
                 << n / pr.seconds << ',' << pr.compute_s << ',' << pr.exposed_comm_s << ",linear_layer\n";
          char line[320];
          std::snprintf(line, sizeof line,
                        "  %-12s W=%-4d N=%5ldK: Loom's LASP-2 %8.0f tok/s, faster than Loom's ring by %6.1f%%, "
                        "than Loom's LASP-1 by %5.1f%%\n",
                        c.name().c_str(), W, long(n / 1024), n / l2.seconds, 100 * (ring.seconds / l2.seconds - 1),
                        100 * (l1.seconds / l2.seconds - 1));
          report << line;
        }
    // The paper's own baselines as it ran them, with the constants stated (the
    // sweep's clusters do not enter: the paper ran on DGX-A100 nodes).
    report << lasp2_paper_report();
    // The same model with GLA or Gated DeltaNet layers in place of its linear
    // ones: LASP-2 against the chain and the all-gather K,V baseline.
    std::set<Subject> gated_subjects;
    for (const auto& sname : w.subjects())
      if (gated_recurrent(parse_subject(sname))) gated_subjects.insert(parse_subject(sname));
    if (!gated_subjects.empty())
      report << "the same model with every linear layer a GLA / Gated DeltaNet layer (same heads, d_k = d_v = "
             << pm.head_dim << "; Gated DeltaNet blocks of " << gated_delta::kGatedDeltaReferenceBlock
             << ", maps exchanged in float32): LASP-2 overlaps its exchange with the query side, the chain\n"
             << "cannot, all-gather K,V moves k, v and the gates of every token (W-1 messages, then the gradients\n"
             << "back) and its last rank runs the kernel over all N tokens:\n";
    for (Subject mixer : gated_subjects) {
      ProjectedModel gm = pm;
      gm.mixer = mixer;
      if (mixer == Subject::kGatedDeltaLayer) gm.block = gated_delta::kGatedDeltaReferenceBlock;
      for (const auto& c : w.clusters())
        for (int W : w.projection_world_sizes())
          for (int64_t n : w.projection_seq_lens()) {
            const Projection l2 = project(Method::kLasp2, gm, c, n, W), scan = project(Method::kLasp2AllScan, gm, c, n, W),
                             l1 = project(Method::kLasp1, gm, c, n, W), ag = project(Method::kAllGather, gm, c, n, W);
            for (auto [m, pr] : {std::pair{Method::kLasp2, l2}, std::pair{Method::kLasp2AllScan, scan},
                                 std::pair{Method::kLasp1, l1}, std::pair{Method::kAllGather, ag}})
              proj << c.name() << ',' << W << ',' << n << ',' << method_name(m) << ',' << pr.seconds << ','
                   << n / pr.seconds << ',' << pr.compute_s << ',' << pr.exposed_comm_s << ',' << subject_name(mixer)
                   << "\n";
            char line[320];
            std::snprintf(line, sizeof line,
                          "  %-17s %-12s W=%-4d N=%5ldK: LASP-2 %8.0f tok/s (comm exposed %5.1f%%); time vs LASP-2: "
                          "all-scan %+6.1f%%, chain %+6.1f%%, all-gather K,V %+7.1f%%\n",
                          subject_name(mixer), c.name().c_str(), W, long(n / 1024), n / l2.seconds,
                          100 * l2.exposed_comm_s / l2.seconds, 100 * (scan.seconds / l2.seconds - 1),
                          100 * (l1.seconds / l2.seconds - 1), 100 * (ag.seconds / l2.seconds - 1));
            report << line;
          }
    }
  }
  // Head-parallel methods: Ulysses and USP against the ring, on the same model
  // with every layer softmax attention, and LINEAR_ULYSSES on the linear model.
  // Projected whenever the sweep has one of them: all degrees (U = 8 is one node).
  std::set<Method> head_methods;
  for (const auto& mname : w.methods())
    if (ulysses_degree(parse_method(mname), 2) > 0)
      head_methods = {Method::kUlysses, Method::kUsp2, Method::kUsp4, Method::kUsp8};
  if (!w.clusters().empty() && !head_methods.empty()) {
    pb::ModelConfig user;
    user.set_preset(w.projection_model_preset());
    const auto mc = models::resolve_model_config(user);
    ProjectedModel sm;
    sm.layers = mc.pattern().size();
    sm.heads = mc.n_heads();
    sm.kv_heads = mc.n_kv_heads() > 0 ? mc.n_kv_heads() : mc.n_heads();
    sm.head_dim = mc.d_model() / mc.n_heads();
    sm.params_non_embedding = models::count_parameters(mc) - mc.vocab_size() * mc.d_model() * (mc.tie_embeddings() ? 1 : 2);
    ProjectedModel lm = sm;
    sm.mixer = Subject::kSoftmaxLayer;
    report << "head-parallel methods (the same model, " << sm.heads << " query / " << sm.kv_heads
           << " KV heads): all-to-alls not overlapped, G-1 pairwise rounds each at the link it crosses; inside a node\n"
           << "of ranks_per_node at intra_latency_s / intra_bandwidth_bytes_per_s, across nodes at latency_s /\n"
           << "bandwidth_bytes_per_s (the cluster lines of the sweep); uspU: all-to-all inside groups of U consecutive\n"
           << "ranks (U = 8 = one node), zigzag ring across the W/U groups at the inter-node constants, each K,V step\n"
           << "overlapping 1/R of the attention; ring_zigzag: 3(W-1) K,V steps across nodes. Softmax layers: causal,\n"
           << "14 d FLOPs per query-key pair; linear layers: LINEAR_ULYSSES over all W ranks vs LASP-2.\n";
    for (const auto& c : w.clusters()) {
      report << "  " << c.name() << ": ranks_per_node " << c.ranks_per_node() << ", intra " << c.intra_latency_s() * 1e6
             << " us / " << c.intra_bandwidth_bytes_per_s() / 1e9 << " GB/s, inter " << c.latency_s() * 1e6 << " us / "
             << c.bandwidth_bytes_per_s() / 1e9 << " GB/s per GPU, " << c.compute_flops() / 1e12 << " TFLOP/s\n";
      for (int W : w.projection_world_sizes())
        for (int64_t n : w.projection_seq_lens()) {
          const Projection ring = project(Method::kRingZigzag, sm, c, n, W);
          proj << c.name() << ',' << W << ',' << n << ",ring_zigzag," << ring.seconds << ',' << n / ring.seconds << ','
               << ring.compute_s << ',' << ring.exposed_comm_s << ",softmax_layer\n";
          std::ostringstream line;
          char head[200];
          std::snprintf(head, sizeof head, "  softmax_layer %-12s W=%-4d N=%5ldK: ring %8.0f tok/s (comm exposed %5.2f%%)",
                        c.name().c_str(), W, long(n / 1024), n / ring.seconds, 100 * ring.exposed_comm_s / ring.seconds);
          line << head;
          for (Method m : head_methods) {
            if (!head_parallel_possible(m, sm, W)) {
              line << "; " << method_name(m) << " not possible (" << sm.heads << " heads, group of "
                   << ulysses_degree(m, W) << ")";
              continue;
            }
            const Projection pr = project(m, sm, c, n, W);
            proj << c.name() << ',' << W << ',' << n << ',' << method_name(m) << ',' << pr.seconds << ','
                 << n / pr.seconds << ',' << pr.compute_s << ',' << pr.exposed_comm_s << ",softmax_layer\n";
            char part[160];
            std::snprintf(part, sizeof part, "; %s %+.2f%% vs ring (exposed %.2f%%)", method_name(m),
                          100 * (pr.seconds / ring.seconds - 1), 100 * pr.exposed_comm_s / pr.seconds);
            line << part;
          }
          report << line.str() << "\n";
          if (head_methods.count(Method::kUlysses)) {
            const Projection l2 = project(Method::kLasp2, lm, c, n, W);
            char part[240];
            if (head_parallel_possible(Method::kUlysses, lm, W)) {
              const Projection u = project(Method::kUlysses, lm, c, n, W);
              proj << c.name() << ',' << W << ',' << n << ",ulysses," << u.seconds << ',' << n / u.seconds << ','
                   << u.compute_s << ',' << u.exposed_comm_s << ",linear_layer\n";
              std::snprintf(part, sizeof part, "  linear_layer  %-12s W=%-4d N=%5ldK: LINEAR_ULYSSES %+.2f%% vs LASP-2\n",
                            c.name().c_str(), W, long(n / 1024), 100 * (u.seconds / l2.seconds - 1));
            } else {
              std::snprintf(part, sizeof part,
                            "  linear_layer  %-12s W=%-4d N=%5ldK: LINEAR_ULYSSES not possible (%ld heads over %d ranks)\n",
                            c.name().c_str(), W, long(n / 1024), long(lm.heads), W);
            }
            report << part;
          }
        }
    }
  }
  std::ofstream lim(out_dir + "/limits.csv");
  lim << "method,longest_seq_len,memory_cap_bytes,trial_seq_len,trial_peak_bytes\n";
  for (const auto& [m, best, trials] : limits)
    for (const auto& [n, peak] : trials) lim << m << ',' << best << ',' << w.memory_cap_bytes() << ',' << n << ',' << peak << "\n";
  report.close();
  std::cout << "\n" << std::ifstream(out_dir + "/report.txt").rdbuf();
  // Plots (gnuplot, when installed).
  const std::string plot = std::string(LOOM_SOURCE_DIR) + "/benchmarks/plot_bench.sh";
  const int rc = std::system(("bash '" + plot + "' '" + out_dir + "'").c_str());
  std::printf("plots: %s\nwrote %s/{results.jsonl,results.csv,projections.csv,limits.csv,report.txt} in %.0f s\n",
              rc == 0 ? "written" : "not written (gnuplot missing?)", out_dir.c_str(), since(start));
  return 0;
}

}  // namespace
}  // namespace loom::bench

int main(int argc, char** argv) {
  try {
    loom::MpiEnvironment mpi(&argc, &argv);
    try {
      return loom::bench::run(argc, argv);
    } catch (const loom::ConfigError& e) {
      std::cerr << "loom-bench: " << e.what() << std::endl;
      return 2;  // every rank read the same sweep
    } catch (const std::exception& e) {
      std::cerr << "loom-bench: error: " << e.what() << std::endl;
      MPI_Abort(MPI_COMM_WORLD, 1);
    }
  } catch (const std::exception& e) {
    std::cerr << "loom-bench: " << e.what() << std::endl;
  }
  return 1;
}
