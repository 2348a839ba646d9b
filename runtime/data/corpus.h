// Corpus reading for `loom-data prepare`: inputs to documents to a token file,
// streaming, in memory bounded independent of the corpus size.
//
// Inputs (expand_inputs): files; directories, walked recursively in sorted
// path order (hidden names, starting with '.', are skipped; so is the output
// file); glob patterns (glob(3), sorted), which must match something. Each
// input is plain, gzip (.gz, dictzip .dz) or zstd (.zst) compressed, told by
// its magic bytes (a .gz/.dz/.zst name must carry that format's magic).
// Formats (by name with --format auto: *.jsonl / *.ndjson -> jsonl,
// *.dict -> dictd, else text; the compression suffix is ignored):
// - text: one document per file, or per paragraph (blank-line separated:
//   runs of whitespace-only lines separate documents and are dropped).
// - jsonl: one document per line, the string field `jsonl_field` of the
//   line's JSON object (whitespace-only lines are skipped). A malformed line,
//   a missing field or a non-string value is an error naming file:line.
// - dictd (GCIDE's format): one document per dictionary entry. With the
//   dictionary's .index file beside it (gcide.dict.dz -> gcide.index) the
//   entries are exactly the index's (offset, length) ranges in the
//   uncompressed text: a document per distinct offset; text between two
//   entries stays with the entry before it (the separating newline, a stray
//   source tag); text before the first or after the last entry is a document
//   of its own unless whitespace only. Without an index an entry starts at a
//   line with no leading whitespace that follows a blank line.
// Every document is tokenized (the tokenizer sees pieces of at most
// kPieceBytes, cut at whitespace, batched across documents), followed by the
// end-of-document token when one is configured, and written as it goes
// through TokenFileWriter (atomic rename when complete). A document without
// tokens is an error naming file:line, or skipped and counted with
// skip_empty. Memory: the pieces in flight (a few MiB), one JSONL line, and
// the document index (8 bytes per document). Errors: LoomError (input) or
// ConfigError (options), naming the input, the line and the field.
#pragma once

#include <cstdint>
#include <functional>
#include <iosfwd>
#include <string>
#include <vector>

#include "loom/runtime/data/tokenizer.h"

namespace loom {

enum class CorpusFormat { kAuto, kText, kJsonl, kDictd };
enum class TextDocuments { kFile, kParagraph };

struct PrepareOptions {
  std::vector<std::string> inputs;  // files, directories, globs (expand_inputs)
  std::string output;
  CorpusFormat format = CorpusFormat::kAuto;
  TextDocuments text_documents = TextDocuments::kFile;
  std::string jsonl_field = "text";
  int64_t eod_token = -1;  // appended after every document; -1: none
  bool skip_empty = false;
  double progress_seconds = 5;  // progress lines at most this often (0: after every read)
  // Polled after every read: when it returns true (loom-data: SIGINT or
  // SIGTERM arrived) prepare stops with LoomError and the temporary output is
  // removed; the existing output, if any, is untouched. May be empty.
  std::function<bool()> interrupted;
};

struct PrepareReport {
  int64_t inputs = 0, documents = 0, tokens = 0, skipped_empty = 0;
  uint64_t bytes_read = 0;  // uncompressed
};

// The files the input specifications name, in order; throws ConfigError
// naming a specification that names nothing (a missing file, a glob matching
// nothing, a directory without files). `output`, when it exists, is left out
// of directories and globs.
std::vector<std::string> expand_inputs(const std::vector<std::string>& specs, const std::string& output = "");

// The format an input is read as under `format` (kAuto: by its name).
CorpusFormat input_format(const std::string& path, CorpusFormat format);

// Tokenizes the inputs into options.output. Progress lines go to `progress`
// (may be null) when reading takes longer than options.progress_seconds.
PrepareReport prepare_token_file(const PrepareOptions& options, const Tokenizer& tokenizer, std::ostream* progress);

// Reads a whole input (plain, gzip or zstd) into memory: for tools that need
// the text at once (SentencePiece training). LoomError names the file.
std::string read_whole_input(const std::string& path);

}  // namespace loom
