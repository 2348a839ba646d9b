#include "loom/runtime/comm/wait_times.h"

#include <map>
#include <mutex>

namespace loom {
namespace {
std::mutex& table_mutex() {
  static std::mutex m;
  return m;
}
std::map<int64_t, CommWaitTimes::PerOp>& table() {
  static std::map<int64_t, CommWaitTimes::PerOp> t;
  return t;
}
}  // namespace

void CommWaitTimes::track(int64_t comm_id) {
  std::lock_guard<std::mutex> lock(table_mutex());
  table().emplace(comm_id, PerOp{});
}

void CommWaitTimes::forget(int64_t comm_id) {
  std::lock_guard<std::mutex> lock(table_mutex());
  table().erase(comm_id);
}

void CommWaitTimes::record(int64_t comm_id, OpType op, double seconds) {
  std::lock_guard<std::mutex> lock(table_mutex());
  const auto it = table().find(comm_id);
  if (it != table().end()) it->second[static_cast<int>(op)] += seconds;
}

CommWaitTimes::PerOp CommWaitTimes::of(int64_t comm_id) {
  std::lock_guard<std::mutex> lock(table_mutex());
  const auto it = table().find(comm_id);
  return it == table().end() ? PerOp{} : it->second;
}

std::vector<int64_t> CommWaitTimes::tracked() {
  std::lock_guard<std::mutex> lock(table_mutex());
  std::vector<int64_t> ids;
  for (const auto& entry : table()) ids.push_back(entry.first);
  return ids;
}

}  // namespace loom
