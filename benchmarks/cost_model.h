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

}  // namespace loom::bench
