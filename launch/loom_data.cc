// loom-data: turns text into Loom token files.
//
//   loom-data prepare --input corpus.txt[.gz|.dz] --output data/corpus.tok [--tokenizer byte]
//   loom-data info data/corpus.tok
// The byte tokenizer is built in (vocabulary 256). SentencePiece tokenizers
// (loom-data train-tokenizer) are not supported by this build yet.
// Exit codes: 0 success, 2 bad arguments or input (the message names it),
// 3 not supported.
#include <CLI/CLI.hpp>

#include <iostream>

#include "runtime/error.h"
#include "runtime/token_file.h"

int main(int argc, char** argv) {
  CLI::App app{"loom-data: prepare token files for loom-train"};
  app.require_subcommand(1);
  std::string input, output, tokenizer = "byte", info_path;
  auto* prepare = app.add_subcommand("prepare", "Tokenize a text file (plain, .gz or dictzip .dz) into a token file");
  prepare->add_option("--input", input, "Text file")->required();
  prepare->add_option("--output", output, "Token file to write")->required();
  prepare->add_option("--tokenizer", tokenizer, "Tokenizer: byte");
  auto* train_tok = app.add_subcommand("train-tokenizer", "Train a SentencePiece tokenizer (not supported yet)");
  train_tok->allow_extras();
  auto* info = app.add_subcommand("info", "Print a token file's header");
  info->add_option("file", info_path, "Token file")->required();
  CLI11_PARSE(app, argc, argv);
  try {
    if (*train_tok) {
      std::cerr << "loom-data: train-tokenizer (SentencePiece) is not supported by this build yet; use --tokenizer byte"
                << std::endl;
      return 3;
    }
    if (*prepare) {
      if (tokenizer != "byte") {
        std::cerr << "loom-data: --tokenizer '" << tokenizer << "': only 'byte' is supported by this build" << std::endl;
        return tokenizer == "sentencepiece" ? 3 : 2;
      }
      const std::string text = loom::read_text_file(input);
      loom::write_token_file(output, loom::byte_tokenize(text), 256);
      std::cout << "wrote " << text.size() << " tokens (byte tokenizer, vocabulary 256) to " << output << std::endl;
    } else if (*info) {
      loom::TokenFile f(info_path);
      std::cout << info_path << ": " << f.size() << " tokens, vocabulary " << f.vocab_size() << ", "
                << f.header().token_bytes << " bytes per token, checksum ok" << std::endl;
    }
  } catch (const std::exception& e) {
    std::cerr << "loom-data: " << e.what() << std::endl;
    return 2;
  }
  return 0;
}
