// loom-spm: SentencePiece in a process of its own.
//
// Debian's libsentencepiece embeds protobuf 3.14 and aborts in a process that
// also loads libprotobuf 3.21 (as libtorch and Loom do), so Loom runs
// SentencePiece here, linked against nothing else, and talks to it through
// files (runtime/data/tokenizer.cc):
//   loom-spm train <trainer flags>            (--input=... --model_prefix=... ...)
//   loom-spm encode MODEL IN_TEXT OUT_IDS     (OUT_IDS: little-endian uint32)
//   loom-spm encode-pieces MODEL IN OUT       (IN: per piece u64 length + bytes;
//                                              OUT: per piece u64 count + uint32 ids)
//   loom-spm decode MODEL IN_IDS OUT_TEXT     (IN_IDS: little-endian uint32)
//   loom-spm size MODEL                       (prints the vocabulary size)
#include <sentencepiece_processor.h>
#include <sentencepiece_trainer.h>

#include <cstdint>
#include <fstream>
#include <iostream>
#include <iterator>
#include <string>
#include <vector>

namespace {
int fail(const std::string& what) {
  std::cerr << "loom-spm: " << what << std::endl;
  return 2;
}
}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) return fail("usage: loom-spm train|encode|decode|size ...");
  const std::string cmd = argv[1];
  if (cmd == "train") {
    std::string args;
    for (int i = 2; i < argc; ++i) args += std::string(i > 2 ? " " : "") + argv[i];
    const auto status = sentencepiece::SentencePieceTrainer::Train(args);
    return status.ok() ? 0 : fail(status.ToString());
  }
  if (argc < 3) return fail("missing MODEL");
  sentencepiece::SentencePieceProcessor sp;
  const auto loaded = sp.Load(argv[2]);
  if (!loaded.ok()) return fail(std::string("cannot load model '") + argv[2] + "': " + loaded.ToString());
  if (cmd == "size") {
    std::cout << sp.GetPieceSize() << std::endl;
    return 0;
  }
  if (argc < 5) return fail("usage: loom-spm " + cmd + " MODEL IN OUT");
  std::ifstream in(argv[3], std::ios::binary);
  std::ofstream out(argv[4], std::ios::binary | std::ios::trunc);
  if (!in || !out) return fail("cannot open the input or output file");
  if (cmd == "encode") {
    const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    std::vector<int> ids;
    const auto status = sp.Encode(text, &ids);
    if (!status.ok()) return fail(status.ToString());
    for (int id : ids) {
      const uint32_t v = static_cast<uint32_t>(id);
      out.write(reinterpret_cast<const char*>(&v), 4);
    }
    return out ? 0 : fail("write failed");
  }
  if (cmd == "encode-pieces") {
    uint64_t n = 0;
    std::string text;
    std::vector<int> ids;
    while (in.read(reinterpret_cast<char*>(&n), 8)) {
      text.resize(n);
      if (!in.read(text.data(), static_cast<std::streamsize>(n))) return fail("the pieces file ends inside a piece");
      ids.clear();
      const auto status = sp.Encode(text, &ids);
      if (!status.ok()) return fail(status.ToString());
      const uint64_t count = ids.size();
      out.write(reinterpret_cast<const char*>(&count), 8);
      for (int id : ids) {
        const uint32_t v = static_cast<uint32_t>(id);
        out.write(reinterpret_cast<const char*>(&v), 4);
      }
    }
    return out ? 0 : fail("write failed");
  }
  if (cmd == "decode") {
    std::vector<int> ids;
    uint32_t v = 0;
    while (in.read(reinterpret_cast<char*>(&v), 4)) ids.push_back(static_cast<int>(v));
    std::string text;
    const auto status = sp.Decode(ids, &text);
    if (!status.ok()) return fail(status.ToString());
    out << text;
    return out ? 0 : fail("write failed");
  }
  return fail("unknown command '" + cmd + "'");
}
