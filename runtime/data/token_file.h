// Token files: what loom-data prepare writes and the trainer reads.
//
// Layout (little endian): a 64-byte header
//   magic "LOOMTOK\\0" (8) | version u32 | vocab_size u32 | token_bytes u32 (2 or 4)
//   | reserved u32 | count u64 | checksum u64 (FNV-1a 64 of the token bytes) | 24 bytes zero
// followed by `count` tokens of `token_bytes` each.
// Opening reads the whole file once (checksum and largest token id) and
// validates magic, version, sizes, checksum and that every id is below the
// header's vocabulary; every error names the file. A missing or empty file is
// an error, never an empty dataset.
// Reads go through a file descriptor kept open (pread, never a memory map), so
// a file truncated under a running job is an error naming the file and both
// sizes, never SIGBUS. Before each read the file is checked against what was
// recorded at open (fstat of the kept descriptor: size, modification time; and
// the path still naming the same file): a truncated or rewritten file, or a
// path replaced by different data, throws LoomError. A touched file whose
// contents still match the checksum, or a path replaced by an identical file
// (same header and checksum), is accepted.
#pragma once

#include <sys/types.h>

#include <cstdint>
#include <ctime>
#include <mutex>
#include <string>
#include <vector>

namespace loom {

uint64_t fnv1a64(const void* data, size_t bytes, uint64_t seed = 1469598103934665603ull);

struct TokenFileHeader {
  uint32_t version = 1;
  uint32_t vocab_size = 0;
  uint32_t token_bytes = 2;
  uint64_t count = 0;
  uint64_t checksum = 0;
};

// Writes atomically: the tokens go to a new, uniquely named temporary file next
// to `path` (created exclusively, so it never overwrites anything), which is
// flushed, closed and renamed over `path` only when complete; on any failure
// the temporary file is removed and LoomError names `path` and the cause.
void write_token_file(const std::string& path, const std::vector<uint32_t>& tokens, uint32_t vocab_size);

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

  std::string path_;
  TokenFileHeader header_;
  int fd_ = -1;
  uint32_t max_token_ = 0;
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
