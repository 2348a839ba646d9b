// Test helpers for packed documents (runtime/comm/documents.h): rows of
// document lengths that put boundaries where the layout makes them hard, and
// the reference every operator is checked against: each document run alone
// on one rank, outputs concatenated.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <functional>
#include <map>
#include <set>
#include <string>
#include <vector>

#include "loom/runtime/comm/sequence_layout.h"

namespace loom::testing {

// Document lengths of a row of n tokens cut before each position in `cuts`
// (positions outside (0, n) and repeats are ignored).
inline std::vector<int64_t> lengths_from_cuts(const std::vector<int64_t>& cuts, int64_t n) {
  std::set<int64_t> inside;
  for (int64_t c : cuts)
    if (c > 0 && c < n) inside.insert(c);
  std::vector<int64_t> lengths;
  int64_t start = 0;
  for (int64_t c : inside) {
    lengths.push_back(c - start);
    start = c;
  }
  lengths.push_back(n - start);
  return lengths;
}

// Rows of documents (batch of two) for a layout, together covering: documents
// of length 1, a document starting at a chunk's first token and one ending at
// its last, one spanning two ranks, one spanning all ranks, a row that is one
// document, and random lengths. The layout's N need not divide into chunks.
struct DocumentRows {
  std::string name;
  std::vector<std::vector<int64_t>> lengths;  // [B][documents], each row sums to N
};

inline std::vector<DocumentRows> document_rows(const SequenceLayout& layout, uint64_t seed) {
  const int64_t n = layout.global_len(), L = layout.chunk_len();
  std::vector<DocumentRows> rows;
  // Row 0: length-1 documents at 0 and 1, [2, L) ends at chunk 0's last token,
  // [L, 2L-1) starts at chunk 1's first token, a length-1 document at 2L-1.
  // Row 1: one document.
  rows.push_back({"edges+one", {lengths_from_cuts({1, 2, L, 2 * L - 1, 2 * L}, n), {n}}});
  // Row 0: [L-1, n-1) spans every chunk (every rank). Row 1: [L-2, L+2) spans
  // chunks 0 and 1 (ranks 0 and 1 in both layouts).
  rows.push_back({"span-all+span-two", {lengths_from_cuts({L - 1, n - 1}, n), lengths_from_cuts({L - 2, L + 2}, n)}});
  // Row 0: every token its own document. Row 1: random lengths 1..L+2.
  std::vector<int64_t> ones(static_cast<size_t>(n), 1), random_lengths;
  uint64_t state = seed * 6364136223846793005ULL + 1442695040888963407ULL;
  for (int64_t left = n; left > 0;) {
    state = state * 6364136223846793005ULL + 1442695040888963407ULL;
    const int64_t len = std::min<int64_t>(left, 1 + static_cast<int64_t>((state >> 33) % static_cast<uint64_t>(L + 2)));
    random_lengths.push_back(len);
    left -= len;
  }
  rows.push_back({"ones+random", {ones, random_lengths}});
  return rows;
}

// The reference: `op` runs on each document alone. For row b and document
// [s, s+len) it gets every input narrowed to batch row b and to [s, s+len)
// along `seq_dim`, and returns its outputs (sequence also on `seq_dim`); the
// outputs are concatenated along the sequence, then the rows along dim 0.
// Documents of the same length run together as one batch (rows of a batch
// never see each other, and a row of length-1 documents would otherwise be
// N separate calls). Differentiable: gradients reach the inputs through
// narrow, cat and split.
inline std::vector<at::Tensor> each_document_alone(
    const std::vector<std::vector<int64_t>>& lengths, const std::vector<at::Tensor>& inputs, int64_t seq_dim,
    const std::function<std::vector<at::Tensor>(const std::vector<at::Tensor>&)>& op) {
  struct Piece {
    int64_t row, start;
  };
  std::map<int64_t, std::vector<Piece>> by_length;
  std::vector<std::vector<std::pair<int64_t, size_t>>> order(lengths.size());  // (length, index in its group)
  for (size_t b = 0; b < lengths.size(); ++b) {
    int64_t start = 0;
    for (int64_t len : lengths[b]) {
      auto& group = by_length[len];
      order[b].emplace_back(len, group.size());
      group.push_back({static_cast<int64_t>(b), start});
      start += len;
    }
  }
  std::map<int64_t, std::vector<std::vector<at::Tensor>>> outputs;  // length -> [output][piece]
  for (const auto& [len, group] : by_length) {
    std::vector<at::Tensor> batch;
    for (const auto& x : inputs) {
      std::vector<at::Tensor> docs;
      for (const Piece& p : group) docs.push_back(x.narrow(0, p.row, 1).narrow(seq_dim, p.start, len));
      batch.push_back(at::cat(docs, 0));
    }
    auto& per_output = outputs[len];
    for (const at::Tensor& out : op(batch)) per_output.push_back(out.split(1, 0));
  }
  std::vector<std::vector<at::Tensor>> rows;  // [output][row]
  for (size_t b = 0; b < lengths.size(); ++b) {
    std::vector<std::vector<at::Tensor>> pieces;  // [output][document]
    for (const auto& [len, i] : order[b]) {
      const auto& per_output = outputs.at(len);
      pieces.resize(per_output.size());
      for (size_t o = 0; o < per_output.size(); ++o) pieces[o].push_back(per_output[o][i]);
    }
    rows.resize(pieces.size());
    for (size_t o = 0; o < pieces.size(); ++o) rows[o].push_back(at::cat(pieces[o], seq_dim));
  }
  std::vector<at::Tensor> out;
  for (const auto& r : rows) out.push_back(at::cat(r, 0));
  return out;
}

inline std::string describe_lengths(const std::vector<std::vector<int64_t>>& lengths) {
  std::string s;
  for (const auto& row : lengths) {
    s += "[";
    for (size_t i = 0; i < row.size(); ++i) s += (i ? "," : "") + std::to_string(row[i]);
    s += "]";
  }
  return s;
}

}  // namespace loom::testing
