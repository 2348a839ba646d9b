// Token files: what loom-data prepare writes and the trainer reads.
//
// Layout (little endian): a 64-byte header
//   magic "LOOMTOK\\0" (8) | version u32 | vocab_size u32 | token_bytes u32 (2 or 4)
//   | reserved u32 | count u64 | checksum u64 (FNV-1a 64 of the token bytes)
//   | documents u64 | index_checksum u64 (FNV-1a 64 of the index bytes) | 8 bytes zero
// followed by `count` tokens of `token_bytes` each and, from version 2, the
// document index: `documents` u64 offsets (token positions) of the document
// starts. Version 1 files (no index; documents and index_checksum are zero)
// still load, as one document, with a note in the log.
// Opening reads the whole file once (checksum and largest token id), reads
// the index into memory (O(#documents) int64) and validates magic, version,
// sizes, both checksums, that every id is below the header's vocabulary, and
// that the index is strictly increasing (no empty document), starts at 0 and
// stays below count; every error names the file. A missing or empty file is
// an error, never an empty dataset.
// Reads go through a file descriptor kept open (pread, never a memory map), so
// a file truncated under a running job is an error naming the file and both
// sizes, never SIGBUS. Before each read the file is checked against what was
// recorded at open (fstat of the kept descriptor: size, modification time; and
// the path still naming the same file): a truncated or rewritten file, or a
// path replaced by different data, throws LoomError. A touched file whose
// tokens and index still match their checksums, or a path replaced by an
// identical file (same header, so same checksums), is accepted.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <ctime>
#include <mutex>
#include <string>
#include <vector>

namespace loom {

uint64_t fnv1a64(const void* data, size_t bytes, uint64_t seed = 1469598103934665603ull);

constexpr uint32_t kTokenFileVersion = 2;  // what the writers below write

struct TokenFileHeader {
  uint32_t version = kTokenFileVersion;
  uint32_t vocab_size = 0;
  uint32_t token_bytes = 2;
  uint64_t count = 0;
  uint64_t checksum = 0;
  uint64_t documents = 0;       // 0 in version 1 files
  uint64_t index_checksum = 0;  // 0 in version 1 files
};

// Writes a token file as it streams in, atomically: the tokens go to a new,
// uniquely named temporary file next to `path` (created exclusively, so it
// never overwrites anything) as they arrive, through a bounded buffer; the
// document index (kept in memory, O(#documents)) and the header are written by
// finish(), which flushes, closes and renames the file over `path`. On any
// failure, or when destroyed before finish(), the temporary file is removed;
// errors are LoomError naming `path` and the cause. Memory is bounded
// independent of the number of tokens.
// Usage: begin_document(); append(...) (any number of times); begin_document();
// ...; finish(). Every document must get at least one token.
class TokenFileWriter {
 public:
  TokenFileWriter(const std::string& path, uint32_t vocab_size);
  ~TokenFileWriter();
  TokenFileWriter(const TokenFileWriter&) = delete;
  TokenFileWriter& operator=(const TokenFileWriter&) = delete;

  void begin_document();
  // Appends tokens to the current document; every id must be below vocab_size.
  void append(const uint32_t* tokens, size_t n);
  void finish();
  int64_t tokens() const { return static_cast<int64_t>(count_); }
  int64_t documents() const { return static_cast<int64_t>(starts_.size()); }
  const std::string& temporary_path() const { return tmp_path_; }

 private:
  void flush_buffer();
  [[noreturn]] void write_failed(int error);

  std::string path_, tmp_path_;
  int fd_ = -1;
  bool finished_ = false;
  uint32_t vocab_size_, token_bytes_;
  uint64_t count_ = 0, checksum_;
  std::vector<unsigned char> buffer_;
  std::vector<uint64_t> starts_;
};

// Writes a whole token file at once (through TokenFileWriter). With
// `document_starts` empty the file is one document; otherwise they are the
// documents' first positions (strictly increasing, starting at 0).
void write_token_file(const std::string& path, const std::vector<uint32_t>& tokens, uint32_t vocab_size,
                      const std::vector<int64_t>& document_starts = {});

class TokenFile {
 public:
  explicit TokenFile(const std::string& path);
  ~TokenFile();
  TokenFile(const TokenFile&) = delete;
  TokenFile& operator=(const TokenFile&) = delete;

  const std::string& path() const { return path_; }
  const TokenFileHeader& header() const { return header_; }
  int64_t size() const { return static_cast<int64_t>(header_.count); }
  uint32_t vocab_size() const { return header_.vocab_size; }
  // The largest token id in the file (found when opening).
  uint32_t max_token() const { return max_token_; }
  // Throws ConfigError when a token id is not below `model_vocab_size`, naming
  // the file, `field` (the config field that named the file, e.g.
  // "data.train_path"), the first such id, its position and model.vocab_size.
  // Covers the whole file, not a sample.
  void check_vocabulary(int64_t model_vocab_size, const std::string& field) const;
  // Document starts, strictly increasing, the first 0 (version 1: just {0}).
  const std::vector<int64_t>& document_starts() const { return document_starts_; }
  int64_t documents() const { return static_cast<int64_t>(document_starts_.size()); }
  bool has_document_index() const { return header_.version >= 2; }
  uint32_t at(int64_t i) const;
  // Copies tokens [start, start + n) into out (int64), after check_unchanged().
  void read(int64_t start, int64_t n, int64_t* out) const;
  // Throws LoomError if the file changed since it was opened (see above).
  void check_unchanged() const;

 private:
  void read_bytes(uint64_t offset, size_t bytes, void* out) const;
  // Re-reads the token bytes through the kept descriptor: their FNV-1a checksum
  // as they are now and, with max_token, the largest id.
  uint64_t scan_tokens(uint32_t* max_token = nullptr) const;
  // Re-reads the index bytes: their FNV-1a checksum and, with starts, the offsets.
  uint64_t scan_index(std::vector<int64_t>* starts = nullptr) const;
  uint64_t index_offset() const;

  std::string path_;
  TokenFileHeader header_;
  int fd_ = -1;
  uint32_t max_token_ = 0;
  std::vector<int64_t> document_starts_;
  // What open saw, compared before every read.
  dev_t device_ = 0;
  ino_t inode_ = 0;
  int64_t bytes_ = 0;
  mutable std::mutex check_mutex_;
  mutable timespec modified_{};
  // A replacement of the path already found identical (same header, checksum).
  mutable dev_t replacement_device_ = 0;
  mutable ino_t replacement_inode_ = 0;
  mutable timespec replacement_modified_{};
  mutable bool warned_unlinked_ = false;
};

// Byte-level tokenizer: token = byte value, vocabulary 256.
std::vector<uint32_t> byte_tokenize(const std::string& text);
std::string byte_detokenize(const std::vector<int64_t>& tokens);

// Reads a text file, transparently gunzipping .gz/.dz (dictzip) files. Throws
// LoomError naming the file and zlib's (or the system's) reason.
std::string read_text_file(const std::string& path);

}  // namespace loom
