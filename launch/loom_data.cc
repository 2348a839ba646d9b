// loom-data: turns text into Loom token files.
//
//   loom-data prepare --input corpus.txt[.gz|.dz] --output data/corpus.tok
//                     [--tokenizer byte | --tokenizer sentencepiece --model tok.model]
//   loom-data train-tokenizer --input corpus.txt --model-prefix data/tok --vocab-size 4096 [--model-type bpe|unigram]
//   loom-data info data/corpus.tok
// prepare refuses an output that is its input or the tokenizer model (the same
// file by device and inode, so also through links and relative paths), and
// writes the token file under a temporary name renamed into place when
// complete (removed on any failure): an existing output is replaced only by a
// complete file.
// Exit codes: 0 success, 2 bad arguments or input (the message names it).
#include <CLI/CLI.hpp>
#include <sys/stat.h>

#include <filesystem>
#include <iostream>

#include "loom/runtime/core/error.h"
#include "loom/runtime/data/token_file.h"
#include "loom/runtime/data/tokenizer.h"

namespace {

// True when both paths exist and name the same file (device and inode).
bool same_file(const std::string& a, const std::string& b) {
  struct stat sa {}, sb {};
  return ::stat(a.c_str(), &sa) == 0 && ::stat(b.c_str(), &sb) == 0 && sa.st_dev == sb.st_dev &&
         sa.st_ino == sb.st_ino;
}

// Checks made before the (possibly long) read and tokenization.
void check_prepare_paths(const std::string& input, const std::string& output, const std::string& model) {
  namespace fs = std::filesystem;
  if (same_file(input, output))
    throw loom::ConfigError("--output '" + output + "' is the input file '" + input +
                            "' (the same file): writing it would destroy the input; name another output");
  if (!model.empty() && same_file(model, output))
    throw loom::ConfigError("--output '" + output + "' is the tokenizer model '" + model +
                            "' (the same file); name another output");
  std::error_code ec;
  if (fs::is_directory(output, ec))
    throw loom::ConfigError("--output '" + output + "' is a directory; name a token file");
  const fs::path parent = fs::path(output).parent_path();
  if (!parent.empty() && !fs::is_directory(parent, ec))
    throw loom::ConfigError("--output '" + output + "': the directory '" + parent.string() + "' does not exist");
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"loom-data: prepare token files for loom-train", "loom-data"};
  app.require_subcommand(1);
  std::string input, output, tokenizer = "byte", model, prefix, model_type = "bpe", info_path;
  int vocab_size = 4096;
  auto* prepare = app.add_subcommand("prepare", "Tokenize a text file (plain, .gz or dictzip .dz) into a token file");
  prepare->add_option("--input", input, "Text file")->required();
  prepare->add_option("--output", output, "Token file to write (not the input)")->required();
  prepare->add_option("--tokenizer", tokenizer, "byte or sentencepiece");
  prepare->add_option("--model", model, "SentencePiece .model file (with --tokenizer sentencepiece)");
  auto* train = app.add_subcommand("train-tokenizer", "Train a SentencePiece BPE or unigram tokenizer");
  train->add_option("--input", input, "Text file")->required();
  train->add_option("--model-prefix", prefix, "Writes <prefix>.model and <prefix>.vocab")->required();
  train->add_option("--vocab-size", vocab_size, "Vocabulary size")->check(CLI::Range(16, 1 << 20));
  train->add_option("--model-type", model_type, "bpe or unigram");
  auto* info = app.add_subcommand("info", "Print a token file's header");
  info->add_option("file", info_path, "Token file")->required();
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    // --help arrives here too, with exit code 0; every usage error exits 2.
    return app.exit(e) == 0 ? 0 : 2;
  }
  try {
    if (*train) {
      loom::train_sentencepiece(input, prefix, vocab_size, model_type);
      std::cout << "wrote " << prefix << ".model (" << model_type << ", vocabulary " << vocab_size << ")" << std::endl;
    } else if (*prepare) {
      check_prepare_paths(input, output, model);
      const auto tok = loom::make_tokenizer(tokenizer, model);
      const std::string text = loom::read_text_file(input);
      const auto ids = tok->encode(text);
      loom::write_token_file(output, ids, tok->vocab_size());
      std::cout << "wrote " << ids.size() << " tokens (" << tokenizer << ", vocabulary " << tok->vocab_size() << ") to "
                << output << std::endl;
    } else if (*info) {
      loom::TokenFile f(info_path);
      std::cout << info_path << ": " << f.size() << " tokens, vocabulary " << f.vocab_size() << ", "
                << f.header().token_bytes << " bytes per token, largest token id " << f.max_token() << ", checksum ok"
                << std::endl;
    }
  } catch (const std::exception& e) {
    std::cerr << "loom-data: " << e.what() << std::endl;
    return 2;
  }
  return 0;
}
