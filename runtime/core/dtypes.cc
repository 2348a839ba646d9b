#include "loom/runtime/core/dtypes.h"

#include <array>
#include <utility>

namespace loom {
namespace {
constexpr std::array<std::pair<const char*, at::ScalarType>, 5> kNames{{{"float32", at::kFloat},
                                                                       {"float64", at::kDouble},
                                                                       {"bfloat16", at::kBFloat16},
                                                                       {"float16", at::kHalf},
                                                                       {"int64", at::kLong}}};
}  // namespace

std::optional<at::ScalarType> scalar_type_from_name(const std::string& name) {
  for (const auto& [n, t] : kNames)
    if (name == n) return t;
  return std::nullopt;
}

std::optional<std::string> scalar_type_name(at::ScalarType t) {
  for (const auto& [n, s] : kNames)
    if (s == t) return std::string(n);
  return std::nullopt;
}

}  // namespace loom
