// A loom-bench sweep: which methods, subjects, lengths and world sizes to
// measure, and the cluster constants to project to (BenchSweep in
// runtime/core/proto/loom.proto). load_sweep() parses and validates; every error is
// a ConfigError naming the file, the field and the value.
#pragma once

#include <string>
#include <vector>

#include "loom/runtime/core/proto/loom.pb.h"

namespace loom::bench {

// kGlaLayer: linear attention with a data-dependent log gate per token and head
// (lasp.h, GLA/Mamba2 style); kGatedDeltaLayer: the gated delta rule
// (parallel/gated_delta/gated_delta.h). New subjects go last: the cost model
// keys its fits by the enum's value.
enum class Subject { kLinearLayer, kSoftmaxLayer, kTinyModel, kGlaLayer, kGatedDeltaLayer };
enum class Method { kLasp2, kLasp2AllScan, kLasp1, kRingContiguous, kRingZigzag, kAllGather, kNone };

Subject parse_subject(const std::string& name);
Method parse_method(const std::string& name);
const char* subject_name(Subject s);
const char* method_name(Method m);
// Whether `m` applies to `s` (linear layers: LASP variants; GLA and Gated
// DeltaNet layers: LASP variants and allgather, the all-gather K,V baseline;
// softmax layers: ring/all-gather; the tiny model: all; every subject: none).
bool applies(Subject s, Method m);
// The recurrent layers with a gate per token (GLA, Gated DeltaNet): what they
// share in the cost model and in loom-bench's all-gather K,V baseline.
inline bool gated_recurrent(Subject s) { return s == Subject::kGlaLayer || s == Subject::kGatedDeltaLayer; }

// Parses `path` and validates it against `launched_ranks`.
pb::BenchSweep load_sweep(const std::string& path, int launched_ranks);
void validate_sweep(const pb::BenchSweep& sweep, int launched_ranks, const std::string& source);

}  // namespace loom::bench
