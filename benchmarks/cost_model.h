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
int64_t forward_bytes_formula(Subject subject, Method method, const Shape& s, int64_t n_tokens, int world);
// Messages and bytes per message of one forward+backward on the critical path.
std::pair<int64_t, int64_t> critical_messages(Method method, const Shape& s, int64_t n_tokens, int world);
double comm_seconds(Subject subject, Method method, const Shape& s, int64_t n_tokens, int world, const Network& net);
// Work that bounds the step: {tokens, causal pairs / 1e6} of the slowest rank,
// or of the whole sequence divided by `concurrency` when ranks outnumber the
// cores (oversubscribed ranks share cores, so the total work is what counts).
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
struct ProjectedModel {
  int64_t layers = 16, params_non_embedding = 0, heads = 16, kv_heads = 16, head_dim = 64, element_bytes = 2;
  int64_t block = 256;
};
Projection project(Method method, const ProjectedModel& model, const pb::ClusterConstants& cluster,
                   int64_t n_tokens, int world);

}  // namespace loom::bench
