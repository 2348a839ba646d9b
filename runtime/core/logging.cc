#include "loom/runtime/core/logging.h"

#include <atomic>
#include <iostream>
#include <mutex>

#include "loom/runtime/core/error.h"

namespace loom {
namespace {
std::atomic<int> g_rank{-1};
std::atomic<int> g_world{0};
std::atomic<bool> g_all_ranks{false};
std::atomic<int> g_level{static_cast<int>(LogLevel::kInfo)};
const char* level_name(LogLevel l) {
  switch (l) {
    case LogLevel::kDebug: return "debug";
    case LogLevel::kInfo: return "info";
    case LogLevel::kWarn: return "warn";
    case LogLevel::kError: return "error";
  }
  return "?";
}
}  // namespace

LogLevel parse_log_level(const std::string& name) {
  if (name == "debug") return LogLevel::kDebug;
  if (name == "info") return LogLevel::kInfo;
  if (name == "warn") return LogLevel::kWarn;
  if (name == "error") return LogLevel::kError;
  throw ConfigError("log level '" + name + "': allowed values are debug, info, warn, error");
}

void configure_logging(int rank, int world_size, bool all_ranks, LogLevel level) {
  g_rank = rank;
  g_world = world_size;
  g_all_ranks = all_ranks;
  g_level = static_cast<int>(level);
}

bool log_enabled(LogLevel level) {
  if (static_cast<int>(level) < g_level.load()) return false;
  if (level >= LogLevel::kWarn) return true;
  return g_all_ranks.load() || g_rank.load() <= 0;
}

LogLine::~LogLine() {
  if (!log_enabled(level_)) return;
  static std::mutex m;
  std::lock_guard<std::mutex> lock(m);
  std::ostream& os = level_ >= LogLevel::kWarn ? std::cerr : std::cout;
  os << "[loom r";
  if (g_rank.load() < 0)
    os << "?";
  else
    os << g_rank.load() << "/" << g_world.load();
  os << " " << level_name(level_) << "] " << out_.str() << std::endl;
}

}  // namespace loom
