// Logging with a rank prefix: "[loom r2/4 info] message".
//
// By default only rank 0 prints info and debug lines (a 64-rank job should not
// print everything 64 times); warnings and errors print on every rank, since
// they are usually rank-specific. configure_logging() is called once by the
// launcher after MPI is up; before that, lines print with rank "?".
//   LOOM_LOG(kInfo) << "mesh " << mesh.describe();
#pragma once

#include <sstream>
#include <string>

namespace loom {

enum class LogLevel { kDebug = 0, kInfo = 1, kWarn = 2, kError = 3 };

LogLevel parse_log_level(const std::string& name);
void configure_logging(int rank, int world_size, bool all_ranks, LogLevel level);
bool log_enabled(LogLevel level);

class LogLine {
 public:
  explicit LogLine(LogLevel level) : level_(level) {}
  ~LogLine();
  template <typename T>
  LogLine& operator<<(const T& v) {
    if (log_enabled(level_)) out_ << v;
    return *this;
  }

 private:
  LogLevel level_;
  std::ostringstream out_;
};

}  // namespace loom

#define LOOM_LOG(level) ::loom::LogLine(::loom::LogLevel::level)
