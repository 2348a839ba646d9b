#include "benchmarks/cost_model.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <sstream>

#include "loom/parallel/gated_delta/chunked_kernel.h"
#include "loom/parallel/linear_attention/chunked_kernel.h"
#include "loom/runtime/core/error.h"

namespace loom::bench {
namespace {

bool zigzag(Method m) { return m == Method::kRingZigzag || m == Method::kAllGather || is_usp(m); }
bool head_parallel(Method m) { return m == Method::kUlysses || is_usp(m); }
int64_t chunk_tokens(int64_t n, int world, Method m) {
  const int64_t chunks = world * (zigzag(m) ? 2 : 1);
  return (n + chunks - 1) / chunks;
}
int64_t state_bytes(const Shape& s) { return s.batch * s.heads * s.head_dim * s.head_dim * s.element_bytes; }
int64_t kv_bytes(const Shape& s, int64_t tokens) { return s.batch * 2 * tokens * s.kv_heads * s.head_dim * s.element_bytes; }

// GLA and Gated DeltaNet layers: every method on the contiguous layout.
int64_t gated_payload_element(Subject subject, int64_t element_bytes) {
  return subject == Subject::kGatedDeltaLayer ? std::max<int64_t>(element_bytes, 4) : element_bytes;
}
// What one chunk contributes to LASP-2 / all-scan: GLA (state, decay), Gated DeltaNet (A, B).
int64_t gated_chunk_bytes(Subject subject, const Shape& s) {
  const int64_t d = s.head_dim, per_head = subject == Subject::kGatedDeltaLayer ? d * d + d * d : d * d + 1;
  return s.batch * s.heads * per_head * gated_payload_element(subject, s.element_bytes);
}
int64_t gated_state_bytes(Subject subject, const Shape& s) {
  return s.batch * s.heads * s.head_dim * s.head_dim * gated_payload_element(subject, s.element_bytes);
}
// k, v and the gates of `tokens` tokens (the all-gather baseline's payload).
int64_t gated_inputs_bytes(Subject subject, const Shape& s, int64_t tokens) {
  const int64_t gates = subject == Subject::kGatedDeltaLayer ? 2 : 1;
  return s.batch * s.heads * tokens * (2 * s.head_dim + gates) * s.element_bytes;
}
int64_t per_rank_tokens(int64_t n, int W) { return (n + W - 1) / W; }

int64_t gated_forward_bytes(Subject subject, Method method, const Shape& s, int64_t n, int W) {
  switch (method) {
    case Method::kLasp2: return (W - 1) * gated_chunk_bytes(subject, s);
    case Method::kLasp2AllScan: return gated_chunk_bytes(subject, s);
    case Method::kLasp1: return gated_state_bytes(subject, s);
    case Method::kAllGather: return (W - 1) * gated_inputs_bytes(subject, s, per_rank_tokens(n, W));
    default: return 0;
  }
}

// Head-parallel methods (parallel/softmax_attention/ulysses.h,
// parallel/linear_attention/ulysses.h). Everything below is per rank and
// step; every rank moves the same bytes (no busiest rank).
struct UlyssesTraffic {
  int64_t fwd_bytes = 0, bwd_bytes = 0, messages = 0;
};
// Softmax ULYSSES (U = W) and USP (U < W, R = W/U, zigzag): one all-to-all of
// q, k, v (KV heads repeated f = U / gcd(U, Hkv) times when U does not divide
// them), one of out and one of lse (accumulation dtype, b' = max(b, 4)) forward;
// dout and dq, dk, dv backward; each (U-1)/U of its tensor, in U-1 messages.
// USP's ring: R-1 K,V messages of this rank's n tokens x Hk heads forward,
// R-1 again and R of dK,dV (accumulation dtype) backward.
UlyssesTraffic softmax_ulysses_traffic(Method method, const Shape& s, int64_t n, int W) {
  const int64_t U = ulysses_degree(method, W), R = W / U;
  const int64_t local = chunk_tokens(n, W, method) * (zigzag(method) ? 2 : 1);
  const int64_t hk = s.kv_heads * (U / std::gcd(U, s.kv_heads));
  const int64_t acc = std::max<int64_t>(s.element_bytes, 4);
  const int64_t rows = (U - 1) * s.batch * local;  // received: (U-1)/U of every head, H/U heads a block
  const int64_t qkv = rows * ((s.heads + 2 * hk) / U) * s.head_dim * s.element_bytes;
  const int64_t out = rows * (s.heads / U) * s.head_dim * s.element_bytes;
  const int64_t lse = rows * (s.heads / U) * acc;
  const int64_t kv = 2 * s.batch * hk * local * s.head_dim;  // elements of one ring message
  UlyssesTraffic t;
  t.fwd_bytes = qkv + out + lse + (R - 1) * kv * s.element_bytes;
  t.bwd_bytes = qkv + out + (R > 1 ? (R - 1) * kv * s.element_bytes + R * kv * acc : 0);
  t.messages = 5 * (U - 1) + (R > 1 ? 3 * R - 2 : 0);
  return t;
}
// LINEAR_ULYSSES (contiguous, U = W): q, k, v in one all-to-all, the gates
// (GLA log g; Gated DeltaNet beta and log alpha) in another, out back; the
// same for the gradients backward. Features per token and head: 2 d_k + d_v
// + d_v of out, plus 1 (GLA) or 2 (Gated DeltaNet) gates, all in b.
UlyssesTraffic linear_ulysses_traffic(Subject subject, const Shape& s, int64_t n, int W) {
  const int64_t local = per_rank_tokens(n, W);
  const int64_t gates = subject == Subject::kGatedDeltaLayer ? 2 : subject == Subject::kGlaLayer ? 1 : 0;
  const int64_t features = 4 * s.head_dim + gates;
  UlyssesTraffic t;
  t.fwd_bytes = s.batch * (s.heads / W) * local * (W - 1) * features * s.element_bytes;
  t.bwd_bytes = t.fwd_bytes;
  t.messages = 2 * (gates > 0 ? 3 : 2) * (W - 1);
  return t;
}
UlyssesTraffic ulysses_traffic(Subject subject, Method method, const Shape& s, int64_t n, int W) {
  return subject == Subject::kSoftmaxLayer ? softmax_ulysses_traffic(method, s, n, W)
                                           : linear_ulysses_traffic(subject, s, n, W);
}

}  // namespace

int64_t forward_bytes_formula(Subject subject, Method method, const Shape& s, int64_t n, int W,
                              bool packed_documents) {
  if (W == 1 || method == Method::kNone || subject == Subject::kTinyModel) return 0;
  if (head_parallel(method)) {
    // Packed rows: the document starts (int64, [B, n] per rank) are gathered within the all-to-all group.
    const int64_t U = ulysses_degree(method, W);
    const int64_t local = subject == Subject::kSoftmaxLayer ? chunk_tokens(n, W, method) * (zigzag(method) ? 2 : 1)
                                                            : per_rank_tokens(n, W);
    return ulysses_traffic(subject, method, s, n, W).fwd_bytes + (packed_documents ? (U - 1) * s.batch * local * 8 : 0);
  }
  return forward_bytes_formula(subject, method, s, n, W);
}

int64_t forward_bytes_formula(Subject subject, Method method, const Shape& s, int64_t n, int W) {
  if (W == 1 || method == Method::kNone || subject == Subject::kTinyModel) return 0;
  if (head_parallel(method)) return forward_bytes_formula(subject, method, s, n, W, /*packed_documents=*/false);
  if (gated_recurrent(subject)) return gated_forward_bytes(subject, method, s, n, W);
  const int64_t per_rank_chunks = zigzag(method) ? 2 : 1;
  switch (method) {
    case Method::kLasp2: return (W - 1) * per_rank_chunks * state_bytes(s);  // (W-1) B H dk dv b
    case Method::kLasp2AllScan:  // the (a, M) pair: the state and one decay factor per head
      return state_bytes(s) + s.batch * s.heads * s.element_bytes;
    case Method::kLasp1: return state_bytes(s);  // one state into the busiest rank (r > 0)
    case Method::kRingContiguous:
    case Method::kRingZigzag:
    case Method::kAllGather:  // (W-1)/W 2 N H_kv d b
      return (W - 1) * kv_bytes(s, chunk_tokens(n, W, method) * per_rank_chunks);
    default: return 0;
  }
}

std::pair<int64_t, int64_t> critical_messages(Method method, const Shape& s, int64_t n, int W) {
  if (W == 1 || method == Method::kNone) return {0, 0};
  const int64_t per_rank_chunks = zigzag(method) ? 2 : 1;
  const int64_t kv = kv_bytes(s, chunk_tokens(n, W, method) * per_rank_chunks);
  const int64_t steps = W - 1;
  switch (method) {
    case Method::kLasp2: return {2 * steps, per_rank_chunks * state_bytes(s)};          // ring AllGather fwd + bwd
    case Method::kLasp2AllScan: return {2 * static_cast<int64_t>(std::ceil(std::log2(W))), state_bytes(s)};
    case Method::kLasp1: return {2 * steps, state_bytes(s)};                              // serial chain fwd + bwd
    case Method::kRingContiguous:
    case Method::kRingZigzag: return {3 * steps, kv};  // K,V forward; K,V then dK,dV backward
    case Method::kAllGather: return {2 * steps, kv};   // AllGather forward, reduce-scatter backward
    default: break;
  }
  return {0, 0};
}

std::pair<int64_t, int64_t> critical_messages(Subject subject, Method method, const Shape& s, int64_t n, int W) {
  if (W > 1 && head_parallel(method) && subject != Subject::kTinyModel) {
    // Mixed sizes (all-to-alls, USP's ring): the mean message carries the total.
    const UlyssesTraffic t = ulysses_traffic(subject, method, s, n, W);
    return {t.messages, (t.fwd_bytes + t.bwd_bytes) / t.messages};
  }
  if (!gated_recurrent(subject)) return critical_messages(method, s, n, W);
  if (W == 1 || method == Method::kNone) return {0, 0};
  const int64_t steps = W - 1;
  switch (method) {
    case Method::kLasp2: return {2 * steps, gated_chunk_bytes(subject, s)};  // ring AllGather fwd + bwd
    case Method::kLasp2AllScan:
      return {2 * static_cast<int64_t>(std::ceil(std::log2(W))), gated_chunk_bytes(subject, s)};
    case Method::kLasp1: return {2 * steps, gated_state_bytes(subject, s)};  // serial chain fwd + bwd
    case Method::kAllGather:  // AllGather of k, v, gates forward, reduce-scatter of their gradients backward
      return {2 * steps, gated_inputs_bytes(subject, s, per_rank_tokens(n, W))};
    default: break;
  }
  return {0, 0};
}

double comm_seconds(Subject subject, Method method, const Shape& s, int64_t n, int W, const Network& net) {
  if (subject == Subject::kTinyModel) return 0;  // folded into the fitted compute of the whole step
  const auto [messages, bytes] = critical_messages(subject, method, s, n, W);
  return messages * (net.alpha_s + static_cast<double>(bytes) / net.beta_bytes_per_s);
}

std::pair<double, double> work_units(Subject subject, Method method, int64_t n, int W, int concurrency) {
  const int world = method == Method::kNone ? 1 : W;
  const double shared = static_cast<double>(std::min(world, std::max(concurrency, 1)));
  if (gated_recurrent(subject)) {
    const double N = static_cast<double>(n);
    if (method == Method::kAllGather) return {std::max(N, N * (world + 1) / 2.0 / shared), 0};
    return {std::max(static_cast<double>(per_rank_tokens(n, world)), N / shared), 0};
  }
  const double tokens = std::max(static_cast<double>(chunk_tokens(n, world, method) * (zigzag(method) ? 2 : 1)),
                                 static_cast<double>(n) / shared);
  if (subject == Subject::kLinearLayer) return {tokens, 0};
  // Causal pairs of the slowest rank: contiguous layouts (ring, and the tiny
  // model's softmax layer under the LASP methods): the last rank sees all N
  // keys for its n queries (minus half a diagonal block); zigzag / all-gather:
  // balanced, N^2 / (2W).
  const double N = static_cast<double>(n), c = N / world;
  // Ulysses / USP: whole sequences of H/U heads per rank (USP's ring zigzag-balanced): N^2 / (2W) too.
  const double slowest =
      (!zigzag(method) && !head_parallel(method)) || world == 1 ? (N * c - c * c / 2) : N * N / (2.0 * world);
  return {tokens, std::max(slowest, N * N / 2 / shared) / 1e6};
}

namespace {

// Non-negative least squares of y = c + a x1 + b x2 (x[i] = {1, x1, x2}): the
// best of the unconstrained fits over every subset of the three terms whose
// coefficients are all >= 0 (3 unknowns: 7 subsets), by relative residuals so
// that short and long points count alike.
std::array<double, 3> fit_nonnegative(const std::vector<std::array<double, 3>>& x, const std::vector<double>& y,
                                      double& best_residual) {
  std::array<double, 3> best{0, 0, 0};
  best_residual = std::numeric_limits<double>::infinity();
  for (int mask = 1; mask < 8; ++mask) {
    std::vector<int> terms;
    for (int t = 0; t < 3; ++t)
      if (mask & (1 << t)) terms.push_back(t);
    const int k = static_cast<int>(terms.size());
    // Normal equations (k <= 3) by Gauss-Jordan elimination.
    std::vector<std::vector<double>> A(k, std::vector<double>(k + 1, 0));
    for (size_t i = 0; i < x.size(); ++i)
      for (int r = 0; r < k; ++r) {
        for (int c = 0; c < k; ++c) A[r][c] += x[i][terms[r]] * x[i][terms[c]];
        A[r][k] += x[i][terms[r]] * y[i];
      }
    bool singular = false;
    for (int c = 0; c < k && !singular; ++c) {
      int pivot = c;
      for (int r = c + 1; r < k; ++r)
        if (std::abs(A[r][c]) > std::abs(A[pivot][c])) pivot = r;
      std::swap(A[c], A[pivot]);
      if (std::abs(A[c][c]) < 1e-300) {
        singular = true;
        break;
      }
      for (int r = 0; r < k; ++r)
        if (r != c) {
          const double f = A[r][c] / A[c][c];
          for (int cc = c; cc <= k; ++cc) A[r][cc] -= f * A[c][cc];
        }
    }
    if (singular) continue;
    std::array<double, 3> coef{0, 0, 0};
    bool non_negative = true;
    for (int r = 0; r < k; ++r) {
      coef[terms[r]] = A[r][k] / A[r][r];
      non_negative = non_negative && coef[terms[r]] >= 0;
    }
    if (!non_negative) continue;
    double residual = 0;
    for (size_t i = 0; i < x.size(); ++i) {
      const double fit = coef[0] + coef[1] * x[i][1] + coef[2] * x[i][2];
      const double rel = (fit - y[i]) / std::max(std::abs(y[i]), 1e-9);
      residual += rel * rel;
    }
    if (residual < best_residual) best_residual = residual, best = coef;
  }
  return best;
}

}  // namespace

void CostModel::calibrate(const std::vector<Observation>& obs) {
  std::map<std::pair<int, int>, std::vector<const Observation*>> groups;
  for (const auto& o : obs) groups[{static_cast<int>(o.subject), o.world}].push_back(&o);
  for (const auto& [key, list] : groups) {
    std::vector<double> y;
    std::vector<std::pair<double, double>> units;
    for (const Observation* o : list) {
      units.push_back(work_units(o->subject, o->method, o->n_tokens, o->world, shape_.concurrency));
      y.push_back(o->measured_s - comm_seconds(o->subject, o->method, shape_, o->n_tokens, o->world, net_));
    }
    // The per-token term scales as tokens^p: p = 1 for an ideal kernel, more
    // when the working set outgrows the caches on the way; p is searched on a
    // grid from 1 (kept on ties) and reported.
    Fit best;
    double best_residual = std::numeric_limits<double>::infinity();
    for (int step = 0; step <= 10; ++step) {
      const double p = 1.0 + 0.05 * step;
      std::vector<std::array<double, 3>> x;
      for (const auto& [x1, x2] : units) x.push_back({1.0, std::pow(x1, p), x2});
      double residual = 0;
      const auto coef = fit_nonnegative(x, y, residual);
      if (residual < best_residual * (1 - 1e-9)) best_residual = residual, best = Fit{coef, p};
    }
    fits_[key] = best;
  }
}

const CostModel::Fit& CostModel::fit(Subject subject, int world) const {
  auto it = fits_.find({static_cast<int>(subject), world});
  if (it == fits_.end())
    throw LoomError(std::string("cost model: not calibrated for ") + subject_name(subject) + " at world size " +
                    std::to_string(world));
  return it->second;
}

double CostModel::predict(Subject subject, Method method, int64_t n, int world) const {
  const Fit& f = fit(subject, world);
  const auto [x1, x2] = work_units(subject, method, n, world, shape_.concurrency);
  return f.coef[0] + f.coef[1] * std::pow(x1, f.exponent) + f.coef[2] * x2 +
         comm_seconds(subject, method, shape_, n, world, net_);
}

double projected_attention_flops(const ProjectedModel& m, int64_t tokens) {
  switch (m.mixer) {
    case Subject::kGlaLayer:
      return m.heads * linear_attention::gated_linear_attention_flops(tokens, m.block, m.head_dim, m.head_dim);
    case Subject::kGatedDeltaLayer:
      return m.heads * gated_delta::gated_delta_flops(tokens, m.block, m.head_dim, m.head_dim);
    case Subject::kSoftmaxLayer: {  // causal: N^2/2 pairs, 4 d FLOPs forward and 10 d backward per pair
      const double t = static_cast<double>(tokens);
      return m.heads * 14.0 * m.head_dim * t * t / 2;
    }
    default:
      return m.heads * linear_attention::chunked_linear_attention_flops(tokens, m.block, m.head_dim, m.head_dim);
  }
}

namespace {

// GLA and Gated DeltaNet models (ProjectedModel::mixer).
Projection project_gated(Method method, const ProjectedModel& m, double alpha, double beta, double flops, int64_t n,
                         int W) {
  const int world = method == Method::kNone ? 1 : W;
  const int64_t local = static_cast<int64_t>(static_cast<double>(n) / world);
  const double d = static_cast<double>(m.head_dim);
  const bool delta = m.mixer == Subject::kGatedDeltaLayer;
  const double payload = delta ? std::max<double>(m.element_bytes, 4) : static_cast<double>(m.element_bytes);
  const double chunk = m.heads * (delta ? 2 * d * d : d * d + 1) * payload;  // LASP-2 / all-scan, per rank
  const double state = m.heads * d * d * payload;                              // the chain's message
  // The all-gather baseline's last rank runs the kernel over the whole sequence.
  const double attn_flops = projected_attention_flops(m, method == Method::kAllGather ? n : local);
  Projection p;
  p.compute_s = (6.0 * m.params_non_embedding * static_cast<double>(local) + m.layers * attn_flops) / flops;
  // What LASP-2 overlaps: GLA its intra-block part (as linear attention);
  // Gated DeltaNet the query side of its blocks, 2C^2 (2 d_k + d_v) per block.
  const double overlapped =
      delta ? m.heads * static_cast<double>(local) * m.block * (4 * d + 2 * d)
            : attn_flops - m.heads * linear_attention::gated_linear_attention_flops(local, 0, m.head_dim, m.head_dim);
  double per_layer = 0;
  switch (method) {
    case Method::kLasp2:
    case Method::kLasp2AllScan: {
      const double steps = method == Method::kLasp2 ? W - 1 : std::ceil(std::log2(W));
      per_layer = std::max(0.0, 2 * steps * (alpha + chunk / beta) - overlapped / flops);
      break;
    }
    case Method::kLasp1: per_layer = 2 * (W - 1) * (alpha + state / beta); break;
    case Method::kAllGather: {
      const double inputs = static_cast<double>(local) * m.heads * (2 * d + (delta ? 2 : 1)) * m.element_bytes;
      per_layer = 2 * (W - 1) * (alpha + inputs / beta);
      break;
    }
    default: break;
  }
  p.exposed_comm_s = m.layers * per_layer;
  p.seconds = p.compute_s + p.exposed_comm_s;
  return p;
}

// An all-to-all over `group` consecutive ranks of `bytes` per rank: group-1
// pairwise rounds of bytes/group, each at the link it crosses (inside a node
// of ranks_per_node, or across nodes), not overlapped with compute.
double all_to_all_seconds(const pb::ClusterConstants& c, int group, double bytes) {
  const int per_node = std::max(1, c.ranks_per_node());
  const int inside = std::min(group, per_node) - 1, across = group - 1 - inside;
  const double block = bytes / group;
  double t = 0;
  if (inside > 0) t += inside * (c.intra_latency_s() + block / c.intra_bandwidth_bytes_per_s());
  if (across > 0) t += across * (c.latency_s() + block / c.bandwidth_bytes_per_s());
  return t;
}

bool ring_across_nodes(const pb::ClusterConstants& c, int ranks_spanned) {
  return c.ranks_per_node() <= 1 || ranks_spanned > c.ranks_per_node();
}

}  // namespace

bool head_parallel_possible(Method method, const ProjectedModel& m, int W) {
  const int U = ulysses_degree(method, W);
  if (U == 0) return true;
  if (W % U != 0 || m.heads % U != 0) return false;
  if (m.mixer == Subject::kSoftmaxLayer) return true;
  return method == Method::kUlysses;  // linear layers: LINEAR_ULYSSES over all W only
}

Projection project_head_parallel(Method method, const ProjectedModel& m, const pb::ClusterConstants& c, int64_t n,
                                 int W) {
  if (!head_parallel_possible(method, m, W))
    throw ConfigError(std::string("projection: ") + method_name(method) + " at " + std::to_string(W) + " ranks needs " +
                      "n_heads = " + std::to_string(m.heads) + " divisible by its all-to-all group of " +
                      std::to_string(ulysses_degree(method, W)) + " ranks");
  const int U = ulysses_degree(method, W), R = W / U;
  const double local = static_cast<double>(n) / W, d = static_cast<double>(m.head_dim), b = m.element_bytes;
  const double flops = c.compute_flops();
  // Softmax: W's share of the causal pairs; linear: H/W heads of all N tokens. Both balanced.
  const double attn_flops = projected_attention_flops(m, n) / W;
  Projection p;
  p.compute_s = (6.0 * m.params_non_embedding * local + m.layers * attn_flops) / flops;
  double per_layer = 0;
  if (m.mixer == Subject::kSoftmaxLayer) {
    const int64_t f = U / std::gcd<int64_t>(U, m.kv_heads);
    const double hk = static_cast<double>(m.kv_heads * f);
    // Forward: q, k, v; out; lse (float32). Backward: dout; dq, dk, dv.
    const double qkv = local * (m.heads + 2 * hk) * d * b, out = local * m.heads * d * b, lse = local * m.heads * 4;
    per_layer = 2 * all_to_all_seconds(c, U, qkv) + 2 * all_to_all_seconds(c, U, out) + all_to_all_seconds(c, U, lse);
    if (R > 1) {  // ring across the groups: K,V of this rank's tokens x hk heads, overlapped like the ring's steps
      const bool across = ring_across_nodes(c, W);
      const double alpha = across ? c.latency_s() : c.intra_latency_s();
      const double beta = across ? c.bandwidth_bytes_per_s() : c.intra_bandwidth_bytes_per_s();
      const double kv = 2 * local * hk * d * b;
      per_layer += 3 * (R - 1) * std::max(0.0, alpha + kv / beta - attn_flops / R / flops);
    }
  } else {
    const double gates = m.mixer == Subject::kGatedDeltaLayer ? 2 : m.mixer == Subject::kGlaLayer ? 1 : 0;
    const double qkv_out = local * m.heads * (4 * d + gates) * b;  // q, k, v, gates out; out back
    per_layer = 2 * all_to_all_seconds(c, W, qkv_out);              // and the gradients
  }
  p.exposed_comm_s = m.layers * per_layer;
  p.seconds = p.compute_s + p.exposed_comm_s;
  return p;
}

Projection project(Method method, const ProjectedModel& m, const pb::ClusterConstants& c, int64_t n, int W) {
  if (ulysses_degree(method, W) > 0) return project_head_parallel(method, m, c, n, W);
  const bool across_nodes = c.ranks_per_node() <= 1 || W > c.ranks_per_node();
  const double alpha = across_nodes ? c.latency_s() : c.intra_latency_s();
  const double beta = across_nodes ? c.bandwidth_bytes_per_s() : c.intra_bandwidth_bytes_per_s();
  if (gated_recurrent(m.mixer)) return project_gated(method, m, alpha, beta, c.compute_flops(), n, W);
  const int world = method == Method::kNone ? 1 : W;
  const double tokens = static_cast<double>(n) / world;
  const double d = static_cast<double>(m.head_dim);
  // Linear attention per layer fwd+bwd; its intra-block part is what LASP-2's AllGather overlaps.
  const int64_t local = static_cast<int64_t>(tokens);
  // A softmax model (mixer kSoftmaxLayer, ring methods only): this rank's share of the causal pairs.
  const double attn_flops = m.mixer == Subject::kSoftmaxLayer
                                ? projected_attention_flops(m, n) / W
                                : m.heads * linear_attention::chunked_linear_attention_flops(local, m.block, m.head_dim, m.head_dim);
  const double intra_flops = attn_flops - m.heads * linear_attention::chunked_linear_attention_flops(local, 0, m.head_dim, m.head_dim);
  Projection p;
  p.compute_s = (6.0 * m.params_non_embedding * tokens + m.layers * attn_flops) / c.compute_flops();
  const double state = m.heads * d * d * m.element_bytes;
  const double kv = 2 * tokens * m.kv_heads * d * m.element_bytes;
  double per_layer = 0;
  switch (method) {
    case Method::kLasp2:
    case Method::kLasp2AllScan: {
      const double steps = method == Method::kLasp2 ? W - 1 : std::ceil(std::log2(W));
      per_layer = std::max(0.0, 2 * steps * (alpha + state / beta) - intra_flops / c.compute_flops());
      break;
    }
    case Method::kLasp1: per_layer = 2 * (W - 1) * (alpha + state / beta); break;
    case Method::kRingContiguous:
    case Method::kRingZigzag:
    case Method::kAllGather: {
      const double step_compute = attn_flops / c.compute_flops() / W;
      per_layer = 3 * (W - 1) * std::max(0.0, alpha + kv / beta - step_compute);
      break;
    }
    case Method::kNone: break;
  }
  p.exposed_comm_s = m.layers * per_layer;
  p.seconds = p.compute_s + p.exposed_comm_s;
  return p;
}

// ---------------------------------------------------------------------------
// The LASP-2 paper's setting (cost_model.h).

const char* paper_method_name(PaperMethod m) {
  switch (m) {
    case PaperMethod::kLasp2: return "LASP-2";
    case PaperMethod::kLasp1: return "LASP-1";
    case PaperMethod::kRing: return "Ring Attention";
  }
  return "?";
}

double paper_dense_flops_per_token(const PaperModel& m) {
  const double D = static_cast<double>(m.d_model), F = static_cast<double>(m.d_ff);
  return 6.0 * (m.layers * (5 * D * D + 3 * D * F) + static_cast<double>(m.vocab) * D);
}

double paper_state_bytes(const PaperModel& m) {
  return static_cast<double>(m.heads) * m.head_dim * m.head_dim * m.state_bytes_per_element;
}

double paper_kv_bytes(const PaperModel& m, double tokens) {
  return 2.0 * tokens * m.heads * m.head_dim * m.element_bytes;
}

double paper_ring_pair_flops(const PaperModel& m, double chunk) {
  return 12.0 * chunk * chunk * m.head_dim * m.heads;
}

namespace {

bool spans_nodes(const PaperHardware& hw, int world) { return world > std::max(1, hw.ranks_per_node); }
double nvlink_hop(const PaperHardware& hw, double bytes) { return hw.nvlink_latency_s + bytes / hw.nvlink_bytes_per_s; }
double ib_hop(const PaperHardware& hw, double bytes) { return hw.ib_latency_s + bytes / hw.ib_bytes_per_s; }
// One ring step: every rank sends at once, the slowest link sets the pace.
double ring_step(const PaperHardware& hw, int world, double bytes) {
  return spans_nodes(hw, world) ? ib_hop(hw, bytes) : nvlink_hop(hw, bytes);
}
// The linear attention kernel (chunked_linear_attention_flops) of one chunk, all heads:
// forward 2NC(dk+dv) + 4N dk dv, the rest backward.
double kernel_forward_flops(const PaperModel& m, double n) {
  const double d = static_cast<double>(m.head_dim);
  return m.heads * (2 * n * m.block * (2 * d) + 4 * n * d * d);
}
double kernel_flops(const PaperModel& m, int64_t n) {
  return m.heads * linear_attention::chunked_linear_attention_flops(n, m.block, m.head_dim, m.head_dim);
}

}  // namespace

double paper_allgather_seconds(const PaperHardware& hw, int world, double bytes) {
  return world <= 1 ? 0 : (world - 1) * ring_step(hw, world, bytes);
}

double paper_chain_seconds(const PaperHardware& hw, int world, double bytes) {
  if (world <= 1) return 0;
  const int per_node = std::max(1, hw.ranks_per_node);
  const int across = spans_nodes(hw, world) ? (world + per_node - 1) / per_node - 1 : 0;
  return (world - 1 - across) * nvlink_hop(hw, bytes) + across * ib_hop(hw, bytes);
}

PaperStep paper_step(PaperMethod method, const PaperModel& m, const PaperHardware& hw, int64_t n_tokens, int W) {
  TORCH_CHECK(n_tokens > 0 && W > 0 && n_tokens % W == 0, "paper_step: ", n_tokens, " tokens over ", W, " ranks");
  const int64_t chunk = n_tokens / W;
  const double n = static_cast<double>(chunk), L = static_cast<double>(m.layers), R = hw.sustained_flops;
  const double dense_s = paper_dense_flops_per_token(m) * n / R;
  const double kernel_s = kernel_flops(m, chunk) / R, kernel_fwd_s = kernel_forward_flops(m, n) / R;
  const double state = paper_state_bytes(m);
  PaperStep p;
  p.fixed_s = hw.fixed_step_s;
  switch (method) {
    case PaperMethod::kLasp2:
      p.compute_s = dense_s + L * kernel_s;
      p.extra_s = 2 * L * paper_allgather_seconds(hw, W, state);
      break;
    case PaperMethod::kLasp1: {
      p.compute_s = dense_s + L * kernel_s;
      const double chain = paper_chain_seconds(hw, W, state);
      p.extra_s = L * ((W - 1) * kernel_fwd_s + chain) + (W - 1) * (kernel_s - kernel_fwd_s) + chain;
      break;
    }
    case PaperMethod::kRing: {
      // Per layer: W pair computations on the last rank; W-1 K,V transfers
      // forward and W-1 of K,V with dK,dV backward, each overlapping one pair.
      const double pair = paper_ring_pair_flops(m, n) / R, pair_fwd = pair / 3, pair_bwd = pair - pair_fwd;
      const double kv = paper_kv_bytes(m, n);
      p.compute_s = dense_s + L * W * pair;
      p.extra_s = L * (W - 1) *
                  (std::max(0.0, ring_step(hw, W, kv) - pair_fwd) + std::max(0.0, ring_step(hw, W, 2 * kv) - pair_bwd));
      break;
    }
  }
  p.seconds = p.fixed_s + p.compute_s + p.extra_s;
  p.tokens_per_s = static_cast<double>(n_tokens) / p.seconds;
  return p;
}

bool PaperFigure::reproduced() const { return std::abs(error()) <= 0.25; }

std::vector<PaperFigure> lasp2_paper_figures(const PaperModel& m, const PaperHardware& hw) {
  const int64_t K = 1024;
  auto gain = [&](PaperMethod base, int64_t n, int W) {
    return 100 * (paper_step(base, m, hw, n, W).seconds / paper_step(PaperMethod::kLasp2, m, hw, n, W).seconds - 1);
  };
  auto rate = [&](int64_t n, int W) { return paper_step(PaperMethod::kLasp2, m, hw, n, W).tokens_per_s; };
  return {
      {"LASP-2 over LASP-1, 512K, 64 GPUs (sec. 4.2)", "%", 7.3, gain(PaperMethod::kLasp1, 512 * K, 64)},
      {"LASP-2 over LASP-1, 2048K, 64 GPUs (sec. 4.2)", "%", 15.2, gain(PaperMethod::kLasp1, 2048 * K, 64)},
      {"LASP-2 over Ring Attention, 512K, 64 GPUs", "%", 17.8, gain(PaperMethod::kRing, 512 * K, 64)},
      {"LASP-2 over Ring Attention, 2048K, 64 GPUs", "%", 36.6, gain(PaperMethod::kRing, 2048 * K, 64)},
      {"LASP-2 512K, 64 GPUs (Table 6)", "tokens/s", 245353, rate(512 * K, 64)},
      {"LASP-2 512K, 128 GPUs (Table 6)", "tokens/s", 233442, rate(512 * K, 128)},
      {"LASP-2 1024K, 64 GPUs (Table 6)", "tokens/s", 442221, rate(1024 * K, 64)},
      {"LASP-2 1024K, 64 GPUs (Table 5, same point)", "tokens/s", 486183, rate(1024 * K, 64)},
      {"LASP-2 1024K, 128 GPUs (Table 6)", "tokens/s", 416465, rate(1024 * K, 128)},
      {"LASP-2 2048K, 128 GPUs (Table 6)", "tokens/s", 769030, rate(2048 * K, 128)},
  };
}

std::string lasp2_paper_report(const PaperModel& m, const PaperHardware& hw) {
  std::ostringstream out;
  char line[400];
  out << "cost model against the LASP-2 paper (arXiv 2502.07563): Linear-Llama3-1B as Linear-MoE builds it, "
      << m.layers << " layers, D " << m.d_model << ", " << m.heads << " heads x " << m.head_dim << " for q, k, v, F "
      << m.d_ff << ", V " << m.vocab << ", batch 1, SP = W\n";
  std::snprintf(line, sizeof line,
                "constants: A100 bf16 peak %.0f TFLOP/s, sustained %.0f TFLOP/s (%.0f%%) for matmuls and the kernels "
                "(block %ld); NVLink %.0f us / %.0f GB/s inside nodes of %d, IB %.0f us / %.0f GB/s per GPU across; "
                "fixed step %.2f s (Table 6 at 2K tokens)\n",
                hw.peak_flops / 1e12, hw.sustained_flops / 1e12, 100 * hw.sustained_flops / hw.peak_flops,
                long(m.block), hw.nvlink_latency_s * 1e6, hw.nvlink_bytes_per_s / 1e9, hw.ranks_per_node,
                hw.ib_latency_s * 1e6, hw.ib_bytes_per_s / 1e9, hw.fixed_step_s);
  out << line;
  out << "| figure | paper | model | error | within 25% |\n| --- | ---: | ---: | ---: | --- |\n";
  for (const PaperFigure& f : lasp2_paper_figures(m, hw)) {
    if (f.unit == "%")
      std::snprintf(line, sizeof line, "| %s | +%.1f%% | %+.1f%% | %+.0f%% | %s |\n", f.what.c_str(), f.paper, f.model,
                    100 * f.error(), f.reproduced() ? "yes" : "no");
    else
      std::snprintf(line, sizeof line, "| %s | %.0f | %.0f | %+.0f%% | %s |\n", f.what.c_str(), f.paper, f.model,
                    100 * f.error(), f.reproduced() ? "yes" : "no");
    out << line;
  }
  const int64_t K = 1024;
  out << "steps (s = fixed + compute + the method's extra: LASP-2 its AllGathers, LASP-1 its serial chain, ring its "
         "exposed K,V transfers):\n";
  for (int64_t n : {512 * K, 2048 * K})
    for (PaperMethod method : {PaperMethod::kLasp2, PaperMethod::kLasp1, PaperMethod::kRing}) {
      const PaperStep p = paper_step(method, m, hw, n, 64);
      std::snprintf(line, sizeof line, "  %5ldK W=64 %-14s %8.3f s = %.2f + %8.3f + %6.3f, %8.0f tokens/s\n",
                    long(n / K), paper_method_name(method), p.seconds, p.fixed_s, p.compute_s, p.extra_s,
                    p.tokens_per_s);
      out << line;
    }
  // What the paper's ring gaps imply, next to the least time the ring's K,V traffic can take.
  for (auto [n, gap] : {std::pair<int64_t, double>{512 * K, 17.8}, std::pair<int64_t, double>{2048 * K, 36.6}}) {
    const double base = paper_step(PaperMethod::kLasp2, m, hw, n, 64).seconds;
    const double kv_forward = m.layers * 63.0 * paper_kv_bytes(m, static_cast<double>(n) / 64);
    std::snprintf(line, sizeof line,
                  "  ring at %ldK, 64 GPUs: the paper's +%.1f%% is %.2f s over LASP-2; receiving the sequence's K,V "
                  "once per layer forward (%.0f GB per rank) takes %.2f s at NVLink speed, %.1f s at the IB links a "
                  "64-GPU ring crosses; forward+backward moves 3x that\n",
                  long(n / K), gap, gap / 100 * base, kv_forward / 1e9, kv_forward / hw.nvlink_bytes_per_s,
                  kv_forward / hw.ib_bytes_per_s);
    out << line;
  }
  return out.str();
}

}  // namespace loom::bench
