#include "loom/runtime/data/token_file.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <system_error>

#include "loom/runtime/core/error.h"
#include "loom/runtime/core/logging.h"

namespace loom {
namespace {
constexpr char kMagic[8] = {'L', 'O', 'O', 'M', 'T', 'O', 'K', '\0'};
constexpr size_t kHeaderBytes = 64;
constexpr size_t kScanChunkBytes = size_t{1} << 20;  // a multiple of every token width and of 8
constexpr size_t kWriteBufferBytes = size_t{1} << 20;

[[noreturn]] void fail(const std::string& path, const std::string& what) {
  throw LoomError("token file '" + path + "': " + what);
}

bool same_time(const timespec& a, const timespec& b) { return a.tv_sec == b.tv_sec && a.tv_nsec == b.tv_nsec; }

uint32_t token_at(const unsigned char* p, uint32_t token_bytes) {
  uint32_t v = 0;
  std::memcpy(&v, p, token_bytes);  // little endian
  return v;
}

void write_all(int fd, const unsigned char* data, size_t bytes) {
  while (bytes > 0) {
    const ssize_t n = ::write(fd, data, bytes);
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) throw std::system_error(errno, std::generic_category());
    data += n;
    bytes -= static_cast<size_t>(n);
  }
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

TokenFileWriter::TokenFileWriter(const std::string& path, uint32_t vocab_size)
    : path_(path), vocab_size_(vocab_size), token_bytes_(vocab_size <= 65536 ? 2 : 4), checksum_(fnv1a64(nullptr, 0)) {
  if (vocab_size == 0) fail(path, "vocabulary size 0");
  // A fresh name created exclusively: never an existing file (the input, say),
  // and never another writer's temporary file.
  static std::atomic<unsigned> serial{0};
  for (int attempt = 0; fd_ < 0; ++attempt) {
    tmp_path_ = path + ".tmp-" + std::to_string(::getpid()) + "-" + std::to_string(serial++);
    fd_ = ::open(tmp_path_.c_str(), O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0666);
    if (fd_ < 0 && (errno != EEXIST || attempt == 100)) {
      const int e = errno;
      tmp_path_.clear();  // not ours: nothing to remove
      fail(path, "cannot create a temporary file next to it: " + std::string(std::strerror(e)));
    }
  }
  buffer_.reserve(kWriteBufferBytes);
  buffer_.assign(kHeaderBytes, 0);  // the header is written last, by finish()
}

TokenFileWriter::~TokenFileWriter() {
  if (fd_ >= 0) ::close(fd_);
  if (!finished_ && !tmp_path_.empty()) ::unlink(tmp_path_.c_str());
}

void TokenFileWriter::write_failed(int error) {
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
  fail(path_, "writing failed (" + std::string(std::strerror(error)) + "); the partial file '" + tmp_path_ +
                  "' was removed");
}

void TokenFileWriter::flush_buffer() {
  try {
    write_all(fd_, buffer_.data(), buffer_.size());
  } catch (const std::system_error& e) {
    write_failed(e.code().value());
  }
  buffer_.clear();
}

void TokenFileWriter::begin_document() {
  if (finished_ || fd_ < 0) fail(path_, "begin_document after the writer finished or failed");
  if (!starts_.empty() && starts_.back() == count_)
    fail(path_, "document " + std::to_string(starts_.size() - 1) + " is empty (no tokens between two document starts)");
  starts_.push_back(count_);
}

void TokenFileWriter::append(const uint32_t* tokens, size_t n) {
  if (finished_ || fd_ < 0) fail(path_, "append after the writer finished or failed");
  if (starts_.empty()) fail(path_, "tokens appended before the first document began");
  for (size_t i = 0; i < n; ++i)
    if (tokens[i] >= vocab_size_)
      fail(path_, "token " + std::to_string(tokens[i]) + " at position " + std::to_string(count_ + i) +
                      " is not below the vocabulary size " + std::to_string(vocab_size_));
  // In blocks that fill the buffer: little-endian bytes, checksummed as written.
  for (size_t done = 0; done < n;) {
    const size_t room = std::max<size_t>(kWriteBufferBytes - std::min(buffer_.size(), kWriteBufferBytes), token_bytes_);
    const size_t take = std::min(n - done, room / token_bytes_);
    const size_t at = buffer_.size();
    buffer_.resize(at + take * token_bytes_);
    unsigned char* out = buffer_.data() + at;
    if (token_bytes_ == 2) {
      for (size_t i = 0; i < take; ++i) {
        out[2 * i] = static_cast<unsigned char>(tokens[done + i]);
        out[2 * i + 1] = static_cast<unsigned char>(tokens[done + i] >> 8);
      }
    } else {
      std::memcpy(out, tokens + done, take * 4);  // little endian
    }
    checksum_ = fnv1a64(out, take * token_bytes_, checksum_);
    done += take;
    if (buffer_.size() >= kWriteBufferBytes) flush_buffer();
  }
  count_ += n;
}

void TokenFileWriter::finish() {
  if (finished_ || fd_ < 0) fail(path_, "finish called twice or after a failure");
  if (count_ == 0) fail(path_, "no tokens to write (the input was empty)");
  if (starts_.back() == count_)
    fail(path_, "document " + std::to_string(starts_.size() - 1) + " is empty (no tokens after its start)");
  // The index: u64 offsets of the document starts, after the tokens.
  uint64_t index_checksum = fnv1a64(nullptr, 0);
  for (uint64_t start : starts_) {
    unsigned char bytes[8];
    std::memcpy(bytes, &start, 8);
    index_checksum = fnv1a64(bytes, 8, index_checksum);
    buffer_.insert(buffer_.end(), bytes, bytes + 8);
    if (buffer_.size() >= kWriteBufferBytes) flush_buffer();
  }
  flush_buffer();
  unsigned char h[kHeaderBytes] = {0};
  const uint32_t version = kTokenFileVersion, reserved = 0;
  const uint64_t documents = starts_.size();
  std::memcpy(h, kMagic, 8);
  std::memcpy(h + 8, &version, 4);
  std::memcpy(h + 12, &vocab_size_, 4);
  std::memcpy(h + 16, &token_bytes_, 4);
  std::memcpy(h + 20, &reserved, 4);
  std::memcpy(h + 24, &count_, 8);
  std::memcpy(h + 32, &checksum_, 8);
  std::memcpy(h + 40, &documents, 8);
  std::memcpy(h + 48, &index_checksum, 8);
  for (size_t done = 0; done < kHeaderBytes;) {
    const ssize_t n = ::pwrite(fd_, h + done, kHeaderBytes - done, static_cast<off_t>(done));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) write_failed(errno);
    done += static_cast<size_t>(n);
  }
  if (::fsync(fd_) != 0) write_failed(errno);
  const int fd = fd_;
  fd_ = -1;
  if (::close(fd) != 0)
    fail(path_, "writing failed at close (" + std::string(std::strerror(errno)) + "); the partial file '" +
                    tmp_path_ + "' was removed");
  if (std::rename(tmp_path_.c_str(), path_.c_str()) != 0)
    fail(path_, "cannot rename the finished temporary file over it (" + std::string(std::strerror(errno)) +
                    "); the temporary file was removed");
  finished_ = true;
}

void write_token_file(const std::string& path, const std::vector<uint32_t>& tokens, uint32_t vocab_size,
                      const std::vector<int64_t>& document_starts) {
  if (tokens.empty()) fail(path, "no tokens to write (the input was empty)");
  const std::vector<int64_t> one_document = {0};
  const std::vector<int64_t>& starts = document_starts.empty() ? one_document : document_starts;
  if (starts.front() != 0) fail(path, "the first document starts at " + std::to_string(starts.front()) + ", not 0");
  TokenFileWriter writer(path, vocab_size);
  for (size_t d = 0; d < starts.size(); ++d) {
    const int64_t end = d + 1 < starts.size() ? starts[d + 1] : static_cast<int64_t>(tokens.size());
    if (end <= starts[d] || end > static_cast<int64_t>(tokens.size()))
      fail(path, "document " + std::to_string(d) + " spans [" + std::to_string(starts[d]) + ", " +
                     std::to_string(end) + ") of " + std::to_string(tokens.size()) +
                     " tokens: document starts must increase strictly and stay below the token count");
    writer.begin_document();
    writer.append(tokens.data() + starts[d], static_cast<size_t>(end - starts[d]));
  }
  writer.finish();
}

TokenFile::TokenFile(const std::string& path) : path_(path) {
  fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd_ < 0) fail(path, std::string("cannot open: ") + std::strerror(errno));
  try {
    struct stat st {};
    if (::fstat(fd_, &st) != 0) fail(path, std::string("cannot stat: ") + std::strerror(errno));
    if (S_ISDIR(st.st_mode)) fail(path, "is a directory, not a token file");
    bytes_ = static_cast<int64_t>(st.st_size);
    device_ = st.st_dev;
    inode_ = st.st_ino;
    modified_ = st.st_mtim;
    if (bytes_ == 0) fail(path, "file is empty (run loom-data prepare)");
    if (bytes_ < static_cast<int64_t>(kHeaderBytes))
      fail(path, "file is " + std::to_string(bytes_) + " bytes, shorter than the 64-byte header (truncated?)");
    unsigned char h[kHeaderBytes];
    read_bytes(0, kHeaderBytes, h);
    if (std::memcmp(h, kMagic, 8) != 0) fail(path, "not a Loom token file (bad magic)");
    std::memcpy(&header_.version, h + 8, 4);
    std::memcpy(&header_.vocab_size, h + 12, 4);
    std::memcpy(&header_.token_bytes, h + 16, 4);
    std::memcpy(&header_.count, h + 24, 8);
    std::memcpy(&header_.checksum, h + 32, 8);
    if (header_.version != 1 && header_.version != 2)
      fail(path, "unsupported version " + std::to_string(header_.version) + " (this build reads versions 1 and 2)");
    if (header_.version >= 2) {
      std::memcpy(&header_.documents, h + 40, 8);
      std::memcpy(&header_.index_checksum, h + 48, 8);
    }
    if (header_.token_bytes != 2 && header_.token_bytes != 4)
      fail(path, "token width " + std::to_string(header_.token_bytes) + " bytes (allowed 2 or 4)");
    if (header_.count == 0) fail(path, "holds no tokens");
    if (header_.version >= 2 && header_.documents == 0) fail(path, "its document index holds no documents");
    const uint64_t room = static_cast<uint64_t>(bytes_) - kHeaderBytes;
    if (header_.count > room / header_.token_bytes || header_.documents > room / 8 ||
        room != header_.count * header_.token_bytes + header_.documents * 8)
      fail(path, "is " + std::to_string(bytes_) + " bytes but its header promises " + std::to_string(kHeaderBytes) +
                     " + " + std::to_string(header_.count) + " x " + std::to_string(header_.token_bytes) +
                     (header_.version >= 2 ? " + " + std::to_string(header_.documents) + " x 8 (document index)" : "") +
                     " (truncated or corrupt)");
    // One pass over the tokens: checksum and largest id.
    const uint64_t hash = scan_tokens(&max_token_);
    if (hash != header_.checksum) fail(path, "checksum mismatch (corrupt)");
    if (max_token_ >= header_.vocab_size)
      fail(path, "corrupt: holds token id " + std::to_string(max_token_) + ", not below its header's vocabulary " +
                     std::to_string(header_.vocab_size));
    if (header_.version >= 2) {
      if (scan_index(&document_starts_) != header_.index_checksum)
        fail(path, "document index checksum mismatch (corrupt)");
      if (document_starts_.front() != 0)
        fail(path, "corrupt document index: the first document starts at " +
                       std::to_string(document_starts_.front()) + ", not 0");
      for (size_t d = 1; d < document_starts_.size(); ++d)
        if (document_starts_[d] <= document_starts_[d - 1])
          fail(path, "corrupt document index: document " + std::to_string(d) + " starts at " +
                         std::to_string(document_starts_[d]) + ", not after document " + std::to_string(d - 1) +
                         " (at " + std::to_string(document_starts_[d - 1]) +
                         "): starts must increase strictly (no empty document)");
      if (document_starts_.back() >= static_cast<int64_t>(header_.count))
        fail(path, "corrupt document index: document " + std::to_string(document_starts_.size() - 1) +
                       " starts at " + std::to_string(document_starts_.back()) + ", not below the " +
                       std::to_string(header_.count) + " tokens");
    } else {
      document_starts_ = {0};
      LOOM_LOG(kInfo) << "token file '" << path
                      << "' is version 1 (no document index): read as one document; loom-data prepare writes "
                         "version 2 with its documents";
    }
  } catch (...) {
    ::close(fd_);
    throw;
  }
}

TokenFile::~TokenFile() {
  if (fd_ >= 0) ::close(fd_);
}

void TokenFile::read_bytes(uint64_t offset, size_t bytes, void* out) const {
  auto* p = static_cast<unsigned char*>(out);
  while (bytes > 0) {
    const ssize_t n = ::pread(fd_, p, bytes, static_cast<off_t>(offset));
    if (n < 0 && errno == EINTR) continue;
    if (n < 0) fail(path_, "read failed at byte " + std::to_string(offset) + ": " + std::strerror(errno));
    if (n == 0)
      fail(path_, "changed under the running job: it ends at byte " + std::to_string(offset) + " but was " +
                      std::to_string(bytes_) + " bytes when opened (truncated)");
    p += n;
    offset += static_cast<uint64_t>(n);
    bytes -= static_cast<size_t>(n);
  }
}

uint64_t TokenFile::scan_tokens(uint32_t* max_token) const {
  std::vector<unsigned char> chunk(kScanChunkBytes);
  uint64_t hash = fnv1a64(nullptr, 0);
  const uint64_t body = header_.count * header_.token_bytes;
  for (uint64_t done = 0; done < body;) {
    const size_t n = static_cast<size_t>(std::min<uint64_t>(kScanChunkBytes, body - done));
    read_bytes(kHeaderBytes + done, n, chunk.data());
    hash = fnv1a64(chunk.data(), n, hash);
    if (max_token != nullptr)
      for (size_t i = 0; i < n; i += header_.token_bytes)
        *max_token = std::max(*max_token, token_at(chunk.data() + i, header_.token_bytes));
    done += n;
  }
  return hash;
}

uint64_t TokenFile::index_offset() const { return kHeaderBytes + header_.count * header_.token_bytes; }

uint64_t TokenFile::scan_index(std::vector<int64_t>* starts) const {
  std::vector<unsigned char> chunk(kScanChunkBytes);
  uint64_t hash = fnv1a64(nullptr, 0);
  const uint64_t bytes = header_.documents * 8;
  if (starts != nullptr) {
    starts->clear();
    starts->reserve(header_.documents);
  }
  for (uint64_t done = 0; done < bytes;) {
    const size_t n = static_cast<size_t>(std::min<uint64_t>(kScanChunkBytes, bytes - done));
    read_bytes(index_offset() + done, n, chunk.data());
    hash = fnv1a64(chunk.data(), n, hash);
    if (starts != nullptr)
      for (size_t i = 0; i < n; i += 8) {
        uint64_t v = 0;
        std::memcpy(&v, chunk.data() + i, 8);
        // Above INT64_MAX is beyond any count: the range check names it.
        starts->push_back(v > static_cast<uint64_t>(INT64_MAX) ? INT64_MAX : static_cast<int64_t>(v));
      }
    done += n;
  }
  return hash;
}

void TokenFile::check_unchanged() const {
  std::lock_guard<std::mutex> lock(check_mutex_);
  struct stat st {};
  if (::fstat(fd_, &st) != 0) fail(path_, std::string("cannot stat: ") + std::strerror(errno));
  if (static_cast<int64_t>(st.st_size) != bytes_)
    fail(path_, "changed under the running job: it was " + std::to_string(bytes_) + " bytes when opened and is now " +
                    std::to_string(static_cast<int64_t>(st.st_size)) +
                    " bytes (truncated or rewritten); restore it and resume from the last checkpoint");
  if (!same_time(st.st_mtim, modified_)) {
    // Written since open: accept only if header and tokens are still the same.
    unsigned char h[kHeaderBytes];
    read_bytes(0, kHeaderBytes, h);
    TokenFileHeader now;
    std::memcpy(&now.vocab_size, h + 12, 4);
    std::memcpy(&now.count, h + 24, 8);
    std::memcpy(&now.checksum, h + 32, 8);
    std::memcpy(&now.documents, h + 40, 8);
    std::memcpy(&now.index_checksum, h + 48, 8);
    if (header_.version < 2) now.documents = now.index_checksum = 0;
    if (std::memcmp(h, kMagic, 8) != 0 || now.vocab_size != header_.vocab_size || now.count != header_.count ||
        now.checksum != header_.checksum || now.documents != header_.documents ||
        now.index_checksum != header_.index_checksum || scan_tokens() != header_.checksum ||
        scan_index() != header_.index_checksum)
      fail(path_, "changed under the running job: modified after it was opened (still " + std::to_string(bytes_) +
                      " bytes, but its contents no longer match the checksum recorded at open); restore it and "
                      "resume from the last checkpoint");
    modified_ = st.st_mtim;  // touched, contents intact
  }
  // The path may now name another file (loom-data prepare renames a new one
  // in): this job keeps reading the file it opened, which must then be the
  // same data, or a resumed run would read something else.
  struct stat named {};
  if (::stat(path_.c_str(), &named) != 0) {
    if (!warned_unlinked_) {
      LOOM_LOG(kWarn) << "token file '" << path_ << "' was removed while the job runs; reading the copy still open";
      warned_unlinked_ = true;
    }
    return;
  }
  if (named.st_dev == device_ && named.st_ino == inode_) return;
  if (named.st_dev == replacement_device_ && named.st_ino == replacement_inode_ &&
      same_time(named.st_mtim, replacement_modified_))
    return;
  unsigned char h[kHeaderBytes] = {0};
  bool identical = false;
  const int fd = ::open(path_.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd >= 0) {
    unsigned char mine[kHeaderBytes];
    read_bytes(0, kHeaderBytes, mine);
    identical = named.st_size == static_cast<off_t>(bytes_) &&
                ::pread(fd, h, kHeaderBytes, 0) == static_cast<ssize_t>(kHeaderBytes) &&
                std::memcmp(h, mine, kHeaderBytes) == 0;  // same count, vocabulary and checksum
    ::close(fd);
  }
  if (!identical)
    fail(path_, "changed under the running job: the path now names a different file (" +
                    std::to_string(static_cast<int64_t>(named.st_size)) + " bytes; the one opened was " +
                    std::to_string(bytes_) +
                    " bytes) with other tokens; restore it and resume from the last checkpoint");
  replacement_device_ = named.st_dev;
  replacement_inode_ = named.st_ino;
  replacement_modified_ = named.st_mtim;
}

void TokenFile::check_vocabulary(int64_t model_vocab_size, const std::string& field) const {
  if (static_cast<int64_t>(max_token_) < model_vocab_size) return;
  // The first offending id, for the message (an error path: one more pass).
  check_unchanged();
  std::vector<unsigned char> chunk(kScanChunkBytes);
  const uint64_t body = header_.count * header_.token_bytes;
  for (uint64_t done = 0; done < body;) {
    const size_t n = static_cast<size_t>(std::min<uint64_t>(kScanChunkBytes, body - done));
    read_bytes(kHeaderBytes + done, n, chunk.data());
    for (size_t i = 0; i < n; i += header_.token_bytes) {
      const uint32_t id = token_at(chunk.data() + i, header_.token_bytes);
      if (static_cast<int64_t>(id) >= model_vocab_size)
        throw ConfigError("data file '" + path_ + "' (" + field + ") has vocabulary " +
                          std::to_string(header_.vocab_size) + " but model.vocab_size is " +
                          std::to_string(model_vocab_size) + ": token id " + std::to_string(id) + " at position " +
                          std::to_string((done + i) / header_.token_bytes) + " (of " +
                          std::to_string(header_.count) + " tokens) is not below model.vocab_size " +
                          std::to_string(model_vocab_size));
    }
    done += n;
  }
}

uint32_t TokenFile::at(int64_t i) const {
  if (i < 0 || i >= size())
    fail(path_, "token " + std::to_string(i) + " is outside its " + std::to_string(size()) + " tokens");
  check_unchanged();
  unsigned char v[4];
  read_bytes(kHeaderBytes + static_cast<uint64_t>(i) * header_.token_bytes, header_.token_bytes, v);
  return token_at(v, header_.token_bytes);
}

void TokenFile::read(int64_t start, int64_t n, int64_t* out) const {
  if (start < 0 || n < 0 || start + n > size())
    fail(path_, "read of [" + std::to_string(start) + ", " + std::to_string(start + n) + ") outside its " +
                    std::to_string(size()) + " tokens");
  check_unchanged();
  std::vector<unsigned char> bytes(static_cast<size_t>(n) * header_.token_bytes);
  read_bytes(kHeaderBytes + static_cast<uint64_t>(start) * header_.token_bytes, bytes.size(), bytes.data());
  for (int64_t i = 0; i < n; ++i) out[i] = token_at(bytes.data() + i * header_.token_bytes, header_.token_bytes);
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
  errno = 0;
  gzFile f = gzopen(path.c_str(), "rb");  // reads plain files as they are
  if (f == nullptr)
    throw LoomError("input '" + path + "': cannot open: " + (errno != 0 ? std::strerror(errno) : "out of memory"));
  std::string text;
  std::vector<char> buf(1 << 16);
  int n = 0;
  while ((n = gzread(f, buf.data(), static_cast<unsigned>(buf.size()))) > 0)
    text.append(buf.data(), static_cast<size_t>(n));
  // zlib's message lives in the gzFile: copy it before gzclose frees it.
  int err = Z_OK;
  const char* msg = gzerror(f, &err);
  std::string reason = msg != nullptr ? msg : "";
  const std::string prefix = path + ": ";  // zlib prefixes the path; the message names it already
  if (reason.compare(0, prefix.size(), prefix) == 0) reason.erase(0, prefix.size());
  const int closed = gzclose(f);
  if (n < 0 || (err != Z_OK && err != Z_STREAM_END))
    throw LoomError("input '" + path + "': read failed: " +
                    (reason.empty() ? "zlib error " + std::to_string(err) : reason));
  if (closed == Z_BUF_ERROR)  // the last read ended inside a gzip stream
    throw LoomError("input '" + path + "': read failed: the compressed data ends early (truncated file?)");
  if (text.empty()) throw LoomError("input '" + path + "' is empty");
  return text;
}

}  // namespace loom
