// libtorch's fused flash attention as the fast path of the blockwise kernel
// for one chunk pair on CUDA (at::_scaled_dot_product_flash_attention, which
// returns the log-sum-exp, and its _backward).
//
// Who calls: attend_pair() and attend_pair_backward() (blockwise_kernel.h)
// try the fused path first and run the blockwise kernel (the fallback) when it
// declines. Ring, all-gather, local and Ulysses attention therefore use it
// wherever their pairs qualify, without code of their own.
//
// A pair qualifies when all of these hold:
//   - compiled in: a CUDA build (LOOM_WITH_CUDA) against libtorch >= 2.1 with
//     the CMake option LOOM_FUSED_ATTENTION on (default for CUDA builds);
//   - enabled: not forced off by LOOM_FUSED_ATTENTION=0 in the environment or
//     set_fused_attention_enabled(false), and no earlier fused call failed;
//   - q, k, v on one CUDA device of compute capability >= 8.0, all float16 or
//     all bfloat16, head dim a multiple of 8 and at most 256;
//   - no documents (doc_start undefined);
//   - the mask is one the kernel has: every key visible to every query (a
//     past block, inside the window) or the causal diagonal (q_start == k_start,
//     Lq == Lk, window 0 or >= Lq).
// GQA: key/value heads are repeated to the query heads (repeat_kv_heads) and
// their gradients summed back over each group.
// Results: the forward returns out in float32 and lse [B, Hq, Lq] float32 (the
// flash kernel's layout, natural log of the scaled scores, as the blockwise
// kernel's), so partials merge with merge_partial() as before. The backward
// takes the query rows' final (merged) out and lse with dout and returns this
// pair's dq, dk, dv (the ring-flash-attention scheme), added into the float32
// accumulators; the kernel computes delta = rowsum(dout * out) itself from out
// rounded to the input dtype.
// A fused call that throws (an architecture or build without the flash kernel)
// logs one warning, disables the fused path for the process and falls back.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "loom/parallel/softmax_attention/blockwise_kernel.h"

namespace loom::softmax_attention {

// True when this build contains the fused path (see above).
bool fused_attention_compiled();

// True when the fused path may run: compiled in, not forced off, not disabled
// after a failure.
bool fused_attention_enabled();

// True when the fused path is compiled in and `device` is a CUDA device it
// runs on (compute capability >= 8.0), whatever the enabled state.
bool fused_attention_supported(const at::Device& device);

// Forces the fallback (false) or allows the fused path again (true); the
// parity tests and loom-device-bench compare both. Overrides the environment.
void set_fused_attention_enabled(bool enabled);

// How many pairs the fused path computed since the process started (tests
// check that it ran; benchmarks that it was measured).
struct FusedAttentionCounts {
  int64_t forward = 0;
  int64_t backward = 0;
};
FusedAttentionCounts fused_attention_counts();

// The forward of one pair on the fused path into `result`; false (and
// `result` untouched) when the pair does not qualify. Arguments as attend_pair.
bool fused_attend_pair(const at::Tensor& q, int64_t q_start, const at::Tensor& k, const at::Tensor& v,
                       int64_t k_start, const AttentionSpec& spec, const at::Tensor& doc_start, Partial& result);

// The backward of one pair on the fused path, adding into dq, dk, dv; false
// (nothing added) when the pair does not qualify or `out` is undefined.
// `out` and `lse` are the query rows' final results, arguments otherwise as
// attend_pair_backward.
bool fused_attend_pair_backward(const at::Tensor& q, int64_t q_start, const at::Tensor& k, const at::Tensor& v,
                                int64_t k_start, const AttentionSpec& spec, const at::Tensor& out,
                                const at::Tensor& lse, const at::Tensor& dout, at::Tensor& dq, at::Tensor& dk,
                                at::Tensor& dv, const at::Tensor& doc_start);

}  // namespace loom::softmax_attention
