// Chunked cross-entropy: the language-model loss of hidden states through the
// LM head, computed block by block of tokens so that the [N, vocab] logits
// never exist at once (issue 17: at N = 1M tokens and a 128K vocabulary the
// float32 logits alone would take 512 GiB).
//
// chunked_cross_entropy(hidden [N, D], weight [V, D], bias [V] or undefined,
// labels [N]) = sum over the tokens whose label is not -100 of
// logsumexp(z) - z[label], z = hidden W^T + b, which equals
// nll_loss(log_softmax(z), labels, Sum, ignore_index = -100) exactly up to
// rounding. Forward computes each block's logits in the hidden states' dtype
// (like the plain head), then log-softmax in float32 at least (float64 stays
// float64), keeps only the log-sum-exp per token [N] and drops the block.
// Backward recomputes each block's logits and accumulates
//   dz = (softmax(z) - one_hot(label)) * g   (0 on ignored rows)
//   d hidden = dz W,  dW += dz^T hidden,  db += sum dz
// block by block: a custom autograd node, so autograd keeps no block alive
// either. Peak extra memory: a few [block, V] buffers plus dW.
// Who calls it: language_model_loss (hybrid_lm.cc). Labels outside [0, V)
// other than -100 are an error (TORCH_CHECK), as in nll_loss.
#pragma once

#include <ATen/ATen.h>

namespace loom::models {

// Tokens per block for a vocabulary of `vocab`: about kLossBlockBytes of
// float32 logits per block (64 MiB whatever the vocabulary, small next to a
// long step's activations), at least 128 tokens (the head matmul reuses each
// weight row that often, so it stays compute-bound) and at most 4096 (small
// vocabularies gain nothing from larger blocks).
constexpr int64_t kLossBlockBytes = int64_t(64) << 20;
int64_t loss_block_tokens(int64_t vocab);

// block_tokens <= 0: loss_block_tokens(V).
at::Tensor chunked_cross_entropy(const at::Tensor& hidden, const at::Tensor& weight, const at::Tensor& bias,
                                 const at::Tensor& labels, int64_t block_tokens = 0);

}  // namespace loom::models
