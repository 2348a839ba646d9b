// loom-ckpt: Loom checkpoints for PyTorch and Hugging Face tools, and back.
//
//   loom-ckpt inspect CHECKPOINT
//   loom-ckpt export CHECKPOINT --format torch|safetensors --output FILE
//                    [--names auto|hf|loom] [--with-optimizer]
//   loom-ckpt import FILE --output DIR [--like CHECKPOINT] [--format auto|torch|safetensors]
//
// CHECKPOINT is a step-NNNNNNNN directory or a checkpoint directory (its
// latest checkpoint, by manifest step).
// inspect prints the manifest (step, seed, data position, layout, loss,
// checksum), the resolved config and the tensor table (name, dtype, shape,
// bytes).
// export writes the model's parameters to FILE: "torch" is torch.save's zip
// format (torch.load opens it; a flat name -> tensor dict, as a state_dict),
// "safetensors" the safetensors format (any reader; the header's
// __metadata__ holds the Loom manifest, "loom.manifest", for import). Names:
// Hugging Face Llama names for Llama-style models (every mixer a linear 'L'
// or softmax 'A' attention: model.embed_tokens.weight,
// model.layers.N.self_attn.q_proj.weight, ..., lm_head.weight), Loom's names
// ("embedding.weight", "block0_mixer.q.weight", ...) otherwise or with
// --names loom. --with-optimizer adds the optimizer state
// ("loom.optimizer/<name>") and, in a torch file, the manifest as a uint8
// tensor "loom.manifest": everything a Loom checkpoint holds, for a bit-exact
// round trip.
// import reads such a file (or a state_dict written by torch.save or any
// safetensors writer, with either naming) and writes a Loom checkpoint into
// DIR (DIR/step-NNNNNNNN, atomically, as loom-train saves): the manifest and
// the expected tensors (names, dtypes, shapes) come from --like CHECKPOINT
// or else from the file's "loom.manifest". Every expected model tensor must
// be there with its shape and dtype, and nothing else; the optimizer state
// is taken when the file has it, else the checkpoint holds the model only
// (loom-train --init-from style use; resuming needs the optimizer state).
// Exit codes: 0 done; 2 bad arguments or input (missing file, wrong format,
// unknown, missing or misshapen tensor: the message names it), with nothing
// written (outputs appear by rename only when complete); 1 anything else.
#include <algorithm>
#include <CLI/CLI.hpp>
#include <fcntl.h>
#include <nlohmann/json.hpp>
#include <torch/csrc/jit/serialization/pickle.h>
#include <unistd.h>

#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <map>
#include <regex>
#include <set>
#include <sstream>

#include <google/protobuf/text_format.h>

#include "cli_checks.h"
#include "loom/runtime/core/config.h"
#include "loom/runtime/core/dtypes.h"
#include "loom/runtime/core/error.h"
#include "loom/runtime/train/checkpoint.h"

namespace fs = std::filesystem;

namespace loom {
namespace {

// A bad file or argument: exit 2 with the message.
class InputError : public ConfigError {
 public:
  using ConfigError::ConfigError;
};

std::string resolve_checkpoint(const std::string& path) {
  std::error_code ec;
  if (!fs::exists(path, ec)) throw InputError("checkpoint '" + path + "' does not exist");
  if (fs::exists(fs::path(path) / "manifest.pb", ec)) return path;
  if (auto latest = latest_checkpoint(path)) return *latest;
  throw InputError("'" + path + "' is neither a checkpoint (no manifest.pb) nor a directory holding one");
}

pb::LoomConfig config_of(const pb::CheckpointManifest& manifest, const std::string& where) {
  pb::LoomConfig config;
  parse_config_text(manifest.config_text(), where + " (manifest config)", &config);
  return config;
}

// ---- names: Loom <-> Hugging Face Llama ----

bool is_llama_style(const pb::LoomConfig& config) {
  const std::string& pattern = config.model().pattern();
  return !pattern.empty() && pattern.find_first_not_of("LA") == std::string::npos;
}

std::string hf_name(const std::string& loom_name) {
  static const std::vector<std::pair<std::regex, std::string>> rules = {
      {std::regex(R"(^embedding\.weight$)"), "model.embed_tokens.weight"},
      {std::regex(R"(^block(\d+)_mixer_norm\.weight$)"), "model.layers.$1.input_layernorm.weight"},
      {std::regex(R"(^block(\d+)_mixer\.([qkvo])\.(weight|bias)$)"), "model.layers.$1.self_attn.$2_proj.$3"},
      {std::regex(R"(^block(\d+)_mlp_norm\.weight$)"), "model.layers.$1.post_attention_layernorm.weight"},
      {std::regex(R"(^block(\d+)_mlp\.(gate|up|down)\.weight$)"), "model.layers.$1.mlp.$2_proj.weight"},
      {std::regex(R"(^final_norm\.weight$)"), "model.norm.weight"},
      {std::regex(R"(^head\.weight$)"), "lm_head.weight"},
  };
  for (const auto& [pattern, replacement] : rules)
    if (std::regex_match(loom_name, pattern)) return std::regex_replace(loom_name, pattern, replacement);
  return loom_name;  // a parameter Llama has no name for keeps Loom's
}

const std::string kOptimizerPrefix = "loom.optimizer/";
const std::string kManifestKey = "loom.manifest";

// The manifest as exported: the run's facts and tensor table, without the
// state file's bookkeeping.
std::string manifest_text(pb::CheckpointManifest manifest) {
  manifest.clear_state_file();
  manifest.clear_state_bytes();
  manifest.clear_state_checksum();
  for (auto& entry : *manifest.mutable_tensors()) {
    entry.clear_offset();
    entry.clear_bytes();
  }
  std::string text;
  google::protobuf::TextFormat::PrintToString(manifest, &text);
  return text;
}

// ---- files written whole or not at all ----

void write_atomically(const std::string& path, const std::function<void(std::ofstream&)>& write) {
  const fs::path target(path);
  std::error_code ec;
  if (fs::is_directory(target, ec)) throw InputError("--output '" + path + "' is a directory; name a file");
  const fs::path parent = target.parent_path().empty() ? fs::path(".") : target.parent_path();
  if (!fs::is_directory(parent, ec))
    throw InputError("--output '" + path + "': the directory '" + parent.string() + "' does not exist");
  const std::string tmp = path + ".tmp-" + std::to_string(getpid());
  try {
    std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
    if (!out) throw InputError("cannot write '" + tmp + "': " + std::strerror(errno));
    write(out);
    out.flush();
    if (!out) throw LoomError("writing '" + tmp + "' failed: " + std::strerror(errno));
    out.close();
    const int fd = ::open(tmp.c_str(), O_RDONLY);
    if (fd >= 0) {
      ::fsync(fd);
      ::close(fd);
    }
    fs::rename(tmp, target);
  } catch (...) {
    fs::remove(tmp, ec);
    throw;
  }
}

std::vector<char> read_file(const std::string& path) {
  std::error_code ec;
  if (!fs::exists(path, ec)) throw InputError("input file '" + path + "' does not exist");
  if (fs::is_directory(path, ec)) throw InputError("input '" + path + "' is a directory, not a file");
  std::ifstream in(path, std::ios::binary);
  if (!in) throw InputError("cannot open '" + path + "': " + std::strerror(errno));
  return std::vector<char>(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

// ---- safetensors ----

const std::map<at::ScalarType, std::string>& safetensors_dtypes() {
  static const std::map<at::ScalarType, std::string> table = {
      {at::kFloat, "F32"}, {at::kDouble, "F64"}, {at::kBFloat16, "BF16"}, {at::kHalf, "F16"},
      {at::kLong, "I64"},  {at::kInt, "I32"},    {at::kShort, "I16"},     {at::kChar, "I8"},
      {at::kByte, "U8"},   {at::kBool, "BOOL"}};
  return table;
}

void write_safetensors(std::ofstream& out, const NamedTensors& tensors, const std::map<std::string, std::string>& meta) {
  nlohmann::ordered_json header;
  header["__metadata__"] = meta;
  uint64_t offset = 0;
  for (const auto& [name, t] : tensors) {
    const auto it = safetensors_dtypes().find(t.scalar_type());
    if (it == safetensors_dtypes().end())
      throw LoomError("tensor '" + name + "': dtype " + c10::toString(t.scalar_type()) + " has no safetensors name");
    header[name] = {{"dtype", it->second}, {"shape", t.sizes().vec()}, {"data_offsets", {offset, offset + t.nbytes()}}};
    offset += t.nbytes();
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');  // the data starts 8-byte aligned
  const uint64_t size = text.size();
  char size_bytes[8];
  for (int i = 0; i < 8; ++i) size_bytes[i] = static_cast<char>((size >> (8 * i)) & 0xff);  // little-endian
  out.write(size_bytes, 8);
  out.write(text.data(), static_cast<std::streamsize>(text.size()));
  for (const auto& [name, t] : tensors)
    out.write(static_cast<const char*>(t.data_ptr()), static_cast<std::streamsize>(t.nbytes()));
}

NamedTensors read_safetensors(const std::vector<char>& bytes, const std::string& path,
                              std::map<std::string, std::string>* meta) {
  auto bad = [&](const std::string& why) { return InputError("'" + path + "' is not a valid safetensors file: " + why); };
  if (bytes.size() < 8) throw bad("shorter than its 8-byte header length");
  uint64_t header_size = 0;
  for (int i = 7; i >= 0; --i) header_size = (header_size << 8) | static_cast<unsigned char>(bytes[i]);
  if (header_size > bytes.size() - 8) throw bad("header length " + std::to_string(header_size) + " exceeds the file");
  nlohmann::json header;
  try {
    header = nlohmann::json::parse(bytes.begin() + 8, bytes.begin() + 8 + static_cast<std::ptrdiff_t>(header_size));
  } catch (const std::exception& e) {
    throw bad(std::string("header is not JSON: ") + e.what());
  }
  if (!header.is_object()) throw bad("header is not a JSON object");
  const uint64_t data_start = 8 + header_size, data_size = bytes.size() - data_start;
  std::map<std::string, at::ScalarType> by_name;
  for (const auto& [t, name] : safetensors_dtypes()) by_name[name] = t;
  std::vector<std::tuple<uint64_t, std::string, at::Tensor>> ordered;
  for (const auto& [name, entry] : header.items()) {
    if (name == "__metadata__") {
      if (meta && entry.is_object())
        for (const auto& [k, v] : entry.items())
          if (v.is_string()) (*meta)[k] = v.get<std::string>();
      continue;
    }
    try {
      const std::string dtype = entry.at("dtype").get<std::string>();
      const auto it = by_name.find(dtype);
      if (it == by_name.end()) throw bad("tensor '" + name + "' has dtype '" + dtype + "', which Loom does not read");
      const auto shape = entry.at("shape").get<std::vector<int64_t>>();
      const auto offsets = entry.at("data_offsets").get<std::vector<uint64_t>>();
      if (offsets.size() != 2 || offsets[0] > offsets[1] || offsets[1] > data_size)
        throw bad("tensor '" + name + "' has data offsets outside the file");
      at::Tensor t = at::empty(shape, at::TensorOptions().dtype(it->second));
      if (static_cast<uint64_t>(t.nbytes()) != offsets[1] - offsets[0])
        throw bad("tensor '" + name + "': shape and dtype make " + std::to_string(t.nbytes()) + " bytes, the offsets " +
                  std::to_string(offsets[1] - offsets[0]));
      std::memcpy(t.data_ptr(), bytes.data() + data_start + offsets[0], t.nbytes());
      ordered.emplace_back(offsets[0], name, t);
    } catch (const nlohmann::json::exception& e) {
      throw bad("tensor '" + name + "': " + e.what());
    }
  }
  std::sort(ordered.begin(), ordered.end(),
            [](const auto& a, const auto& b) { return std::get<0>(a) < std::get<0>(b); });
  NamedTensors out;
  for (auto& [offset, name, t] : ordered) out.emplace_back(name, t);
  return out;
}

// ---- torch.save's zip format ----

void write_torch(std::ofstream& out, const NamedTensors& tensors) {
  c10::Dict<std::string, at::Tensor> dict;
  for (const auto& [name, t] : tensors) dict.insert(name, t);
  const std::vector<char> bytes = torch::jit::pickle_save(c10::IValue(dict));
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

NamedTensors read_torch(const std::vector<char>& bytes, const std::string& path) {
  c10::IValue value;
  try {
    value = torch::jit::pickle_load(bytes);
  } catch (const std::exception& e) {
    // torch.save(model.state_dict()) pickles a collections.OrderedDict, which libtorch's C++ unpickler
    // (1.13) turns into None; torch.save stores its pickle uncompressed, so the class name is in the bytes.
    const std::string ordered = "collections\nOrderedDict";
    if (std::search(bytes.begin(), bytes.end(), ordered.begin(), ordered.end()) != bytes.end())
      throw InputError("'" + path + "' holds a collections.OrderedDict (what nn.Module.state_dict() returns), which "
                       "libtorch's C++ unpickler cannot read: save a plain dict instead, "
                       "torch.save(dict(model.state_dict()), path)");
    const std::string what = e.what();
    throw InputError("'" + path + "' is not a file torch.save wrote (zip format): " + what.substr(0, what.find('\n')));
  }
  if (!value.isGenericDict())
    throw InputError("'" + path + "' holds a " + value.tagKind() + ", not a dict of name -> tensor (a state_dict)");
  NamedTensors out;
  for (const auto& item : value.toGenericDict()) {
    if (!item.key().isString() || !item.value().isTensor())
      throw InputError("'" + path + "': every entry must be a string name -> tensor; found a " + item.key().tagKind() +
                       " -> " + item.value().tagKind());
    out.emplace_back(item.key().toStringRef(), item.value().toTensor().contiguous());
  }
  return out;
}

bool looks_like_zip(const std::vector<char>& bytes) {
  return bytes.size() >= 4 && bytes[0] == 'P' && bytes[1] == 'K' && bytes[2] == 3 && bytes[3] == 4;
}

// ---- the commands ----

std::string shape_string(const google::protobuf::RepeatedField<int64_t>& shape) {
  std::string s = "[";
  for (int i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
  return s + "]";
}

int inspect(const std::string& arg) {
  const std::string path = resolve_checkpoint(arg);
  const CheckpointData data = load_checkpoint(path);
  const auto& m = data.manifest;
  std::cout << "checkpoint " << path << "\n"
            << "manifest: version " << m.version() << ", step " << m.step() << ", seed " << m.seed()
            << ", data position " << m.data_position() << ", saved as dp=" << m.dp() << " x sp=" << m.sp()
            << ", last loss " << m.last_loss() << "\n"
            << "state: " << m.state_file() << ", " << m.state_bytes() << " bytes, FNV-1a " << std::hex
            << m.state_checksum() << std::dec << " (verified)\n";
  std::cout << "config:\n";
  std::istringstream lines(m.config_text());
  for (std::string line; std::getline(lines, line);) std::cout << "  " << line << "\n";
  size_t width = 4;
  for (const auto& e : m.tensors()) width = std::max(width, e.name().size());
  int64_t model_params = 0;
  std::cout << "tensors (" << m.tensors_size() << "):\n  " << std::left << std::setw(static_cast<int>(width)) << "name"
            << "  " << std::setw(9) << "dtype" << "  " << std::setw(16) << "shape" << "  bytes\n";
  for (const auto& e : m.tensors()) {
    std::cout << "  " << std::setw(static_cast<int>(width)) << e.name() << "  " << std::setw(9) << e.dtype() << "  "
              << std::setw(16) << shape_string(e.shape()) << "  " << e.bytes() << "\n";
    if (e.name().rfind("model/", 0) == 0) {
      int64_t n = 1;
      for (auto s : e.shape()) n *= s;
      model_params += n;
    }
  }
  std::cout << std::right << "model parameters: " << model_params << "\n";
  return 0;
}

int export_checkpoint(const std::string& arg, const std::string& format, const std::string& output,
                      const std::string& names, bool with_optimizer) {
  const std::string path = resolve_checkpoint(arg);
  const CheckpointData data = load_checkpoint(path);
  const pb::LoomConfig config = config_of(data.manifest, path);
  const bool hf = names == "hf" || (names == "auto" && is_llama_style(config));
  if (names == "hf" && !is_llama_style(config))
    throw InputError("--names hf: the model's pattern '" + config.model().pattern() +
                     "' is not Llama-style (every mixer L or A); use --names loom or auto");
  NamedTensors out;
  std::set<std::string> seen;
  for (const auto& [name, t] : data.tensors) {
    std::string exported;
    if (name.rfind("model/", 0) == 0) {
      exported = hf ? hf_name(name.substr(6)) : name.substr(6);
    } else if (with_optimizer && name.rfind("optimizer/", 0) == 0) {
      exported = kOptimizerPrefix + name.substr(10);
    } else {
      continue;
    }
    if (!seen.insert(exported).second) throw LoomError("two tensors export as '" + exported + "'");
    out.emplace_back(exported, t.contiguous());
  }
  const std::string manifest = manifest_text(data.manifest);
  if (format == "safetensors") {
    write_atomically(output, [&](std::ofstream& f) {
      write_safetensors(f, out, {{"format", "pt"}, {kManifestKey, manifest}, {"loom.names", hf ? "hf" : "loom"}});
    });
  } else {
    if (with_optimizer) {
      at::Tensor text = at::empty({static_cast<int64_t>(manifest.size())}, at::kByte);
      std::memcpy(text.data_ptr(), manifest.data(), manifest.size());
      out.emplace_back(kManifestKey, text);
    }
    write_atomically(output, [&](std::ofstream& f) { write_torch(f, out); });
  }
  std::cout << "exported " << out.size() << " tensors of " << path << " to " << output << " (" << format << ", "
            << (hf ? "Hugging Face Llama" : "Loom") << " names" << (with_optimizer ? ", with optimizer state" : "")
            << ")\n";
  return 0;
}

int import_checkpoint(const std::string& input, const std::string& output, const std::string& like,
                      const std::string& format_arg) {
  const std::vector<char> bytes = read_file(input);
  std::string format = format_arg;
  if (format == "auto") format = looks_like_zip(bytes) ? "torch" : "safetensors";
  std::map<std::string, std::string> meta;
  NamedTensors file_tensors;
  if (format == "torch") {
    if (!looks_like_zip(bytes))
      throw InputError("'" + input + "' is not a torch.save file (no zip signature); is it safetensors?");
    file_tensors = read_torch(bytes, input);
  } else {
    try {
      file_tensors = read_safetensors(bytes, input, &meta);
    } catch (const InputError& e) {
      if (format_arg != "auto") throw;
      throw InputError("'" + input + "' is neither a torch.save file (zip) nor a safetensors file (" + e.what() + ")");
    }
  }
  std::map<std::string, at::Tensor> by_name;
  for (auto& [name, t] : file_tensors) {
    if (name == kManifestKey) {
      meta[kManifestKey] = std::string(static_cast<const char*>(t.data_ptr()), t.nbytes());
      continue;
    }
    by_name[name] = t;
  }

  // The manifest, the model and the expected tensor table.
  pb::CheckpointManifest manifest;
  std::string manifest_source;
  if (!like.empty()) {
    const std::string path = resolve_checkpoint(like);
    manifest = load_checkpoint(path).manifest;
    manifest_source = "--like " + path;
  } else if (meta.count(kManifestKey)) {
    try {
      parse_text_message(meta[kManifestKey], input + " (" + kManifestKey + ")", &manifest);
    } catch (const ConfigError& e) {
      throw InputError(e.what());
    }
    manifest_source = input + "'s " + kManifestKey;
  } else {
    throw InputError("'" + input + "' carries no Loom manifest (" + kManifestKey +
                     "): name a checkpoint of the same model with --like");
  }
  const pb::LoomConfig config = config_of(manifest, manifest_source);
  const bool llama = is_llama_style(config);

  CheckpointData data;
  data.manifest = manifest;
  std::set<std::string> used;
  std::vector<std::string> optimizer_missing;
  bool has_optimizer = false;
  for (const auto& entry : manifest.tensors()) {
    const std::string& name = entry.name();
    std::string key;
    if (name.rfind("model/", 0) == 0) {
      const std::string loom_name = name.substr(6);
      if (by_name.count(loom_name)) key = loom_name;
      else if (llama && by_name.count(hf_name(loom_name))) key = hf_name(loom_name);
      else
        throw InputError("'" + input + "' has no tensor for the model's parameter '" + loom_name + "'" +
                         (llama ? " (Hugging Face name '" + hf_name(loom_name) + "')" : std::string()) +
                         "; the model comes from " + manifest_source);
    } else if (name.rfind("optimizer/", 0) == 0) {
      key = kOptimizerPrefix + name.substr(10);
      if (!by_name.count(key)) {
        optimizer_missing.push_back(key);  // a weights-only file has none: the model alone
        continue;
      }
      has_optimizer = true;
    } else {
      continue;
    }
    const at::Tensor& t = by_name.at(key);
    std::vector<int64_t> shape(entry.shape().begin(), entry.shape().end());
    if (t.sizes().vec() != shape)
      throw InputError("'" + input + "': tensor '" + key + "' has shape " + c10::str(t.sizes()) + ", the model's '" +
                       name + "' is " + c10::str(at::IntArrayRef(shape)) + " (model from " + manifest_source + ")");
    const auto dtype = scalar_type_from_name(entry.dtype());
    if (!dtype || t.scalar_type() != *dtype)
      throw InputError("'" + input + "': tensor '" + key + "' is " + c10::toString(t.scalar_type()) + ", the model's '" +
                       name + "' is " + entry.dtype());
    used.insert(key);
    data.tensors.emplace_back(name, t);
  }
  std::vector<std::string> unknown;
  for (const auto& [name, t] : by_name)
    if (!used.count(name)) unknown.push_back(name);
  if (!unknown.empty()) {
    std::string list;
    for (size_t i = 0; i < unknown.size() && i < 5; ++i) list += (i ? ", " : "") + std::string("'") + unknown[i] + "'";
    if (unknown.size() > 5) list += ", ...";
    throw InputError("'" + input + "' has " + std::to_string(unknown.size()) +
                     " tensor(s) the model does not have: " + list + " (model from " + manifest_source + ")");
  }
  if (has_optimizer && !optimizer_missing.empty())
    throw InputError("'" + input + "' has optimizer state but not '" + optimizer_missing.front() + "' (and " +
                     std::to_string(optimizer_missing.size() - 1) + " more)");
  std::error_code ec;
  if (fs::exists(output, ec) && !fs::is_directory(output, ec))
    throw InputError("--output '" + output + "' is a file; name a checkpoint directory");
  // A run's directory keeps its own checkpoints: an import there would become its latest (and could move a
  // checkpoint of the same step aside), so it is refused, as loom-train refuses a reused directory.
  if (fs::is_directory(output, ec)) {
    const auto existing = list_checkpoints(output);
    if (!existing.empty())
      throw InputError("--output '" + output + "' already holds " + std::to_string(existing.size()) +
                       " checkpoint(s) (latest " + existing.back().path +
                       "): importing there would make the import that run's latest; name a new directory");
  }
  fs::create_directories(output, ec);
  if (ec) throw InputError("cannot create --output '" + output + "': " + ec.message());
  const std::string written = save_checkpoint(output, data);
  std::cout << "imported " << data.tensors.size() << " tensors from " << input << " (" << format << ") into "
            << written << (has_optimizer ? "" : " (model only: the file has no optimizer state)") << "\n";
  return 0;
}

}  // namespace
}  // namespace loom

int main(int argc, char** argv) {
  CLI::App app{"loom-ckpt: inspect Loom checkpoints, export them for PyTorch / Hugging Face, import them back",
               "loom-ckpt"};
  app.require_subcommand(1);
  std::string checkpoint, format = "torch", output, names = "auto", like, input, import_format = "auto";
  bool with_optimizer = false;
  auto* inspect = app.add_subcommand("inspect", "Print a checkpoint's manifest, config and tensor table");
  inspect->add_option("checkpoint", checkpoint, "step-NNNNNNNN directory or checkpoint directory")->required();
  auto* exp = app.add_subcommand("export", "Write the model's parameters as a torch or safetensors file");
  exp->add_option("checkpoint", checkpoint, "step-NNNNNNNN directory or checkpoint directory")->required();
  exp->add_option("--format", format, "torch (torch.load) or safetensors")
      ->required()
      ->check(CLI::IsMember({"torch", "safetensors"}));
  exp->add_option("--output,-o", output, "File to write (replaced only when complete)")->required();
  exp->add_option("--names", names, "auto (Hugging Face for Llama-style models), hf, loom")
      ->check(CLI::IsMember({"auto", "hf", "loom"}));
  exp->add_flag("--with-optimizer", with_optimizer, "Also the optimizer state and manifest (bit-exact round trip)");
  auto* imp = app.add_subcommand("import", "Make a Loom checkpoint from a torch or safetensors file");
  imp->add_option("file", input, "torch.save or safetensors file")->required();
  imp->add_option("--output,-o", output, "Checkpoint directory to write step-NNNNNNNN into")->required();
  imp->add_option("--like", like, "Checkpoint of the same model: manifest, names and shapes (default: the file's)");
  imp->add_option("--format", import_format, "auto (by content), torch, safetensors")
      ->check(CLI::IsMember({"auto", "torch", "safetensors"}));
  if (const std::string bad = loom::cli::option_with_empty_value(argc, argv); !bad.empty()) {
    std::cerr << "loom-ckpt: " << loom::cli::empty_value_message(bad) << std::endl;
    return 2;
  }
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e) == 0 ? 0 : 2;
  }
  try {
    if (*inspect) return loom::inspect(checkpoint);
    if (*exp) return loom::export_checkpoint(checkpoint, format, output, names, with_optimizer);
    return loom::import_checkpoint(input, output, like, import_format);
  } catch (const loom::ConfigError& e) {
    std::cerr << "loom-ckpt: " << e.what() << std::endl;
    return 2;
  } catch (const loom::LoomError& e) {
    // load_checkpoint's refusals (truncated, corrupt, unknown dtype) are bad input too.
    std::cerr << "loom-ckpt: " << e.what() << std::endl;
    return 2;
  } catch (const std::exception& e) {
    const std::string what = e.what();
    std::cerr << "loom-ckpt: " << what.substr(0, what.find('\n')) << std::endl;
    return 1;
  }
}
