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
// kUlysses: head-parallel all-to-all over the whole world W (softmax: ULYSSES;
// linear, GLA, Gated DeltaNet: LINEAR_ULYSSES), contiguous layout. kUsp2/4/8
// ("usp2", "usp4", "usp8"): softmax USP with all-to-all groups of 2, 4 or 8
// ranks and a zigzag ring across the W/U groups (the degree is in the name: a
// BenchSweep field would change the proto); a point runs only where U divides
// W and U < W (U = W is `ulysses`). New methods go last (enum values key fits).
enum class Method { kLasp2, kLasp2AllScan, kLasp1, kRingContiguous, kRingZigzag, kAllGather, kNone, kUlysses,
                    kUsp2, kUsp4, kUsp8 };

Subject parse_subject(const std::string& name);
Method parse_method(const std::string& name);
const char* subject_name(Subject s);
const char* method_name(Method m);
// Whether `m` applies to `s` (linear layers: LASP variants; GLA and Gated
// DeltaNet layers: LASP variants and allgather, the all-gather K,V baseline;
// softmax layers: ring/all-gather; ulysses: every subject; usp: softmax layers
// and the tiny model; the tiny model: all; every subject: none).
bool applies(Subject s, Method m);
// The all-to-all group size of the head-parallel methods at world size W:
// kUlysses W, kUspU U; 0 for every other method.
int ulysses_degree(Method m, int world);
inline bool is_usp(Method m) { return m == Method::kUsp2 || m == Method::kUsp4 || m == Method::kUsp8; }
// Whether `m` runs at world size W: USP needs 1 < U < W with U dividing W.
bool runs_at(Method m, int world);
// The recurrent layers with a gate per token (GLA, Gated DeltaNet): what they
// share in the cost model and in loom-bench's all-gather K,V baseline.
inline bool gated_recurrent(Subject s) { return s == Subject::kGlaLayer || s == Subject::kGatedDeltaLayer; }

// Parses `path` and validates it against `launched_ranks`.
pb::BenchSweep load_sweep(const std::string& path, int launched_ranks);
void validate_sweep(const pb::BenchSweep& sweep, int launched_ranks, const std::string& source);

}  // namespace loom::bench
