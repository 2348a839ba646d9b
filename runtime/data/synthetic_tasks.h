// Synthetic recall tasks with exact accuracy metrics.
//
// MQAR (multi-query associative recall, as in BASED/Zoology): keys from
// [1, V/2), values from [V/2, V), unique within an example; the sequence opens
// with `pairs` key-value pairs (k v k v ...), then each key is queried once more
// at a later position (gaps drawn from a power law), the rest is filler 0.
// Labels are -100 except at query positions, where the label is the key's value
// (the model must emit it as the next token). Accuracy: argmax == label there.
//
// S-NIAH pass-key (RULER style, byte tokens): filler text with a needle "The
// pass key is DDDDD. Remember it." at a random depth, ending with "What is the
// pass key? The pass key is DDDDD". Labels are the 5 digits of the answer
// (teacher-forced); an example counts as correct when all 5 argmaxes are right.
//
// Both are pure functions of (seed, sample index), like the text windows.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <utility>

#include "loom/runtime/data/data.h"

namespace loom {

Batch mqar_batch(int64_t first, int64_t batch_size, int64_t seq_len, int64_t pairs, int64_t vocab, uint64_t seed);
Batch sniah_batch(int64_t first, int64_t batch_size, int64_t seq_len, uint64_t seed);
// sniah_batch's check of the length alone (ConfigError below 160 tokens),
// without building a row: a start-up check of a long evaluation length.
void check_sniah_length(int64_t seq_len);

// (correct, total) over labelled positions of this shard: per position
// (MQAR), or per example over groups of `group` consecutive labels (S-NIAH: 5).
std::pair<int64_t, int64_t> labelled_accuracy(const at::Tensor& logits, const at::Tensor& labels, int64_t group = 1);

}  // namespace loom
