// Training data: rows of a token file, the same on every sp rank of a dp group
// and different across dp groups. The trainer asks a sampler for samples
// first .. first + n - 1 of a split; every sample is a pure function of
// (seed, sample index), so resuming at step s reproduces the data exactly.
//
// Two samplers (data.packing):
// - NONE, TokenWindowSampler (the stream Loom always had, bit for bit): sample
//   i is the window of seq_len + 1 tokens starting at a position drawn from
//   (seed, i) by splitmix64; it becomes (inputs = tokens[0..N), labels =
//   tokens[1..N]), crossing documents freely. doc_start is undefined.
// - PACK, PackedDocumentSampler: rows of seq_len tokens built from whole
//   documents (the token file's document index; a version-1 file is one
//   document). Built once when opened (O(#documents + #rows) memory): the
//   split's documents in an order shuffled by the seed; a document longer
//   than a row is cut into pieces of seq_len tokens (each piece but the last
//   fills a row of its own) and its remainder is placed like a short
//   document; every document or remainder no longer than a row goes, best
//   fit, into the open row with the least room that holds it whole (a new
//   row when none does). Each piece starts a document in its row (a cut
//   document continues with its state reset, as peers do). The rows of an
//   epoch are visited in an order drawn from (seed, epoch) by a keyed
//   permutation, so sample i is row perm_{i / R}(i % R) of the R rows: over
//   each epoch every token of the split is in exactly one row, none dropped
//   or repeated. Labels are the next token of the same document (also across
//   a cut: the last token of a piece predicts the first token of the next
//   piece), -100 for a document's last token (it would predict the next
//   document) and for padding. Padding (the room a row has left) is token 0,
//   label -100, and a document of its own. With an alignment a > 1
//   (data.document_alignment: Titans memory needs documents to start at
//   multiples of model.memory_chunk) every piece takes a multiple of a
//   positions, the gap after its tokens being padding inside its document.
// Batch.doc_start is then [B, N] int64, global positions as documents.h says.
//
// Splits: train = the first (1 - val_fraction) of the file, validation = the
// rest; or, with a held-out file (data.val_path), train = all of the train
// file and validation = all of the held-out file, which must have the train
// file's vocabulary. PACK moves the cut to the document start nearest to the
// (1 - val_fraction) point (the earlier one on a tie), so no document is in
// both splits; only a file without a document start past position 0 (one
// document) is cut inside that document, whose two parts are then documents
// of their own. Validation packs its split the same way (seed + 1).
// Errors name the file and the numbers: a split shorter than a window (NONE)
// or without a token to predict (PACK), a token id not below the model's
// vocabulary; errors of the held-out file start with "data.val_path".
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <memory>
#include <string>
#include <vector>

#include "loom/runtime/data/token_file.h"

namespace loom {

struct Batch {
  at::Tensor inputs;  // [B, N] int64
  at::Tensor labels;  // [B, N] int64, -100 = ignored
  // [B, N] int64, global positions (documents.h); undefined = one document per
  // row (data.packing NONE, synthetic tasks).
  at::Tensor doc_start;
};

enum class Packing { kNone, kPack };

class TokenSampler {
 public:
  virtual ~TokenSampler() = default;
  // Samples first .. first + batch_size - 1 (first >= 0).
  virtual Batch batch(int64_t first, int64_t batch_size) const = 0;
  // Tokens of the split.
  virtual int64_t tokens() const = 0;
};

class TokenWindowSampler final : public TokenSampler {
 public:
  TokenWindowSampler(std::shared_ptr<TokenFile> file, int64_t begin, int64_t end, int64_t seq_len,
                     int64_t vocab_limit, uint64_t seed, const std::string& split_name);
  Batch batch(int64_t first, int64_t batch_size) const override;
  int64_t tokens() const override { return end_ - begin_; }

 private:
  std::shared_ptr<TokenFile> file_;
  int64_t begin_, end_, seq_len_, vocab_limit_;
  uint64_t seed_;
  std::string split_;
};

class PackedDocumentSampler final : public TokenSampler {
 public:
  // The split is the tokens [begin, end) of `file`; a document that starts
  // before `begin` counts from `begin`, one that ends after `end` up to `end`.
  // Every piece (and the row's padding) starts at a multiple of `alignment`
  // in its row; the gap after a piece up to the next multiple is padding
  // inside the piece's document (token 0, label -100).
  PackedDocumentSampler(std::shared_ptr<TokenFile> file, int64_t begin, int64_t end, int64_t seq_len,
                        int64_t vocab_limit, uint64_t seed, const std::string& split_name, int64_t alignment = 1);
  Batch batch(int64_t first, int64_t batch_size) const override;
  int64_t tokens() const override { return end_ - begin_; }
  // Rows per epoch (R), documents of the split and padding tokens per epoch.
  int64_t rows_per_epoch() const { return static_cast<int64_t>(row_begin_.size()) - 1; }
  int64_t documents() const { return documents_; }
  int64_t padding_per_epoch() const { return rows_per_epoch() * seq_len_ - tokens(); }
  // The row that sample `index` reads (a permutation of [0, R) per epoch).
  int64_t row_of_sample(int64_t index) const;

 private:
  struct Piece {
    int64_t start;   // file position of its first token
    int64_t length;  // tokens, 1 .. seq_len
    bool ends_document;
  };
  void fill_row(int64_t row, int64_t* inputs, int64_t* labels, int64_t* doc_start) const;
  // Row positions a piece of `length` takes from `room` left (aligned).
  int64_t slot(int64_t length, int64_t room) const {
    return std::min(room, (length + alignment_ - 1) / alignment_ * alignment_);
  }

  std::shared_ptr<TokenFile> file_;
  int64_t begin_, end_, seq_len_, vocab_limit_, alignment_;
  uint64_t seed_;
  std::string split_;
  int64_t documents_ = 0;
  std::vector<Piece> pieces_;       // grouped by row
  std::vector<int64_t> row_begin_;  // row r holds pieces_[row_begin_[r] .. row_begin_[r + 1])
};

// The train and validation samplers of a token file (and of a held-out file,
// when `val_path` is not empty; val_fraction is then not used).
struct DataSplits {
  std::shared_ptr<TokenSampler> train, validation;
};
// `document_alignment` (PACK): documents start at multiples of it in their rows.
DataSplits open_data(const std::string& path, double val_fraction, int64_t seq_len, int64_t vocab_limit,
                     uint64_t seed, const std::string& val_path = "", Packing packing = Packing::kNone,
                     int64_t document_alignment = 1);

uint64_t splitmix64(uint64_t x);

// A bijection of [0, n) keyed by `key` (a balanced Feistel network on the
// smallest even number of bits that covers n, cycle-walking back into range):
// a pure function, O(1) memory. n >= 1.
int64_t keyed_permutation(int64_t index, int64_t n, uint64_t key);

}  // namespace loom
