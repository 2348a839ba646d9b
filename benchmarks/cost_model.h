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
// attention), kGlaLayer or kGatedDeltaLayer (d_k = d_v = head_dim). For the
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
// FLOPs of one attention layer's forward+backward per head over `tokens`.
double projected_attention_flops(const ProjectedModel& model, int64_t tokens);
Projection project(Method method, const ProjectedModel& model, const pb::ClusterConstants& cluster,
                   int64_t n_tokens, int world);

}  // namespace loom::bench
