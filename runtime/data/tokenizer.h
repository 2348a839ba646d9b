// Tokenizers: byte-level (built in, vocabulary 256) and SentencePiece (BPE or
// unigram models trained by `loom-data train-tokenizer`). loom-data uses them
// to prepare token files; loom-train to encode --generate prompts and decode
// the continuation. SentencePiece runs in the loom-spm helper process
// (launch/loom_spm.cc): Debian's libsentencepiece embeds protobuf 3.14 and
// aborts inside a process that has libprotobuf 3.21 loaded, as Loom does.
#pragma once

#include <memory>
#include <string>
#include <vector>

namespace loom {

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;
  virtual std::vector<uint32_t> encode(const std::string& text) const = 0;
  // Each piece encoded on its own, in one call (SentencePiece: one helper
  // process for all of them); the default encodes them one by one.
  virtual std::vector<std::vector<uint32_t>> encode_pieces(const std::vector<std::string>& pieces) const;
  virtual std::string decode(const std::vector<int64_t>& ids) const = 0;
  virtual uint32_t vocab_size() const = 0;
};

// kind: "byte" or "sentencepiece" (then model_path names the .model file).
// Throws ConfigError naming the kind or the file.
std::unique_ptr<Tokenizer> make_tokenizer(const std::string& kind, const std::string& model_path);

// Trains a SentencePiece model <model_prefix>.model on a text file (plain, .gz
// or dictzip); model_type "bpe" or "unigram".
void train_sentencepiece(const std::string& input, const std::string& model_prefix, int vocab_size,
                         const std::string& model_type);

}  // namespace loom
