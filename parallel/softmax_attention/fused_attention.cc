#include "loom/parallel/softmax_attention/fused_attention.h"

#include <torch/version.h>

#include <array>
#include <atomic>
#include <string>
#include <tuple>

#include "loom/runtime/core/build_config.h"
#include "loom/runtime/core/env_flag.h"
#include "loom/runtime/core/logging.h"

// The flash operator with a scale argument and the LSE output exists from
// libtorch 2.1 on (2.0's had no scale); CUDA builds only.
#if LOOM_WITH_CUDA && LOOM_FUSED_ATTENTION && \
    (TORCH_VERSION_MAJOR > 2 || (TORCH_VERSION_MAJOR == 2 && TORCH_VERSION_MINOR >= 1))
#define LOOM_FUSED_ATTENTION_ACTIVE 1
#include <ATen/cuda/CUDAContext.h>
#else
#define LOOM_FUSED_ATTENTION_ACTIVE 0
#endif

namespace loom::softmax_attention {
namespace {

// -1: not yet decided (read the environment), 0: off, 1: on.
std::atomic<int> g_enabled{-1};
std::atomic<int64_t> g_forward{0}, g_backward{0};

bool enabled_from_environment() { return env_flag("LOOM_FUSED_ATTENTION", true); }

#if LOOM_FUSED_ATTENTION_ACTIVE

enum class FusedMask { kNone, kFull, kCausal };

// The mask of a pair as the flash kernel can apply it, or kNone.
FusedMask fused_mask(int64_t q_start, int64_t lq, int64_t k_start, int64_t lk, const AttentionSpec& spec) {
  if (lq == 0 || lk == 0 || q_start < 0 || k_start < 0) return FusedMask::kNone;
  const bool past = k_start + lk - 1 <= q_start;
  const bool inside_window = spec.window <= 0 || k_start > q_start + lq - 1 - spec.window;
  if (past && inside_window) return FusedMask::kFull;
  if (q_start == k_start && lq == lk && (spec.window <= 0 || spec.window >= lq)) return FusedMask::kCausal;
  return FusedMask::kNone;
}

// Compute capability >= 8.0 (the flash kernel's bf16/fp16 floor), per device,
// asked once; no lock on the per-pair path (two threads may both ask once).
bool device_supported(const at::Device& device) {
  static std::array<std::atomic<int8_t>, 64> known{};  // per device index: 0 unknown, 1 no, 2 yes
  const c10::DeviceIndex index = device.has_index() ? device.index() : c10::cuda::current_device();
  const auto ask = [&] { return at::cuda::getDeviceProperties(index)->major >= 8; };
  if (index < 0 || static_cast<size_t>(index) >= known.size()) return ask();
  std::atomic<int8_t>& state = known[static_cast<size_t>(index)];
  int8_t s = state.load(std::memory_order_relaxed);
  if (s == 0) {
    s = ask() ? 2 : 1;
    state.store(s, std::memory_order_relaxed);
  }
  return s == 2;
}

bool tensors_qualify(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& doc_start) {
  if (!fused_attention_enabled() || doc_start.defined()) return false;
  if (q.dim() != 4 || k.dim() != 4 || v.dim() != 4 || k.sizes() != v.sizes()) return false;
  if (!q.is_cuda() || k.device() != q.device() || v.device() != q.device()) return false;
  const auto dtype = q.scalar_type();
  if ((dtype != at::kHalf && dtype != at::kBFloat16) || k.scalar_type() != dtype || v.scalar_type() != dtype)
    return false;
  const int64_t d = q.size(3);
  if (d % 8 != 0 || d > 256 || k.size(3) != d || q.size(0) != k.size(0)) return false;
  if (k.size(1) < 1 || q.size(1) % k.size(1) != 0) return false;
  return device_supported(q.device());
}

// The flash kernel needs a unit stride in the head dimension (a narrowed chunk has it).
at::Tensor unit_last_stride(const at::Tensor& x) { return x.stride(-1) == 1 ? x : x.contiguous(); }

// Called when a fused call threw: one warning, then the fallback for the rest of the process.
void disable_after_failure(const char* where, const c10::Error& e) {
  int expected = 1;
  g_enabled.compare_exchange_strong(expected, 0);
  std::string what = e.what_without_backtrace();
  if (const auto nl = what.find('\n'); nl != std::string::npos) what.resize(nl);
  LOOM_LOG(kWarn) << "fused attention " << where << " failed (" << what
                  << "); the blockwise kernel runs from now on";
}

#endif  // LOOM_FUSED_ATTENTION_ACTIVE

}  // namespace

bool fused_attention_compiled() { return LOOM_FUSED_ATTENTION_ACTIVE != 0; }

bool fused_attention_enabled() {
  // The environment is read (and a typo refused) in every build, so that a
  // setting that means nothing here is still checked.
  int state = g_enabled.load();
  if (state < 0) {
    int expected = -1;
    g_enabled.compare_exchange_strong(expected, enabled_from_environment() ? 1 : 0);
    state = g_enabled.load();
  }
  return fused_attention_compiled() && state == 1;
}

void set_fused_attention_enabled(bool enabled) { g_enabled.store(enabled ? 1 : 0); }

bool fused_attention_supported(const at::Device& device) {
#if LOOM_FUSED_ATTENTION_ACTIVE
  return device.is_cuda() && device_supported(device);
#else
  (void)device;
  return false;
#endif
}

FusedAttentionCounts fused_attention_counts() { return {g_forward.load(), g_backward.load()}; }

#if LOOM_FUSED_ATTENTION_ACTIVE

bool fused_attend_pair(const at::Tensor& q, int64_t q_start, const at::Tensor& k, const at::Tensor& v,
                       int64_t k_start, const AttentionSpec& spec, const at::Tensor& doc_start, Partial& result) {
  if (!tensors_qualify(q, k, v, doc_start)) return false;
  const FusedMask mask = fused_mask(q_start, q.size(2), k_start, k.size(2), spec);
  if (mask == FusedMask::kNone) return false;
  at::NoGradGuard no_grad;
  const int64_t B = q.size(0), Hq = q.size(1), Lq = q.size(2), group = q.size(1) / k.size(1);
  const double scale = spec.resolved_scale(q.size(3));
  try {
    // output, logsumexp, cum_seq_q, cum_seq_k, max_q, max_k, philox_seed, philox_offset, debug_attn_mask
    auto res = at::_scaled_dot_product_flash_attention(
        unit_last_stride(q), unit_last_stride(repeat_kv_heads(k, group)), unit_last_stride(repeat_kv_heads(v, group)),
        /*dropout_p=*/0.0, /*is_causal=*/mask == FusedMask::kCausal, /*return_debug_mask=*/false, scale);
    at::Tensor lse = std::get<1>(res);
    // Flash's LSE is [B, H, Lq]; some versions of the memory-efficient kernel pad Lq to a multiple of 32.
    TORCH_CHECK(lse.dim() == 3 && lse.size(0) == B && lse.size(1) == Hq && lse.size(2) >= Lq,
                "fused attention: LSE of shape ", lse.sizes(), " for a query chunk [", B, ", ", Hq, ", ", Lq, "]");
    const auto acc = accumulation_dtype(q.scalar_type());
    result = Partial{std::get<0>(res).to(acc), lse.narrow(2, 0, Lq).to(acc)};
  } catch (const c10::Error& e) {
    disable_after_failure("forward", e);
    return false;
  }
  g_forward.fetch_add(1);
  return true;
}

bool fused_attend_pair_backward(const at::Tensor& q, int64_t q_start, const at::Tensor& k, const at::Tensor& v,
                                int64_t k_start, const AttentionSpec& spec, const at::Tensor& out,
                                const at::Tensor& lse, const at::Tensor& dout, at::Tensor& dq, at::Tensor& dk,
                                at::Tensor& dv, const at::Tensor& doc_start) {
  if (!out.defined() || !tensors_qualify(q, k, v, doc_start)) return false;
  const FusedMask mask = fused_mask(q_start, q.size(2), k_start, k.size(2), spec);
  if (mask == FusedMask::kNone) return false;
  at::NoGradGuard no_grad;
  const int64_t B = k.size(0), Hkv = k.size(1), Lq = q.size(2), Lk = k.size(2), d = q.size(3);
  const int64_t group = q.size(1) / Hkv;
  const auto dtype = q.scalar_type();
  const double scale = spec.resolved_scale(d);
  at::Tensor gq, gk, gv;
  try {
    // Dropout 0: the kernel never reads the RNG state (the forward returns empty tensors for it); on q's
    // device so that no device check of the operator sees a second device.
    const at::Tensor no_rng = at::empty({}, q.options().dtype(at::kLong));
    std::tie(gq, gk, gv) = at::_scaled_dot_product_flash_attention_backward(
        unit_last_stride(dout.to(dtype)), unit_last_stride(q), unit_last_stride(repeat_kv_heads(k, group)),
        unit_last_stride(repeat_kv_heads(v, group)), out.to(dtype).contiguous(), lse.to(at::kFloat).contiguous(),
        /*cum_seq_q=*/at::Tensor(), /*cum_seq_k=*/at::Tensor(), /*max_q=*/Lq, /*max_k=*/Lk, /*dropout_p=*/0.0,
        /*is_causal=*/mask == FusedMask::kCausal, no_rng, no_rng, scale);
  } catch (const c10::Error& e) {
    disable_after_failure("backward", e);
    return false;
  }
  dq.add_(gq.to(dq.scalar_type()));
  if (group == 1) {
    dk.add_(gk.to(dk.scalar_type()));
    dv.add_(gv.to(dv.scalar_type()));
  } else {  // the repeated heads' gradients summed back to their key/value head, in float32
    dk.add_(gk.to(dk.scalar_type()).reshape({B, Hkv, group, Lk, d}).sum(2));
    dv.add_(gv.to(dv.scalar_type()).reshape({B, Hkv, group, Lk, d}).sum(2));
  }
  g_backward.fetch_add(1);
  return true;
}

#else  // the fused path is not in this build: every pair takes the blockwise kernel

bool fused_attend_pair(const at::Tensor&, int64_t, const at::Tensor&, const at::Tensor&, int64_t,
                       const AttentionSpec&, const at::Tensor&, Partial&) {
  return false;
}

bool fused_attend_pair_backward(const at::Tensor&, int64_t, const at::Tensor&, const at::Tensor&, int64_t,
                                const AttentionSpec&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                at::Tensor&, at::Tensor&, at::Tensor&, const at::Tensor&) {
  return false;
}

#endif

}  // namespace loom::softmax_attention
