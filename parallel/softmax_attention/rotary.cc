#include "loom/parallel/softmax_attention/rotary.h"

namespace loom::softmax_attention {

at::Tensor apply_rotary(const at::Tensor& x, const at::Tensor& positions, double theta) {
  TORCH_CHECK(x.dim() == 4 && x.size(3) % 2 == 0, "rotary: expected [B, H, n, d] with even d, got ", x.sizes());
  TORCH_CHECK((positions.dim() == 1 && positions.size(0) == x.size(2)) ||
                  (positions.dim() == 2 && positions.size(0) == x.size(0) && positions.size(1) == x.size(2)),
              "rotary: positions ", positions.sizes(), " for input ", x.sizes(), " (expected [n] or [B, n])");
  const int64_t half = x.size(3) / 2;
  // Angles in float64 so that positions in the millions keep their precision.
  const at::Tensor inv_freq =
      at::pow(theta, -at::arange(half, at::TensorOptions().dtype(at::kDouble).device(x.device())) / static_cast<double>(half));
  // [n, half], or [B, 1, n, half] for per-row positions (documents).
  at::Tensor angles = positions.to(x.device(), at::kDouble).unsqueeze(-1) * inv_freq;
  if (positions.dim() == 2) angles = angles.unsqueeze(1);
  const at::Tensor cos = angles.cos().to(x.options()), sin = angles.sin().to(x.options());
  const at::Tensor x1 = x.narrow(-1, 0, half), x2 = x.narrow(-1, half, half);
  return at::cat({x1 * cos - x2 * sin, x1 * sin + x2 * cos}, -1);
}

}  // namespace loom::softmax_attention
