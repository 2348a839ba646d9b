#include "loom/runtime/data/data.h"

#include "loom/runtime/core/error.h"

namespace loom {

uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

TokenWindowSampler::TokenWindowSampler(std::shared_ptr<TokenFile> file, int64_t begin, int64_t end, int64_t seq_len,
                                       int64_t vocab_limit, uint64_t seed, const std::string& split_name)
    : file_(std::move(file)), begin_(begin), end_(end), seq_len_(seq_len), vocab_limit_(vocab_limit), seed_(seed),
      split_(split_name) {
  if (end_ - begin_ < seq_len_ + 1)
    throw ConfigError("data file '" + file_->path() + "': the " + split_ + " split has " +
                      std::to_string(end_ - begin_) + " tokens, fewer than one window of train.seq_len + 1 = " +
                      std::to_string(seq_len_ + 1) + " (use more data, a shorter seq_len or another val_fraction)");
  if (static_cast<int64_t>(file_->vocab_size()) > vocab_limit_)
    throw ConfigError("data file '" + file_->path() + "' has vocabulary " + std::to_string(file_->vocab_size()) +
                      " but model.vocab_size is " + std::to_string(vocab_limit_) +
                      ": token ids would not be below the model's vocabulary");
}

Batch TokenWindowSampler::batch(int64_t first, int64_t batch_size) const {
  at::Tensor window = at::empty({batch_size, seq_len_ + 1}, at::kLong);
  auto* out = window.data_ptr<int64_t>();
  const uint64_t span = static_cast<uint64_t>(end_ - begin_ - seq_len_);  // >= 1
  for (int64_t b = 0; b < batch_size; ++b) {
    const int64_t start = begin_ + static_cast<int64_t>(splitmix64(seed_ ^ splitmix64(first + b)) % span);
    file_->read(start, seq_len_ + 1, out + b * (seq_len_ + 1));
    for (int64_t i = 0; i <= seq_len_; ++i)
      if (out[b * (seq_len_ + 1) + i] >= vocab_limit_)
        throw LoomError("data file '" + file_->path() + "': token id " + std::to_string(out[b * (seq_len_ + 1) + i]) +
                        " at position " + std::to_string(start + i) + " is not below model.vocab_size " +
                        std::to_string(vocab_limit_));
  }
  return {window.narrow(1, 0, seq_len_).contiguous(), window.narrow(1, 1, seq_len_).contiguous()};
}

DataSplits open_data(const std::string& path, double val_fraction, int64_t seq_len, int64_t vocab_limit,
                     uint64_t seed, const std::string& val_path) {
  if (path.empty()) throw ConfigError("data.train_path is empty: name a token file (loom-data prepare makes one)");
  auto file = std::make_shared<TokenFile>(path);
  const int64_t n = file->size();
  DataSplits d;
  if (!val_path.empty()) {
    d.train = std::make_shared<TokenWindowSampler>(file, 0, n, seq_len, vocab_limit, seed, "train");
    try {
      auto held_out = std::make_shared<TokenFile>(val_path);
      if (held_out->vocab_size() != file->vocab_size())
        throw ConfigError("token file '" + val_path + "' has vocabulary " + std::to_string(held_out->vocab_size()) +
                          " but data.train_path '" + path + "' has " + std::to_string(file->vocab_size()) +
                          ": they were not made with the same tokenizer");
      d.validation = std::make_shared<TokenWindowSampler>(held_out, 0, held_out->size(), seq_len, vocab_limit,
                                                          splitmix64(seed + 1), "validation");
    } catch (const LoomError& e) {
      throw ConfigError(std::string("data.val_path: ") + e.what());
    }
    return d;
  }
  const int64_t split = static_cast<int64_t>(static_cast<double>(n) * (1.0 - val_fraction));
  d.train = std::make_shared<TokenWindowSampler>(file, 0, split, seq_len, vocab_limit, seed, "train");
  d.validation = std::make_shared<TokenWindowSampler>(file, split, n, seq_len, vocab_limit, splitmix64(seed + 1),
                                                      "validation");
  return d;
}

}  // namespace loom
