#include "loom/runtime/data/token_file.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>

#include "loom/runtime/core/error.h"

namespace loom {
namespace {
constexpr char kMagic[8] = {'L', 'O', 'O', 'M', 'T', 'O', 'K', '\0'};
constexpr size_t kHeaderBytes = 64;

[[noreturn]] void fail(const std::string& path, const std::string& what) {
  throw LoomError("token file '" + path + "': " + what);
}
}  // namespace

uint64_t fnv1a64(const void* data, size_t bytes, uint64_t seed) {
  const auto* p = static_cast<const unsigned char*>(data);
  uint64_t h = seed;
  for (size_t i = 0; i < bytes; ++i) {
    h ^= p[i];
    h *= 1099511628211ull;
  }
  return h;
}

void write_token_file(const std::string& path, const std::vector<uint32_t>& tokens, uint32_t vocab_size) {
  if (tokens.empty()) fail(path, "no tokens to write (the input was empty)");
  const uint32_t token_bytes = vocab_size <= 65536 ? 2 : 4;
  std::vector<unsigned char> body(tokens.size() * token_bytes);
  for (size_t i = 0; i < tokens.size(); ++i) {
    if (tokens[i] >= vocab_size)
      fail(path, "token " + std::to_string(tokens[i]) + " at position " + std::to_string(i) +
                     " is not below the vocabulary size " + std::to_string(vocab_size));
    std::memcpy(body.data() + i * token_bytes, &tokens[i], token_bytes);  // little endian
  }
  unsigned char header[kHeaderBytes] = {0};
  const uint32_t version = 1, reserved = 0;
  const uint64_t count = tokens.size(), checksum = fnv1a64(body.data(), body.size());
  std::memcpy(header, kMagic, 8);
  std::memcpy(header + 8, &version, 4);
  std::memcpy(header + 12, &vocab_size, 4);
  std::memcpy(header + 16, &token_bytes, 4);
  std::memcpy(header + 20, &reserved, 4);
  std::memcpy(header + 24, &count, 8);
  std::memcpy(header + 32, &checksum, 8);
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) fail(path, std::string("cannot write: ") + std::strerror(errno));
    out.write(reinterpret_cast<const char*>(header), kHeaderBytes);
    out.write(reinterpret_cast<const char*>(body.data()), static_cast<std::streamsize>(body.size()));
    if (!out) fail(path, "write failed (disk full?)");
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) fail(path, std::string("rename failed: ") + std::strerror(errno));
}

TokenFile::TokenFile(const std::string& path) : path_(path) {
  const int fd = ::open(path.c_str(), O_RDONLY);
  if (fd < 0) fail(path, std::string("cannot open: ") + std::strerror(errno));
  struct stat st {};
  ::fstat(fd, &st);
  const size_t bytes = static_cast<size_t>(st.st_size);
  if (bytes == 0) {
    ::close(fd);
    fail(path, "file is empty (run loom-data prepare)");
  }
  if (bytes < kHeaderBytes) {
    ::close(fd);
    fail(path, "file is " + std::to_string(bytes) + " bytes, shorter than the 64-byte header (truncated?)");
  }
  map_ = ::mmap(nullptr, bytes, PROT_READ, MAP_PRIVATE, fd, 0);
  ::close(fd);
  if (map_ == MAP_FAILED) {
    map_ = nullptr;
    fail(path, std::string("mmap failed: ") + std::strerror(errno));
  }
  map_bytes_ = bytes;
  const auto* h = static_cast<const unsigned char*>(map_);
  if (std::memcmp(h, kMagic, 8) != 0) fail(path, "not a Loom token file (bad magic)");
  std::memcpy(&header_.version, h + 8, 4);
  std::memcpy(&header_.vocab_size, h + 12, 4);
  std::memcpy(&header_.token_bytes, h + 16, 4);
  std::memcpy(&header_.count, h + 24, 8);
  std::memcpy(&header_.checksum, h + 32, 8);
  if (header_.version != 1) fail(path, "unsupported version " + std::to_string(header_.version));
  if (header_.token_bytes != 2 && header_.token_bytes != 4)
    fail(path, "token width " + std::to_string(header_.token_bytes) + " bytes (allowed 2 or 4)");
  if (header_.count == 0) fail(path, "holds no tokens");
  const size_t expected = kHeaderBytes + header_.count * header_.token_bytes;
  if (bytes != expected)
    fail(path, "is " + std::to_string(bytes) + " bytes but its header promises " + std::to_string(expected) +
                   " (truncated or corrupt)");
  data_ = h + kHeaderBytes;
  if (fnv1a64(data_, header_.count * header_.token_bytes) != header_.checksum)
    fail(path, "checksum mismatch (corrupt)");
}

TokenFile::~TokenFile() {
  if (map_) ::munmap(map_, map_bytes_);
}

uint32_t TokenFile::at(int64_t i) const {
  uint32_t v = 0;
  std::memcpy(&v, data_ + i * header_.token_bytes, header_.token_bytes);
  return v;
}

void TokenFile::read(int64_t start, int64_t n, int64_t* out) const {
  if (start < 0 || start + n > size())
    fail(path_, "read of [" + std::to_string(start) + ", " + std::to_string(start + n) + ") outside its " +
                    std::to_string(size()) + " tokens");
  for (int64_t i = 0; i < n; ++i) out[i] = at(start + i);
}

std::vector<uint32_t> byte_tokenize(const std::string& text) {
  std::vector<uint32_t> t(text.size());
  for (size_t i = 0; i < text.size(); ++i) t[i] = static_cast<unsigned char>(text[i]);
  return t;
}

std::string byte_detokenize(const std::vector<int64_t>& tokens) {
  std::string s;
  for (int64_t t : tokens) s += static_cast<char>(t & 0xff);
  return s;
}

std::string read_text_file(const std::string& path) {
  gzFile f = gzopen(path.c_str(), "rb");  // reads plain files as they are
  if (f == nullptr) throw LoomError("input '" + path + "': cannot open: " + std::strerror(errno));
  std::string text;
  char buf[1 << 16];
  int n = 0;
  while ((n = gzread(f, buf, sizeof(buf))) > 0) text.append(buf, static_cast<size_t>(n));
  int err = 0;
  const char* msg = gzerror(f, &err);
  gzclose(f);
  if (n < 0 || (err != Z_OK && err != Z_STREAM_END))
    throw LoomError("input '" + path + "': read failed: " + (msg ? msg : "?"));
  if (text.empty()) throw LoomError("input '" + path + "' is empty");
  return text;
}

}  // namespace loom
