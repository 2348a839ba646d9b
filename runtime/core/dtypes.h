// Tensor dtypes: the names that configs, sweeps, command lines and
// checkpoint manifests use (float32, float64, bfloat16, float16, int64; callers
// turn an unknown name into their own error naming the field or file), and
// which floating types are the reduced-precision ones of mixed precision.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>

namespace loom {

std::optional<at::ScalarType> scalar_type_from_name(const std::string& name);
// The name of `t`, or nullopt for a dtype without one.
std::optional<std::string> scalar_type_name(at::ScalarType t);

// bfloat16 and float16: the dtypes whose sums and optimiser state Loom keeps
// in float32.
inline bool is_reduced_precision(at::ScalarType t) { return t == at::kBFloat16 || t == at::kHalf; }

}  // namespace loom
