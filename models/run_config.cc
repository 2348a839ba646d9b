#include "loom/models/run_config.h"

#include "loom/models/hybrid_lm.h"
#include "loom/runtime/core/config.h"
#include "loom/runtime/core/error.h"

namespace loom::models {

pb::LoomConfig resolve_run_config(const pb::LoomConfig& parsed) {
  // Ranges first: the preset's derived defaults divide by fields the user may
  // have set (d_model / n_heads).
  validate_ranges(parsed);
  pb::LoomConfig resolved = parsed;
  // The preset under the fields the user set: before fill_defaults, which
  // would make every field look set.
  *resolved.mutable_model() = resolve_model_config(parsed.model());
  fill_defaults(&resolved);
  validate_config(resolved);
  return resolved;
}

pb::LoomConfig resolve_run_config(const std::string& path, const std::vector<std::string>& overrides) {
  return resolve_run_config(read_config_sources(path, overrides));
}

}  // namespace loom::models
