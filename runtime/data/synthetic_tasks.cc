#include "loom/runtime/data/synthetic_tasks.h"

#include <cmath>
#include <string>
#include <vector>

#include "loom/runtime/core/error.h"

namespace loom {
namespace {
struct Rng {
  uint64_t state;
  uint64_t next() { return state = splitmix64(state); }
  int64_t below(int64_t n) { return static_cast<int64_t>(next() % static_cast<uint64_t>(n)); }
  double unit() { return static_cast<double>(next() >> 11) / 9007199254740992.0; }
};
}  // namespace

Batch mqar_batch(int64_t first, int64_t batch_size, int64_t seq_len, int64_t pairs, int64_t vocab, uint64_t seed) {
  if (pairs < 1 || 4 * pairs > seq_len)
    throw ConfigError("MQAR: data.mqar_pairs = " + std::to_string(pairs) + " needs train.seq_len >= " +
                      std::to_string(4 * pairs) + " (got " + std::to_string(seq_len) + ")");
  if (vocab / 2 - 1 < pairs)
    throw ConfigError("MQAR: model.vocab_size = " + std::to_string(vocab) + " has too few keys for " +
                      std::to_string(pairs) + " pairs");
  at::Tensor inputs = at::zeros({batch_size, seq_len}, at::kLong);
  at::Tensor labels = at::full({batch_size, seq_len}, -100, at::kLong);
  auto* in = inputs.data_ptr<int64_t>();
  auto* lab = labels.data_ptr<int64_t>();
  for (int64_t b = 0; b < batch_size; ++b) {
    Rng rng{seed ^ splitmix64(static_cast<uint64_t>(first + b))};
    std::vector<int64_t> keys, values;
    while (static_cast<int64_t>(keys.size()) < pairs) {  // unique keys
      const int64_t k = 1 + rng.below(vocab / 2 - 1);
      bool seen = false;
      for (int64_t x : keys) seen = seen || x == k;
      if (!seen) keys.push_back(k);
    }
    for (int64_t i = 0; i < pairs; ++i) values.push_back(vocab / 2 + rng.below(vocab - vocab / 2));
    int64_t* row = in + b * seq_len;
    int64_t* lrow = lab + b * seq_len;
    for (int64_t i = 0; i < pairs; ++i) {
      row[2 * i] = keys[i];
      row[2 * i + 1] = values[i];
    }
    // Queries in a random order, at positions after the context with
    // power-law gaps (most queries soon, some far away).
    std::vector<int64_t> order(pairs);
    for (int64_t i = 0; i < pairs; ++i) order[i] = i;
    for (int64_t i = pairs - 1; i > 0; --i) std::swap(order[i], order[rng.below(i + 1)]);
    const int64_t free_slots = seq_len - 2 * pairs;
    std::vector<char> used(seq_len, 0);
    for (int64_t i = 0; i < pairs; ++i) {
      int64_t pos = -1;
      for (int attempt = 0; attempt < 64 && pos < 0; ++attempt) {
        const double u = rng.unit();
        const int64_t gap = static_cast<int64_t>(std::pow(static_cast<double>(free_slots), u)) - 1;
        const int64_t p = 2 * pairs + std::min<int64_t>(gap, free_slots - 1);
        if (!used[p]) pos = p;
      }
      for (int64_t p = 2 * pairs; pos < 0 && p < seq_len; ++p)
        if (!used[p]) pos = p;
      used[pos] = 1;
      row[pos] = keys[order[i]];
      lrow[pos] = values[order[i]];
    }
  }
  return {inputs, labels};
}

void check_sniah_length(int64_t seq_len) {
  if (seq_len < 160)
    throw ConfigError("S-NIAH: train.seq_len = " + std::to_string(seq_len) + " is too short (at least 160)");
}

Batch sniah_batch(int64_t first, int64_t batch_size, int64_t seq_len, uint64_t seed) {
  static const std::string filler =
      "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ";
  const std::string question = " What is the pass key? The pass key is ";
  check_sniah_length(seq_len);
  at::Tensor inputs = at::zeros({batch_size, seq_len}, at::kLong);
  at::Tensor labels = at::full({batch_size, seq_len}, -100, at::kLong);
  for (int64_t b = 0; b < batch_size; ++b) {
    Rng rng{seed ^ splitmix64(static_cast<uint64_t>(first + b) + 77)};
    std::string key;
    for (int i = 0; i < 5; ++i) key += static_cast<char>('0' + rng.below(10));
    const std::string needle = " The pass key is " + key + ". Remember it. ";
    const std::string tail = question + key;
    const int64_t hay = seq_len - static_cast<int64_t>(tail.size() + needle.size());
    std::string text;
    while (static_cast<int64_t>(text.size()) < hay) text += filler;
    text.resize(hay);
    const int64_t depth = rng.below(std::max<int64_t>(1, hay));
    text.insert(depth, needle);
    text += tail;
    auto* row = inputs.data_ptr<int64_t>() + b * seq_len;
    auto* lrow = labels.data_ptr<int64_t>() + b * seq_len;
    for (int64_t i = 0; i < seq_len; ++i) row[i] = static_cast<unsigned char>(text[i]);
    // Label position i predicts token i + 1: the 5 digits of the answer.
    for (int64_t d = 0; d < 5; ++d) lrow[seq_len - 6 + d] = row[seq_len - 5 + d];
  }
  return {inputs, labels};
}

std::pair<int64_t, int64_t> labelled_accuracy(const at::Tensor& logits, const at::Tensor& labels, int64_t group) {
  const at::Tensor pred = logits.argmax(-1).reshape({-1});
  const at::Tensor lab = labels.reshape({-1});
  const at::Tensor mask = lab.ne(-100);
  const at::Tensor hits = pred.eq(lab).logical_and(mask);
  if (group <= 1) return {hits.sum().item<int64_t>(), mask.sum().item<int64_t>()};
  // Groups of consecutive labelled positions in order (they never straddle a shard).
  const at::Tensor idx = mask.nonzero().reshape({-1});
  const at::Tensor ok = hits.index_select(0, idx);
  const int64_t groups = ok.numel() / group;
  if (groups == 0) return {0, 0};
  const at::Tensor all = ok.narrow(0, 0, groups * group).reshape({groups, group}).all(1);
  return {all.sum().item<int64_t>(), groups};
}

}  // namespace loom
