// Documents in the data path: the token file's document index (written,
// validated, version-1 files as one document) and the PACK sampler (every
// token of a split exactly once per epoch, labels -100 exactly at document
// ends and padding, doc_start as documents.h says, a pure function of (seed,
// sample index), splits at a document boundary), and NONE as the old stream.
// One rank.
#include <fcntl.h>
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <set>
#include <string>
#include <vector>

#include "loom/runtime/core/error.h"
#include "scratch_dir.h"
#include "loom/runtime/data/data.h"
#include "loom/runtime/data/token_file.h"

namespace loom {
namespace {
namespace fs = std::filesystem;

struct ScratchDir : testing::ScratchDir {
  ScratchDir() : testing::ScratchDir("loom-packing") {}
};

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "";
}

// Document lengths 1 .. max_length from a fixed generator; returns the starts.
std::vector<int64_t> document_starts(int64_t tokens, int64_t max_length, uint64_t seed) {
  std::vector<int64_t> starts;
  for (int64_t at = 0, k = 0; at < tokens; ++k) {
    starts.push_back(at);
    at += 1 + static_cast<int64_t>(splitmix64(seed + static_cast<uint64_t>(k)) % static_cast<uint64_t>(max_length));
  }
  return starts;
}

// Token i is i + 1 (vocabulary above the count): every token names its
// position, and 0 is left for padding.
std::vector<uint32_t> positions(int64_t n) {
  std::vector<uint32_t> t(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) t[static_cast<size_t>(i)] = static_cast<uint32_t>(i + 1);
  return t;
}

// A token file written byte by byte: version, documents and index as given,
// with correct checksums unless told otherwise.
void write_raw(const std::string& path, uint32_t version, const std::vector<uint16_t>& tokens,
               const std::vector<uint64_t>& index, bool bad_index_checksum = false) {
  std::vector<unsigned char> h(64, 0), body(tokens.size() * 2), idx(index.size() * 8);
  std::memcpy(body.data(), tokens.data(), body.size());
  std::memcpy(idx.data(), index.data(), idx.size());
  const uint32_t vocab = 256, width = 2;
  const uint64_t count = tokens.size(), checksum = fnv1a64(body.data(), body.size());
  const uint64_t documents = index.size(),
                 index_checksum = fnv1a64(idx.data(), idx.size()) + (bad_index_checksum ? 1 : 0);
  std::memcpy(h.data(), "LOOMTOK\0", 8);
  std::memcpy(h.data() + 8, &version, 4);
  std::memcpy(h.data() + 12, &vocab, 4);
  std::memcpy(h.data() + 16, &width, 4);
  std::memcpy(h.data() + 24, &count, 8);
  std::memcpy(h.data() + 32, &checksum, 8);
  if (version >= 2) {
    std::memcpy(h.data() + 40, &documents, 8);
    std::memcpy(h.data() + 48, &index_checksum, 8);
  }
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out.write(reinterpret_cast<const char*>(h.data()), 64);
  out.write(reinterpret_cast<const char*>(body.data()), static_cast<std::streamsize>(body.size()));
  if (version >= 2) out.write(reinterpret_cast<const char*>(idx.data()), static_cast<std::streamsize>(idx.size()));
}

TEST(TokenFileIndex, DocumentStartsSurviveTheRoundTrip) {
  ScratchDir dir;
  const auto starts = document_starts(5000, 40, 3);
  write_token_file(dir.file("d.tok"), positions(5000), 1 << 20, starts);
  TokenFile f(dir.file("d.tok"));
  EXPECT_EQ(f.header().version, 2u);
  EXPECT_TRUE(f.has_document_index());
  EXPECT_EQ(f.document_starts(), starts);
  EXPECT_EQ(f.documents(), static_cast<int64_t>(starts.size()));
  EXPECT_EQ(f.header().token_bytes, 4u);
  std::vector<int64_t> out(3);
  f.read(4997, 3, out.data());
  EXPECT_EQ(out, (std::vector<int64_t>{4998, 4999, 5000}));
  // Without starts: one document.
  write_token_file(dir.file("one.tok"), positions(100), 256);  // ids 1 .. 100
  EXPECT_EQ(TokenFile(dir.file("one.tok")).document_starts(), (std::vector<int64_t>{0}));
}

TEST(TokenFileIndex, StreamingWriterMatchesTheWholeFileWriter) {
  ScratchDir dir;
  const auto tokens = positions(3000);
  const auto starts = document_starts(3000, 100, 9);
  write_token_file(dir.file("whole.tok"), tokens, 4000, starts);
  {
    TokenFileWriter w(dir.file("stream.tok"), 4000);
    for (size_t d = 0; d < starts.size(); ++d) {
      w.begin_document();
      const int64_t end = d + 1 < starts.size() ? starts[d + 1] : 3000;
      for (int64_t i = starts[d]; i < end; ++i) w.append(&tokens[static_cast<size_t>(i)], 1);  // token by token
    }
    EXPECT_TRUE(fs::exists(w.temporary_path()));
    w.finish();
  }
  std::ifstream a(dir.file("whole.tok"), std::ios::binary), b(dir.file("stream.tok"), std::ios::binary);
  const std::string sa((std::istreambuf_iterator<char>(a)), {}), sb((std::istreambuf_iterator<char>(b)), {});
  EXPECT_EQ(sa, sb);
  EXPECT_EQ(sa.size(), 64 + 3000 * 2 + starts.size() * 8);
}

TEST(TokenFileIndex, WriterRefusesEmptyDocumentsAndLeavesNothingBehind) {
  ScratchDir dir;
  const uint32_t t[2] = {1, 2};
  {
    TokenFileWriter w(dir.file("e.tok"), 256);
    w.begin_document();
    w.append(t, 2);
    w.begin_document();
    EXPECT_NE(error_of([&] { w.begin_document(); }).find("document 1 is empty"), std::string::npos);
  }
  {
    TokenFileWriter w(dir.file("e.tok"), 256);
    w.begin_document();
    w.append(t, 2);
    w.begin_document();
    EXPECT_NE(error_of([&] { w.finish(); }).find("token file '" + dir.file("e.tok") + "': document 1 is empty"),
              std::string::npos);
  }
  {
    TokenFileWriter w(dir.file("e.tok"), 256);  // destroyed unfinished
    w.begin_document();
    w.append(t, 2);
  }
  EXPECT_TRUE(fs::is_empty(dir.path)) << "a temporary file was left behind";
  EXPECT_NE(error_of([&] {
              write_token_file(dir.file("x.tok"), positions(10), 256, {0, 5, 5});
            }).find("must increase strictly"),
            std::string::npos);
  EXPECT_NE(error_of([&] {
              write_token_file(dir.file("x.tok"), positions(10), 256, {1, 5});
            }).find("not 0"),
            std::string::npos);
  EXPECT_FALSE(fs::exists(dir.file("x.tok")));
}

TEST(TokenFileIndex, VersionOneFilesLoadAsOneDocument) {
  ScratchDir dir;
  write_raw(dir.file("v1.tok"), 1, {1, 2, 3, 4, 5}, {});
  TokenFile f(dir.file("v1.tok"));
  EXPECT_EQ(f.header().version, 1u);
  EXPECT_FALSE(f.has_document_index());
  EXPECT_EQ(f.document_starts(), (std::vector<int64_t>{0}));
  EXPECT_EQ(f.size(), 5);
  // The PACK sampler takes it as one document: non-overlapping windows.
  PackedDocumentSampler s(std::make_shared<TokenFile>(dir.file("v1.tok")), 0, 5, 2, 256, 1, "train");
  EXPECT_EQ(s.rows_per_epoch(), 3);
  EXPECT_EQ(s.documents(), 1);
}

TEST(TokenFileIndex, BadIndexesAreNamedErrors) {
  ScratchDir dir;
  const std::vector<uint16_t> tokens = {1, 2, 3, 4, 5, 6};
  const std::string path = dir.file("bad.tok");
  auto error_for = [&](const std::vector<uint64_t>& index, bool bad_checksum = false) {
    write_raw(path, 2, tokens, index, bad_checksum);
    return error_of([&] { TokenFile f(path); });
  };
  EXPECT_EQ(error_for({0, 2, 5}), "");
  EXPECT_NE(error_for({0, 2, 5}, true).find("token file '" + path + "': document index checksum mismatch"),
            std::string::npos);
  EXPECT_NE(error_for({1, 3}).find("token file '" + path + "': corrupt document index: the first document starts at 1"),
            std::string::npos);
  EXPECT_NE(error_for({0, 3, 2}).find("document 2 starts at 2, not after document 1"), std::string::npos);
  EXPECT_NE(error_for({0, 3, 3}).find("(no empty document)"), std::string::npos);
  EXPECT_NE(error_for({0, 6}).find("document 1 starts at 6, not below the 6 tokens"), std::string::npos);
  EXPECT_NE(error_for({}).find("its document index holds no documents"), std::string::npos);
  // An index cut short: the size no longer matches the header.
  write_raw(path, 2, tokens, {0, 2, 5});
  fs::resize_file(path, fs::file_size(path) - 4);
  EXPECT_NE(error_of([&] { TokenFile f(path); }).find("+ 3 x 8 (document index) (truncated or corrupt)"),
            std::string::npos);
}

TEST(TokenFileIndex, ARewrittenIndexIsAChangeUnderTheRunningJob) {
  ScratchDir dir;
  const std::string path = dir.file("c.tok");
  write_raw(path, 2, {1, 2, 3, 4, 5, 6}, {0, 2, 5});
  TokenFile f(path);
  {
    std::fstream io(path, std::ios::binary | std::ios::in | std::ios::out);
    io.seekp(64 + 12 + 8);
    const uint64_t moved = 3;
    io.write(reinterpret_cast<const char*>(&moved), 8);
  }
  struct timespec later[2] = {{0, UTIME_NOW}, {::time(nullptr) + 5, 0}};
  ::utimensat(AT_FDCWD, path.c_str(), later, 0);
  std::vector<int64_t> out(1);
  EXPECT_NE(error_of([&] { f.read(0, 1, out.data()); }).find("changed under the running job"), std::string::npos);
}

// Checks rows [B, N] of PACK against a file whose token at position p is
// p + 1 (so 0 is only padding): returns how many times each position appears
// as an input. Inside a document piece the tokens are consecutive positions of
// one document; labels are the next position of the same document, else -100;
// padding is a trailing document of 0s with labels -100.
std::vector<int> check_rows(const Batch& b, const std::vector<int64_t>& starts, int64_t begin, int64_t end,
                            int64_t alignment = 1) {
  std::vector<int> seen(static_cast<size_t>(end), 0);
  const int64_t rows = b.inputs.size(0), n = b.inputs.size(1);
  EXPECT_TRUE(b.doc_start.defined());
  EXPECT_EQ(b.labels.sizes(), b.inputs.sizes());
  EXPECT_EQ(b.doc_start.sizes(), b.inputs.sizes());
  auto in = b.inputs.accessor<int64_t, 2>();
  auto lab = b.labels.accessor<int64_t, 2>();
  auto ds = b.doc_start.accessor<int64_t, 2>();
  // The end of the document (of the file, clipped to the split) holding p.
  auto doc_stop = [&](int64_t p) {
    auto it = std::upper_bound(starts.begin(), starts.end(), p);
    return it == starts.end() ? end : std::min(*it, end);
  };
  for (int64_t r = 0; r < rows; ++r) {
    EXPECT_EQ(ds[r][0], 0);
    for (int64_t t = 0; t < n; ++t) {
      const bool starts_here = ds[r][t] == t;
      if (!starts_here) EXPECT_EQ(ds[r][t], ds[r][t - 1]) << "row " << r << " token " << t;
      if (starts_here) EXPECT_EQ(t % alignment, 0) << "row " << r << ": a document starts at " << t;
      if (in[r][t] == 0) {  // padding: label -100, inside the document before it or, at the row's end, its own
        EXPECT_EQ(lab[r][t], -100);
        if (!starts_here) continue;
        for (int64_t u = t; u < n; ++u) {
          EXPECT_EQ(in[r][u], 0) << "row " << r << ": padding document is not at the end";
          EXPECT_EQ(lab[r][u], -100);
          EXPECT_EQ(ds[r][u], t);
        }
        break;
      }
      if (!starts_here && in[r][t - 1] == 0) ADD_FAILURE() << "row " << r << " token " << t << ": text after padding";
      const int64_t p = in[r][t] - 1;
      if (!starts_here) EXPECT_EQ(p, in[r][t - 1]) << "row " << r << " token " << t << ": not the next token";
      EXPECT_GE(p, begin);
      EXPECT_LT(p, end);
      if (p < begin || p >= end) continue;
      ++seen[static_cast<size_t>(p)];
      const int64_t expected_label = p + 1 < doc_stop(p) ? p + 2 : -100;
      EXPECT_EQ(lab[r][t], expected_label) << "row " << r << " token " << t << " position " << p;
    }
  }
  return seen;
}

TEST(Packing, EveryTokenExactlyOncePerEpochWithLabelsAndDocumentStarts) {
  ScratchDir dir;
  const int64_t n = 4001, seq_len = 16;
  const auto starts = document_starts(n, 3 * seq_len, 11);  // lengths 1 .. 48: short, exact, long
  write_token_file(dir.file("p.tok"), positions(n), 1 << 20, starts);
  auto file = std::make_shared<TokenFile>(dir.file("p.tok"));
  PackedDocumentSampler s(file, 0, n, seq_len, 1 << 20, 7, "train");
  const int64_t rows = s.rows_per_epoch();
  EXPECT_EQ(s.documents(), static_cast<int64_t>(starts.size()));
  EXPECT_GE(rows * seq_len, n);
  EXPECT_EQ(s.padding_per_epoch(), rows * seq_len - n);
  EXPECT_LT(s.padding_per_epoch(), n / 10) << "best fit should leave little padding";
  for (int64_t epoch = 0; epoch < 2; ++epoch) {
    const Batch b = s.batch(epoch * rows, rows);
    const auto seen = check_rows(b, starts, 0, n);
    for (int64_t p = 0; p < n; ++p)
      ASSERT_EQ(seen[static_cast<size_t>(p)], 1) << "position " << p << ", epoch " << epoch;
    // Labels: exactly the documents' last tokens and the padding are ignored.
    const int64_t ignored = b.labels.eq(-100).sum().item<int64_t>();
    const int64_t padding = s.padding_per_epoch();
    EXPECT_EQ(ignored, static_cast<int64_t>(starts.size()) + padding);
  }
  // Epochs visit the rows in different orders, each a permutation.
  std::set<int64_t> epoch0, epoch1;
  std::vector<int64_t> order0, order1;
  for (int64_t i = 0; i < rows; ++i) {
    order0.push_back(s.row_of_sample(i));
    order1.push_back(s.row_of_sample(rows + i));
  }
  epoch0.insert(order0.begin(), order0.end());
  epoch1.insert(order1.begin(), order1.end());
  EXPECT_EQ(static_cast<int64_t>(epoch0.size()), rows);
  EXPECT_EQ(static_cast<int64_t>(epoch1.size()), rows);
  EXPECT_NE(order0, order1);
}

TEST(Packing, DocumentsStartAtMultiplesOfTheAlignment) {
  ScratchDir dir;
  const int64_t n = 3001;
  const auto starts = document_starts(n, 40, 13);
  write_token_file(dir.file("p.tok"), positions(n), 1 << 20, starts);
  for (const auto& [seq_len, alignment] : std::vector<std::pair<int64_t, int64_t>>{{16, 4}, {18, 4}, {20, 5}, {16, 16}}) {
    PackedDocumentSampler s(std::make_shared<TokenFile>(dir.file("p.tok")), 0, n, seq_len, 1 << 20, 5, "train",
                            alignment);
    const Batch b = s.batch(0, s.rows_per_epoch());
    const auto seen = check_rows(b, starts, 0, n, alignment);
    for (int64_t p = 0; p < n; ++p) ASSERT_EQ(seen[static_cast<size_t>(p)], 1) << p << ", alignment " << alignment;
    // Ignored labels: each document's last token and every padding token.
    EXPECT_EQ(b.labels.eq(-100).sum().item<int64_t>(), static_cast<int64_t>(starts.size()) + s.padding_per_epoch());
  }
}

TEST(Packing, APureFunctionOfSeedAndSampleIndex) {
  ScratchDir dir;
  const int64_t n = 3000;
  const auto starts = document_starts(n, 50, 5);
  write_token_file(dir.file("p.tok"), positions(n), 1 << 20, starts);
  auto open = [&](uint64_t seed) {
    return PackedDocumentSampler(std::make_shared<TokenFile>(dir.file("p.tok")), 0, n, 32, 1 << 20, seed, "train");
  };
  const auto a = open(42), b = open(42), c = open(43);
  const Batch whole = a.batch(0, 40);
  const Batch part = b.batch(17, 9);  // a resumed run asks from the middle
  EXPECT_TRUE(whole.inputs.narrow(0, 17, 9).equal(part.inputs));
  EXPECT_TRUE(whole.labels.narrow(0, 17, 9).equal(part.labels));
  EXPECT_TRUE(whole.doc_start.narrow(0, 17, 9).equal(part.doc_start));
  EXPECT_TRUE(a.batch(1000, 4).inputs.equal(b.batch(1000, 4).inputs));
  EXPECT_FALSE(whole.inputs.equal(c.batch(0, 40).inputs));
}

TEST(Packing, SplitsCutAtADocumentBoundaryAndValidationPacksToo) {
  ScratchDir dir;
  const int64_t n = 5000;
  const auto starts = document_starts(n, 60, 21);
  write_token_file(dir.file("p.tok"), positions(n), 1 << 20, starts);
  const DataSplits d = open_data(dir.file("p.tok"), 0.1, 24, 1 << 20, 3, "", Packing::kPack);
  const int64_t cut = d.train->tokens();
  EXPECT_EQ(cut + d.validation->tokens(), n);
  EXPECT_TRUE(std::binary_search(starts.begin(), starts.end(), cut)) << "cut at " << cut << ", not a document start";
  EXPECT_LE(std::abs(cut - 4500), 60);
  auto* train = dynamic_cast<PackedDocumentSampler*>(d.train.get());
  auto* validation = dynamic_cast<PackedDocumentSampler*>(d.validation.get());
  ASSERT_NE(train, nullptr);
  ASSERT_NE(validation, nullptr);
  const auto seen_train = check_rows(train->batch(0, train->rows_per_epoch()), starts, 0, cut);
  const auto seen_val = check_rows(validation->batch(0, validation->rows_per_epoch()), starts, cut, n);
  for (int64_t p = 0; p < cut; ++p) ASSERT_EQ(seen_train[static_cast<size_t>(p)], 1) << p;
  for (int64_t p = cut; p < n; ++p) ASSERT_EQ(seen_val[static_cast<size_t>(p)], 1) << p;
  // One document: cut inside it, both parts documents of their own.
  write_token_file(dir.file("one.tok"), positions(1000), 1 << 20);
  const DataSplits one = open_data(dir.file("one.tok"), 0.1, 24, 1 << 20, 3, "", Packing::kPack);
  EXPECT_EQ(one.train->tokens(), 900);
  const Batch v = one.validation->batch(0, 5);
  EXPECT_GE(v.inputs.index({at::indexing::Slice(), 0}).min().item<int64_t>(), 901);
  // A split with nothing to predict is a named error.
  write_token_file(dir.file("ones.tok"), positions(20), 256, {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 12});  // cut at 10
  EXPECT_NE(error_of([&] {
              open_data(dir.file("ones.tok"), 0.5, 4, 256, 1, "", Packing::kPack);
            }).find("the train split has 10 tokens in 10 documents: no token has a next token"),
            std::string::npos);
}

TEST(Packing, NoneIsTheWindowStreamOfBefore) {
  ScratchDir dir;
  const int64_t n = 2000, seq_len = 16;
  write_token_file(dir.file("p.tok"), positions(n), 1 << 20, document_starts(n, 30, 2));
  const DataSplits d = open_data(dir.file("p.tok"), 0.1, seq_len, 1 << 20, 9, "", Packing::kNone);
  EXPECT_EQ(d.train->tokens(), 1800);  // no move to a document boundary
  const Batch b = d.train->batch(5, 3);
  EXPECT_FALSE(b.doc_start.defined());
  for (int64_t r = 0; r < 3; ++r) {
    // The formula Loom always used: start = splitmix64(seed ^ splitmix64(i)) % (tokens - seq_len).
    const int64_t start =
        static_cast<int64_t>(splitmix64(9 ^ splitmix64(5 + r)) % static_cast<uint64_t>(1800 - seq_len));
    for (int64_t t = 0; t < seq_len; ++t) {
      EXPECT_EQ(b.inputs[r][t].item<int64_t>(), start + t + 1);
      EXPECT_EQ(b.labels[r][t].item<int64_t>(), start + t + 2);
    }
  }
}

TEST(Packing, KeyedPermutationIsABijection) {
  for (int64_t n : {1, 2, 3, 4, 5, 17, 64, 1000, 4097}) {
    std::vector<int> hit(static_cast<size_t>(n), 0);
    for (int64_t i = 0; i < n; ++i) ++hit[static_cast<size_t>(keyed_permutation(i, n, 12345))];
    EXPECT_TRUE(std::all_of(hit.begin(), hit.end(), [](int v) { return v == 1; })) << "n = " << n;
  }
}

}  // namespace
}  // namespace loom
