#include "loom/models/run_config.h"

#include <algorithm>
#include <cctype>

#include "loom/models/hybrid_lm.h"
#include "loom/runtime/core/config.h"
#include "loom/runtime/core/error.h"

namespace loom::models {

namespace {

// Fields that take one of a few names accept them in any case, like enums.
void lower_case_choices(pb::LoomConfig* c) {
  auto lower = [](std::string s) {
    std::transform(s.begin(), s.end(), s.begin(), [](unsigned char ch) { return std::tolower(ch); });
    return s;
  };
  if (c->model().has_feature_map()) c->mutable_model()->set_feature_map(lower(c->model().feature_map()));
  if (c->train().has_device()) c->mutable_train()->set_device(lower(c->train().device()));
  if (c->train().has_dtype()) c->mutable_train()->set_dtype(lower(c->train().dtype()));
  if (c->data().has_tokenizer()) c->mutable_data()->set_tokenizer(lower(c->data().tokenizer()));
  if (c->data().has_task()) c->mutable_data()->set_task(lower(c->data().task()));
  if (c->log().has_level()) c->mutable_log()->set_level(lower(c->log().level()));
}

// Titans memories reset only at multiples of model.memory_chunk, so packed
// documents must start there: an explicit alignment that is not a multiple of
// it would stop the first step; refuse it here, naming both fields.
void check_document_alignment(const pb::LoomConfig& c) {
  const auto& m = c.model();
  const int64_t align = c.data().document_alignment();
  if (c.data().packing() != pb::DataConfig::PACK || align == 0 || c.data().task() != "text") return;
  if (m.pattern().find_first_of("MGX") == std::string::npos || align % m.memory_chunk() == 0) return;
  throw ConfigError("data.document_alignment = " + std::to_string(align) + ": model.pattern '" + m.pattern() +
                    "' has Titans memory, which resets only at multiples of model.memory_chunk = " +
                    std::to_string(m.memory_chunk()) + "; use a multiple of " + std::to_string(m.memory_chunk()) +
                    " or 0 (automatic)");
}

}  // namespace

pb::LoomConfig resolve_run_config(const pb::LoomConfig& user) {
  pb::LoomConfig parsed = user;
  lower_case_choices(&parsed);
  // Ranges first: the preset's derived defaults divide by fields the user may
  // have set (d_model / n_heads).
  validate_ranges(parsed);
  pb::LoomConfig resolved = parsed;
  // The preset under the fields the user set: before fill_defaults, which
  // would make every field look set.
  *resolved.mutable_model() = resolve_model_config(parsed.model());
  fill_defaults(&resolved);
  validate_config(resolved);
  check_document_alignment(resolved);
  return resolved;
}

pb::LoomConfig resolve_run_config(const std::string& path, const std::vector<std::string>& overrides) {
  return resolve_run_config(read_config_sources(path, overrides));
}

}  // namespace loom::models
