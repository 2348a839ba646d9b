#include "loom/runtime/core/config.h"

#include <google/protobuf/descriptor.h>
#include <google/protobuf/io/coded_stream.h>
#include <google/protobuf/io/tokenizer.h>
#include <google/protobuf/io/zero_copy_stream_impl_lite.h>
#include <google/protobuf/text_format.h>

#include <algorithm>
#include <cctype>
#include <cerrno>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <functional>
#include <iomanip>
#include <limits>
#include <map>
#include <set>
#include <sstream>
#include <type_traits>

#include "loom/runtime/core/error.h"

namespace loom {

namespace gp = google::protobuf;

namespace {

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

// Shortest text that reads back as the same double.
std::string num(double v) {
  std::ostringstream o;
  o << std::setprecision(15) << v;
  if (std::strtod(o.str().c_str(), nullptr) != v) {
    o.str("");
    o << std::setprecision(17) << v;
  }
  return o.str();
}

// ---- the text pre-pass: field positions, enum case, leading zeros, duplicates ----

// Walks a text-format document with protobuf's own tokenizer (so line and
// column numbers are the parser's) and the message's descriptors. It records
// where each field name is (for error messages), rewrites enum identifiers to
// their canonical case (same length, so positions do not move), and refuses
// integers with a leading zero (protobuf reads "010" as octal 8) and singular
// fields given twice in one message, naming the field and the lines.
class TextScan {
 public:
  TextScan(const std::string& text, std::string source, const gp::Descriptor* root)
      : text_(text), canonical_(text), source_(std::move(source)) {
    size_t start = 0;
    line_starts_.push_back(0);
    while ((start = text.find('\n', start)) != std::string::npos) line_starts_.push_back(++start);
    scan(root);
  }
  const std::string& canonical() const { return canonical_; }
  // The dotted path of the field whose name is at or last before (line, column).
  std::string field_at(int line, int column) const {
    std::string path;
    for (const auto& f : fields_) {
      if (f.line > line || (f.line == line && f.column > column)) break;
      path = f.path;
    }
    return path;
  }

 private:
  struct FieldName {
    int line, column;
    std::string path;
  };
  enum class Expect { kName, kAfterName, kValue };
  struct Frame {
    const gp::Descriptor* descriptor;  // null inside an unknown field
    std::string prefix;                // "train."
    Expect expect = Expect::kName;
    int list_depth = 0;
    const gp::FieldDescriptor* field = nullptr;
    std::string field_name;
    std::map<std::string, int> seen;  // singular field -> line (1-based) of its first occurrence
  };
  class IgnoreErrors : public gp::io::ErrorCollector {
   public:
    void AddError(int, gp::io::ColumnNumber, const std::string&) override {}  // the parser reports them
  };

  size_t offset_of(int line, int column) const {
    size_t i = line_starts_.at(static_cast<size_t>(line));
    for (int c = 0; i < text_.size() && c < column; ++i) c = text_[i] == '\t' ? c + 8 - c % 8 : c + 1;
    return i;
  }

  [[noreturn]] void fail(const gp::io::Tokenizer::Token& t, const std::string& field, const std::string& what) const {
    throw ConfigError(source_ + ":" + std::to_string(t.line + 1) + ":" + std::to_string(t.column + 1) + ": field " +
                      field + ": " + what);
  }

  void value_done(Frame& f) {
    if (f.list_depth == 0) f.expect = Expect::kName;
  }

  void scan(const gp::Descriptor* root) {
    gp::io::ArrayInputStream input(text_.data(), static_cast<int>(text_.size()));
    IgnoreErrors errors;
    gp::io::Tokenizer tokens(&input, &errors);
    tokens.set_comment_style(gp::io::Tokenizer::SH_COMMENT_STYLE);
    tokens.set_allow_f_after_float(true);
    tokens.set_require_space_after_number(false);
    tokens.set_allow_multiline_strings(true);
    std::vector<Frame> frames(1);
    frames[0].descriptor = root;
    while (tokens.Next()) {
      const auto& t = tokens.current();
      Frame& f = frames.back();
      const std::string path = f.prefix + f.field_name;
      switch (t.type) {
        case gp::io::Tokenizer::TYPE_IDENTIFIER:
          if (f.expect == Expect::kName) {
            f.field_name = t.text;
            f.field = f.descriptor ? f.descriptor->FindFieldByName(t.text) : nullptr;
            f.expect = Expect::kAfterName;
            fields_.push_back({t.line, t.column, f.prefix + t.text});
            if (f.field && !f.field->is_repeated()) {
              const auto [it, first] = f.seen.emplace(t.text, t.line + 1);
              if (!first)
                fail(t, f.prefix + t.text,
                     "given twice (first on line " + std::to_string(it->second) + "); give each field once");
            }
          } else {
            if (f.field && f.field->cpp_type() == gp::FieldDescriptor::CPPTYPE_ENUM) {
              const gp::EnumDescriptor* e = f.field->enum_type();
              for (int k = 0; k < e->value_count(); ++k)
                if (lower(e->value(k)->name()) == lower(t.text))
                  canonical_.replace(offset_of(t.line, t.column), t.text.size(), e->value(k)->name());
            }
            value_done(f);
          }
          break;
        case gp::io::Tokenizer::TYPE_INTEGER:
          if (t.text.size() > 1 && t.text[0] == '0')
            fail(t, path,
                 "'" + t.text + "' has a leading zero (protobuf would read it as " +
                     (std::isdigit(static_cast<unsigned char>(t.text[1])) ? "octal" : "hexadecimal") +
                     "); write the number in decimal");
          value_done(f);
          break;
        case gp::io::Tokenizer::TYPE_FLOAT:
        case gp::io::Tokenizer::TYPE_STRING:
          if (f.expect != Expect::kName) value_done(f);
          break;
        case gp::io::Tokenizer::TYPE_SYMBOL:
          if (t.text == ":") {
            if (f.expect == Expect::kAfterName) f.expect = Expect::kValue;
          } else if (t.text == "{" || t.text == "<") {
            Frame inner;
            inner.descriptor = f.field ? f.field->message_type() : nullptr;
            inner.prefix = path + ".";
            frames.push_back(std::move(inner));
          } else if (t.text == "}" || t.text == ">") {
            if (frames.size() > 1) frames.pop_back();
            value_done(frames.back());
          } else if (t.text == "[") {
            if (f.expect == Expect::kName) {  // an extension or Any type name: [a.b/c]
              while (tokens.Next() && tokens.current().text != "]") {
              }
              f.field = nullptr;
              f.field_name = "[extension]";
              f.expect = Expect::kAfterName;
            } else {
              ++f.list_depth;
              f.expect = Expect::kValue;
            }
          } else if (t.text == "]") {
            if (f.list_depth > 0 && --f.list_depth == 0) f.expect = Expect::kName;
          }
          break;
        default:
          break;
      }
    }
  }

  const std::string& text_;
  std::string canonical_;
  std::string source_;
  std::vector<size_t> line_starts_;
  std::vector<FieldName> fields_;
};

class CollectingErrors : public gp::io::ErrorCollector {
 public:
  CollectingErrors(std::string source, const TextScan& scan) : source_(std::move(source)), scan_(scan) {}
  void AddError(int line, gp::io::ColumnNumber column, const std::string& message) override {
    std::ostringstream out;
    out << source_ << ":" << (line + 1) << ":" << (column + 1) << ": ";
    const std::string field = scan_.field_at(line, column);
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
  const TextScan& scan_;
  std::vector<std::string> errors_;
};

bool parse_with_scan(const std::string& text, const std::string& source, gp::Message* message, std::string* errors) {
  const TextScan scan(text, source, message->GetDescriptor());
  gp::TextFormat::Parser parser;  // Parse, not Merge: a singular field given twice is an error
  CollectingErrors collected(source, scan);
  parser.RecordErrorsTo(&collected);
  if (parser.ParseFromString(scan.canonical(), message)) return true;
  *errors = collected.joined();
  return false;
}

// ---- assignments from --set and the environment ----

// Decimal integers only: a leading zero would mean octal to strtoll(base 0)
// and to protobuf's text parser, so it is refused rather than guessed.
bool is_decimal_integer(const std::string& s) {
  size_t i = s[0] == '-' ? 1 : 0;
  if (i >= s.size() || (s[i] == '0' && i + 1 < s.size())) return false;
  for (; i < s.size(); ++i)
    if (!std::isdigit(static_cast<unsigned char>(s[i]))) return false;
  return true;
}

bool is_decimal_number(const std::string& s) {
  size_t i = (s[0] == '-' || s[0] == '+') ? 1 : 0;
  const size_t int_start = i;
  while (i < s.size() && std::isdigit(static_cast<unsigned char>(s[i]))) ++i;
  const size_t int_digits = i - int_start;
  if (int_digits > 1 && s[int_start] == '0') return false;  // "010" is octal to protobuf
  size_t frac_digits = 0;
  if (i < s.size() && s[i] == '.') {
    ++i;
    while (i < s.size() && std::isdigit(static_cast<unsigned char>(s[i]))) ++i, ++frac_digits;
  }
  if (int_digits + frac_digits == 0) return false;
  if (i < s.size() && (s[i] == 'e' || s[i] == 'E')) {
    ++i;
    if (i < s.size() && (s[i] == '-' || s[i] == '+')) ++i;
    const size_t exp_start = i;
    while (i < s.size() && std::isdigit(static_cast<unsigned char>(s[i]))) ++i;
    if (i == exp_start) return false;
  }
  return i == s.size();
}

struct Assignment {
  std::string path, value;
  std::string origin;  // "--set train.steps=3" or "environment variable LOOM_X=3 (sets parallel.y)"
  std::string where;   // how path errors start: "--set train.steps"
};

[[noreturn]] void bad_value(const Assignment& a, const std::string& expected) {
  throw ConfigError(a.origin + ": " + expected);
}

template <typename T>
T parse_integer(const Assignment& a, const char* type) {
  constexpr T lo = std::numeric_limits<T>::min(), hi = std::numeric_limits<T>::max();
  const std::string expected = std::string("expected ") + type + " in [" + std::to_string(lo) + ", " +
                               std::to_string(hi) + "], in decimal without leading zeros";
  if (a.value.empty() || !is_decimal_integer(a.value)) bad_value(a, expected);
  errno = 0;
  char* end = nullptr;
  if (std::is_signed<T>::value) {
    const long long v = std::strtoll(a.value.c_str(), &end, 10);
    if (errno == ERANGE || v < static_cast<long long>(lo) || v > static_cast<long long>(hi)) bad_value(a, expected);
    return static_cast<T>(v);
  }
  if (a.value[0] == '-') bad_value(a, expected);
  const unsigned long long v = std::strtoull(a.value.c_str(), &end, 10);
  if (errno == ERANGE || v > static_cast<unsigned long long>(hi)) bad_value(a, expected);
  return static_cast<T>(v);
}

void assign(const Assignment& a, pb::LoomConfig* config) {
  gp::Message* msg = config;
  std::string walked;
  std::stringstream parts(a.path);
  std::string part;
  std::vector<std::string> names;
  while (std::getline(parts, part, '.')) names.push_back(part);
  if (names.empty()) throw ConfigError(a.where + ": expected section.field=value");
  for (size_t i = 0; i < names.size(); ++i) {
    const gp::Descriptor* d = msg->GetDescriptor();
    const gp::FieldDescriptor* f = d->FindFieldByName(names[i]);
    const std::string where = walked.empty() ? "the config" : "'" + walked + "'";
    if (f == nullptr)
      throw ConfigError(a.where + ": " + where + " has no field '" + names[i] + "' (fields: " + field_names(d) + ")");
    walked += (walked.empty() ? "" : ".") + names[i];
    const gp::Reflection* r = msg->GetReflection();
    if (f->is_repeated()) throw ConfigError(a.where + ": repeated field '" + walked + "' cannot be set");
    if (f->cpp_type() == gp::FieldDescriptor::CPPTYPE_MESSAGE) {
      if (i + 1 == names.size())
        throw ConfigError(a.where + ": '" + walked + "' is a section; set one of its fields (" +
                          field_names(f->message_type()) + ")");
      msg = r->MutableMessage(msg, f);
      continue;
    }
    if (i + 1 != names.size()) throw ConfigError(a.where + ": '" + walked + "' is a value, not a section");
    switch (f->cpp_type()) {
      case gp::FieldDescriptor::CPPTYPE_INT32: r->SetInt32(msg, f, parse_integer<int32_t>(a, "an integer")); break;
      case gp::FieldDescriptor::CPPTYPE_INT64: r->SetInt64(msg, f, parse_integer<int64_t>(a, "an integer")); break;
      case gp::FieldDescriptor::CPPTYPE_UINT32:
        r->SetUInt32(msg, f, parse_integer<uint32_t>(a, "an unsigned integer"));
        break;
      case gp::FieldDescriptor::CPPTYPE_UINT64:
        r->SetUInt64(msg, f, parse_integer<uint64_t>(a, "an unsigned integer"));
        break;
      case gp::FieldDescriptor::CPPTYPE_DOUBLE:
      case gp::FieldDescriptor::CPPTYPE_FLOAT: {
        if (a.value.empty() || !is_decimal_number(a.value)) bad_value(a, "expected a finite number (e.g. 0.5, 3e-4)");
        const double v = std::strtod(a.value.c_str(), nullptr);
        if (!std::isfinite(v)) bad_value(a, "expected a finite number (e.g. 0.5, 3e-4)");
        if (f->cpp_type() == gp::FieldDescriptor::CPPTYPE_DOUBLE)
          r->SetDouble(msg, f, v);
        else
          r->SetFloat(msg, f, static_cast<float>(v));
        break;
      }
      case gp::FieldDescriptor::CPPTYPE_BOOL: {
        const std::string v = lower(a.value);
        if (v == "true" || v == "1")
          r->SetBool(msg, f, true);
        else if (v == "false" || v == "0")
          r->SetBool(msg, f, false);
        else
          bad_value(a, "expected true or false");
        break;
      }
      case gp::FieldDescriptor::CPPTYPE_ENUM: {
        const gp::EnumDescriptor* e = f->enum_type();
        const gp::EnumValueDescriptor* ev = nullptr;
        for (int k = 0; k < e->value_count(); ++k)
          if (lower(e->value(k)->name()) == lower(a.value)) ev = e->value(k);
        if (ev == nullptr) bad_value(a, "allowed values are " + enum_names(e));
        r->SetEnum(msg, f, ev);
        break;
      }
      case gp::FieldDescriptor::CPPTYPE_STRING: r->SetString(msg, f, a.value); break;
      default: throw ConfigError(a.where + ": unsupported field type");
    }
  }
}

// ---- ranges ----

// The range of every numeric field of LoomConfig. The text is the one written
// next to the field in loom.proto ("range [lo, hi]"; a test compares them).
// Upper bounds keep every derived quantity inside int64 and double precision
// (timeouts in ms, capacities in bytes, sample indices, token counts).
struct RangeRule {
  const char* field;
  const char* range;
};
constexpr RangeRule kRanges[] = {
    {"model.vocab_size", "[2, 16777216]"},
    {"model.d_model", "[1, 65536]"},
    {"model.n_heads", "[1, 4096]"},
    {"model.n_kv_heads", "[0, 4096]"},
    {"model.d_ff", "[0, 1048576]"},
    {"model.feature_dim", "[0, 65536]"},
    {"model.window", "[1, 1073741824]"},
    {"model.conv_kernel", "[1, 4096]"},
    {"model.rope_theta", "(0, 1e12]"},
    {"model.norm_eps", "(0, 1]"},
    {"model.block_size", "[1, 65536]"},
    {"model.memory_depth", "[1, 64]"},
    {"model.memory_expansion", "[1, 256]"},
    {"model.memory_chunk", "[1, 65536]"},
    {"model.persistent_tokens", "[0, 65536]"},
    {"model.memory_max_lr", "(0, 100]"},
    {"model.delta_key_heads", "[0, 4096]"},
    {"model.delta_value_heads", "[0, 4096]"},
    {"model.delta_key_dim", "[0, 65536]"},
    {"model.delta_value_dim", "[0, 65536]"},
    {"parallel.dp", "[1, 1048576]"},
    {"parallel.sp", "[0, 1048576]"},
    {"parallel.threads_per_rank", "[0, 4096]"},
    {"parallel.comm_timeout_s", "[0.001, 604800]"},
    {"train.steps", "[0, 1099511627776]"},
    {"train.batch_size", "[1, 1048576]"},
    {"train.seq_len", "[1, 4294967296]"},
    {"train.lr", "(0, 10]"},
    {"train.min_lr_ratio", "[0, 1]"},
    {"train.warmup_steps", "[0, 1099511627776]"},
    {"train.weight_decay", "[0, 10]"},
    {"train.grad_clip", "[0, 1e12]"},
    {"train.grad_accum", "[1, 1048576]"},
    {"train.seed", "[0, 18446744073709551615]"},
    {"train.log_interval", "[1, 1099511627776]"},
    {"train.eval_interval", "[0, 1099511627776]"},
    {"train.checkpoint_interval", "[0, 1099511627776]"},
    {"train.eval_batches", "[1, 1048576]"},
    {"train.keep_checkpoints", "[0, 1048576]"},
    {"parallel.ulysses_degree", "[0, 1048576]"},
    {"data.val_fraction", "[0, 1)"},
    {"data.mqar_pairs", "[1, 1048576]"},
    {"data.document_alignment", "[0, 1048576]"},
    {"offload.memory_ranks", "[0, 1048576]"},
    {"offload.capacity_mb", "[1, 16777216]"},
};

struct Range {
  double lo, hi;
  bool lo_open, hi_open;
  std::string text, lo_text, hi_text;  // "[0, 1)", "0", "1"
};

const Range* find_range(const std::string& field) {
  static const std::map<std::string, Range> table = [] {
    std::map<std::string, Range> t;
    for (const auto& rule : kRanges) {
      const std::string s = rule.range;
      Range r;
      r.text = s;
      r.lo_open = s.front() == '(';
      r.hi_open = s.back() == ')';
      const size_t comma = s.find(',');
      r.lo_text = s.substr(1, comma - 1);
      r.hi_text = s.substr(comma + 2, s.size() - comma - 3);
      r.lo = std::strtod(r.lo_text.c_str(), nullptr);
      r.hi = std::strtod(r.hi_text.c_str(), nullptr);
      t.emplace(rule.field, r);
    }
    return t;
  }();
  const auto it = table.find(field);
  return it == table.end() ? nullptr : &it->second;
}

bool is_numeric(const gp::FieldDescriptor* f) {
  switch (f->cpp_type()) {
    case gp::FieldDescriptor::CPPTYPE_INT32:
    case gp::FieldDescriptor::CPPTYPE_INT64:
    case gp::FieldDescriptor::CPPTYPE_UINT32:
    case gp::FieldDescriptor::CPPTYPE_UINT64:
    case gp::FieldDescriptor::CPPTYPE_DOUBLE:
    case gp::FieldDescriptor::CPPTYPE_FLOAT: return true;
    default: return false;
  }
}

// The value as a double (for the range test) and as text (for the message).
std::pair<double, std::string> numeric_value(const gp::Message& m, const gp::FieldDescriptor* f) {
  const gp::Reflection* r = m.GetReflection();
  switch (f->cpp_type()) {
    case gp::FieldDescriptor::CPPTYPE_INT32: return {r->GetInt32(m, f), std::to_string(r->GetInt32(m, f))};
    case gp::FieldDescriptor::CPPTYPE_INT64:
      return {static_cast<double>(r->GetInt64(m, f)), std::to_string(r->GetInt64(m, f))};
    case gp::FieldDescriptor::CPPTYPE_UINT32: return {r->GetUInt32(m, f), std::to_string(r->GetUInt32(m, f))};
    case gp::FieldDescriptor::CPPTYPE_UINT64:
      return {static_cast<double>(r->GetUInt64(m, f)), std::to_string(r->GetUInt64(m, f))};
    case gp::FieldDescriptor::CPPTYPE_DOUBLE: return {r->GetDouble(m, f), num(r->GetDouble(m, f))};
    case gp::FieldDescriptor::CPPTYPE_FLOAT: return {r->GetFloat(m, f), num(r->GetFloat(m, f))};
    default: return {0, ""};
  }
}

// "" when `value` is inside the range, else what the rule says.
std::string range_violation(double value, const Range& r) {
  if (!std::isfinite(value)) return "must be a finite number (range " + r.text + ")";
  if (r.lo_open ? !(value > r.lo) : !(value >= r.lo))
    return std::string("must be ") + (r.lo_open ? "> " : ">= ") + r.lo_text + " (range " + r.text + ")";
  if (r.hi_open ? !(value < r.hi) : !(value <= r.hi))
    return std::string("must be ") + (r.hi_open ? "< " : "<= ") + r.hi_text + " (range " + r.text + ")";
  return "";
}

class Validator {
 public:
  void one_of(const std::string& field, const std::string& value, const std::set<std::string>& allowed) {
    if (allowed.count(value)) return;
    std::string list;
    for (const auto& a : allowed) list += (list.empty() ? "" : ", ") + a;
    errors_.push_back("field " + field + " = '" + value + "': allowed values are " + list);
  }
  void require(bool ok, const std::string& message) {
    if (!ok) errors_.push_back(message);
  }
  // Every numeric field against its range (non-finite values included).
  void ranges(const gp::Message& m, const std::string& prefix) {
    const gp::Descriptor* d = m.GetDescriptor();
    for (int i = 0; i < d->field_count(); ++i) {
      const gp::FieldDescriptor* f = d->field(i);
      if (f->is_repeated()) continue;
      const std::string path = prefix + f->name();
      if (f->cpp_type() == gp::FieldDescriptor::CPPTYPE_MESSAGE) {
        ranges(m.GetReflection()->GetMessage(m, f), path + ".");
        continue;
      }
      if (!is_numeric(f)) continue;
      const auto [value, text] = numeric_value(m, f);
      const Range* r = find_range(path);
      std::string problem;
      if (r)
        problem = range_violation(value, *r);
      else if (!std::isfinite(value))
        problem = "must be a finite number";
      if (!problem.empty()) errors_.push_back("field " + path + " = " + text + ": " + problem);
    }
  }
  bool ok() const { return errors_.empty(); }
  void throw_if_any() const {
    if (errors_.empty()) return;
    std::string s = "invalid config:";
    for (const auto& e : errors_) s += "\n  " + e;
    throw ConfigError(s);
  }

 private:
  std::vector<std::string> errors_;
};

}  // namespace

void parse_text_message(const std::string& text, const std::string& source, gp::Message* message) {
  std::string errors;
  if (!parse_with_scan(text, source, message, &errors))
    throw ConfigError("invalid " + message->GetDescriptor()->name() + " " + errors + "\n(fields: " +
                      field_names(message->GetDescriptor()) + ")");
}

void parse_config_text(const std::string& text, const std::string& source, pb::LoomConfig* config) {
  std::string errors;
  if (!parse_with_scan(text, source, config, &errors))
    throw ConfigError("invalid config " + errors + "\n(sections: " + field_names(pb::LoomConfig::descriptor()) + ")");
}

pb::LoomConfig load_config_file(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw ConfigError("cannot open config file '" + path + "': " + std::strerror(errno));
  std::stringstream text;
  text << in.rdbuf();
  pb::LoomConfig config;
  parse_config_text(text.str(), path, &config);
  // The file's own values, before the environment or --set could hide them.
  try {
    validate_ranges(config);
  } catch (const ConfigError& e) {
    throw ConfigError("config file '" + path + "': " + e.what());
  }
  return config;
}

void apply_override(const std::string& assignment, pb::LoomConfig* config) {
  const auto eq = assignment.find('=');
  if (eq == std::string::npos || eq == 0)
    throw ConfigError("--set '" + assignment + "': expected section.field=value");
  Assignment a;
  a.path = assignment.substr(0, eq);
  a.value = assignment.substr(eq + 1);
  a.origin = "--set " + assignment;
  a.where = "--set " + a.path;
  assign(a, config);
}

const std::vector<EnvironmentOverride>& environment_overrides() {
  static const std::vector<EnvironmentOverride> list = {
      {"LOOM_COMM_TIMEOUT_S", "parallel.comm_timeout_s"},
      {"LOOM_THREADS_PER_RANK", "parallel.threads_per_rank"},
  };
  return list;
}

void apply_environment(pb::LoomConfig* config) {
  for (const auto& e : environment_overrides()) {
    const char* value = std::getenv(e.variable);
    if (value == nullptr || *value == '\0') continue;  // unset, or set to nothing
    Assignment a;
    a.path = e.field;
    a.value = value;
    a.origin = std::string("environment variable ") + e.variable + "=" + value + " (sets " + e.field + ")";
    a.where = a.origin;
    assign(a, config);
    // The range now, so that the message names the variable rather than only the field.
    const Range* r = find_range(e.field);
    const gp::Message& section = config->GetReflection()->GetMessage(
        *config, pb::LoomConfig::descriptor()->FindFieldByName(a.path.substr(0, a.path.find('.'))));
    const auto [v, text] = numeric_value(section, section.GetDescriptor()->FindFieldByName(a.path.substr(a.path.find('.') + 1)));
    const std::string problem = r ? range_violation(v, *r) : "";
    if (!problem.empty()) throw ConfigError(a.origin + ": " + problem);
  }
}

std::string numeric_field_range(const std::string& field) {
  const Range* r = find_range(field);
  return r ? r->text : "";
}

void validate_ranges(const pb::LoomConfig& c) {
  Validator v;
  v.ranges(c, "");
  v.throw_if_any();
}

void validate_config(const pb::LoomConfig& c) {
  Validator v;
  v.ranges(c, "");
  const auto& m = c.model();
  if (m.n_heads() >= 1 && m.d_model() >= 1)
    v.require(m.d_model() % m.n_heads() == 0, "field model.d_model = " + std::to_string(m.d_model()) +
                                                  ": must be divisible by model.n_heads = " + std::to_string(m.n_heads()));
  if (m.n_kv_heads() >= 1 && m.n_heads() >= 1)
    v.require(m.n_heads() % m.n_kv_heads() == 0, "field model.n_kv_heads = " + std::to_string(m.n_kv_heads()) +
                                                     ": must divide model.n_heads = " + std::to_string(m.n_heads()));
  v.require(!m.pattern().empty(), "field model.pattern is empty: give one letter per block from LAWCMGXKD");
  for (char ch : m.pattern())
    v.require(std::string("LAWCMGXKD").find(ch) != std::string::npos,
              "field model.pattern = '" + m.pattern() + "': letter '" + std::string(1, ch) +
                  "' is not a mixer (allowed: L A W C M G X K D)");
  if (m.delta_key_heads() >= 1 && m.delta_value_heads() >= 1)
    v.require(m.delta_value_heads() % m.delta_key_heads() == 0,
              "field model.delta_value_heads = " + std::to_string(m.delta_value_heads()) +
                  ": must be a multiple of model.delta_key_heads = " + std::to_string(m.delta_key_heads()));
  v.one_of("model.feature_map", m.feature_map(), {"identity", "elu", "relu", "taylor", "hedgehog"});

  const auto& t = c.train();
  v.one_of("train.device", t.device(), {"cpu", "cuda"});
  v.one_of("train.dtype", t.dtype(), {"float32", "float64", "bfloat16"});
  // Products that index samples and tokens must stay exact in int64 and double.
  if (v.ok()) {
    const long double samples = static_cast<long double>(t.steps()) * t.grad_accum() * c.parallel().dp() * t.batch_size();
    v.require(samples <= 9007199254740992.0L,
              "fields train.steps x train.grad_accum x parallel.dp x train.batch_size = " + num(static_cast<double>(samples)) +
                  " samples: must be <= 2^53 (the sample index must stay exact)");
    const long double tokens = static_cast<long double>(t.batch_size()) * (t.seq_len() + 1) * t.grad_accum();
    v.require(tokens <= 1099511627776.0L,
              "fields train.batch_size x (train.seq_len + 1) x train.grad_accum = " + num(static_cast<double>(tokens)) +
                  " tokens per rank and step: must be <= 2^40");
  }

  const auto& p = c.parallel();
  if (p.backend() == pb::MPI)
    v.require(t.device() != "cuda",
              "field parallel.backend = MPI: the MPI communicator takes CPU tensors; with train.device = cuda use "
              "NCCL or AUTO");
  if (p.backend() == pb::NCCL)
    v.require(t.device() == "cuda",
              "field parallel.backend = NCCL: NCCL takes CUDA tensors; with train.device = " + t.device() +
                  " use MPI or AUTO");

  const auto& d = c.data();
  v.one_of("data.tokenizer", d.tokenizer(), {"byte", "sentencepiece"});
  v.one_of("data.task", d.task(), {"text", "mqar", "sniah"});
  v.require(d.val_path().empty() || d.task() == "text",
            "field data.val_path = '" + d.val_path() + "': data.task = " + d.task() +
                " generates its validation examples; data.val_path is for data.task = text");

  const bool offload = c.parallel().softmax_method() == pb::OFFLOAD;
  v.require(!offload || c.offload().memory_ranks() > 0,
            "field parallel.softmax_method = OFFLOAD needs memory nodes: set offload.memory_ranks >= 1");
  v.require(offload || c.offload().memory_ranks() == 0,
            "field offload.memory_ranks = " + std::to_string(c.offload().memory_ranks()) +
                ": memory nodes serve only parallel.softmax_method = OFFLOAD (they would sit idle)");
  v.require(!offload || c.train().device() == "cpu",
            "field parallel.softmax_method = OFFLOAD: the memory nodes' transport is MPI, so train.device must be cpu");
  // Head-parallel methods: the heads they exchange must divide among the
  // all-to-all group (checked here when parallel.sp is given, else at start-up
  // once the world size is known).
  const bool usp = p.softmax_method() == pb::USP;
  const bool ulysses_softmax = p.softmax_method() == pb::ULYSSES || usp;
  const bool softmax_layers = m.pattern().find_first_of("AW") != std::string::npos;
  v.require(p.ulysses_degree() == 0 || usp,
            "field parallel.ulysses_degree = " + std::to_string(p.ulysses_degree()) +
                ": only parallel.softmax_method = USP uses it (ULYSSES spans the whole sp group)");
  if (usp && p.ulysses_degree() > 0 && p.sp() > 0)
    v.require(p.sp() % p.ulysses_degree() == 0,
              "field parallel.ulysses_degree = " + std::to_string(p.ulysses_degree()) +
                  ": must divide parallel.sp = " + std::to_string(p.sp()) + " (sp = ulysses_degree x ring degree)");
  const int64_t all_to_all_ranks = usp && p.ulysses_degree() > 0 ? p.ulysses_degree() : p.sp();
  if (ulysses_softmax && softmax_layers && all_to_all_ranks > 0 && m.n_heads() >= 1)
    v.require(m.n_heads() % all_to_all_ranks == 0,
              "field model.n_heads = " + std::to_string(m.n_heads()) + ": parallel.softmax_method = " +
                  pb::SoftmaxMethod_Name(p.softmax_method()) + " shards the heads over " +
                  std::to_string(all_to_all_ranks) + " ranks (" + (usp && p.ulysses_degree() > 0 ? "parallel.ulysses_degree" : "parallel.sp") +
                  "), which must divide it");
  if (p.linear_method() == pb::LINEAR_ULYSSES && p.sp() > 0) {
    if (m.pattern().find_first_of("LK") != std::string::npos && m.n_heads() >= 1)
      v.require(m.n_heads() % p.sp() == 0, "field model.n_heads = " + std::to_string(m.n_heads()) +
                                               ": parallel.linear_method = LINEAR_ULYSSES shards the heads over "
                                               "parallel.sp = " + std::to_string(p.sp()) + " ranks, which must divide it");
    const int64_t key_heads = m.delta_key_heads() > 0 ? m.delta_key_heads() : m.n_heads();
    const int64_t value_heads = m.delta_value_heads() > 0 ? m.delta_value_heads() : key_heads;
    if (m.pattern().find('D') != std::string::npos && value_heads >= 1)
      v.require(value_heads % p.sp() == 0, "field model.delta_value_heads = " + std::to_string(value_heads) +
                                               ": parallel.linear_method = LINEAR_ULYSSES shards the Gated DeltaNet "
                                               "heads over parallel.sp = " + std::to_string(p.sp()) +
                                               " ranks, which must divide it");
  }
  v.require(c.train().recompute() == pb::TrainConfig::NONE || !offload,
            "field train.recompute = " + pb::TrainConfig::Recompute_Name(c.train().recompute()) +
                " with parallel.softmax_method = OFFLOAD: a recomputed block would send its keys and values to the "
                "memory nodes again; use train.recompute = NONE with offload");
  v.one_of("log.level", c.log().level(), {"debug", "info", "warn", "error"});
  v.throw_if_any();
}

pb::LoomConfig read_config_sources(const std::string& path, const std::vector<std::string>& overrides) {
  pb::LoomConfig config = path.empty() ? pb::LoomConfig() : load_config_file(path);
  apply_environment(&config);
  for (const auto& o : overrides) apply_override(o, &config);
  return config;
}

pb::LoomConfig resolve_config(const std::string& path, const std::vector<std::string>& overrides) {
  pb::LoomConfig config = read_config_sources(path, overrides);
  validate_config(config);
  return config;
}

void fill_defaults(gp::Message* msg) {
  const gp::Descriptor* d = msg->GetDescriptor();
  const gp::Reflection* r = msg->GetReflection();
  for (int i = 0; i < d->field_count(); ++i) {
    const gp::FieldDescriptor* f = d->field(i);
    if (f->is_repeated()) continue;
    if (f->cpp_type() == gp::FieldDescriptor::CPPTYPE_MESSAGE) {
      fill_defaults(r->MutableMessage(msg, f));
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
}

std::string config_to_text(const pb::LoomConfig& config) {
  pb::LoomConfig full = config;
  fill_defaults(&full);
  std::string text;
  gp::TextFormat::PrintToString(full, &text);
  return text;
}

uint64_t config_hash(const pb::LoomConfig& config) {
  pb::LoomConfig full = config;
  fill_defaults(&full);
  std::string bytes;
  {
    gp::io::StringOutputStream stream(&bytes);
    gp::io::CodedOutputStream out(&stream);
    out.SetSerializationDeterministic(true);
    full.SerializeToCodedStream(&out);
  }
  uint64_t h = 14695981039346656037ull;
  for (unsigned char ch : bytes) h = (h ^ ch) * 1099511628211ull;
  return h;
}

std::string config_differences(const pb::LoomConfig& a, const pb::LoomConfig& b, int limit) {
  pb::LoomConfig fa = a, fb = b;
  fill_defaults(&fa);
  fill_defaults(&fb);
  std::vector<std::string> lines;
  int more = 0;
  gp::TextFormat::Printer printer;
  printer.SetSingleLineMode(true);
  std::function<void(const gp::Message&, const gp::Message&, const std::string&)> walk =
      [&](const gp::Message& x, const gp::Message& y, const std::string& prefix) {
        const gp::Descriptor* d = x.GetDescriptor();
        const gp::Reflection* r = x.GetReflection();
        for (int i = 0; i < d->field_count(); ++i) {
          const gp::FieldDescriptor* f = d->field(i);
          const std::string path = prefix + f->name();
          if (!f->is_repeated() && f->cpp_type() == gp::FieldDescriptor::CPPTYPE_MESSAGE) {
            walk(r->GetMessage(x, f), r->GetMessage(y, f), path + ".");
            continue;
          }
          auto text_of = [&](const gp::Message& m) {
            if (!f->is_repeated()) {
              std::string s;
              printer.PrintFieldValueToString(m, f, -1, &s);
              return s;
            }
            std::string s = "[";
            for (int k = 0; k < r->FieldSize(m, f); ++k) {
              std::string e;
              printer.PrintFieldValueToString(m, f, k, &e);
              s += (k ? ", " : "") + e;
            }
            return s + "]";
          };
          const std::string vx = text_of(x), vy = text_of(y);
          if (vx == vy) continue;
          if (static_cast<int>(lines.size()) < limit)
            lines.push_back(path + ": " + vx + " vs " + vy);
          else
            ++more;
        }
      };
  walk(fa, fb, "");
  std::string s;
  for (const auto& l : lines) s += (s.empty() ? "" : "\n") + l;
  if (more > 0) s += "\n(and " + std::to_string(more) + " more)";
  return s;
}

}  // namespace loom
