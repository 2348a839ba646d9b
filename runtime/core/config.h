// Config: Loom's one configuration, a protobuf message (runtime/core/proto/loom.proto).
//
// Who calls it: loom-train, loom-bench and embedding programs, once at start-up,
// on every rank (each rank reads the same file; resolve_config_on_all_ranks in
// runtime/train/job.h then checks that all ranks agree before any collective).
// Sources, lowest precedence first: schema defaults, the text-format file
// (--config), the environment (LOOM_COMM_TIMEOUT_S, LOOM_THREADS_PER_RANK; see
// environment_overrides()), then each --set section.field=value override.
// The model preset and derived defaults are applied on top by
// models::resolve_run_config (models/run_config.h), which is what loom-train
// runs; the result, with every default written out, is "the resolved config".
// Every failure throws ConfigError with a message that names the file position
// or the field and what is allowed: unknown fields, wrong types, fields given
// twice, integers with leading zeros, non-finite or out-of-range values. Every
// numeric field of LoomConfig has a range, documented next to it in loom.proto
// ("range [lo, hi]") and checked by validate_config.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "loom/runtime/core/proto/loom.pb.h"

namespace loom {

// Parses protobuf text into any message (replacing its contents); ConfigError
// naming source:line:col and the field on a syntax error, unknown field, wrong
// type, a field given twice or an integer with a leading zero. Enum values are
// accepted in any case ("zigzag" for ZIGZAG).
void parse_text_message(const std::string& text, const std::string& source, google::protobuf::Message* message);
void parse_config_text(const std::string& text, const std::string& source, pb::LoomConfig* config);
// Reads and parses a .pbtxt file and checks the ranges of its values (so that
// a bad value in a file is refused even where the environment or --set would
// override it).
pb::LoomConfig load_config_file(const std::string& path);
// Applies "section.field=value" (enum values by name, any case; bools as
// true/false/1/0; integers in decimal without leading zeros).
void apply_override(const std::string& assignment, pb::LoomConfig* config);

// The environment variables that set config fields: they override the config
// file and are overridden by --set.
struct EnvironmentOverride {
  const char* variable;
  const char* field;  // section.field
};
const std::vector<EnvironmentOverride>& environment_overrides();
// Sets the field of each variable in environment_overrides() that is set in
// this process's environment; ConfigError naming the variable and the field
// when a value does not parse or is out of the field's range.
void apply_environment(pb::LoomConfig* config);

// The range of a numeric field of LoomConfig ("train.steps"), as documented in
// loom.proto, e.g. "[0, 1099511627776]" or "(0, 10]"; empty for other fields.
std::string numeric_field_range(const std::string& field);
// Checks every numeric field against its range (and finiteness) only; throws
// one ConfigError listing every violation.
void validate_ranges(const pb::LoomConfig& config);
// Checks every range rule and cross-field rule; throws one ConfigError listing
// every violation, each naming its field.
void validate_config(const pb::LoomConfig& config);

// Defaults, file (if non-empty), environment, overrides; not validated and
// without the model preset applied (models::resolve_run_config does both).
pb::LoomConfig read_config_sources(const std::string& path, const std::vector<std::string>& overrides);
// read_config_sources, then validation, for programs without model presets.
pb::LoomConfig resolve_config(const std::string& path, const std::vector<std::string>& overrides);

// Sets every unset singular field of `message` and of its sub-messages to its
// default, so that a printout is complete and equal configs serialize equally.
void fill_defaults(google::protobuf::Message* message);
// Text format of the config with every field, defaults included.
std::string config_to_text(const pb::LoomConfig& config);
// FNV-1a 64 of the deterministic serialization of the config with every
// default filled: equal for equal configs, whatever was set explicitly.
uint64_t config_hash(const pb::LoomConfig& config);
// The fields whose values differ, one "section.field: A vs B" per line (at
// most `limit` lines); empty when the configs are equal.
std::string config_differences(const pb::LoomConfig& a, const pb::LoomConfig& b, int limit = 8);

}  // namespace loom
