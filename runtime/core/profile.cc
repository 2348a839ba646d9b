#include "loom/runtime/core/profile.h"

namespace loom::profile {

void Accumulator::add(const std::string& part, double seconds) {
  Part& p = parts_[part];
  p.seconds += seconds;
  ++p.count;
}

double Accumulator::seconds(const std::string& part) const {
  const auto it = parts_.find(part);
  return it == parts_.end() ? 0.0 : it->second.seconds;
}

double Accumulator::sum_with_prefix(const std::string& prefix) const {
  double sum = 0;
  for (auto it = parts_.lower_bound(prefix); it != parts_.end() && it->first.compare(0, prefix.size(), prefix) == 0;
       ++it)
    sum += it->second.seconds;
  return sum;
}

namespace {
bool layers_active_flag = false;
}

Accumulator& global() {
  static Accumulator accumulator;
  return accumulator;
}

bool layers_active() { return layers_active_flag; }
void set_layers_active(bool active) { layers_active_flag = active; }

}  // namespace loom::profile
