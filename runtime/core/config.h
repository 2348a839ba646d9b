// Config: Loom's one configuration, a protobuf message (runtime/core/proto/loom.proto).
//
// Who calls it: loom-train, loom-bench and embedding programs, once at start-up,
// on every rank (each rank reads the same file; the launcher then checks that
// all ranks agree before any collective).
// Sources, in order: schema defaults, the text-format file (--config), then
// each --set section.field=value override. Every failure throws ConfigError
// with a message that names the file position or the field and what is allowed:
// unknown fields, wrong types, out-of-range values.
#pragma once

#include <string>
#include <vector>

#include "loom/runtime/core/proto/loom.pb.h"

namespace loom {

// Parses text format into `config` (merging); `source` names it in errors.
// Parses protobuf text into any message; ConfigError naming source:line:col
// and the field on a syntax error, unknown field or wrong type.
void parse_text_message(const std::string& text, const std::string& source, google::protobuf::Message* message);
void parse_config_text(const std::string& text, const std::string& source, pb::LoomConfig* config);
// Reads and parses a .pbtxt file.
pb::LoomConfig load_config_file(const std::string& path);
// Applies "section.field=value" (enum values by name, any case; bools as
// true/false/1/0).
void apply_override(const std::string& assignment, pb::LoomConfig* config);
// Checks every range rule; throws one ConfigError listing every violation.
void validate_config(const pb::LoomConfig& config);
// Defaults, then file (if non-empty), then overrides, then validation.
pb::LoomConfig resolve_config(const std::string& path, const std::vector<std::string>& overrides);
// Text format of the resolved config with every field, defaults included.
std::string config_to_text(const pb::LoomConfig& config);

}  // namespace loom
