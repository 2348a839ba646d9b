// loom-data prepare's corpus path (runtime/data/corpus.h): round trips of
// plain text, paragraphs, JSONL, gzip and zstd inputs, several files,
// directories and globs, dictd entries (with and without the index); the
// document index equals the inputs' documents; long documents reach the
// tokenizer in bounded pieces; bad inputs are errors naming file:line and
// leave no file behind. One rank.
#include "loom/runtime/data/corpus.h"

#include <gtest/gtest.h>
#include <unistd.h>
#include <zlib.h>
#include <zstd.h>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <functional>
#include <sstream>
#include <string>
#include <vector>

#include "loom/runtime/core/error.h"
#include "scratch_dir.h"
#include "loom/runtime/data/token_file.h"

namespace loom {
namespace {
namespace fs = std::filesystem;

struct ScratchDir : testing::ScratchDir {
  ScratchDir() : testing::ScratchDir("loom-corpus") {}
};

void write_file(const std::string& path, const std::string& bytes) {
  fs::create_directories(fs::path(path).parent_path());
  std::ofstream(path, std::ios::binary | std::ios::trunc) << bytes;
}

void write_gzip(const std::string& path, const std::string& bytes) {
  gzFile f = gzopen(path.c_str(), "wb");
  ASSERT_NE(f, nullptr);
  ASSERT_EQ(gzwrite(f, bytes.data(), static_cast<unsigned>(bytes.size())), static_cast<int>(bytes.size()));
  ASSERT_EQ(gzclose(f), Z_OK);
}

std::string zstd_bytes(const std::string& bytes) {
  std::string out(ZSTD_compressBound(bytes.size()), '\0');
  const size_t n = ZSTD_compress(out.data(), out.size(), bytes.data(), bytes.size(), 3);
  EXPECT_FALSE(ZSTD_isError(n));
  out.resize(n);
  return out;
}

// Byte tokens that remember the longest piece they were given.
class RecordingByteTokenizer final : public Tokenizer {
 public:
  std::vector<uint32_t> encode(const std::string& text) const override {
    longest_piece = std::max(longest_piece, text.size());
    return byte_tokenize(text);
  }
  std::string decode(const std::vector<int64_t>& ids) const override { return byte_detokenize(ids); }
  uint32_t vocab_size() const override { return 256; }
  mutable size_t longest_piece = 0;
};

// The documents of a token file, as byte strings.
std::vector<std::string> documents_of(const std::string& path) {
  TokenFile f(path);
  std::vector<std::string> docs;
  const auto& starts = f.document_starts();
  for (size_t d = 0; d < starts.size(); ++d) {
    const int64_t end = d + 1 < starts.size() ? starts[d + 1] : f.size();
    std::vector<int64_t> ids(static_cast<size_t>(end - starts[d]));
    f.read(starts[d], end - starts[d], ids.data());
    docs.push_back(byte_detokenize(ids));
  }
  return docs;
}

PrepareOptions options_for(const std::vector<std::string>& inputs, const std::string& output) {
  PrepareOptions o;
  o.inputs = inputs;
  o.output = output;
  o.progress_seconds = 1e9;
  return o;
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const std::exception& e) {
    return e.what();
  }
  return "";
}

const std::string kJsonl =
    "{\"id\": 1, \"text\": \"first document\"}\n"
    "\n"
    "{\"text\": \"caf\\u00e9 \\\"quoted\\\"\\nline two\", \"meta\": {\"text\": 5}}\n"
    "{\"text\": \"third\"}";  // no final newline
const std::vector<std::string> kJsonlDocuments = {"first document", "caf\xc3\xa9 \"quoted\"\nline two", "third"};

TEST(CorpusPrepare, JsonlPlainGzipAndZstdRoundTrip) {
  ScratchDir dir;
  RecordingByteTokenizer tok;
  write_file(dir.file("a.jsonl"), kJsonl);
  write_gzip(dir.file("b.jsonl.gz"), kJsonl);
  write_file(dir.file("c.jsonl.zst"), zstd_bytes(kJsonl));
  for (const std::string name : {"a.jsonl", "b.jsonl.gz", "c.jsonl.zst"}) {
    const auto report = prepare_token_file(options_for({dir.file(name)}, dir.file("out.tok")), tok, nullptr);
    EXPECT_EQ(documents_of(dir.file("out.tok")), kJsonlDocuments) << name;
    EXPECT_EQ(report.documents, 3);
    EXPECT_EQ(report.bytes_read, kJsonl.size());
  }
  // Another field, and an end-of-document token after every document.
  write_file(dir.file("d.jsonl"), "{\"body\": \"xy\"}\n{\"body\": \"z\"}\n");
  auto o = options_for({dir.file("d.jsonl")}, dir.file("out.tok"));
  o.jsonl_field = "body";
  o.eod_token = 0;
  prepare_token_file(o, tok, nullptr);
  EXPECT_EQ(documents_of(dir.file("out.tok")),
            (std::vector<std::string>{std::string("xy\0", 3), std::string("z\0", 2)}));
}

TEST(CorpusPrepare, FilesDirectoriesAndGlobsInSortedOrder) {
  ScratchDir dir;
  RecordingByteTokenizer tok;
  write_file(dir.file("tree/b/2.txt"), "two");
  write_file(dir.file("tree/a.txt"), "one");
  write_file(dir.file("tree/b/1.txt.gz"), "");  // replaced below by gzip data
  write_gzip(dir.file("tree/b/1.txt.gz"), "gz one\n");
  write_file(dir.file("tree/.hidden"), "never");
  write_file(dir.file("tree/.git/x.txt"), "never");
  write_file(dir.file("g/x1.txt"), "x1");
  write_file(dir.file("g/x2.txt"), "x2");
  write_file(dir.file("g/y.txt"), "y");
  write_file(dir.file("single.txt"), "single\n");
  EXPECT_EQ(expand_inputs({dir.file("tree")}),
            (std::vector<std::string>{dir.file("tree/a.txt"), dir.file("tree/b/1.txt.gz"), dir.file("tree/b/2.txt")}));
  const auto report = prepare_token_file(
      options_for({dir.file("single.txt"), dir.file("tree"), dir.file("g/x*.txt")}, dir.file("out.tok")), tok, nullptr);
  EXPECT_EQ(report.inputs, 6);
  EXPECT_EQ(documents_of(dir.file("out.tok")),
            (std::vector<std::string>{"single\n", "one", "gz one\n", "two", "x1", "x2"}));
  // The output inside an input directory is not read back.
  write_file(dir.file("g/out.tok"), "");
  prepare_token_file(options_for({dir.file("g")}, dir.file("g/out.tok")), tok, nullptr);
  EXPECT_EQ(documents_of(dir.file("g/out.tok")), (std::vector<std::string>{"x1", "x2", "y"}));
}

TEST(CorpusPrepare, ParagraphsSeparatedByBlankLines) {
  ScratchDir dir;
  RecordingByteTokenizer tok;
  write_file(dir.file("p.txt"), "\n\nfirst para\nstill first\n \t\n\n  second, indented\n\nthird");
  auto o = options_for({dir.file("p.txt")}, dir.file("out.tok"));
  o.text_documents = TextDocuments::kParagraph;
  prepare_token_file(o, tok, nullptr);
  EXPECT_EQ(documents_of(dir.file("out.tok")),
            (std::vector<std::string>{"first para\nstill first\n", "  second, indented\n", "third"}));
}

// dictd base64 numbers.
std::string b64(uint64_t v) {
  static const char* digits = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  std::string s;
  do {
    s.insert(s.begin(), digits[v % 64]);
    v /= 64;
  } while (v > 0);
  return s;
}

TEST(CorpusPrepare, DictdEntriesFromTheIndexAndFromHeadwords) {
  ScratchDir dir;
  RecordingByteTokenizer tok;
  const std::string a = "Abjure \\Ab*jure\"\\, v. t.\n   To renounce.\n\n   Second sense.\n   [1913 Webster]";
  const std::string b = "Able \\A\"ble\\, a.\n   Fit.";
  const std::string c = "Zythum \\Zy\"thum\\, n.\n   Beer.";
  // Leading blank lines, a stray tag between a and b that the index leaves
  // out, and c after the last indexed entry.
  const std::string text = "\n\n" + a + "\n\n[1913 Webster]\n\n" + b + "\n" + c + "\n";
  const uint64_t oa = 2, ob = oa + a.size() + 18;
  write_gzip(dir.file("tiny.dict.dz"), text);
  write_file(dir.file("tiny.index"), "Abjure\t" + b64(oa) + "\t" + b64(a.size()) + "\nAble\t" + b64(ob) + "\t" +
                                         b64(b.size()) + "\nabjure\t" + b64(oa) + "\t" + b64(a.size()) + "\n");
  const auto report = prepare_token_file(options_for({dir.file("tiny.dict.dz")}, dir.file("out.tok")), tok, nullptr);
  EXPECT_EQ(documents_of(dir.file("out.tok")),
            (std::vector<std::string>{a + "\n\n[1913 Webster]\n\n", b + "\n", c + "\n"}));
  EXPECT_EQ(report.documents, 3);
  // Without the index: a new entry at an unindented line after a blank line
  // (blank lines inside an entry stay, the stray tag becomes an entry, c
  // without a blank line before it stays with b).
  fs::remove(dir.file("tiny.index"));
  prepare_token_file(options_for({dir.file("tiny.dict.dz")}, dir.file("out.tok")), tok, nullptr);
  EXPECT_EQ(documents_of(dir.file("out.tok")),
            (std::vector<std::string>{a + "\n", "[1913 Webster]\n", b + "\n" + c + "\n"}));
  // An index that names more text than there is.
  write_file(dir.file("tiny.index"), "Far\t" + b64(text.size() + 10) + "\t" + b64(5) + "\n");
  EXPECT_NE(error_of([&] {
              prepare_token_file(options_for({dir.file("tiny.dict.dz")}, dir.file("out.tok")), tok, nullptr);
            }).find("names an entry ending at byte"),
            std::string::npos);
}

TEST(CorpusPrepare, LongDocumentsReachTheTokenizerInBoundedPieces) {
  ScratchDir dir;
  RecordingByteTokenizer tok;
  std::string text;
  for (int i = 0; text.size() < (5u << 20); ++i) text += "word" + std::to_string(i) + (i % 17 == 0 ? "\n" : " ");
  text += std::string(3u << 20, 'x');  // no whitespace at all: cut at a character boundary
  write_file(dir.file("long.txt"), text);
  const auto report = prepare_token_file(options_for({dir.file("long.txt")}, dir.file("out.tok")), tok, nullptr);
  EXPECT_LE(tok.longest_piece, size_t{1} << 20);
  EXPECT_EQ(report.tokens, static_cast<int64_t>(text.size()));
  const auto docs = documents_of(dir.file("out.tok"));
  ASSERT_EQ(docs.size(), 1u);
  EXPECT_TRUE(docs[0] == text);
}

TEST(CorpusPrepare, BadInputsAreNamedErrorsAndLeaveNoFile) {
  ScratchDir dir;
  RecordingByteTokenizer tok;
  const std::string out = dir.file("out.tok");
  auto error_for = [&](const std::vector<std::string>& inputs, const std::function<void(PrepareOptions&)>& tweak = {}) {
    auto o = options_for(inputs, out);
    if (tweak) tweak(o);
    return error_of([&] { prepare_token_file(o, tok, nullptr); });
  };
  write_file(dir.file("missing.jsonl"), "{\"text\": \"ok\"}\n{\"body\": \"no text\"}\n");
  EXPECT_NE(
      error_for({dir.file("missing.jsonl")}).find("input '" + dir.file("missing.jsonl") + "':2: no field \"text\""),
      std::string::npos);
  write_file(dir.file("malformed.jsonl"), "{\"text\": \"ok\"}\n\n{\"text\": \"open\n");
  EXPECT_NE(error_for({dir.file("malformed.jsonl")})
                .find("input '" + dir.file("malformed.jsonl") + "':3: malformed JSON line"),
            std::string::npos);
  write_file(dir.file("number.jsonl"), "{\"text\": 17}\n");
  EXPECT_NE(error_for({dir.file("number.jsonl")}).find(":1: field \"text\" is a number, not a string"),
            std::string::npos);
  write_file(dir.file("array.jsonl"), "[\"text\"]\n");
  EXPECT_NE(error_for({dir.file("array.jsonl")}).find(":1: the line is an array in JSON, not an object"),
            std::string::npos);
  write_file(dir.file("empty.jsonl"), "{\"text\": \"a\"}\n{\"text\": \"\"}\n{\"text\": \"b\"}\n");
  EXPECT_NE(error_for({dir.file("empty.jsonl")})
                .find("input '" + dir.file("empty.jsonl") + "':2 (field \"text\"): empty document"),
            std::string::npos);
  write_file(dir.file("empty.txt"), "");
  EXPECT_NE(error_for({dir.file("empty.txt")}).find("empty document"), std::string::npos);
  // Corrupt gzip: bytes of the deflate stream changed; truncated zstd.
  std::string text;
  for (int i = 0; i < 20000; ++i) text += std::to_string(i * 7919 % 10007) + " ";
  write_gzip(dir.file("corrupt.txt.gz"), text);
  {
    std::fstream io(dir.file("corrupt.txt.gz"), std::ios::binary | std::ios::in | std::ios::out);
    io.seekp(200);
    io.write("\xff\xff\xff\xff\xff\xff\xff\xff", 8);
  }
  EXPECT_NE(error_for({dir.file("corrupt.txt.gz")}).find("input '" + dir.file("corrupt.txt.gz") + "': read failed: "),
            std::string::npos);
  const std::string z = zstd_bytes(text);
  write_file(dir.file("cut.txt.zst"), z.substr(0, z.size() / 2));
  EXPECT_NE(error_for({dir.file("cut.txt.zst")})
                .find("input '" + dir.file("cut.txt.zst") + "': read failed: the compressed data ends early"),
            std::string::npos);
  write_file(dir.file("fake.txt.zst"), "plain text");
  EXPECT_NE(error_for({dir.file("fake.txt.zst")}).find("not zstd data"), std::string::npos);
  EXPECT_NE(error_for({dir.file("nothing*.txt")})
                .find("--input '" + dir.file("nothing*.txt") + "': the pattern matches no file"),
            std::string::npos);
  fs::create_directories(dir.path / "hollow" / "inner");
  write_file(dir.file("hollow/.only-hidden"), "x");
  EXPECT_NE(error_for({dir.file("hollow")}).find("the directory '" + dir.file("hollow") + "' holds no files"),
            std::string::npos);
  EXPECT_NE(error_for({dir.file("none.txt")}).find("input '" + dir.file("none.txt") + "': cannot open: No such file"),
            std::string::npos);
  EXPECT_NE(error_for({dir.file("empty.jsonl")}, [](PrepareOptions& o) { o.eod_token = 256; })
                .find("--eod-token 256 is not below the tokenizer's vocabulary 256"),
            std::string::npos);
  EXPECT_FALSE(fs::exists(out));
  for (const auto& e : fs::directory_iterator(dir.path))
    EXPECT_EQ(e.path().filename().string().find(".tmp-"), std::string::npos) << e.path();
  // --skip-empty: skipped and counted.
  auto o = options_for({dir.file("empty.jsonl"), dir.file("empty.txt")}, out);
  o.skip_empty = true;
  const auto report = prepare_token_file(o, tok, nullptr);
  EXPECT_EQ(report.skipped_empty, 2);
  EXPECT_EQ(documents_of(out), (std::vector<std::string>{"a", "b"}));
}

TEST(CorpusPrepare, ProgressLinesNameTheInputAndCounts) {
  ScratchDir dir;
  RecordingByteTokenizer tok;
  write_file(dir.file("a.jsonl"), kJsonl);
  auto o = options_for({dir.file("a.jsonl")}, dir.file("out.tok"));
  o.progress_seconds = 0;
  std::ostringstream progress;
  prepare_token_file(o, tok, &progress);
  const std::string line = progress.str();
  EXPECT_EQ(line.find("loom-data: input 1/1 '" + dir.file("a.jsonl") + "': 0.0 MiB read, "), 0u) << line;
  EXPECT_NE(line.find(" documents, "), std::string::npos) << line;
  EXPECT_NE(line.find(" tokens, "), std::string::npos) << line;
}

}  // namespace
}  // namespace loom
