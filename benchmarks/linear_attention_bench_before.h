// The chunked linear attention kernel as it was before issue 19, for the
// same-process before/after rows of loom-linear-attention-bench only.
#pragma once

#include <ATen/ATen.h>

namespace loom::bench::linear_before_issue19 {

// Differentiable; decay [H] or undefined (no decay).
at::Tensor chunked_linear_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                    const at::Tensor& decay, int64_t block);

}  // namespace loom::bench::linear_before_issue19
