#include "loom/runtime/train/step_profile.h"

#include <algorithm>
#include <cstdio>
#include <set>
#include <sstream>

#include "loom/runtime/core/error.h"

namespace loom {

// Names the trainer adds to the accumulator (trainer.cc uses the same literals).
namespace {
const char* const kModel = "model forward+backward";
const char* const kFixedBefore[] = {"data"};
const char* const kFixedAfter[] = {"gradient all-reduce", "gradient clipping", "optimizer step", "parameter check",
                                   "checkpoint", "evaluation"};

std::string json_escape(const std::string& s) {
  std::string out;
  for (char c : s) {
    if (c == '"' || c == '\\') out += '\\';
    out += c;
  }
  return out;
}
std::string number(double v) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%.6g", v);
  return buf;
}
}  // namespace

CommSnapshot::CommSnapshot() {
  for (const CommPtr& comm : Communicator::live()) start_[comm->id()] = comm->stats();
}

CommSnapshot::Totals CommSnapshot::since() const {
  Totals totals{};
  for (const CommPtr& comm : Communicator::live()) {
    const auto it = start_.find(comm->id());
    const CommStats delta = it == start_.end() ? comm->stats() : comm->stats() - it->second;
    for (int i = 0; i < static_cast<int>(OpType::kCount); ++i) {
      const OpCounters& c = delta[static_cast<OpType>(i)];
      totals[i].calls += c.calls;
      totals[i].bytes_sent += c.bytes_sent;
      totals[i].bytes_received += c.bytes_received;
      totals[i].wait_seconds += c.wait_seconds;
    }
  }
  return totals;
}

std::string profiled_layer_kinds(const profile::Accumulator& accumulator) {
  std::set<char> kinds;
  for (const auto& [name, part] : accumulator.parts())
    for (const std::string prefix : {"forward ", "backward "})
      if (name.size() == prefix.size() + 1 && name.compare(0, prefix.size(), prefix) == 0) kinds.insert(name.back());
  return std::string(kinds.begin(), kinds.end());
}

StepProfile make_step_profile(const profile::Accumulator& accumulator, const CommSnapshot::Totals& comm,
                              Communicator& world, std::string note) {
  StepProfile p;
  p.steps = accumulator.steps();
  p.wall_seconds = accumulator.wall_seconds();
  p.note = std::move(note);
  auto add = [&](const std::string& name, double seconds) { p.parts.push_back({name, seconds, seconds}); };
  for (const char* name : kFixedBefore) add(name, accumulator.seconds(name));
  double layers = 0;
  for (char kind : profiled_layer_kinds(accumulator)) {
    for (const char* direction : {"forward", "backward"}) {
      const double s = accumulator.seconds(std::string(direction) + " " + kind);
      add(std::string("layers ") + kind + " " + direction, s);
      layers += s;
    }
  }
  add("embedding + head/loss", std::max(0.0, accumulator.seconds(kModel) - layers));
  for (const char* name : kFixedAfter) add(name, accumulator.seconds(name));
  double sum = 0;
  for (const auto& row : p.parts) sum += row.seconds;
  add("other", std::max(0.0, p.wall_seconds - sum));
  for (int i = 0; i < static_cast<int>(OpType::kCount); ++i) {
    if (comm[i].calls == 0 && comm[i].wait_seconds == 0) continue;
    p.collectives.push_back({op_type_name(static_cast<OpType>(i)), comm[i], comm[i].wait_seconds});
  }
  // Max over ranks: the row counts first (the ranks ran the same model, but a
  // mismatch must not make the all-reduce mix rows up), then every value.
  const int64_t rows = static_cast<int64_t>(p.parts.size() + p.collectives.size()) + 1;
  at::Tensor counts = at::tensor({static_cast<double>(rows), -static_cast<double>(rows)}, at::kDouble).to(world.device());
  world.all_reduce(counts, ReduceOp::kMax)->wait();
  counts = counts.cpu();
  p.have_max = counts[0].item<double>() == -counts[1].item<double>();
  p.max_wall_seconds = p.wall_seconds;
  if (!p.have_max) return p;
  std::vector<double> values{p.wall_seconds};
  for (const auto& row : p.parts) values.push_back(row.seconds);
  for (const auto& row : p.collectives) values.push_back(row.counters.wait_seconds);
  at::Tensor t = at::tensor(values, at::kDouble).to(world.device());
  world.all_reduce(t, ReduceOp::kMax)->wait();
  t = t.cpu();
  const double* v = t.data_ptr<double>();
  size_t k = 0;
  p.max_wall_seconds = v[k++];
  for (auto& row : p.parts) row.max_seconds = v[k++];
  for (auto& row : p.collectives) row.max_wait_seconds = v[k++];
  return p;
}

std::string StepProfile::table() const {
  const double steps_d = std::max<double>(1, static_cast<double>(steps));
  const double wall = std::max(wall_seconds, 1e-12);
  std::ostringstream out;
  char line[256];
  std::snprintf(line, sizeof(line), "profile: %ld steps, %.3f s wall (max over ranks %.3f s), %.1f ms/step\n",
                static_cast<long>(steps), wall_seconds, max_wall_seconds, wall_seconds / steps_d * 1e3);
  out << line;
  std::snprintf(line, sizeof(line), "  %-30s %10s %7s %10s %14s\n", "part", "seconds", "%", "ms/step",
                have_max ? "max ms/step" : "(no max)");
  out << line;
  for (const auto& row : parts) {
    std::snprintf(line, sizeof(line), "  %-30s %10.3f %7.1f %10.2f %14.2f\n", row.name.c_str(), row.seconds,
                  100.0 * row.seconds / wall, row.seconds / steps_d * 1e3, row.max_seconds / steps_d * 1e3);
    out << line;
  }
  out << "  collectives (all communicators; wait = blocked in Work::wait(), inside the parts above):\n";
  std::snprintf(line, sizeof(line), "  %-16s %10s %12s %12s %10s %7s %10s %14s\n", "collective", "calls", "MiB sent",
                "MiB recv", "wait s", "%", "ms/step", "max ms/step");
  out << line;
  for (const auto& row : collectives) {
    const CollectiveCounters& c = row.counters;
    std::snprintf(line, sizeof(line), "  %-16s %10ld %12.2f %12.2f %10.3f %7.1f %10.2f %14.2f\n", row.name.c_str(),
                  static_cast<long>(c.calls), c.bytes_sent / 1048576.0, c.bytes_received / 1048576.0, c.wait_seconds,
                  100.0 * c.wait_seconds / wall, c.wait_seconds / steps_d * 1e3, row.max_wait_seconds / steps_d * 1e3);
    out << line;
  }
  if (!note.empty()) out << "  note: " << note << "\n";
  return out.str();
}

std::string StepProfile::json() const {
  const double steps_d = std::max<double>(1, static_cast<double>(steps));
  const double wall = std::max(wall_seconds, 1e-12);
  std::ostringstream out;
  out << "{\"profile\": {\"steps\": " << steps << ", \"wall_s\": " << number(wall_seconds)
      << ", \"max_wall_s\": " << number(max_wall_seconds) << ", \"step_ms\": " << number(wall_seconds / steps_d * 1e3)
      << ", \"note\": \"" << json_escape(note) << "\", \"parts\": {";
  for (size_t i = 0; i < parts.size(); ++i) {
    const auto& row = parts[i];
    out << (i ? ", " : "") << "\"" << json_escape(row.name) << "\": {\"s\": " << number(row.seconds)
        << ", \"pct\": " << number(100.0 * row.seconds / wall) << ", \"ms_per_step\": "
        << number(row.seconds / steps_d * 1e3) << ", \"max_ms_per_step\": " << number(row.max_seconds / steps_d * 1e3)
        << "}";
  }
  out << "}, \"collectives\": {";
  for (size_t i = 0; i < collectives.size(); ++i) {
    const auto& row = collectives[i];
    out << (i ? ", " : "") << "\"" << row.name << "\": {\"calls\": " << row.counters.calls
        << ", \"bytes_sent\": " << row.counters.bytes_sent << ", \"bytes_received\": " << row.counters.bytes_received
        << ", \"wait_s\": " << number(row.counters.wait_seconds)
        << ", \"pct\": " << number(100.0 * row.counters.wait_seconds / wall)
        << ", \"wait_ms_per_step\": " << number(row.counters.wait_seconds / steps_d * 1e3)
        << ", \"max_wait_ms_per_step\": " << number(row.max_wait_seconds / steps_d * 1e3) << "}";
  }
  out << "}}}";
  return out.str();
}

}  // namespace loom
