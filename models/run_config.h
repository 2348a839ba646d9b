// The resolved config: the one function that turns what the user wrote into
// the config a run uses.
//
// resolve_run_config() takes the parsed sources (defaults, --config file,
// environment, --set: read_config_sources in runtime/core/config.h), checks
// each field's range, applies model.preset under the fields the user set and
// the derived model defaults (models::resolve_model_config: n_kv_heads, d_ff,
// feature_dim), writes every remaining default out explicitly and validates
// the whole. The result is self-contained: printing it (config_to_text) and
// resolving the printed text gives the same config, field for field, and the
// same model (tests/config_test.cc checks every preset).
// Who calls it: loom-train, for --print-config, --dry-run, training (the
// Trainer's config, hence the checkpoint manifest's config_text), --resume and
// --eval-only, through resolve_config_on_all_ranks (runtime/train/job.h), which
// also checks that every rank resolved the same config. It lives in models/
// because it needs the presets; runtime/ never includes it.
// Not resolved here, because they depend on the world the job runs in:
// parallel.sp = 0 (world / dp), parallel.threads_per_rank = 0 (cores per
// node / ranks per node) and parallel.backend = AUTO (Job picks the
// communicator); the Job logs what it chose.
#pragma once

#include <string>
#include <vector>

#include "loom/runtime/core/proto/loom.pb.h"

namespace loom::models {

pb::LoomConfig resolve_run_config(const pb::LoomConfig& parsed);
// read_config_sources(path, overrides), then the above.
pb::LoomConfig resolve_run_config(const std::string& path, const std::vector<std::string>& overrides);

}  // namespace loom::models
