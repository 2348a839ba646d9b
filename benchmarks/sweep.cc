#include "benchmarks/sweep.h"

#include <fstream>
#include <sstream>

#include "loom/runtime/core/config.h"
#include "loom/runtime/core/error.h"

namespace loom::bench {
namespace {

const std::vector<std::pair<const char*, Subject>>& subjects() {
  static const std::vector<std::pair<const char*, Subject>> t{
      {"linear_layer", Subject::kLinearLayer}, {"softmax_layer", Subject::kSoftmaxLayer},
      {"tiny_model", Subject::kTinyModel}, {"gla_layer", Subject::kGlaLayer},
      {"gated_delta_layer", Subject::kGatedDeltaLayer}};
  return t;
}
const std::vector<std::pair<const char*, Method>>& methods() {
  static const std::vector<std::pair<const char*, Method>> t{
      {"lasp2", Method::kLasp2},          {"lasp2_allscan", Method::kLasp2AllScan},
      {"lasp1", Method::kLasp1},          {"ring_contiguous", Method::kRingContiguous},
      {"ring_zigzag", Method::kRingZigzag}, {"allgather", Method::kAllGather},
      {"none", Method::kNone},            {"ulysses", Method::kUlysses},
      {"usp2", Method::kUsp2},            {"usp4", Method::kUsp4},
      {"usp8", Method::kUsp8}};
  return t;
}

template <typename T>
T parse_named(const std::vector<std::pair<const char*, T>>& table, const std::string& name, const char* field) {
  std::string allowed;
  for (const auto& [n, v] : table) {
    if (name == n) return v;
    allowed += (allowed.empty() ? "" : ", ") + std::string(n);
  }
  throw ConfigError(std::string(field) + " = '" + name + "': allowed values are " + allowed);
}

[[noreturn]] void bad(const std::string& source, const std::string& what) { throw ConfigError(source + ": " + what); }

}  // namespace

Subject parse_subject(const std::string& name) { return parse_named(subjects(), name, "subjects"); }
Method parse_method(const std::string& name) { return parse_named(methods(), name, "methods"); }
const char* subject_name(Subject s) {
  for (const auto& [n, v] : subjects())
    if (v == s) return n;
  return "?";
}
const char* method_name(Method m) {
  for (const auto& [n, v] : methods())
    if (v == m) return n;
  return "?";
}

int ulysses_degree(Method m, int world) {
  switch (m) {
    case Method::kUlysses: return world;
    case Method::kUsp2: return 2;
    case Method::kUsp4: return 4;
    case Method::kUsp8: return 8;
    default: return 0;
  }
}

bool runs_at(Method m, int world) {
  if (!is_usp(m)) return true;
  const int U = ulysses_degree(m, world);
  return U < world && world % U == 0;
}

bool applies(Subject s, Method m) {
  if (m == Method::kNone || s == Subject::kTinyModel || m == Method::kUlysses) return true;
  if (is_usp(m)) return s == Subject::kSoftmaxLayer;
  const bool linear = m == Method::kLasp2 || m == Method::kLasp2AllScan || m == Method::kLasp1;
  if (gated_recurrent(s)) return linear || m == Method::kAllGather;
  return s == Subject::kLinearLayer ? linear : !linear;
}

void validate_sweep(const pb::BenchSweep& w, int launched_ranks, const std::string& source) {
  if (w.methods().empty()) bad(source, "methods: at least one method is needed");
  if (w.subjects().empty()) bad(source, "subjects: at least one subject is needed");
  if (w.seq_lens().empty()) bad(source, "seq_lens: at least one sequence length is needed");
  try {
    for (const auto& m : w.methods()) parse_method(m);
    for (const auto& s : w.subjects()) parse_subject(s);
    for (const auto& m : w.limit_methods()) parse_method(m);
  } catch (const ConfigError& e) {
    bad(source, e.what());
  }
  for (int64_t n : w.seq_lens())
    if (n < 2) bad(source, "seq_lens = " + std::to_string(n) + ": must be >= 2");
  for (int ws : w.world_sizes())
    if (ws < 1 || ws > launched_ranks)
      bad(source, "world_sizes = " + std::to_string(ws) + ": must be in [1, " + std::to_string(launched_ranks) +
                      "] (the ranks this run was launched with)");
  if (w.dtype() != "float32" && w.dtype() != "float64" && w.dtype() != "bfloat16")
    bad(source, "dtype = '" + w.dtype() + "': allowed values are float32, float64, bfloat16");
  if (w.reps() < 1) bad(source, "reps = " + std::to_string(w.reps()) + ": must be >= 1");
  if (!(w.min_time_s() >= 0)) bad(source, "min_time_s = " + std::to_string(w.min_time_s()) + ": must be >= 0");
  for (int64_t mean : w.document_lengths())
    if (mean < 0) bad(source, "document_lengths = " + std::to_string(mean) + ": must be >= 0 (0: flat rows)");
  if (w.warmup() < 0) bad(source, "warmup = " + std::to_string(w.warmup()) + ": must be >= 0");
  if (w.batch() < 1 || w.heads() < 1 || w.head_dim() < 1 || w.block() < 1)
    bad(source, "batch, heads, head_dim and block must be >= 1");
  if (w.threads() < 1) bad(source, "threads = " + std::to_string(w.threads()) + ": must be >= 1");
  for (const auto& c : w.clusters()) {
    const std::string name = "clusters '" + c.name() + "'";
    if (c.name().empty()) bad(source, "clusters: every cluster needs a name");
    if (!(c.latency_s() > 0) || !(c.bandwidth_bytes_per_s() > 0) || !(c.compute_flops() > 0))
      bad(source, name + ": latency_s, bandwidth_bytes_per_s and compute_flops must be > 0");
    if (c.ranks_per_node() > 1 && (!(c.intra_latency_s() > 0) || !(c.intra_bandwidth_bytes_per_s() > 0)))
      bad(source, name + ": ranks_per_node > 1 needs intra_latency_s and intra_bandwidth_bytes_per_s > 0");
  }
  if (!w.clusters().empty() && (w.projection_world_sizes().empty() || w.projection_seq_lens().empty()))
    bad(source, "clusters given without projection_world_sizes and projection_seq_lens");
  for (int ws : w.projection_world_sizes())
    if (ws < 2) bad(source, "projection_world_sizes = " + std::to_string(ws) + ": must be >= 2");
  if (!w.limit_methods().empty() && w.memory_cap_bytes() <= 0)
    bad(source, "limit_methods given without memory_cap_bytes > 0");
}

pb::BenchSweep load_sweep(const std::string& path, int launched_ranks) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw ConfigError("cannot open sweep file '" + path + "'");
  std::stringstream text;
  text << in.rdbuf();
  pb::BenchSweep sweep;
  parse_text_message(text.str(), path, &sweep);
  validate_sweep(sweep, launched_ranks, path);
  return sweep;
}

}  // namespace loom::bench
