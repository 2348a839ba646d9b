// loom-data: turns text into Loom token files.
//
//   loom-data prepare --input PATH... --output data/corpus.tok
//                     [--format auto|text|jsonl|dictd] [--text-documents file|paragraph]
//                     [--jsonl-field text] [--eod-token ID|none] [--skip-empty]
//                     [--tokenizer byte | --tokenizer sentencepiece --model tok.model]
//   loom-data train-tokenizer --input corpus.txt --model-prefix data/tok --vocab-size 4096 [--model-type bpe|unigram]
//   loom-data info data/corpus.tok
// prepare reads files, directories (recursively, sorted) and glob patterns,
// plain or gzip/dictzip/zstd compressed, as documents (runtime/data/corpus.h),
// streaming: memory stays bounded whatever the corpus size, and progress goes
// to stderr every few seconds. It refuses an output that is one of its inputs
// or the tokenizer model (the same file by device and inode, so also through
// links and relative paths), and writes the token file under a temporary name
// renamed into place when complete (removed on any failure): an existing
// output is replaced only by a complete file.
// Exit codes: 0 success, 2 bad arguments or input (the message names it),
// 130 interrupted (SIGINT/SIGTERM during prepare: the temporary output is
// removed, an existing output is left as it was).
#include <CLI/CLI.hpp>
#include <sys/stat.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <filesystem>
#include <iostream>
#include <vector>

#include "cli_checks.h"
#include "loom/runtime/core/error.h"
#include "loom/runtime/core/stop_signals.h"
#include "loom/runtime/data/corpus.h"
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
void check_prepare_paths(const std::vector<std::string>& inputs, const std::string& output, const std::string& model) {
  namespace fs = std::filesystem;
  for (const auto& input : inputs)
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

// "min a, median b, max c" of the documents' lengths.
std::string length_stats(const loom::TokenFile& f) {
  const auto& starts = f.document_starts();
  std::vector<int64_t> lengths(starts.size());
  for (size_t d = 0; d < starts.size(); ++d)
    lengths[d] = (d + 1 < starts.size() ? starts[d + 1] : f.size()) - starts[d];
  const auto mid = lengths.begin() + static_cast<std::ptrdiff_t>(lengths.size() / 2);
  std::nth_element(lengths.begin(), mid, lengths.end());
  const int64_t median = *mid;
  const auto [lo, hi] = std::minmax_element(lengths.begin(), lengths.end());
  return "min " + std::to_string(*lo) + ", median " + std::to_string(median) + ", max " + std::to_string(*hi);
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"loom-data: prepare token files for loom-train", "loom-data"};
  app.require_subcommand(1);
  std::vector<std::string> inputs;
  std::string input, output, tokenizer = "byte", model, prefix, model_type = "bpe", info_path;
  std::string format = "auto", text_documents = "file", eod = "none";
  loom::PrepareOptions options;
  int vocab_size = 4096;
  auto* prepare = app.add_subcommand("prepare", "Tokenize text into a token file with a document index");
  prepare->add_option("--input", inputs,
                      "Files, directories (read recursively, sorted) or glob patterns; plain, gzip (.gz), dictzip "
                      "(.dz) or zstd (.zst)")
      ->required();
  prepare->add_option("--output", output, "Token file to write (not an input)")->required();
  prepare->add_option("--tokenizer", tokenizer, "byte or sentencepiece");
  prepare->add_option("--model", model, "SentencePiece .model file (with --tokenizer sentencepiece)");
  prepare->add_option("--format", format,
                      "auto (by name: *.jsonl, *.ndjson: jsonl; *.dict, *.dict.dz: dictd; else text), text, jsonl, "
                      "or dictd (alias gcide: one document per dictionary entry)")
      ->check(CLI::IsMember({"auto", "text", "jsonl", "dictd", "gcide"}));
  prepare->add_option("--text-documents", text_documents,
                      "Documents of text inputs: file (one per file) or paragraph (separated by blank lines)")
      ->check(CLI::IsMember({"file", "paragraph"}));
  prepare->add_option("--jsonl-field", options.jsonl_field, "The string field of each JSONL line that holds the text");
  prepare->add_option("--eod-token", eod, "Token id appended after every document, or none");
  prepare->add_flag("--skip-empty", options.skip_empty,
                    "Skip (and count) documents without tokens instead of stopping with an error");
  prepare->add_option("--progress-seconds", options.progress_seconds,
                      "Seconds between progress lines on stderr (0: after every read)")
      ->check(CLI::Range(0.0, 86400.0));
  auto* train = app.add_subcommand("train-tokenizer", "Train a SentencePiece BPE or unigram tokenizer");
  train->add_option("--input", input, "Text file")->required();
  train->add_option("--model-prefix", prefix, "Writes <prefix>.model and <prefix>.vocab")->required();
  train->add_option("--vocab-size", vocab_size, "Vocabulary size")->check(CLI::Range(16, 1 << 20));
  train->add_option("--model-type", model_type, "bpe or unigram");
  auto* info = app.add_subcommand("info", "Print a token file's header and document statistics");
  info->add_option("file", info_path, "Token file")->required();
  if (const std::string bad = loom::cli::option_with_empty_value(argc, argv); !bad.empty()) {
    std::cerr << "loom-data: " << loom::cli::empty_value_message(bad) << std::endl;
    return 2;
  }
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
      options.inputs = inputs;
      options.output = output;
      options.format = format == "text"    ? loom::CorpusFormat::kText
                       : format == "jsonl" ? loom::CorpusFormat::kJsonl
                       : format == "auto"  ? loom::CorpusFormat::kAuto
                                           : loom::CorpusFormat::kDictd;
      options.text_documents =
          text_documents == "paragraph" ? loom::TextDocuments::kParagraph : loom::TextDocuments::kFile;
      if (eod != "none") {
        char* end = nullptr;
        errno = 0;
        const long long id = std::strtoll(eod.c_str(), &end, 10);
        // A leading zero is refused as loom-train refuses it (010 is not 8 nor 10 to everyone).
        if (eod.empty() || *end != '\0' || errno != 0 || id < 0 || (eod.size() > 1 && eod[0] == '0'))
          throw loom::ConfigError("--eod-token '" + eod + "': expected a token id (an integer >= 0) or none");
        options.eod_token = id;
      }
      check_prepare_paths(loom::expand_inputs(inputs, output), output, model);
      const auto tok = loom::make_tokenizer(tokenizer, model);
      // A signal stops prepare at its next read; the writer then removes its
      // temporary file (a second signal is not needed and changes nothing).
      loom::StopSignalScope signals("loom-data: ", "stopping after the current read, removing the partial output",
                                    "already stopping");
      options.interrupted = [&signals] { return signals.received() != 0; };
      loom::PrepareReport report;
      try {
        report = loom::prepare_token_file(options, *tok, &std::cerr);
      } catch (const std::exception& e) {
        if (signals.received() == 0) throw;
        std::cerr << "loom-data: " << e.what() << std::endl;
        return 130;
      }
      std::cout << "wrote " << report.tokens << " tokens in " << report.documents << (report.documents == 1 ? " document (" : " documents (") << tokenizer
                << ", vocabulary " << tok->vocab_size()
                << (options.eod_token >= 0 ? ", end-of-document token " + std::to_string(options.eod_token) : "")
                << ") from " << report.inputs << (report.inputs == 1 ? " input" : " inputs") << " ("
                << report.bytes_read << " bytes of text) to " << output;
      if (report.skipped_empty > 0) std::cout << "; skipped " << report.skipped_empty << " empty documents";
      std::cout << std::endl;
    } else if (*info) {
      loom::TokenFile f(info_path);
      std::cout << info_path << ": " << f.size() << " tokens, vocabulary " << f.vocab_size() << ", "
                << f.header().token_bytes << " bytes per token, largest token id " << f.max_token() << ", checksum ok; "
                << f.documents() << (f.documents() == 1 ? " document" : " documents")
                << (f.has_document_index() ? "" : " (version 1 file: no document index)") << ", tokens per document "
                << length_stats(f) << std::endl;
    }
  } catch (const std::exception& e) {
    std::cerr << "loom-data: " << e.what() << std::endl;
    return 2;
  }
  return 0;
}
