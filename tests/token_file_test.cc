// Token files under change: a file truncated, rewritten or replaced after it
// was opened is a named error at the next read (never SIGBUS); a touched file
// with the same contents, or a path replaced by identical data, is accepted.
// Writing never leaves a temporary file; the vocabulary check covers every
// token. One rank (each test uses its own directory).
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <functional>
#include <fstream>
#include <string>
#include <vector>

#include "loom/runtime/core/error.h"
#include "scratch_dir.h"
#include "loom/runtime/data/token_file.h"

namespace loom {
namespace {
namespace fs = std::filesystem;

struct ScratchDir : testing::ScratchDir {
  ScratchDir() : testing::ScratchDir("loom-token-file") {}
};

std::vector<uint32_t> ramp(size_t n, uint32_t modulo) {
  std::vector<uint32_t> t(n);
  for (size_t i = 0; i < n; ++i) t[i] = static_cast<uint32_t>(i % modulo);
  return t;
}

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const LoomError& e) {
    return e.what();
  }
  return "";
}

TEST(TokenFileUnderChange, TruncationIsANamedErrorAtTheNextRead) {
  ScratchDir dir;
  const std::string path = (dir.path / "t.tok").string();
  write_token_file(path, ramp(100000, 256), 256);
  TokenFile file(path);
  std::vector<int64_t> out(16);
  file.read(99000, 16, out.data());
  EXPECT_EQ(out[0], 99000 % 256);
  fs::resize_file(path, 64 + 2 * 50000);
  const std::string e = error_of([&] { file.read(99000, 16, out.data()); });
  // 64-byte header + 100000 2-byte tokens + a one-document index (8 bytes).
  EXPECT_NE(e.find("token file '" + path + "': changed under the running job: it was 200072 bytes when opened and "
                   "is now 100064 bytes"),
            std::string::npos)
      << e;
  // Also a read inside what is left: the file is not the one opened any more.
  EXPECT_NE(error_of([&] { file.read(0, 16, out.data()); }).find("changed under the running job"), std::string::npos);
}

TEST(TokenFileUnderChange, RewrittenInPlaceIsAnErrorTouchedIsNot) {
  ScratchDir dir;
  const std::string path = (dir.path / "t.tok").string();
  write_token_file(path, ramp(5000, 200), 256);
  TokenFile file(path);
  std::vector<int64_t> out(8);
  // Touched (a later modification time), contents intact: accepted.
  const auto later = fs::last_write_time(path) + std::chrono::seconds(5);
  fs::last_write_time(path, later);
  file.read(10, 8, out.data());
  EXPECT_EQ(out[0], 10);
  // One token changed in place, same size: the checksum no longer matches.
  {
    std::fstream f(path, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(64 + 2 * 4000);
    const char byte = 7;
    f.write(&byte, 1);
  }
  fs::last_write_time(path, later + std::chrono::seconds(5));
  const std::string e = error_of([&] { file.read(10, 8, out.data()); });
  EXPECT_NE(e.find("changed under the running job: modified after it was opened (still 10072 bytes"),
            std::string::npos)
      << e;
}

TEST(TokenFileUnderChange, ReplacedPathIsAnErrorUnlessIdentical) {
  ScratchDir dir;
  const std::string path = (dir.path / "t.tok").string();
  write_token_file(path, ramp(3000, 256), 256);
  TokenFile file(path);
  std::vector<int64_t> out(4);
  // The same tokens written again (a new inode renamed over the path): fine.
  write_token_file(path, ramp(3000, 256), 256);
  file.read(0, 4, out.data());
  EXPECT_EQ(out[3], 3);
  // Different tokens renamed over the path: the job would read other data on resume.
  write_token_file(path, ramp(3000, 100), 256);
  const std::string e = error_of([&] { file.read(0, 4, out.data()); });
  EXPECT_NE(e.find("changed under the running job: the path now names a different file"), std::string::npos) << e;
}

TEST(TokenFileVocabulary, EveryTokenIsCheckedAndTheFirstOffenderNamed) {
  ScratchDir dir;
  const std::string path = (dir.path / "v.tok").string();
  auto tokens = ramp(70000, 250);
  tokens[69998] = 299;  // deep in the file
  tokens[69999] = 280;
  write_token_file(path, tokens, 300);
  TokenFile file(path);
  EXPECT_EQ(file.max_token(), 299u);
  EXPECT_NO_THROW(file.check_vocabulary(300, "data.train_path"));
  try {
    file.check_vocabulary(256, "data.val_path");
    FAIL() << "no error";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("data file '" + path + "' (data.val_path) has vocabulary 300 but "
                                         "model.vocab_size is 256: token id 299 at position 69998 (of 70000 tokens)"),
              std::string::npos)
        << e.what();
  }
}

TEST(TokenFileWrite, FailuresLeaveNoTemporaryFileAndKeepTheOldOutput) {
  ScratchDir dir;
  const std::string path = (dir.path / "out.tok").string();
  write_token_file(path, ramp(100, 256), 256);
  // An id beyond the vocabulary: refused before anything is written.
  EXPECT_THROW(write_token_file(path, {1, 300}, 256), LoomError);
  // Renaming over a non-empty directory fails after the data was written.
  const std::string blocked = (dir.path / "blocked").string();
  fs::create_directories(blocked + "/inside");
  const std::string e = error_of([&] { write_token_file(blocked, ramp(100, 256), 256); });
  EXPECT_NE(e.find("cannot rename the finished temporary file over it"), std::string::npos) << e;
  for (const auto& entry : fs::directory_iterator(dir.path))
    EXPECT_EQ(entry.path().filename().string().find(".tmp-"), std::string::npos) << entry.path();
  EXPECT_EQ(TokenFile(path).size(), 100);
  EXPECT_EQ(TokenFile(path).at(99), 99u);
}

}  // namespace
}  // namespace loom
