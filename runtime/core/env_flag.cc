#include "loom/runtime/core/env_flag.h"

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <string>

#include "loom/runtime/core/error.h"

namespace loom {

bool env_flag(const char* name, bool default_value) {
  const char* env = std::getenv(name);
  if (env == nullptr || *env == '\0') return default_value;
  std::string value(env);
  std::transform(value.begin(), value.end(), value.begin(), [](unsigned char c) { return std::tolower(c); });
  if (value == "1" || value == "on" || value == "true" || value == "yes") return true;
  if (value == "0" || value == "off" || value == "false" || value == "no") return false;
  throw ConfigError("environment variable " + std::string(name) + "='" + env +
                    "': allowed values are 1, on, true, yes and 0, off, false, no");
}

bool env_flag_nothrow(const char* name, bool default_value) {
  try {
    return env_flag(name, default_value);
  } catch (const ConfigError&) {
    return default_value;
  }
}

}  // namespace loom
