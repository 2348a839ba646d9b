// The blockwise softmax attention kernel as it was before issue 19, for the
// same-process before/after rows of loom-softmax-attention-bench only.
#pragma once

#include <ATen/ATen.h>

#include "loom/parallel/softmax_attention/blockwise_kernel.h"

namespace loom::bench::softmax_before_issue19 {

loom::softmax_attention::Partial attend_pair(const at::Tensor& q, int64_t q_start, const at::Tensor& k,
                                             const at::Tensor& v, int64_t k_start,
                                             const loom::softmax_attention::AttentionSpec& spec,
                                             const at::Tensor& doc_start);

void attend_pair_backward(const at::Tensor& q, int64_t q_start, const at::Tensor& k, const at::Tensor& v,
                          int64_t k_start, const loom::softmax_attention::AttentionSpec& spec, const at::Tensor& lse,
                          const at::Tensor& dout, const at::Tensor& delta, at::Tensor& dq, at::Tensor& dk,
                          at::Tensor& dv, const at::Tensor& doc_start);

}  // namespace loom::bench::softmax_before_issue19
