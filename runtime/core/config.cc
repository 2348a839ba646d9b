#include "loom/runtime/core/config.h"

#include <google/protobuf/descriptor.h>
#include <google/protobuf/io/tokenizer.h>
#include <google/protobuf/text_format.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <fstream>
#include <limits>
#include <set>
#include <sstream>

#include "loom/runtime/core/error.h"

namespace loom {

namespace gp = google::protobuf;

namespace {

// The dotted path of the field being parsed at (line, column) of a text-format
// document, e.g. "train.seq_len", so that type errors name the field (the
// protobuf parser only says "Expected integer").
std::string field_path_at(const std::string& text, int line, int column) {
  std::vector<std::string> sections;
  std::string last_name, pending;
  int l = 0, c = 0;
  for (size_t i = 0; i < text.size(); ++i) {
    if (l > line || (l == line && c >= column)) break;
    const char ch = text[i];
    if (ch == '\n') {
      ++l;
      c = 0;
      continue;
    }
    ++c;
    if (ch == '#') {  // comment to end of line
      while (i + 1 < text.size() && text[i + 1] != '\n') ++i;
    } else if (ch == '"' || ch == '\'') {  // skip strings
      while (i + 1 < text.size() && text[i + 1] != ch && text[i + 1] != '\n') ++i, ++c;
      ++i, ++c;
    } else if (std::isalpha(static_cast<unsigned char>(ch)) || ch == '_') {
      pending.clear();
      while (i < text.size() && (std::isalnum(static_cast<unsigned char>(text[i])) || text[i] == '_'))
        pending += text[i++], ++c;
      --i, --c;
      last_name = pending;
    } else if (ch == '{' || ch == '<') {
      sections.push_back(last_name);
      last_name.clear();
    } else if ((ch == '}' || ch == '>') && !sections.empty()) {
      sections.pop_back();
      last_name.clear();
    }
  }
  std::string path;
  for (const auto& s : sections) path += s + ".";
  return last_name.empty() ? "" : path + last_name;
}

class CollectingErrors : public gp::io::ErrorCollector {
 public:
  CollectingErrors(std::string source, const std::string& text) : source_(std::move(source)), text_(text) {}
  void AddError(int line, gp::io::ColumnNumber column, const std::string& message) override {
    std::ostringstream out;
    out << source_ << ":" << (line + 1) << ":" << (column + 1) << ": ";
    const std::string field = field_path_at(text_, line, column);
    if (!field.empty()) out << "field " << field << ": ";
    out << message;
    errors_.push_back(out.str());
  }
  void AddWarning(int line, gp::io::ColumnNumber column, const std::string& message) override {
    AddError(line, column, message);
  }
  std::string joined() const {
    std::string s;
    for (const auto& e : errors_) s += (s.empty() ? "" : "\n") + e;
    return s;
  }

 private:
  std::string source_;
  const std::string& text_;
  std::vector<std::string> errors_;
};

std::string lower(std::string s) {
  std::transform(s.begin(), s.end(), s.begin(), [](unsigned char c) { return std::tolower(c); });
  return s;
}

std::string field_names(const gp::Descriptor* d) {
  std::string s;
  for (int i = 0; i < d->field_count(); ++i) s += (i ? ", " : "") + d->field(i)->name();
  return s;
}

std::string enum_names(const gp::EnumDescriptor* e) {
  std::string s;
  for (int i = 0; i < e->value_count(); ++i) s += (i ? ", " : "") + lower(e->value(i)->name());
  return s;
}

[[noreturn]] void bad_value(const std::string& path, const std::string& value, const std::string& expected) {
  throw ConfigError("--set " + path + "=" + value + ": " + expected);
}

int64_t parse_integer(const std::string& path, const std::string& value, int64_t lo, int64_t hi, const char* type) {
  errno = 0;
  char* end = nullptr;
  const long long v = std::strtoll(value.c_str(), &end, 0);
  if (value.empty() || *end != '\0' || errno == ERANGE || v < lo || v > hi)
    bad_value(path, value,
              std::string("expected an ") + type + " in [" + std::to_string(lo) + ", " + std::to_string(hi) + "]");
  return v;
}

}  // namespace

void parse_text_message(const std::string& text, const std::string& source, gp::Message* message) {
  gp::TextFormat::Parser parser;
  CollectingErrors errors(source, text);
  parser.RecordErrorsTo(&errors);
  if (!parser.MergeFromString(text, message))
    throw ConfigError("invalid " + message->GetDescriptor()->name() + " " + errors.joined() + "\n(fields: " +
                      field_names(message->GetDescriptor()) + ")");
}

void parse_config_text(const std::string& text, const std::string& source, pb::LoomConfig* config) {
  gp::TextFormat::Parser parser;
  CollectingErrors errors(source, text);
  parser.RecordErrorsTo(&errors);
  if (!parser.MergeFromString(text, config))
    throw ConfigError("invalid config " + errors.joined() + "\n(sections: " +
                      field_names(pb::LoomConfig::descriptor()) + ")");
}

pb::LoomConfig load_config_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw ConfigError("cannot open config file '" + path + "': " + std::strerror(errno));
  std::stringstream text;
  text << in.rdbuf();
  pb::LoomConfig config;
  parse_config_text(text.str(), path, &config);
  return config;
}

void apply_override(const std::string& assignment, pb::LoomConfig* config) {
  const auto eq = assignment.find('=');
  if (eq == std::string::npos || eq == 0)
    throw ConfigError("--set '" + assignment + "': expected section.field=value");
  const std::string path = assignment.substr(0, eq);
  const std::string value = assignment.substr(eq + 1);

  gp::Message* msg = config;
  std::string walked;
  std::stringstream parts(path);
  std::string part;
  std::vector<std::string> names;
  while (std::getline(parts, part, '.')) names.push_back(part);
  for (size_t i = 0; i < names.size(); ++i) {
    const gp::Descriptor* d = msg->GetDescriptor();
    const gp::FieldDescriptor* f = d->FindFieldByName(names[i]);
    const std::string where = walked.empty() ? "the config" : "'" + walked + "'";
    if (f == nullptr)
      throw ConfigError("--set " + path + ": " + where + " has no field '" + names[i] + "' (fields: " +
                        field_names(d) + ")");
    walked += (walked.empty() ? "" : ".") + names[i];
    const gp::Reflection* r = msg->GetReflection();
    if (f->is_repeated()) throw ConfigError("--set " + path + ": repeated field '" + walked + "' cannot be set");
    if (f->cpp_type() == gp::FieldDescriptor::CPPTYPE_MESSAGE) {
      if (i + 1 == names.size())
        throw ConfigError("--set " + path + ": '" + walked + "' is a section; set one of its fields (" +
                          field_names(f->message_type()) + ")");
      msg = r->MutableMessage(msg, f);
      continue;
    }
    if (i + 1 != names.size())
      throw ConfigError("--set " + path + ": '" + walked + "' is a value, not a section");
    switch (f->cpp_type()) {
      case gp::FieldDescriptor::CPPTYPE_INT32:
        r->SetInt32(msg, f, static_cast<int32_t>(parse_integer(path, value, std::numeric_limits<int32_t>::min(),
                                                                std::numeric_limits<int32_t>::max(), "integer")));
        break;
      case gp::FieldDescriptor::CPPTYPE_INT64:
        r->SetInt64(msg, f, parse_integer(path, value, std::numeric_limits<int64_t>::min(),
                                          std::numeric_limits<int64_t>::max(), "integer"));
        break;
      case gp::FieldDescriptor::CPPTYPE_UINT32:
        r->SetUInt32(msg, f, static_cast<uint32_t>(parse_integer(path, value, 0, std::numeric_limits<uint32_t>::max(),
                                                                  "unsigned integer")));
        break;
      case gp::FieldDescriptor::CPPTYPE_UINT64:
        r->SetUInt64(msg, f, static_cast<uint64_t>(parse_integer(
                                 path, value, 0, std::numeric_limits<int64_t>::max(), "unsigned integer")));
        break;
      case gp::FieldDescriptor::CPPTYPE_DOUBLE:
      case gp::FieldDescriptor::CPPTYPE_FLOAT: {
        errno = 0;
        char* end = nullptr;
        const double v = std::strtod(value.c_str(), &end);
        if (value.empty() || *end != '\0' || errno == ERANGE || !std::isfinite(v))
          bad_value(path, value, "expected a finite number");
        if (f->cpp_type() == gp::FieldDescriptor::CPPTYPE_DOUBLE)
          r->SetDouble(msg, f, v);
        else
          r->SetFloat(msg, f, static_cast<float>(v));
        break;
      }
      case gp::FieldDescriptor::CPPTYPE_BOOL: {
        const std::string v = lower(value);
        if (v == "true" || v == "1")
          r->SetBool(msg, f, true);
        else if (v == "false" || v == "0")
          r->SetBool(msg, f, false);
        else
          bad_value(path, value, "expected true or false");
        break;
      }
      case gp::FieldDescriptor::CPPTYPE_ENUM: {
        const gp::EnumDescriptor* e = f->enum_type();
        const gp::EnumValueDescriptor* ev = nullptr;
        for (int k = 0; k < e->value_count(); ++k)
          if (lower(e->value(k)->name()) == lower(value)) ev = e->value(k);
        if (ev == nullptr) bad_value(path, value, "allowed values are " + enum_names(e));
        r->SetEnum(msg, f, ev);
        break;
      }
      case gp::FieldDescriptor::CPPTYPE_STRING:
        r->SetString(msg, f, value);
        break;
      default:
        throw ConfigError("--set " + path + ": unsupported field type");
    }
  }
}

namespace {

class Validator {
 public:
  void at_least(const std::string& field, double value, double lo) {
    if (!(value >= lo)) fail(field, value, "must be >= " + num(lo));
  }
  void positive(const std::string& field, double value) {
    if (!(value > 0)) fail(field, value, "must be > 0");
  }
  void in_range(const std::string& field, double value, double lo, double hi_exclusive) {
    if (!(value >= lo && value < hi_exclusive)) fail(field, value, "must be in [" + num(lo) + ", " + num(hi_exclusive) + ")");
  }
  void one_of(const std::string& field, const std::string& value, const std::set<std::string>& allowed) {
    if (allowed.count(value)) return;
    std::string list;
    for (const auto& a : allowed) list += (list.empty() ? "" : ", ") + a;
    errors_.push_back("field " + field + " = '" + value + "': allowed values are " + list);
  }
  void require(bool ok, const std::string& message) {
    if (!ok) errors_.push_back(message);
  }
  void throw_if_any() const {
    if (errors_.empty()) return;
    std::string s = "invalid config:";
    for (const auto& e : errors_) s += "\n  " + e;
    throw ConfigError(s);
  }

 private:
  static std::string num(double v) {
    std::ostringstream o;
    o << v;
    return o.str();
  }
  void fail(const std::string& field, double value, const std::string& rule) {
    errors_.push_back("field " + field + " = " + num(value) + ": " + rule);
  }
  std::vector<std::string> errors_;
};

}  // namespace

void validate_config(const pb::LoomConfig& c) {
  Validator v;
  const auto& m = c.model();
  v.at_least("model.vocab_size", m.vocab_size(), 2);
  v.at_least("model.d_model", m.d_model(), 1);
  v.at_least("model.n_heads", m.n_heads(), 1);
  v.at_least("model.n_kv_heads", m.n_kv_heads(), 0);
  v.at_least("model.d_ff", m.d_ff(), 0);
  v.at_least("model.feature_dim", m.feature_dim(), 1);
  v.at_least("model.window", m.window(), 1);
  v.at_least("model.conv_kernel", m.conv_kernel(), 1);
  v.at_least("model.block_size", m.block_size(), 1);
  v.positive("model.rope_theta", m.rope_theta());
  v.positive("model.norm_eps", m.norm_eps());
  if (m.n_heads() >= 1 && m.d_model() >= 1)
    v.require(m.d_model() % m.n_heads() == 0, "field model.d_model = " + std::to_string(m.d_model()) +
                                                  ": must be divisible by model.n_heads = " + std::to_string(m.n_heads()));
  if (m.n_kv_heads() >= 1 && m.n_heads() >= 1)
    v.require(m.n_heads() % m.n_kv_heads() == 0, "field model.n_kv_heads = " + std::to_string(m.n_kv_heads()) +
                                                     ": must divide model.n_heads = " + std::to_string(m.n_heads()));
  v.require(!m.pattern().empty(), "field model.pattern is empty: give one letter per block from LAWCMGX");
  for (char ch : m.pattern())
    v.require(std::string("LAWCMGX").find(ch) != std::string::npos,
              "field model.pattern = '" + m.pattern() + "': letter '" + std::string(1, ch) +
                  "' is not a mixer (allowed: L A W C M G X)");
  v.one_of("model.feature_map", m.feature_map(), {"identity", "elu", "relu", "taylor", "hedgehog"});
  v.at_least("model.memory_depth", m.memory_depth(), 1);
  v.at_least("model.memory_expansion", m.memory_expansion(), 1);
  v.at_least("model.memory_chunk", m.memory_chunk(), 1);
  v.at_least("model.persistent_tokens", m.persistent_tokens(), 0);
  v.positive("model.memory_max_lr", m.memory_max_lr());

  const auto& p = c.parallel();
  v.at_least("parallel.dp", p.dp(), 1);
  v.at_least("parallel.sp", p.sp(), 0);
  v.at_least("parallel.threads_per_rank", p.threads_per_rank(), 0);
  v.positive("parallel.comm_timeout_s", p.comm_timeout_s());

  const auto& t = c.train();
  v.at_least("train.steps", t.steps(), 0);
  v.at_least("train.batch_size", t.batch_size(), 1);
  v.at_least("train.seq_len", t.seq_len(), 1);
  v.positive("train.lr", t.lr());
  v.in_range("train.min_lr_ratio", t.min_lr_ratio(), 0, 1.000001);
  v.at_least("train.warmup_steps", t.warmup_steps(), 0);
  v.at_least("train.weight_decay", t.weight_decay(), 0);
  v.at_least("train.grad_clip", t.grad_clip(), 0);
  v.at_least("train.grad_accum", t.grad_accum(), 1);
  v.at_least("train.log_interval", t.log_interval(), 1);
  v.at_least("train.eval_interval", t.eval_interval(), 0);
  v.at_least("train.checkpoint_interval", t.checkpoint_interval(), 0);
  v.one_of("train.device", t.device(), {"cpu", "cuda"});
  v.one_of("train.dtype", t.dtype(), {"float32", "float64", "bfloat16"});

  const auto& d = c.data();
  v.one_of("data.tokenizer", d.tokenizer(), {"byte", "sentencepiece"});
  v.in_range("data.val_fraction", d.val_fraction(), 0, 1);
  v.one_of("data.task", d.task(), {"text", "mqar", "sniah"});
  v.at_least("data.mqar_pairs", d.mqar_pairs(), 1);

  v.at_least("offload.memory_ranks", c.offload().memory_ranks(), 0);
  v.at_least("offload.capacity_mb", c.offload().capacity_mb(), 1);
  const bool offload = c.parallel().softmax_method() == pb::OFFLOAD;
  v.require(!offload || c.offload().memory_ranks() > 0,
            "field parallel.softmax_method = OFFLOAD needs memory nodes: set offload.memory_ranks >= 1");
  v.require(offload || c.offload().memory_ranks() == 0,
            "field offload.memory_ranks = " + std::to_string(c.offload().memory_ranks()) +
                ": memory nodes serve only parallel.softmax_method = OFFLOAD (they would sit idle)");
  v.require(!offload || c.train().device() == "cpu",
            "field parallel.softmax_method = OFFLOAD: the memory nodes' transport is MPI, so train.device must be cpu");
  v.one_of("log.level", c.log().level(), {"debug", "info", "warn", "error"});
  v.throw_if_any();
}

pb::LoomConfig resolve_config(const std::string& path, const std::vector<std::string>& overrides) {
  pb::LoomConfig config = path.empty() ? pb::LoomConfig() : load_config_file(path);
  for (const auto& o : overrides) apply_override(o, &config);
  validate_config(config);
  return config;
}

std::string config_to_text(const pb::LoomConfig& config) {
  // Materialise every section and default so that the printout is complete.
  pb::LoomConfig full = config;
  std::function<void(gp::Message*)> fill = [&](gp::Message* msg) {
    const gp::Descriptor* d = msg->GetDescriptor();
    const gp::Reflection* r = msg->GetReflection();
    for (int i = 0; i < d->field_count(); ++i) {
      const gp::FieldDescriptor* f = d->field(i);
      if (f->is_repeated()) continue;
      if (f->cpp_type() == gp::FieldDescriptor::CPPTYPE_MESSAGE) {
        fill(r->MutableMessage(msg, f));
      } else if (!r->HasField(*msg, f)) {
        switch (f->cpp_type()) {
          case gp::FieldDescriptor::CPPTYPE_INT32: r->SetInt32(msg, f, r->GetInt32(*msg, f)); break;
          case gp::FieldDescriptor::CPPTYPE_INT64: r->SetInt64(msg, f, r->GetInt64(*msg, f)); break;
          case gp::FieldDescriptor::CPPTYPE_UINT32: r->SetUInt32(msg, f, r->GetUInt32(*msg, f)); break;
          case gp::FieldDescriptor::CPPTYPE_UINT64: r->SetUInt64(msg, f, r->GetUInt64(*msg, f)); break;
          case gp::FieldDescriptor::CPPTYPE_DOUBLE: r->SetDouble(msg, f, r->GetDouble(*msg, f)); break;
          case gp::FieldDescriptor::CPPTYPE_FLOAT: r->SetFloat(msg, f, r->GetFloat(*msg, f)); break;
          case gp::FieldDescriptor::CPPTYPE_BOOL: r->SetBool(msg, f, r->GetBool(*msg, f)); break;
          case gp::FieldDescriptor::CPPTYPE_ENUM: r->SetEnum(msg, f, r->GetEnum(*msg, f)); break;
          case gp::FieldDescriptor::CPPTYPE_STRING: r->SetString(msg, f, r->GetString(*msg, f)); break;
          default: break;
        }
      }
    }
  };
  fill(&full);
  std::string text;
  gp::TextFormat::PrintToString(full, &text);
  return text;
}

}  // namespace loom
