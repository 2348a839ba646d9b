// Training data: windows of a token file, the same on every sp rank of a dp
// group and different across dp groups.
//
// Sample i of a split is the window of seq_len + 1 tokens starting at a
// position drawn from (seed, i) by splitmix64, so the stream is a pure function
// of the sample index: resuming at step s reproduces the data exactly. The
// window becomes (inputs = tokens[0..N), labels = tokens[1..N]) before the
// SequenceLayout shards it, so the label of a chunk's last token is the first
// token of the next chunk, wherever that chunk lives.
// Splits: train = the first (1 - val_fraction) of the file, validation = the
// rest; or, with a held-out file (data.val_path), train = all of the train
// file and validation = all of the held-out file, which must have the train
// file's vocabulary. Errors name the file and the numbers: a split shorter
// than a window, a token id not below the model's vocabulary; errors of the
// held-out file start with "data.val_path".
#pragma once

#include <ATen/ATen.h>

#include <memory>
#include <string>

#include "loom/runtime/data/token_file.h"

namespace loom {

struct Batch {
  at::Tensor inputs;  // [B, N] int64
  at::Tensor labels;  // [B, N] int64, -100 = ignored
  at::Tensor doc_start;  // [B, N] int64, global positions (documents.h); undefined = one document per row (data.packing NONE, synthetic tasks)
};

class TokenWindowSampler {
 public:
  TokenWindowSampler(std::shared_ptr<TokenFile> file, int64_t begin, int64_t end, int64_t seq_len,
                     int64_t vocab_limit, uint64_t seed, const std::string& split_name);
  // Samples first .. first + batch_size - 1.
  Batch batch(int64_t first, int64_t batch_size) const;
  int64_t tokens() const { return end_ - begin_; }

 private:
  std::shared_ptr<TokenFile> file_;
  int64_t begin_, end_, seq_len_, vocab_limit_;
  uint64_t seed_;
  std::string split_;
};

// The train and validation samplers of a token file (and of a held-out file,
// when `val_path` is not empty; val_fraction is then not used).
struct DataSplits {
  std::shared_ptr<TokenWindowSampler> train, validation;
};
DataSplits open_data(const std::string& path, double val_fraction, int64_t seq_len, int64_t vocab_limit,
                     uint64_t seed, const std::string& val_path = "");

uint64_t splitmix64(uint64_t x);

}  // namespace loom
