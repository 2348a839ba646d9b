#include "loom/runtime/data/data.h"

#include <algorithm>
#include <map>

#include "loom/runtime/core/error.h"
#include "loom/runtime/core/logging.h"

namespace loom {

uint64_t splitmix64(uint64_t x) {
  x += 0x9e3779b97f4a7c15ull;
  x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
  x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
  return x ^ (x >> 31);
}

int64_t keyed_permutation(int64_t index, int64_t n, uint64_t key) {
  TORCH_CHECK(n >= 1 && index >= 0 && index < n, "keyed_permutation: index ", index, " outside [0, ", n, ")");
  int bits = 2;
  while (bits < 62 && (int64_t{1} << bits) < n) bits += 2;
  const int half = bits / 2;
  const uint64_t mask = (uint64_t{1} << half) - 1;
  uint64_t x = static_cast<uint64_t>(index);
  do {  // cycle walking: the domain is at most 4n, so a few rounds at most on average
    uint64_t left = x >> half, right = x & mask;
    for (uint64_t round = 0; round < 6; ++round) {
      const uint64_t f = splitmix64(key ^ splitmix64(right + (round << 58))) & mask;
      const uint64_t next = left ^ f;
      left = right;
      right = next;
    }
    x = (left << half) | right;
  } while (x >= static_cast<uint64_t>(n));
  return static_cast<int64_t>(x);
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
  return {window.narrow(1, 0, seq_len_).contiguous(), window.narrow(1, 1, seq_len_).contiguous(), at::Tensor()};
}

PackedDocumentSampler::PackedDocumentSampler(std::shared_ptr<TokenFile> file, int64_t begin, int64_t end,
                                             int64_t seq_len, int64_t vocab_limit, uint64_t seed,
                                             const std::string& split_name, int64_t alignment)
    : file_(std::move(file)), begin_(begin), end_(end), seq_len_(seq_len), vocab_limit_(vocab_limit),
      alignment_(alignment), seed_(seed), split_(split_name) {
  TORCH_CHECK(alignment_ >= 1, "PackedDocumentSampler: alignment ", alignment_, " must be >= 1");
  if (static_cast<int64_t>(file_->vocab_size()) > vocab_limit_)
    throw ConfigError("data file '" + file_->path() + "' has vocabulary " + std::to_string(file_->vocab_size()) +
                      " but model.vocab_size is " + std::to_string(vocab_limit_) +
                      ": token ids would not be below the model's vocabulary");
  TORCH_CHECK(seq_len_ >= 1 && 0 <= begin_ && begin_ <= end_ && end_ <= file_->size(),
              "PackedDocumentSampler: split [", begin_, ", ", end_, ") of ", file_->size(), " tokens, seq_len ",
              seq_len_);
  // The split's documents [start, end): file documents clipped to [begin, end).
  const auto& starts = file_->document_starts();
  auto first = std::upper_bound(starts.begin(), starts.end(), begin_) - 1;  // starts[0] == 0 <= begin
  auto last = std::lower_bound(starts.begin(), starts.end(), end_);
  std::vector<int64_t> doc_begin;
  doc_begin.reserve(static_cast<size_t>(last - first));
  if (end_ > begin_)
    for (auto it = first; it != last; ++it) doc_begin.push_back(std::max(*it, begin_));
  documents_ = static_cast<int64_t>(doc_begin.size());
  if (end_ - begin_ - documents_ < 1)
    throw ConfigError("data file '" + file_->path() + "': the " + split_ + " split has " +
                      std::to_string(end_ - begin_) + " tokens in " + std::to_string(documents_) +
                      " documents: no token has a next token in its document to predict (use more data or another "
                      "val_fraction)");
  auto doc_end = [&](size_t d) { return d + 1 < doc_begin.size() ? doc_begin[d + 1] : end_; };

  // The documents in an order shuffled by the seed (Fisher-Yates).
  std::vector<int64_t> order(doc_begin.size());
  for (size_t d = 0; d < order.size(); ++d) order[d] = static_cast<int64_t>(d);
  for (size_t d = order.size(); d > 1; --d) {
    const size_t j = static_cast<size_t>(splitmix64(seed_ ^ splitmix64(0x5eed0000u + d)) % d);
    std::swap(order[d - 1], order[j]);
  }

  // Best fit: each piece gets a row; open rows by their room left.
  std::vector<Piece> placed;
  std::vector<int64_t> row_of;
  placed.reserve(order.size());
  row_of.reserve(order.size());
  int64_t rows = 0;
  std::multimap<int64_t, int64_t> open;  // room -> row
  auto place = [&](const Piece& p, bool whole_row) {
    int64_t row, room = seq_len_;
    auto it = whole_row ? open.end() : open.lower_bound(p.length);
    if (it == open.end()) {
      row = rows++;
    } else {
      row = it->second;
      room = it->first;
      open.erase(it);
    }
    placed.push_back(p);
    row_of.push_back(row);
    const int64_t left = room - slot(p.length, room);
    if (left > 0) open.emplace(left, row);
  };
  for (int64_t d : order) {
    int64_t start = doc_begin[static_cast<size_t>(d)];
    const int64_t stop = doc_end(static_cast<size_t>(d));
    for (; stop - start > seq_len_; start += seq_len_) place(Piece{start, seq_len_, false}, true);
    place(Piece{start, stop - start, true}, false);
  }
  // Group the pieces by row (a counting sort; in placement order inside a row).
  row_begin_.assign(static_cast<size_t>(rows) + 1, 0);
  for (int64_t r : row_of) ++row_begin_[static_cast<size_t>(r) + 1];
  for (size_t r = 0; r < static_cast<size_t>(rows); ++r) row_begin_[r + 1] += row_begin_[r];
  pieces_.resize(placed.size());
  std::vector<int64_t> next(row_begin_.begin(), row_begin_.end() - 1);
  for (size_t k = 0; k < placed.size(); ++k)
    pieces_[static_cast<size_t>(next[static_cast<size_t>(row_of[k])]++)] = placed[k];
  LOOM_LOG(kInfo) << "data file '" << file_->path() << "', " << split_ << " split: " << documents_ << (documents_ == 1 ? " document, " : " documents, ")
                  << tokens() << " tokens packed into " << rows_per_epoch() << " rows of " << seq_len_
                  << " tokens per epoch (" << padding_per_epoch() << " padding tokens)";
}

int64_t PackedDocumentSampler::row_of_sample(int64_t index) const {
  TORCH_CHECK(index >= 0, "PackedDocumentSampler: sample index ", index, " is negative");
  const int64_t rows = rows_per_epoch();
  const uint64_t epoch = static_cast<uint64_t>(index / rows);
  return keyed_permutation(index % rows, rows, splitmix64(seed_ ^ splitmix64(0xe90c0000u + epoch)));
}

void PackedDocumentSampler::fill_row(int64_t row, int64_t* inputs, int64_t* labels, int64_t* doc_start) const {
  int64_t at = 0;
  for (int64_t k = row_begin_[static_cast<size_t>(row)]; k < row_begin_[static_cast<size_t>(row) + 1]; ++k) {
    const Piece& p = pieces_[static_cast<size_t>(k)];
    // The piece and, when its document goes on, the token after it (its last label).
    file_->read(p.start, p.ends_document ? p.length : p.length + 1, labels + at);
    std::copy(labels + at, labels + at + p.length, inputs + at);
    for (int64_t i = 0; i < p.length + (p.ends_document ? 0 : 1); ++i)
      if (labels[at + i] >= vocab_limit_)
        throw LoomError("data file '" + file_->path() + "': token id " + std::to_string(labels[at + i]) +
                        " at position " + std::to_string(p.start + i) + " is not below model.vocab_size " +
                        std::to_string(vocab_limit_));
    // labels[at + i] = token i + 1 of the piece: shift left by one.
    std::copy(labels + at + 1, labels + at + p.length + (p.ends_document ? 0 : 1), labels + at);
    if (p.ends_document) labels[at + p.length - 1] = -100;
    // Up to the next aligned position: padding inside the piece's document.
    const int64_t taken = slot(p.length, seq_len_ - at);
    std::fill(inputs + at + p.length, inputs + at + taken, 0);
    std::fill(labels + at + p.length, labels + at + taken, -100);
    std::fill(doc_start + at, doc_start + at + taken, at);
    at += taken;
  }
  std::fill(inputs + at, inputs + seq_len_, 0);  // padding: a document of its own, nothing to predict
  std::fill(labels + at, labels + seq_len_, -100);
  std::fill(doc_start + at, doc_start + seq_len_, at);
}

Batch PackedDocumentSampler::batch(int64_t first, int64_t batch_size) const {
  TORCH_CHECK(first >= 0 && batch_size >= 0, "PackedDocumentSampler::batch(", first, ", ", batch_size, ")");
  at::Tensor inputs = at::empty({batch_size, seq_len_}, at::kLong);
  // One spare slot: a piece whose document goes on reads one token past the row.
  at::Tensor labels = at::empty({batch_size, seq_len_ + 1}, at::kLong);
  at::Tensor doc_start = at::empty({batch_size, seq_len_}, at::kLong);
  for (int64_t b = 0; b < batch_size; ++b)
    fill_row(row_of_sample(first + b), inputs.data_ptr<int64_t>() + b * seq_len_,
             labels.data_ptr<int64_t>() + b * (seq_len_ + 1), doc_start.data_ptr<int64_t>() + b * seq_len_);
  return {inputs, labels.narrow(1, 0, seq_len_).contiguous(), doc_start};
}

namespace {

std::shared_ptr<TokenSampler> make_sampler(Packing packing, std::shared_ptr<TokenFile> file, int64_t begin, int64_t end,
                                           int64_t seq_len, int64_t vocab_limit, uint64_t seed,
                                           const std::string& split_name, int64_t alignment) {
  if (packing == Packing::kPack)
    return std::make_shared<PackedDocumentSampler>(std::move(file), begin, end, seq_len, vocab_limit, seed, split_name,
                                                   alignment);
  return std::make_shared<TokenWindowSampler>(std::move(file), begin, end, seq_len, vocab_limit, seed, split_name);
}

// PACK: the document start nearest to `cut` (the earlier on a tie), so that no
// document is in both splits; `cut` itself when the file has no document
// start past 0, or when cut is at the end (val_fraction 0: no validation).
int64_t document_cut(const TokenFile& file, int64_t cut) {
  const auto& starts = file.document_starts();
  if (cut >= file.size() || starts.size() < 2) return cut;
  const auto after = std::lower_bound(starts.begin() + 1, starts.end(), cut);
  if (after == starts.begin() + 1) return *after;
  if (after == starts.end()) return *(after - 1);
  return cut - *(after - 1) <= *after - cut ? *(after - 1) : *after;
}

}  // namespace

DataSplits open_data(const std::string& path, double val_fraction, int64_t seq_len, int64_t vocab_limit,
                     uint64_t seed, const std::string& val_path, Packing packing, int64_t document_alignment) {
  if (path.empty()) throw ConfigError("data.train_path is empty: name a token file (loom-data prepare makes one)");
  auto file = std::make_shared<TokenFile>(path);
  const int64_t n = file->size();
  DataSplits d;
  if (!val_path.empty()) {
    d.train = make_sampler(packing, file, 0, n, seq_len, vocab_limit, seed, "train", document_alignment);
    try {
      auto held_out = std::make_shared<TokenFile>(val_path);
      if (held_out->vocab_size() != file->vocab_size())
        throw ConfigError("token file '" + val_path + "' has vocabulary " + std::to_string(held_out->vocab_size()) +
                          " but data.train_path '" + path + "' has " + std::to_string(file->vocab_size()) +
                          ": they were not made with the same tokenizer");
      d.validation = make_sampler(packing, held_out, 0, held_out->size(), seq_len, vocab_limit, splitmix64(seed + 1),
                                  "validation", document_alignment);
    } catch (const LoomError& e) {
      throw ConfigError(std::string("data.val_path: ") + e.what());
    }
    return d;
  }
  int64_t split = static_cast<int64_t>(static_cast<double>(n) * (1.0 - val_fraction));
  if (packing == Packing::kPack) split = document_cut(*file, split);
  d.train = make_sampler(packing, file, 0, split, seq_len, vocab_limit, seed, "train", document_alignment);
  d.validation = make_sampler(packing, file, split, n, seq_len, vocab_limit, splitmix64(seed + 1), "validation",
                             document_alignment);
  return d;
}

}  // namespace loom
