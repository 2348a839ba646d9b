// Token files: what loom-data prepare writes and the trainer reads.
//
// Layout (little endian): a 64-byte header
//   magic "LOOMTOK\\0" (8) | version u32 | vocab_size u32 | token_bytes u32 (2 or 4)
//   | reserved u32 | count u64 | checksum u64 (FNV-1a 64 of the token bytes) | 24 bytes zero
// followed by `count` tokens of `token_bytes` each. Read by memory mapping.
// Opening validates magic, version, sizes and checksum, and names the file in
// every error; a missing or empty file is an error, never an empty dataset.
#pragma once

#include <cstdint>
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

// Writes atomically (temporary name, then rename).
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
  uint32_t at(int64_t i) const;
  // Copies tokens [start, start + n) into out (int64).
  void read(int64_t start, int64_t n, int64_t* out) const;

 private:
  std::string path_;
  TokenFileHeader header_;
  const unsigned char* data_ = nullptr;  // start of the tokens
  void* map_ = nullptr;
  size_t map_bytes_ = 0;
};

// Byte-level tokenizer: token = byte value, vocabulary 256.
std::vector<uint32_t> byte_tokenize(const std::string& text);
std::string byte_detokenize(const std::vector<int64_t>& tokens);

// Reads a text file, transparently gunzipping .gz/.dz (dictzip) files.
std::string read_text_file(const std::string& path);

}  // namespace loom
