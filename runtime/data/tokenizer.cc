#include "loom/runtime/data/tokenizer.h"

#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <sstream>

#include "loom/runtime/core/error.h"
#include "loom/runtime/data/token_file.h"

namespace loom {
namespace fs = std::filesystem;
namespace {

class ByteTokenizer final : public Tokenizer {
 public:
  std::vector<uint32_t> encode(const std::string& text) const override { return byte_tokenize(text); }
  std::string decode(const std::vector<int64_t>& ids) const override { return byte_detokenize(ids); }
  uint32_t vocab_size() const override { return 256; }
};

// The loom-spm helper: LOOM_SPM, else next to the running executable, else PATH.
std::string spm_helper() {
  if (const char* env = std::getenv("LOOM_SPM")) return env;
  std::error_code ec;
  const fs::path self = fs::read_symlink("/proc/self/exe", ec);
  if (!ec && fs::exists(self.parent_path() / "loom-spm")) return (self.parent_path() / "loom-spm").string();
  return "loom-spm";
}

std::string quote(const std::string& s) {
  std::string q = "'";
  for (char c : s) q += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return q + "'";
}

std::string run_helper(const std::string& args) {
  const std::string cmd = quote(spm_helper()) + " " + args + " 2>&1";
  FILE* pipe = ::popen(cmd.c_str(), "r");
  if (pipe == nullptr) throw LoomError("cannot run the SentencePiece helper: " + cmd);
  std::string output;
  char buf[4096];
  size_t n = 0;
  while ((n = std::fread(buf, 1, sizeof(buf), pipe)) > 0) output.append(buf, n);
  const int status = ::pclose(pipe);
  if (status != 0) throw LoomError("SentencePiece helper failed (" + cmd + "): " + output);
  return output;
}

struct TempDir {
  fs::path path;
  TempDir() {
    std::string templ = (fs::temp_directory_path() / "loom-spm-XXXXXX").string();
    if (::mkdtemp(templ.data()) == nullptr) throw LoomError("cannot create a temporary directory");
    path = templ;
  }
  ~TempDir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
};

class SentencePieceTokenizer final : public Tokenizer {
 public:
  explicit SentencePieceTokenizer(const std::string& model) : model_(model) {
    std::error_code ec;
    if (!fs::exists(model, ec)) throw ConfigError("data.tokenizer_model '" + model + "' does not exist");
    if (!fs::is_regular_file(model, ec))
      throw ConfigError("data.tokenizer_model '" + model + "' is not a file (a SentencePiece .model file)");
    std::string size;
    try {
      size = run_helper("size " + quote(model));
    } catch (const LoomError& e) {
      throw ConfigError("data.tokenizer_model '" + model + "' is not a SentencePiece model that loads: " + e.what());
    }
    char* end = nullptr;
    const unsigned long long v = std::strtoull(size.c_str(), &end, 10);
    if (end == size.c_str() || v == 0 || v > (1ull << 31))
      throw ConfigError("data.tokenizer_model '" + model +
                        "': the SentencePiece helper reported no vocabulary size ('" + size + "')");
    vocab_ = static_cast<uint32_t>(v);
  }
  std::vector<uint32_t> encode(const std::string& text) const override {
    TempDir tmp;
    { std::ofstream(tmp.path / "in.txt", std::ios::binary) << text; }
    run_helper("encode " + quote(model_) + " " + quote((tmp.path / "in.txt").string()) + " " +
               quote((tmp.path / "out.ids").string()));
    std::ifstream in(tmp.path / "out.ids", std::ios::binary);
    std::vector<uint32_t> ids;
    uint32_t v = 0;
    while (in.read(reinterpret_cast<char*>(&v), 4)) ids.push_back(v);
    return ids;
  }
  std::vector<std::vector<uint32_t>> encode_pieces(const std::vector<std::string>& pieces) const override {
    TempDir tmp;
    {
      std::ofstream out(tmp.path / "in.pieces", std::ios::binary);
      for (const auto& piece : pieces) {
        const uint64_t n = piece.size();
        out.write(reinterpret_cast<const char*>(&n), 8);
        out.write(piece.data(), static_cast<std::streamsize>(n));
      }
      if (!out) throw LoomError("cannot write the SentencePiece helper's input in " + tmp.path.string());
    }
    run_helper("encode-pieces " + quote(model_) + " " + quote((tmp.path / "in.pieces").string()) + " " +
               quote((tmp.path / "out.ids").string()));
    std::ifstream in(tmp.path / "out.ids", std::ios::binary);
    std::vector<std::vector<uint32_t>> ids(pieces.size());
    for (auto& piece : ids) {
      uint64_t n = 0;
      if (!in.read(reinterpret_cast<char*>(&n), 8) || n > (uint64_t{1} << 40))
        throw LoomError("the SentencePiece helper returned fewer pieces than it was given");
      piece.resize(static_cast<size_t>(n));
      if (!in.read(reinterpret_cast<char*>(piece.data()), static_cast<std::streamsize>(n * 4)))
        throw LoomError("the SentencePiece helper's output ends early");
    }
    return ids;
  }
  std::string decode(const std::vector<int64_t>& ids) const override {
    TempDir tmp;
    {
      std::ofstream out(tmp.path / "in.ids", std::ios::binary);
      for (int64_t id : ids) {
        const uint32_t v = static_cast<uint32_t>(id);
        out.write(reinterpret_cast<const char*>(&v), 4);
      }
    }
    run_helper("decode " + quote(model_) + " " + quote((tmp.path / "in.ids").string()) + " " +
               quote((tmp.path / "out.txt").string()));
    std::ifstream in(tmp.path / "out.txt", std::ios::binary);
    return std::string((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  }
  uint32_t vocab_size() const override { return vocab_; }

 private:
  std::string model_;
  uint32_t vocab_ = 0;
};

}  // namespace

std::vector<std::vector<uint32_t>> Tokenizer::encode_pieces(const std::vector<std::string>& pieces) const {
  std::vector<std::vector<uint32_t>> ids;
  ids.reserve(pieces.size());
  for (const auto& piece : pieces) ids.push_back(encode(piece));
  return ids;
}

std::unique_ptr<Tokenizer> make_tokenizer(const std::string& kind, const std::string& model_path) {
  if (kind == "byte") return std::make_unique<ByteTokenizer>();
  if (kind == "sentencepiece") {
    if (model_path.empty())
      throw ConfigError("data.tokenizer = sentencepiece needs data.tokenizer_model (loom-data train-tokenizer makes one)");
    return std::make_unique<SentencePieceTokenizer>(model_path);
  }
  throw ConfigError("data.tokenizer = '" + kind + "': allowed values are byte, sentencepiece");
}

void train_sentencepiece(const std::string& input, const std::string& model_prefix, int vocab_size,
                         const std::string& model_type) {
  if (model_type != "bpe" && model_type != "unigram")
    throw ConfigError("--model-type '" + model_type + "': allowed values are bpe, unigram");
  TempDir tmp;  // SentencePiece reads a plain text file of lines: decompress first
  const fs::path plain = tmp.path / "input.txt";
  { std::ofstream(plain, std::ios::binary) << read_text_file(input); }
  run_helper("train " + quote("--input=" + plain.string()) + " " + quote("--model_prefix=" + model_prefix) +
             " --vocab_size=" + std::to_string(vocab_size) + " --model_type=" + model_type +
             " --character_coverage=1.0 --input_sentence_size=2000000 --shuffle_input_sentence=true"
             " --byte_fallback=true --minloglevel=2");
}

}  // namespace loom
