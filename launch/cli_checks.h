// Command-line checks shared by loom-train, loom-data and loom-ckpt.
#pragma once

#include <cstring>
#include <string>

namespace loom::cli {

// CLI11 reads "--option=" (nothing after '=') as "--option" followed by the
// next argument, which then silently becomes its value (a file named
// "--skip-empty", a flag swallowed). Returns the first such argument, or ""
// when there is none. Only the first '=' counts: "--generate=1+1=" has a value;
// nothing after a "--" separator is looked at.
inline std::string option_with_empty_value(int argc, char** argv) {
  for (int i = 1; i < argc; ++i) {
    const char* arg = argv[i];
    if (std::strcmp(arg, "--") == 0) break;  // what follows are values, not options
    if (std::strncmp(arg, "--", 2) != 0 || std::strlen(arg) < 4) continue;
    const char* equals = std::strchr(arg, '=');
    if (equals != nullptr && equals[1] == '\0') return arg;
  }
  return "";
}

// The message for option_with_empty_value's argument.
inline std::string empty_value_message(const std::string& arg) {
  return arg + " has an empty value: give one after '=' (or leave the option out)";
}

}  // namespace loom::cli
