// Rotary position embedding with global positions.
// x [B, H, n, d] (d even), positions int64 [n] (from SequenceLayout::global_positions,
// so that every rank rotates its tokens by where they sit in the whole
// sequence), or [B, n] per row (positions that restart at each document). Pairs (x_i, x_{i+d/2}) rotate by angle pos * theta^(-2i/d).
// Differentiable (plain tensor ops).
#pragma once

#include <ATen/ATen.h>

namespace loom::softmax_attention {

at::Tensor apply_rotary(const at::Tensor& x, const at::Tensor& positions, double theta = 10000.0);

}  // namespace loom::softmax_attention
