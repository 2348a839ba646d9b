#include "loom/runtime/data/corpus.h"

#include <fcntl.h>
#include <glob.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>
#include <zstd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <iomanip>
#include <map>
#include <nlohmann/json.hpp>
#include <ostream>
#include <set>
#include <sstream>
#include <utility>

#include "loom/runtime/core/error.h"
#include "loom/runtime/data/token_file.h"

namespace loom {
namespace fs = std::filesystem;
namespace {

constexpr size_t kReadBytes = size_t{1} << 16;   // one read of an input
constexpr size_t kPieceBytes = size_t{1} << 20;  // at most this much text per tokenizer piece
constexpr size_t kBatchBytes = size_t{8} << 20;  // text queued before the tokenizer runs

bool ends_with(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() && s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

bool is_space(char c) { return c == ' ' || c == '\t' || c == '\r' || c == '\f' || c == '\v' || c == '\n'; }

std::string quoted(const std::string& path) { return "input '" + path + "'"; }

// ---- reading: plain, gzip (also dictzip) or zstd, told by the magic bytes ----

class InputReader {
 public:
  explicit InputReader(const std::string& path) : path_(path) {
    unsigned char magic[4] = {0, 0, 0, 0};
    ssize_t got = 0;
    {
      const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
      if (fd < 0) fail_open(errno);
      struct stat st {};
      if (::fstat(fd, &st) == 0 && S_ISDIR(st.st_mode)) {
        ::close(fd);
        throw LoomError(quoted(path) + ": read failed: Is a directory");
      }
      got = ::pread(fd, magic, 4, 0);
      ::close(fd);
    }
    const bool gzip_magic = got >= 2 && magic[0] == 0x1f && magic[1] == 0x8b;
    const bool zstd_magic = got >= 4 && magic[0] == 0x28 && magic[1] == 0xb5 && magic[2] == 0x2f && magic[3] == 0xfd;
    if ((ends_with(path, ".gz") || ends_with(path, ".dz")) && !gzip_magic)
      throw LoomError(quoted(path) + ": read failed: not gzip data (its name says gzip, its first bytes do not)");
    if (ends_with(path, ".zst") && !zstd_magic)
      throw LoomError(quoted(path) + ": read failed: not zstd data (its name says zstd, its first bytes do not)");
    if (zstd_magic) {
      file_ = std::fopen(path.c_str(), "rb");
      if (file_ == nullptr) fail_open(errno);
      zstd_ = ZSTD_createDCtx();
      if (zstd_ == nullptr) throw LoomError(quoted(path) + ": cannot create a zstd decoder (out of memory)");
      compressed_.resize(ZSTD_DStreamInSize());
    } else {
      errno = 0;
      gz_ = gzopen(path.c_str(), "rb");  // reads plain files as they are
      if (gz_ == nullptr) fail_open(errno);
      gzbuffer(gz_, 1 << 17);
    }
  }
  ~InputReader() {
    if (gz_ != nullptr) gzclose(gz_);
    if (zstd_ != nullptr) ZSTD_freeDCtx(zstd_);
    if (file_ != nullptr) std::fclose(file_);
  }
  InputReader(const InputReader&) = delete;
  InputReader& operator=(const InputReader&) = delete;

  // Up to n bytes of text; 0 at the end. Throws LoomError naming the file.
  size_t read(char* out, size_t n) { return zstd_ != nullptr ? read_zstd(out, n) : read_gzip(out, n); }

 private:
  [[noreturn]] void fail_open(int error) const {
    throw LoomError(quoted(path_) + ": cannot open: " + (error != 0 ? std::strerror(error) : "out of memory"));
  }
  [[noreturn]] void fail_read(const std::string& why) const {
    throw LoomError(quoted(path_) + ": read failed: " + why);
  }

  size_t read_gzip(char* out, size_t n) {
    const int got = gzread(gz_, out, static_cast<unsigned>(std::min<size_t>(n, 1u << 30)));
    int err = Z_OK;
    const char* msg = gzerror(gz_, &err);
    if (got < 0 || (err != Z_OK && err != Z_STREAM_END && err != Z_BUF_ERROR)) {
      std::string reason = msg != nullptr ? msg : "";
      const std::string prefix = path_ + ": ";  // zlib prefixes the path; the message names it already
      if (reason.compare(0, prefix.size(), prefix) == 0) reason.erase(0, prefix.size());
      fail_read(reason.empty() ? "zlib error " + std::to_string(err) : reason);
    }
    if (got == 0) {
      // zlib reports a stream cut inside a gzip member as Z_BUF_ERROR at the end.
      const int closed = gzclose(gz_);
      gz_ = nullptr;
      if (closed == Z_BUF_ERROR) fail_read("the compressed data ends early (truncated file?)");
      if (closed != Z_OK) fail_read("zlib error " + std::to_string(closed) + " at the end");
    }
    return static_cast<size_t>(got);
  }

  size_t read_zstd(char* out, size_t n) {
    ZSTD_outBuffer o{out, n, 0};
    for (;;) {
      if (in_.pos == in_.size && !eof_) {
        const size_t got = std::fread(compressed_.data(), 1, compressed_.size(), file_);
        if (got == 0) {
          if (std::ferror(file_)) fail_read(std::strerror(errno));
          eof_ = true;
        }
        in_ = ZSTD_inBuffer{compressed_.data(), got, 0};
      }
      const bool flush_only = in_.pos == in_.size;  // at the end: what the decoder still holds
      const size_t ret = ZSTD_decompressStream(zstd_, &o, &in_);
      if (ZSTD_isError(ret)) fail_read(std::string("zstd: ") + ZSTD_getErrorName(ret));
      // 0 = the frame is complete; a call without input that produces nothing
      // returns the next frame's header size, which says nothing about this one.
      if (!flush_only || o.pos > 0) frame_left_ = ret;
      if (o.pos > 0) return o.pos;
      if (eof_ && in_.pos == in_.size) {
        if (frame_left_ != 0) fail_read("the compressed data ends early (truncated file?)");
        return 0;
      }
    }
  }

  std::string path_;
  gzFile gz_ = nullptr;
  FILE* file_ = nullptr;
  ZSTD_DCtx* zstd_ = nullptr;
  std::vector<char> compressed_;
  ZSTD_inBuffer in_{nullptr, 0, 0};
  bool eof_ = false;
  size_t frame_left_ = 0;
};

// ---- documents to tokens to the token file ----

class DocumentEncoder {
 public:
  DocumentEncoder(const Tokenizer& tokenizer, TokenFileWriter& writer, const PrepareOptions& options,
                  PrepareReport& report)
      : tokenizer_(tokenizer), writer_(writer), options_(options), report_(report) {}

  // `where` names the document's first line for errors ("input 'a.txt':12").
  void begin(std::string where) {
    pending_first_ = true;
    where_ = std::move(where);
    ++documents_seen_;
  }
  void text(const char* p, size_t n) {
    pending_.append(p, n);
    while (pending_.size() >= kPieceBytes) {
      const size_t cut = piece_cut(pending_);
      enqueue(pending_.substr(0, cut), false);
      pending_.erase(0, cut);
    }
  }
  void end() {
    enqueue(std::move(pending_), true);
    pending_.clear();
    if (queued_bytes_ >= kBatchBytes) flush();
  }
  // Encodes and writes everything queued.
  void flush() {
    if (queue_.empty()) return;
    std::vector<std::string> texts;
    texts.reserve(queue_.size());
    for (auto& q : queue_) texts.push_back(std::move(q.text));
    const auto ids = tokenizer_.encode_pieces(texts);
    if (ids.size() != texts.size())
      throw LoomError("the tokenizer returned " + std::to_string(ids.size()) + " pieces for " +
                      std::to_string(texts.size()));
    for (size_t i = 0; i < queue_.size(); ++i) {
      const Queued& q = queue_[i];
      if (q.first) {
        writing_where_ = q.where;
        begun_ = false;
      }
      if (!ids[i].empty()) {
        if (!begun_) writer_.begin_document();
        begun_ = true;
        writer_.append(ids[i].data(), ids[i].size());
      }
      if (!q.last) continue;
      if (!begun_) {
        if (!options_.skip_empty)
          throw LoomError(writing_where_ +
                          ": empty document (no tokens); remove it, or pass --skip-empty to skip and count such "
                          "documents");
        ++report_.skipped_empty;
        continue;
      }
      if (options_.eod_token >= 0) {
        const uint32_t eod = static_cast<uint32_t>(options_.eod_token);
        writer_.append(&eod, 1);
      }
      ++report_.documents;
    }
    queue_.clear();
    queued_bytes_ = 0;
    report_.tokens = writer_.tokens();
  }
  int64_t documents_seen() const { return documents_seen_; }

 private:
  struct Queued {
    std::string text;
    bool first, last;
    std::string where;  // of a document's first piece
  };
  void enqueue(std::string text, bool last) {
    queued_bytes_ += text.size();
    queue_.push_back(Queued{std::move(text), pending_first_, last, pending_first_ ? where_ : std::string()});
    pending_first_ = false;
    if (queued_bytes_ >= kBatchBytes && !last) flush();
  }
  // Where to cut a long text: after the last whitespace of its first
  // kPieceBytes, else at the last UTF-8 character boundary before it.
  static size_t piece_cut(const std::string& s) {
    for (size_t i = kPieceBytes; i > kPieceBytes / 2; --i)
      if (is_space(s[i - 1])) return i;
    size_t i = kPieceBytes;
    while (i > 1 && (static_cast<unsigned char>(s[i]) & 0xc0) == 0x80) --i;
    return i;
  }

  const Tokenizer& tokenizer_;
  TokenFileWriter& writer_;
  const PrepareOptions& options_;
  PrepareReport& report_;
  std::string pending_, where_, writing_where_;
  bool pending_first_ = false, begun_ = false;
  std::vector<Queued> queue_;
  size_t queued_bytes_ = 0;
  int64_t documents_seen_ = 0;
};

// ---- formats: bytes of one input to documents ----

// Progress on stderr: at most every options.progress_seconds.
class Progress {
 public:
  Progress(std::ostream* out, double seconds, size_t inputs)
      : out_(out), seconds_(seconds), inputs_(inputs), start_(Clock::now()), last_(start_) {}
  void maybe_print(size_t input, const std::string& path, uint64_t bytes, int64_t documents, int64_t tokens) {
    if (out_ == nullptr) return;
    const auto now = Clock::now();
    if (std::chrono::duration<double>(now - last_).count() < seconds_) return;
    last_ = now;
    const double elapsed = std::chrono::duration<double>(now - start_).count();
    std::ostringstream line;
    line << std::fixed << std::setprecision(1) << "loom-data: input " << input + 1 << "/" << inputs_ << " '" << path
         << "': " << static_cast<double>(bytes) / (1 << 20) << " MiB read, " << documents << (documents == 1 ? " document, " : " documents, ") << tokens
         << " tokens, " << elapsed << " s";
    *out_ << line.str() << std::endl;
  }

 private:
  using Clock = std::chrono::steady_clock;
  std::ostream* out_;
  double seconds_;
  size_t inputs_;
  Clock::time_point start_, last_;
};

// Calls on_bytes(p, n) for each chunk of the input, counting bytes and
// printing progress between chunks.
template <typename OnBytes>
void for_each_chunk(const std::string& path, PrepareReport& report, const std::function<void()>& progress,
                    OnBytes on_bytes) {
  InputReader reader(path);
  std::vector<char> buf(kReadBytes);
  for (;;) {
    const size_t n = reader.read(buf.data(), buf.size());
    if (n == 0) break;
    report.bytes_read += n;
    on_bytes(buf.data(), n);
    progress();
  }
}

// Lines of a stream, in fragments: on_fragment(p, n) for text of the current
// line (no '\n'), on_newline() at each '\n'.
template <typename OnFragment, typename OnNewline>
void split_lines(const char* p, size_t n, OnFragment on_fragment, OnNewline on_newline) {
  while (n > 0) {
    const char* nl = static_cast<const char*>(std::memchr(p, '\n', n));
    const size_t len = nl == nullptr ? n : static_cast<size_t>(nl - p);
    if (len > 0) on_fragment(p, len);
    if (nl == nullptr) return;
    on_newline();
    p = nl + 1;
    n -= len + 1;
  }
}

// "an array", "a number": a JSON type with its article.
std::string json_type(const nlohmann::json& v) {
  const std::string t = v.type_name();
  return (t == "array" || t == "object" ? "an " : "a ") + t;
}

std::string at_line(const std::string& path, int64_t line) { return quoted(path) + ":" + std::to_string(line); }

void read_text_whole(const std::string& path, DocumentEncoder& enc, PrepareReport& report,
                     const std::function<void()>& progress) {
  enc.begin(quoted(path) + " (the whole file, one document)");
  for_each_chunk(path, report, progress, [&](const char* p, size_t n) { enc.text(p, n); });
  enc.end();
}

// Paragraphs: runs of whitespace-only lines separate documents. The pending
// leading whitespace of a line is held until the line proves not blank.
void read_text_paragraphs(const std::string& path, DocumentEncoder& enc, PrepareReport& report,
                          const std::function<void()>& progress) {
  bool in_doc = false, blank_so_far = true;
  int64_t line = 1;
  std::string leading;
  for_each_chunk(path, report, progress, [&](const char* p, size_t n) {
    split_lines(
        p, n,
        [&](const char* f, size_t len) {
          if (!blank_so_far) return enc.text(f, len);
          size_t i = 0;
          while (i < len && is_space(f[i])) ++i;
          if (i == len) return leading.append(f, len), void();
          blank_so_far = false;
          if (!in_doc) enc.begin(at_line(path, line));
          in_doc = true;
          enc.text(leading.data(), leading.size());
          leading.clear();
          enc.text(f, len);
        },
        [&] {
          if (blank_so_far && in_doc) {
            enc.end();
            in_doc = false;
          } else if (!blank_so_far) {
            enc.text("\n", 1);
          }
          leading.clear();
          blank_so_far = true;
          ++line;
        });
  });
  if (in_doc) enc.end();
}

void read_jsonl(const std::string& path, const std::string& field, DocumentEncoder& enc, PrepareReport& report,
                const std::function<void()>& progress) {
  int64_t line = 1;
  std::string text;
  auto finish_line = [&] {
    const bool blank = std::all_of(text.begin(), text.end(), [](char c) { return is_space(c); });
    if (!blank) {
      nlohmann::json value;
      try {
        value = nlohmann::json::parse(text);
      } catch (const nlohmann::json::parse_error& e) {
        std::string why = e.what();
        const size_t colon = why.find("parse error");
        throw LoomError(at_line(path, line) + ": malformed JSON line (" +
                        (colon == std::string::npos ? why : why.substr(colon)) + ")");
      }
      if (!value.is_object())
        throw LoomError(at_line(path, line) + ": the line is " + json_type(value) + " in JSON" +
                        ", not an object with the field \"" + field + "\" (--jsonl-field)");
      const auto it = value.find(field);
      if (it == value.end())
        throw LoomError(at_line(path, line) + ": no field \"" + field + "\" (--jsonl-field names the text field)");
      if (!it->is_string())
        throw LoomError(at_line(path, line) + ": field \"" + field + "\" is " + json_type(*it) + ", not a string");
      const auto& s = it->get_ref<const std::string&>();
      enc.begin(at_line(path, line) + " (field \"" + field + "\")");
      enc.text(s.data(), s.size());
      enc.end();
    }
    text.clear();
    ++line;
  };
  for_each_chunk(path, report, progress, [&](const char* p, size_t n) {
    split_lines(p, n, [&](const char* f, size_t len) { text.append(f, len); }, finish_line);
  });
  if (!text.empty()) finish_line();
}

// dictd's base64 numbers ("A-Za-z0-9+/", most significant first).
bool decode_dictd_number(const std::string& s, uint64_t* out) {
  static const std::string digits = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  uint64_t v = 0;
  if (s.empty() || s.size() > 10) return false;
  for (char c : s) {
    const size_t d = digits.find(c);
    if (d == std::string::npos) return false;
    v = v * 64 + d;
  }
  *out = v;
  return true;
}

// The .index beside a dictd file: a.dict.dz, a.dict -> a.index.
std::string dictd_index_path(const std::string& path) {
  std::string base = path;
  if (ends_with(base, ".dz")) base.erase(base.size() - 3);
  if (ends_with(base, ".dict")) base.erase(base.size() - 5);
  return base + ".index";
}

struct DictEntry {
  uint64_t offset, end;
};

// Distinct entry ranges of a dictd index, sorted by offset (headwords that
// share an entry share its offset); an entry ends at its length or at the
// next entry, whichever comes first.
std::vector<DictEntry> read_dictd_index(const std::string& index_path) {
  std::ifstream in(index_path, std::ios::binary);
  if (!in) throw LoomError("dictd index '" + index_path + "': cannot open: " + std::strerror(errno));
  std::map<uint64_t, uint64_t> ranges;  // offset -> longest length
  std::string line;
  for (int64_t n = 1; std::getline(in, line); ++n) {
    if (!line.empty() && line.back() == '\r') line.pop_back();
    if (line.empty()) continue;
    const size_t t1 = line.find('\t'), t2 = t1 == std::string::npos ? t1 : line.find('\t', t1 + 1);
    uint64_t offset = 0, length = 0;
    const size_t t3 = t2 == std::string::npos ? t2 : line.find('\t', t2 + 1);
    if (t2 == std::string::npos || !decode_dictd_number(line.substr(t1 + 1, t2 - t1 - 1), &offset) ||
        !decode_dictd_number(line.substr(t2 + 1, t3 == std::string::npos ? std::string::npos : t3 - t2 - 1), &length))
      throw LoomError("dictd index '" + index_path + "':" + std::to_string(n) +
                      ": malformed line (expected headword<TAB>offset<TAB>length, numbers in dictd's base64)");
    uint64_t& longest = ranges[offset];
    longest = std::max(longest, length);
  }
  if (in.bad()) throw LoomError("dictd index '" + index_path + "': read failed");
  std::vector<DictEntry> entries;
  entries.reserve(ranges.size());
  for (const auto& [offset, length] : ranges) entries.push_back({offset, offset + length});
  for (size_t i = 0; i + 1 < entries.size(); ++i) entries[i].end = std::min(entries[i].end, entries[i + 1].offset);
  return entries;
}

std::string at_byte(const std::string& path, uint64_t offset) {
  return quoted(path) + ": entry at byte " + std::to_string(offset);
}

void read_dictd_indexed(const std::string& path, const std::vector<DictEntry>& entries, DocumentEncoder& enc,
                        PrepareReport& report, const std::function<void()>& progress) {
  // State: before the first entry, inside entry k (and the text up to the
  // next one), or after the last entry's end (leading whitespace stays with
  // the last entry, the rest is one more document).
  uint64_t pos = 0;
  size_t next = 0;  // the next entry to start
  bool in_doc = false, tail_doc = false;
  const uint64_t last_end = entries.empty() ? 0 : entries.back().end;
  for_each_chunk(path, report, progress, [&](const char* p, size_t n) {
    while (n > 0) {
      if (next < entries.size() && pos == entries[next].offset) {
        if (in_doc) enc.end();
        enc.begin(at_byte(path, pos));
        in_doc = true;
        tail_doc = false;
        ++next;
      }
      // Bytes up to the next boundary (the next entry's start, or the last entry's end).
      uint64_t boundary = UINT64_MAX;
      if (next < entries.size())
        boundary = entries[next].offset;
      else if (pos < last_end)
        boundary = last_end;
      const size_t take = static_cast<size_t>(std::min<uint64_t>(n, boundary - pos));
      const bool outside = next == 0 || (next == entries.size() && pos >= last_end);
      if (!outside) {
        enc.text(p, take);
      } else {
        for (size_t i = 0; i < take; ++i) {  // text outside the entries: its own document unless whitespace
          if (!tail_doc && is_space(p[i])) {
            if (in_doc) enc.text(p + i, 1);
            continue;
          }
          if (!tail_doc) {
            if (in_doc) enc.end();
            enc.begin(quoted(path) + ": text outside the index's entries at byte " + std::to_string(pos + i));
            in_doc = tail_doc = true;
          }
          enc.text(p + i, take - i);
          break;
        }
      }
      pos += take;
      p += take;
      n -= take;
    }
  });
  if (next < entries.size() || pos < last_end)
    throw LoomError(quoted(path) + ": its index '" + dictd_index_path(path) + "' names an entry ending at byte " +
                    std::to_string(next < entries.size() ? entries[next].end : last_end) + " but the text has " +
                    std::to_string(pos) + " bytes (the index belongs to another file?)");
  if (in_doc) enc.end();
}

// Without an index: an entry starts at a line with no leading whitespace that
// follows a blank line (or starts the file); blank lines inside an entry stay.
void read_dictd_by_headwords(const std::string& path, DocumentEncoder& enc, PrepareReport& report,
                             const std::function<void()>& progress) {
  bool in_doc = false, blank_so_far = true;
  int64_t line = 1;
  std::string leading, blank_lines;
  for_each_chunk(path, report, progress, [&](const char* p, size_t n) {
    split_lines(
        p, n,
        [&](const char* f, size_t len) {
          if (!blank_so_far) return enc.text(f, len);
          size_t i = 0;
          while (i < len && is_space(f[i])) ++i;
          if (i == len) return leading.append(f, len), void();
          blank_so_far = false;
          const bool headword = leading.empty() && i == 0;
          if (!in_doc || (headword && !blank_lines.empty())) {
            if (in_doc) enc.end();
            enc.begin(at_line(path, line));
            in_doc = true;
          } else {
            enc.text(blank_lines.data(), blank_lines.size());
          }
          blank_lines.clear();
          enc.text(leading.data(), leading.size());
          leading.clear();
          enc.text(f, len);
        },
        [&] {
          if (blank_so_far) {
            if (in_doc) blank_lines += leading + "\n";
          } else {
            enc.text("\n", 1);
          }
          leading.clear();
          blank_so_far = true;
          ++line;
        });
  });
  if (in_doc) enc.end();
}

bool has_glob_characters(const std::string& s) { return s.find_first_of("*?[") != std::string::npos; }

bool same_file(const std::string& a, const std::string& b) {
  struct stat sa {};
  struct stat sb {};
  return ::stat(a.c_str(), &sa) == 0 && ::stat(b.c_str(), &sb) == 0 && sa.st_dev == sb.st_dev && sa.st_ino == sb.st_ino;
}

// Regular files under a directory, recursively, sorted; hidden names skipped.
std::vector<std::string> files_under(const std::string& dir, const std::string& output) {
  std::vector<std::string> files;
  std::error_code ec;
  fs::recursive_directory_iterator it(dir, fs::directory_options::none, ec), end;
  if (ec) throw ConfigError("--input '" + dir + "': cannot list the directory: " + ec.message());
  for (; it != end; it.increment(ec)) {
    if (ec) throw ConfigError("--input '" + dir + "': cannot list the directory: " + ec.message());
    const std::string name = it->path().filename().string();
    if (!name.empty() && name[0] == '.') {
      if (it->is_directory(ec)) it.disable_recursion_pending();
      continue;
    }
    if (!it->is_regular_file(ec)) continue;
    const std::string file = it->path().string();
    if (!output.empty() && same_file(file, output)) continue;
    files.push_back(file);
  }
  std::sort(files.begin(), files.end());
  return files;
}

}  // namespace

CorpusFormat input_format(const std::string& path, CorpusFormat format) {
  if (format != CorpusFormat::kAuto) return format;
  std::string name = path;
  for (const char* z : {".gz", ".dz", ".zst"})
    if (ends_with(name, z)) {
      name.erase(name.size() - std::strlen(z));
      break;
    }
  if (ends_with(name, ".jsonl") || ends_with(name, ".ndjson")) return CorpusFormat::kJsonl;
  if (ends_with(name, ".dict")) return CorpusFormat::kDictd;
  return CorpusFormat::kText;
}

std::vector<std::string> expand_inputs(const std::vector<std::string>& specs, const std::string& output) {
  std::vector<std::string> files;
  auto add_path = [&](const std::string& spec, const std::string& path, bool from_pattern) {
    std::error_code ec;
    if (fs::is_directory(path, ec)) {
      const auto under = files_under(path, output);
      if (under.empty())
        throw ConfigError("--input '" + spec + "': the directory '" + path + "' holds no files" +
                          " (hidden files, named .*, are skipped)");
      files.insert(files.end(), under.begin(), under.end());
    } else if (!from_pattern || output.empty() || !same_file(path, output)) {
      files.push_back(path);  // a missing file fails when opened, naming it
    }
  };
  for (const auto& spec : specs) {
    std::error_code ec;
    if (!has_glob_characters(spec) || fs::exists(spec, ec)) {
      add_path(spec, spec, false);
      continue;
    }
    glob_t g{};
    const int rc = ::glob(spec.c_str(), 0, nullptr, &g);
    std::vector<std::string> matches;
    if (rc == 0)
      for (size_t i = 0; i < g.gl_pathc; ++i) matches.push_back(g.gl_pathv[i]);
    ::globfree(&g);
    if (rc == GLOB_NOMATCH || (rc == 0 && matches.empty()))
      throw ConfigError("--input '" + spec + "': the pattern matches no file");
    if (rc != 0)
      throw ConfigError("--input '" + spec + "': the pattern cannot be expanded (glob error " + std::to_string(rc) +
                        ")");
    std::sort(matches.begin(), matches.end());
    for (const auto& m : matches) add_path(spec, m, true);
  }
  return files;
}

PrepareReport prepare_token_file(const PrepareOptions& options, const Tokenizer& tokenizer,
                                 std::ostream* progress_out) {
  if (options.eod_token >= static_cast<int64_t>(tokenizer.vocab_size()))
    throw ConfigError("--eod-token " + std::to_string(options.eod_token) + " is not below the tokenizer's vocabulary " +
                      std::to_string(tokenizer.vocab_size()));
  if (options.jsonl_field.empty()) throw ConfigError("--jsonl-field is empty: name the JSON field that holds the text");
  const auto files = expand_inputs(options.inputs, options.output);
  if (files.empty()) throw ConfigError("--input names no files");
  PrepareReport report;
  report.inputs = static_cast<int64_t>(files.size());
  TokenFileWriter writer(options.output, tokenizer.vocab_size());
  DocumentEncoder enc(tokenizer, writer, options, report);
  Progress progress_lines(progress_out, options.progress_seconds, files.size());
  for (size_t i = 0; i < files.size(); ++i) {
    const std::string& path = files[i];
    const auto progress = [&] {
      if (options.interrupted && options.interrupted())
        throw LoomError("interrupted while reading " + quoted(path) + ": nothing written ('" + options.output +
                        "' is as it was; the temporary file is removed)");
      progress_lines.maybe_print(i, path, report.bytes_read, enc.documents_seen(), writer.tokens());
    };
    const int64_t seen_before = enc.documents_seen();
    switch (input_format(path, options.format)) {
      case CorpusFormat::kJsonl:
        read_jsonl(path, options.jsonl_field, enc, report, progress);
        break;
      case CorpusFormat::kDictd: {
        const std::string index = dictd_index_path(path);
        std::error_code ec;
        if (fs::is_regular_file(index, ec)) {
          read_dictd_indexed(path, read_dictd_index(index), enc, report, progress);
        } else {
          if (progress_out != nullptr)
            *progress_out << "loom-data: " << quoted(path) << ": no index '" << index
                          << "' beside it: entries start at unindented lines after a blank line" << std::endl;
          read_dictd_by_headwords(path, enc, report, progress);
        }
        break;
      }
      case CorpusFormat::kText:
      case CorpusFormat::kAuto:
        if (options.text_documents == TextDocuments::kParagraph)
          read_text_paragraphs(path, enc, report, progress);
        else
          read_text_whole(path, enc, report, progress);
        break;
    }
    if (enc.documents_seen() == seen_before) {
      if (!options.skip_empty)
        throw LoomError(quoted(path) + ": no documents (no text in it); remove it, or pass --skip-empty");
      ++report.skipped_empty;
    }
  }
  enc.flush();
  if (report.documents == 0)
    throw LoomError("the inputs hold no documents (" + std::to_string(report.skipped_empty) +
                    " empty ones were skipped)");
  writer.finish();
  return report;
}

}  // namespace loom
