// The alpha-beta cost model of loom-bench.
//
//   time(point) = c + a * linear_units^p + b * quadratic_units + comm(method)
//   comm = messages x (alpha + message_bytes / beta), fwd + bwd
//
// linear_units are tokens on the slowest rank (N/W, padded chunks), quadratic
// units the causal query-key pairs on the slowest rank / 1e6; c (per-step
// overhead), a and b are fitted per (subject, world size) by non-negative
// least squares over all lengths and methods of the run, p in [1, 1.5] by a
// grid search (calibrate()); alpha and beta come from the run's
// ping-pong micro-benchmark. Bytes formulas are the per-rank forward
// receive volumes of ../shared/REFERENCES.md, in Loom's accounting (bytes that
// arrive at the busiest rank). project() applies the same structure to a
// cluster's constants (compute FLOP/s, network alpha/beta) for a large model.
#pragma once

#include <array>
#include <map>
#include <string>
#include <utility>
#include <vector>

#include "benchmarks/sweep.h"

namespace loom::bench {

struct Shape {
  int64_t batch = 1, heads = 4, kv_heads = 4, head_dim = 64;
  int64_t element_bytes = 4;
  int concurrency = 1 << 30;  // ranks that can compute at once (cores / threads per rank)
};

struct Network {
  double alpha_s = 0;               // per message
  double beta_bytes_per_s = 1e9;    // per direction
};

// Forward bytes received by the busiest rank; `zigzag` layouts hold 2 chunks.
// GLA and Gated DeltaNet layers (d_k = d_v = head_dim) run their LASP methods
// and their all-gather baseline on the contiguous layout (one chunk per rank):
//   GLA           LASP-2 (W-1) B H (d_k d_v + 1) b (a state and a decay per
//                 chunk), all-scan B H (d_k d_v + 1) b, chain B H d_k d_v b;
//   Gated DeltaNet LASP-2 (W-1) B H (d_k^2 + d_k d_v) b' (each chunk's affine
//                 map), all-scan B H (d_k^2 + d_k d_v) b', chain B H d_k d_v b',
//                 b' = max(b, 4) (bf16 runs in float32, gated_delta.h);
//   allgather     (W-1) (N/W) B H (d_k + d_v + g) b: k, v and g gates per token
//                 (GLA g = 1, Gated DeltaNet g = 2: beta and alpha).
// Every one is independent of N except the all-gather baseline's.
int64_t forward_bytes_formula(Subject subject, Method method, const Shape& s, int64_t n_tokens, int world);
// With the head-parallel methods too (every rank moves the same bytes; n the
// rank's padded tokens, b the element size, b' = max(b, 4) the accumulation
// dtype of the lse, f = U / gcd(U, H_kv) the KV heads' repetition):
//   ulysses (softmax, U = W)  (U-1) B (H/U) n (4 d b + b') when f = 1: q, k, v
//                             out and lse, (U-1)/U of each ((H + 2 f H_kv)/U d
//                             b for q, k, v in general);
//   uspU (softmax, R = W/U)   the same inside the group of U, plus the ring's
//                             2 B f H_kv n d b (K,V of the group's n U
//                             tokens, H f H_kv / U heads);
//   ulysses (linear, GLA, Gated DeltaNet; U = W)  (W-1) B (H/W) n (4 d + g) b,
//                             g gates per token (0, 1, 2);
// `packed_documents` adds the document starts gathered in the group,
// (U-1) B n 8 bytes. Other methods ignore it (their bytes do not change).
int64_t forward_bytes_formula(Subject subject, Method method, const Shape& s, int64_t n_tokens, int world,
                              bool packed_documents);
// Messages and bytes per message of one forward+backward on the critical path
// (the first form: linear and softmax layers, which differ by method only).
std::pair<int64_t, int64_t> critical_messages(Method method, const Shape& s, int64_t n_tokens, int world);
std::pair<int64_t, int64_t> critical_messages(Subject subject, Method method, const Shape& s, int64_t n_tokens,
                                              int world);
double comm_seconds(Subject subject, Method method, const Shape& s, int64_t n_tokens, int world, const Network& net);
// Work that bounds the step: {tokens, causal pairs / 1e6} of the slowest rank,
// or of the whole sequence divided by `concurrency` when ranks outnumber the
// cores (oversubscribed ranks share cores, so the total work is what counts).
// The all-gather baseline of GLA / Gated DeltaNet runs the kernel on the
// prefix up to its own chunk: N tokens on the last rank, N (W+1)/2 in all.
std::pair<double, double> work_units(Subject subject, Method method, int64_t n_tokens, int world,
                                     int concurrency = 1 << 30);

struct Observation {
  Subject subject;
  Method method;
  int world;
  int64_t n_tokens;
  double measured_s;
};

class CostModel {
 public:
  CostModel(Shape shape, Network net) : shape_(shape), net_(net) {}
  // Fits (a, b) per (subject, world) from the observations.
  void calibrate(const std::vector<Observation>& observations);
  double predict(Subject subject, Method method, int64_t n_tokens, int world) const;
  struct Fit {
    std::array<double, 3> coef{0, 0, 0};  // c, a, b
    double exponent = 1;                  // p
  };
  const Fit& fit(Subject subject, int world) const;
  const Network& network() const { return net_; }

 private:
  Shape shape_;
  Network net_;
  std::map<std::pair<int, int>, Fit> fits_;
};

// Projection of a model step (one sequence of n_tokens over `world` ranks) on
// a cluster: dense compute 6 P N / W, linear-attention compute per layer, and
// each method's exposed communication per layer (LASP-2's AllGather overlaps
// the intra-chunk compute; LASP-1's chain is serial; ring attention passes K,V
// chunks, overlapping each step with that step's compute).
struct Projection {
  double seconds = 0, compute_s = 0, exposed_comm_s = 0;
  double tokens_per_s() const { return seconds > 0 ? 1.0 / seconds : 0; }
};
// `mixer`: what every attention layer is: kLinearLayer (Lightning-2 linear
// attention), kGlaLayer or kGatedDeltaLayer (d_k = d_v = head_dim), or
// kSoftmaxLayer (causal softmax attention: ring and the head-parallel methods). For the
// gated layers kAllGather is the all-gather K,V baseline: k, v and the gates of
// the whole sequence gathered (W-1 messages) and their gradients
// reduce-scattered back, nothing overlapped, and the last rank runs the
// kernel over all N tokens. Gated DeltaNet's LASP-2 overlaps its exchange
// with the query side of its blocks (Q K^T, Mq U0, Mq W), computed while the
// maps fly; its payload is float32 whatever element_bytes.
struct ProjectedModel {
  int64_t layers = 16, params_non_embedding = 0, heads = 16, kv_heads = 16, head_dim = 64, element_bytes = 2;
  int64_t block = 256;
  Subject mixer = Subject::kLinearLayer;
};
// Head-parallel methods (kUlysses, kUsp2/4/8): the all-to-alls are not
// overlapped; an all-to-all over G consecutive ranks is G-1 pairwise rounds of
// 1/G of the tensor, each at the constants of the link it crosses (the
// cluster's intra_* inside a node of ranks_per_node, latency_s /
// bandwidth_bytes_per_s across nodes). Softmax models (mixer kSoftmaxLayer):
// q, k, v, out and lse forward, dout and dq, dk, dv backward; USP's ring
// across the W/U groups passes K,V of n/W tokens x the group's heads
// (3 messages, each overlapping 1/R of the attention compute) at the
// inter-node constants when W spans nodes. Linear models: LINEAR_ULYSSES over
// all W ranks, q, k, v (+ gates) and out, forward and backward. A method whose
// all-to-all group does not divide the heads (or USP for a linear model) is
// not possible: head_parallel_possible() says so, project() throws ConfigError.
bool head_parallel_possible(Method method, const ProjectedModel& model, int world);
// FLOPs of one attention layer's forward+backward per head over `tokens`
// (softmax: causal, 14 d per query-key pair: 4 d forward, 10 d backward).
double projected_attention_flops(const ProjectedModel& model, int64_t tokens);
Projection project(Method method, const ProjectedModel& model, const pb::ClusterConstants& cluster,
                   int64_t n_tokens, int world);

// ---------------------------------------------------------------------------
// The LASP-2 paper's setting, its baselines modelled as the paper ran them
// (arXiv 2502.07563, section 4 and appendix A.5; benchmarks/README.md,
// "Cost model against the LASP-2 paper"). Called by loom-bench
// (--lasp2-paper, and the projections section of every report) and by
// tests/bench_test.cc, which holds the reproduced figures to a 25% band.
//
// Step time of one sequence of N tokens over W ranks (batch 1, SP = W):
//   step = fixed_step_s + dense + attention kernel + method's own extra
// dense = 6 (L P_layer + V D) N/W FLOPs (Linear-MoE's layer: q, k, v, an
// output gate and o of D x D each, SwiGLU D x F x 3; the LM head V x D) and
// the chunk's linear attention kernel (chunked_linear_attention_flops at the
// kernels' block, 32 heads for q, k and v), both at sustained_flops.
//   LASP-2 (Linear-MoE lasp2 op): one AllGather of the float32 states before
//     the kernel, forward and backward, not overlapped: 2 L ring AllGathers.
//   LASP-1 (the public LASP code, lasp_fuse_parallel): each layer's forward
//     starts with a barrier, then blocking recv -> the whole local kernel ->
//     send, so the W chunks' forward kernels run one after another and the
//     barrier stops layers from pipelining; the backward chain (recv dKV ->
//     kernel -> send, no barrier) pipelines across layers, so it costs its
//     W-1 serial kernels once. Extra over LASP-2:
//       L [(W-1) t_fwd(N/W) + chain] + (W-1) t_bwd(N/W) + chain - 2 L AllGather.
//   Ring attention "without the right-product kernel trick" (the paper's
//     words): K,V chunks around the ring, each (query chunk, key chunk) pair in
//     the left-product form, 4 C^2 d FLOPs per head forward (Q K^T, then times
//     V) and 8 C^2 d backward (dV, dP, dQ, dK); contiguous causal chunks, so the
//     last rank has W pairs, each ring step overlapping its K,V transfer.
// Links: inside a node of ranks_per_node at nvlink_*, across nodes at ib_*;
// a ring or chain over W > ranks_per_node ranks crosses nodes, and a ring
// step runs at its slowest link. fixed_step_s is the paper's own step at 2K
// tokens (Table 6: 1.59-1.70 s at 16-128 GPUs), where the model's work is
// under 1% of it: optimizer, gradient reduction and framework costs the paper
// does not break down.
struct PaperHardware {
  double peak_flops = 312e12;       // A100 SXM bf16 dense peak
  double sustained_flops = 150e12;  // matmuls and Triton attention kernels: 48% of peak
  int ranks_per_node = 8;           // DGX-A100
  double nvlink_latency_s = 2e-6, nvlink_bytes_per_s = 300e9;  // NVSwitch, per direction (600 GB/s both)
  double ib_latency_s = 5e-6, ib_bytes_per_s = 25e9;           // one HDR 200 Gb/s HCA per GPU
  double fixed_step_s = 1.65;
};
// Linear-Llama3-1B as Linear-MoE builds it (layer type list of 16 'L').
struct PaperModel {
  int64_t layers = 16, d_model = 2048, heads = 32, head_dim = 64, d_ff = 8192, vocab = 128256;
  int64_t element_bytes = 2;  // bf16 activations (K,V blocks)
  int64_t state_bytes_per_element = 4;  // both LASP codes keep and send the d x d states in float32
  int64_t block = 256;  // BLOCK of the LASP and lasp2 kernels for chunks over 128 tokens
};
enum class PaperMethod { kLasp2, kLasp1, kRing };
const char* paper_method_name(PaperMethod m);

struct PaperStep {
  double seconds = 0, fixed_s = 0, compute_s = 0, extra_s = 0;  // seconds = fixed + compute + extra
  double tokens_per_s = 0;
};
// Dense FLOPs per token, forward+backward: 6 (L (5 D^2 + 3 D F) + V D).
double paper_dense_flops_per_token(const PaperModel& m);
// The d x d states of every head, as sent: H d^2 x state_bytes_per_element.
double paper_state_bytes(const PaperModel& m);
// K and V of `tokens` tokens, as the ring passes them: 2 tokens H d b.
double paper_kv_bytes(const PaperModel& m, double tokens);
// One (query chunk, key chunk) pair of C tokens in the left-product form,
// forward+backward, all heads: 12 C^2 d H.
double paper_ring_pair_flops(const PaperModel& m, double chunk);
// A ring AllGather of `bytes` per rank over W ranks: W-1 steps at the slowest
// link of the ring; a chain (W-1 point-to-point hops, one after another) pays
// each hop at its own link: W/ranks_per_node - 1 hops cross nodes.
double paper_allgather_seconds(const PaperHardware& hw, int world, double bytes);
double paper_chain_seconds(const PaperHardware& hw, int world, double bytes);
PaperStep paper_step(PaperMethod method, const PaperModel& m, const PaperHardware& hw, int64_t n_tokens, int world);

// One figure of the paper next to the model's.
struct PaperFigure {
  std::string what;      // "LASP-2 over LASP-1, 2048K, 64 GPUs"
  std::string unit;      // "%" (throughput gain) or "tokens/s"
  double paper = 0, model = 0;
  bool reproduced() const;  // model within 25% of paper
  double error() const { return paper != 0 ? model / paper - 1 : 0; }
};
// Every figure the model is compared with: the four gaps of section 4.2 and
// Table 6's rows at 64 and 128 GPUs from 512K (its 2048K / 128 GPU row among them).
std::vector<PaperFigure> lasp2_paper_figures(const PaperModel& m = {}, const PaperHardware& hw = {});
// The report: the figures as a table with the constants and, for the ring,
// the extra time the paper's gap implies next to the least time its K,V
// traffic can take.
std::string lasp2_paper_report(const PaperModel& m = {}, const PaperHardware& hw = {});

}  // namespace loom::bench
