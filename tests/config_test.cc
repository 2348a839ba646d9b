// Config parsing, overrides and validation: every error names the field; the
// resolved config of every preset prints and parses back to itself; every
// numeric field has the range loom.proto documents; the environment sits
// between the file and --set.
#include <google/protobuf/util/message_differencer.h>
#include <gtest/gtest.h>

#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <optional>
#include <regex>
#include <sstream>

#include "scratch_dir.h"
#include "loom/models/hybrid_lm.h"
#include "loom/models/run_config.h"
#include "loom/runtime/comm/communicator.h"
#include "loom/runtime/core/config.h"
#include "loom/runtime/core/env_flag.h"
#include "loom/runtime/core/error.h"

namespace loom {
namespace {

std::string error_of(const std::function<void()>& f) {
  try {
    f();
  } catch (const ConfigError& e) {
    return e.what();
  }
  return "<no error>";
}

#define EXPECT_CONTAINS(haystack, needle) \
  EXPECT_NE(std::string(haystack).find(needle), std::string::npos) << "in: " << (haystack)

TEST(Config, EnvironmentSwitchesReadOneSpellingAndRefuseTypos) {
  const char* name = "LOOM_TEST_ENV_FLAG";
  ::unsetenv(name);
  EXPECT_TRUE(env_flag(name, true));
  EXPECT_FALSE(env_flag(name, false));
  ::setenv(name, "", 1);
  EXPECT_TRUE(env_flag(name, true));
  for (const char* on : {"1", "on", "TRUE", "Yes"}) {
    ::setenv(name, on, 1);
    EXPECT_TRUE(env_flag(name, false)) << on;
  }
  for (const char* off : {"0", "OFF", "false", "no"}) {
    ::setenv(name, off, 1);
    EXPECT_FALSE(env_flag(name, true)) << off;
  }
  ::setenv(name, "of", 1);
  try {
    env_flag(name, true);
    ADD_FAILURE() << "a typo was taken as a value";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("LOOM_TEST_ENV_FLAG='of'"), std::string::npos) << e.what();
  }
  ::unsetenv(name);
}

TEST(Config, DefaultsAreValid) { EXPECT_NO_THROW(validate_config(pb::LoomConfig())); }

TEST(Config, ParsesTextAndOverrides) {
  pb::LoomConfig c;
  parse_config_text("model { d_model: 128 n_heads: 8 } parallel { layout: CONTIGUOUS }", "inline", &c);
  apply_override("train.seq_len=4096", &c);
  apply_override("parallel.layout=zigzag", &c);
  apply_override("model.tie_embeddings=false", &c);
  apply_override("train.lr=1e-4", &c);
  EXPECT_EQ(c.model().d_model(), 128);
  EXPECT_EQ(c.train().seq_len(), 4096);
  EXPECT_EQ(c.parallel().layout(), pb::ZIGZAG);
  EXPECT_FALSE(c.model().tie_embeddings());
  EXPECT_DOUBLE_EQ(c.train().lr(), 1e-4);
  EXPECT_NO_THROW(validate_config(c));
}

TEST(Config, UnknownFieldNamesLineAndField) {
  pb::LoomConfig c;
  const auto e = error_of([&] { parse_config_text("train {\n  stepz: 3\n}\n", "f.pbtxt", &c); });
  EXPECT_CONTAINS(e, "f.pbtxt:2:");
  EXPECT_CONTAINS(e, "stepz");
}

TEST(Config, WrongTypeIsReported) {
  pb::LoomConfig c;
  EXPECT_CONTAINS(error_of([&] { parse_config_text("train { seq_len: \"x\" }", "f", &c); }), "seq_len");
  EXPECT_CONTAINS(error_of([&] { apply_override("train.seq_len=12abc", &c); }),
                  "--set train.seq_len=12abc: expected an integer");
  EXPECT_CONTAINS(error_of([&] { apply_override("parallel.dp=99999999999", &c); }), "expected an integer in [");
  EXPECT_CONTAINS(error_of([&] { apply_override("model.tie_embeddings=maybe", &c); }), "expected true or false");
  EXPECT_CONTAINS(error_of([&] { apply_override("train.lr=fast", &c); }), "expected a finite number");
}

TEST(Config, OverridePathsAreChecked) {
  pb::LoomConfig c;
  EXPECT_CONTAINS(error_of([&] { apply_override("nosuch.x=1", &c); }), "the config has no field 'nosuch'");
  EXPECT_CONTAINS(error_of([&] { apply_override("train=1", &c); }), "'train' is a section");
  EXPECT_CONTAINS(error_of([&] { apply_override("train.steps.x=1", &c); }), "is a value, not a section");
  EXPECT_CONTAINS(error_of([&] { apply_override("train.steps", &c); }), "expected section.field=value");
  EXPECT_CONTAINS(error_of([&] { apply_override("parallel.softmax_method=magic", &c); }),
                  "allowed values are local, ring, allgather, offload");
}

TEST(Config, ValidationListsEveryViolation) {
  pb::LoomConfig c;
  c.mutable_train()->set_batch_size(0);
  c.mutable_model()->set_pattern("LQ");
  c.mutable_model()->set_d_model(10);
  c.mutable_model()->set_n_heads(4);
  c.mutable_train()->set_device("tpu");
  const auto e = error_of([&] { validate_config(c); });
  EXPECT_CONTAINS(e, "field train.batch_size = 0: must be >= 1");
  EXPECT_CONTAINS(e, "letter 'Q' is not a mixer");
  EXPECT_CONTAINS(e, "model.d_model = 10: must be divisible by model.n_heads = 4");
  EXPECT_CONTAINS(e, "field train.device = 'tpu': allowed values are cpu, cuda");
}

TEST(Config, PrintedConfigParsesBackIdentically) {
  pb::LoomConfig c;
  apply_override("train.steps=7", &c);
  const std::string text = config_to_text(c);
  EXPECT_CONTAINS(text, "steps: 7");
  EXPECT_CONTAINS(text, "layout: ZIGZAG");  // defaults are printed too
  pb::LoomConfig back;
  parse_config_text(text, "printed", &back);
  EXPECT_EQ(config_to_text(back), text);
}

// ---- one resolved config ----

// Field-by-field differences reported by protobuf's MessageDifferencer.
std::string message_differences(const pb::LoomConfig& a, const pb::LoomConfig& b) {
  std::string report;
  google::protobuf::util::MessageDifferencer differencer;
  differencer.ReportDifferencesToString(&report);
  differencer.Compare(a, b);
  return report;
}

TEST(Config, EveryPresetResolvesPrintsAndResolvesBackIdentically) {
  ASSERT_FALSE(models::preset_names().empty());
  for (const auto& preset : models::preset_names()) {
    pb::LoomConfig user;
    user.mutable_model()->set_preset(preset);
    const pb::LoomConfig resolved = models::resolve_run_config(user);
    EXPECT_EQ(resolved.model().preset(), preset);
    const std::string text = config_to_text(resolved);
    pb::LoomConfig parsed;
    parse_config_text(text, "printed " + preset, &parsed);
    const pb::LoomConfig again = models::resolve_run_config(parsed);
    const std::string differences = message_differences(resolved, again);
    EXPECT_TRUE(differences.empty()) << preset << ":\n" << differences;
    EXPECT_TRUE(google::protobuf::util::MessageDifferencer::Equals(resolved, again)) << preset;
    EXPECT_EQ(models::count_parameters(again.model()), models::count_parameters(resolved.model())) << preset;
    EXPECT_EQ(config_to_text(again), text) << preset;
    EXPECT_EQ(config_hash(again), config_hash(resolved)) << preset;
    // The preset's own values are spelled out, not the schema defaults.
    pb::ModelConfig preset_only;
    preset_only.set_preset(preset);
    EXPECT_EQ(resolved.model().d_model(), models::resolve_model_config(preset_only).d_model()) << preset;
  }
}

TEST(Config, UserFieldsOverAPresetSurviveTheRoundTrip) {
  const pb::LoomConfig resolved = models::resolve_run_config(
      "", {"model.preset=linear-llama3-1b", "model.d_model=1024", "model.n_heads=16", "train.seq_len=512"});
  EXPECT_EQ(resolved.model().d_model(), 1024);
  EXPECT_EQ(resolved.model().feature_dim(), 1024 / 16);  // derived from the user's fields
  EXPECT_EQ(resolved.model().vocab_size(), 128256);      // from the preset
  pb::LoomConfig parsed;
  parse_config_text(config_to_text(resolved), "printed", &parsed);
  const pb::LoomConfig again = models::resolve_run_config(parsed);
  EXPECT_TRUE(message_differences(resolved, again).empty()) << message_differences(resolved, again);
  EXPECT_EQ(models::count_parameters(again.model()), models::count_parameters(resolved.model()));
}

TEST(Config, PresetFieldsAreCheckedAfterThePresetIsApplied) {
  // n_heads = 24 divides the preset's d_model 768, not the schema default 64.
  EXPECT_NO_THROW(models::resolve_run_config("", {"model.preset=titans-mac", "model.n_heads=24"}));
  EXPECT_CONTAINS(error_of([] { models::resolve_run_config("", {"model.preset=titans-mac", "model.n_heads=7"}); }),
                  "model.d_model = 768: must be divisible by model.n_heads = 7");
  // A zero head count is a range error, not a division by zero in the derived defaults.
  EXPECT_CONTAINS(error_of([] { models::resolve_run_config("", {"model.n_heads=0", "model.feature_dim=0"}); }),
                  "field model.n_heads = 0: must be >= 1");
}

// Packed documents start at multiples of data.document_alignment; a Titans
// model needs multiples of model.memory_chunk, checked before any step runs.
TEST(Config, DocumentAlignmentMustSuitTitansMemory) {
  const std::vector<std::string> titans{"model.pattern=LWCM", "model.memory_chunk=16", "data.packing=PACK"};
  auto with = [&](const std::string& alignment) {
    auto sets = titans;
    sets.push_back("data.document_alignment=" + alignment);
    return models::resolve_run_config("", sets);
  };
  EXPECT_NO_THROW(with("0"));
  EXPECT_NO_THROW(with("32"));
  try {
    with("7");
    ADD_FAILURE() << "alignment 7 with memory_chunk 16 accepted";
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("data.document_alignment = 7"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("model.memory_chunk = 16"), std::string::npos) << e.what();
  }
  // Without Titans letters, or without packing, any alignment is fine.
  EXPECT_NO_THROW(models::resolve_run_config("", {"model.pattern=LWC", "data.document_alignment=7"}));
  EXPECT_NO_THROW(models::resolve_run_config("", {"model.pattern=LWCM", "model.memory_chunk=16", "data.packing=NONE",
                                                  "data.document_alignment=7"}));
}

TEST(Config, HashAndDifferencesIgnoreWhatWasSetExplicitly) {
  pb::LoomConfig implicit, explicit_default, other;
  explicit_default.mutable_train()->set_steps(100);  // the schema default
  other.mutable_train()->set_steps(101);
  EXPECT_EQ(config_hash(implicit), config_hash(explicit_default));
  EXPECT_NE(config_hash(implicit), config_hash(other));
  EXPECT_EQ(config_differences(implicit, explicit_default), "");
  EXPECT_EQ(config_differences(implicit, other), "train.steps: 100 vs 101");
}

// ---- numbers ----

// Reads `relative` under the source tree (LOOM_SOURCE_DIR, set for this file).
std::string source_file(const std::string& relative) {
  std::ifstream in(std::string(LOOM_SOURCE_DIR) + "/" + relative);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

TEST(Config, EveryNumericFieldHasTheRangeLoomProtoDocuments) {
  const std::string proto = source_file("runtime/core/proto/loom.proto");
  ASSERT_FALSE(proto.empty());
  int checked = 0;
  std::function<void(const google::protobuf::Descriptor*, const std::string&)> walk =
      [&](const google::protobuf::Descriptor* d, const std::string& prefix) {
        // The message's block in loom.proto.
        const size_t begin = proto.find("message " + d->name() + " {");
        ASSERT_NE(begin, std::string::npos) << d->name();
        const std::string block = proto.substr(begin, proto.find("\n}", begin) - begin);
        for (int i = 0; i < d->field_count(); ++i) {
          const auto* f = d->field(i);
          const std::string path = prefix + f->name();
          if (f->type() == google::protobuf::FieldDescriptor::TYPE_MESSAGE) {
            walk(f->message_type(), path + ".");
            continue;
          }
          const bool numeric = f->cpp_type() != google::protobuf::FieldDescriptor::CPPTYPE_STRING &&
                               f->cpp_type() != google::protobuf::FieldDescriptor::CPPTYPE_BOOL &&
                               f->cpp_type() != google::protobuf::FieldDescriptor::CPPTYPE_ENUM;
          const std::string range = numeric_field_range(path);
          EXPECT_EQ(range.empty(), !numeric) << path << " (numeric fields have a range, others none)";
          if (!numeric) continue;
          std::smatch line;
          const std::regex declaration("optional \\w+ " + f->name() + " = [0-9]+[^\n]*");
          ASSERT_TRUE(std::regex_search(block, line, declaration)) << path;
          EXPECT_NE(line.str().find("range " + range), std::string::npos)
              << path << ": loom.proto says '" << line.str() << "', the check is 'range " << range << "'";
          ++checked;
        }
      };
  walk(pb::LoomConfig::descriptor(), "");
  EXPECT_GE(checked, 35);
}

TEST(Config, ValuesAtTheBoundsPassAndJustBeyondFail) {
  for (const char* field : {"model.vocab_size", "parallel.comm_timeout_s", "train.lr", "data.val_fraction",
                            "offload.capacity_mb", "train.steps"}) {
    const std::string range = numeric_field_range(field);
    const size_t comma = range.find(',');
    const std::string lo = range.substr(1, comma - 1), hi = range.substr(comma + 2, range.size() - comma - 3);
    auto check = [&](const std::string& value) {
      pb::LoomConfig c;
      apply_override(std::string(field) + "=" + value, &c);
      return error_of([&] { validate_ranges(c); });
    };
    if (range.front() == '[') {
      EXPECT_EQ(check(lo), "<no error>") << field << " = " << lo;
    } else {
      EXPECT_CONTAINS(check(lo), std::string("field ") + field + " = " + lo + ": must be > " + lo);
    }
    if (range.back() == ']') {
      EXPECT_EQ(check(hi), "<no error>") << field << " = " << hi;
    } else {
      EXPECT_CONTAINS(check(hi), std::string("field ") + field);
    }
  }
}

TEST(Config, NonFiniteValuesAreRefusedInFilesAndSet) {
  for (const std::string text : {"train { lr: inf }", "train { lr: -inf }", "model { rope_theta: nan }",
                                 "train { grad_clip: 1e999 }", "parallel { comm_timeout_s: infinity }"}) {
    pb::LoomConfig c;
    parse_config_text(text, "f", &c);  // protobuf's text format reads them
    const auto e = error_of([&] { validate_config(c); });
    EXPECT_CONTAINS(e, "must be a finite number");
    EXPECT_CONTAINS(e, text.substr(text.find("{ ") + 2, text.find(':') - text.find("{ ") - 2));  // the field
  }
  pb::LoomConfig c;
  for (const char* value : {"inf", "nan", "-inf", "1e999", "0x1p3", " 1", "1 "})
    EXPECT_CONTAINS(error_of([&] { apply_override(std::string("train.lr=") + value, &c); }),
                    std::string("--set train.lr=") + value + ": expected a finite number");
}

TEST(Config, OverflowingValuesAreRefused) {
  const auto e = error_of([] {
    pb::LoomConfig c;
    parse_config_text("parallel { comm_timeout_s: 1e300 } offload { capacity_mb: 9007199254740993 }", "f", &c);
    validate_config(c);
  });
  EXPECT_CONTAINS(e, "field parallel.comm_timeout_s = 1e+300: must be <= 604800");
  EXPECT_CONTAINS(e, "field offload.capacity_mb = 9007199254740993: must be <= 16777216");
  // Each in range, the product of sample counts beyond 2^53.
  pb::LoomConfig c;
  for (const char* o : {"train.steps=1099511627776", "train.grad_accum=1048576", "train.batch_size=1024"})
    apply_override(o, &c);
  EXPECT_CONTAINS(error_of([&] { validate_config(c); }),
                  "train.steps x train.grad_accum x parallel.dp x train.batch_size");
  pb::LoomConfig tokens;
  for (const char* o : {"train.seq_len=4294967296", "train.batch_size=1048576"}) apply_override(o, &tokens);
  EXPECT_CONTAINS(error_of([&] { validate_config(tokens); }), "train.batch_size x (train.seq_len + 1)");
  EXPECT_CONTAINS(error_of([&] { apply_override("parallel.dp=2147483648", &c); }), "expected an integer in [");
}

TEST(Config, NegativeCountsAreRefused) {
  for (const char* field : {"train.steps", "train.warmup_steps", "train.eval_interval", "train.keep_checkpoints",
                            "model.n_kv_heads", "offload.memory_ranks", "parallel.sp"}) {
    pb::LoomConfig c;
    apply_override(std::string(field) + "=-1", &c);
    EXPECT_CONTAINS(error_of([&] { validate_config(c); }), std::string("field ") + field + " = -1: must be >= 0");
  }
  pb::LoomConfig c;
  EXPECT_CONTAINS(error_of([&] { apply_override("train.seed=-1", &c); }), "--set train.seed=-1: expected an unsigned");
  apply_override("train.seed=18446744073709551615", &c);  // the whole uint64 range
  EXPECT_EQ(c.train().seed(), 18446744073709551615ull);
}

TEST(Config, LeadingZerosAreRefusedInFilesAndSet) {
  pb::LoomConfig c;
  auto e = error_of([&] { parse_config_text("train {\n  steps: 010\n}\n", "f.pbtxt", &c); });
  EXPECT_CONTAINS(e, "f.pbtxt:2:10: field train.steps: '010' has a leading zero");
  e = error_of([&] { parse_config_text("parallel { comm_timeout_s: 0600 }", "f.pbtxt", &c); });
  EXPECT_CONTAINS(e, "field parallel.comm_timeout_s: '0600' has a leading zero");
  e = error_of([&] { parse_config_text("train { seed: 0x10 }", "f.pbtxt", &c); });
  EXPECT_CONTAINS(e, "field train.seed: '0x10' has a leading zero");
  for (const char* o : {"train.steps=010", "train.steps=00", "train.steps=-010", "train.steps=+10", "train.steps= 10",
                        "train.steps=0x10", "train.seed=010"})
    EXPECT_CONTAINS(error_of([&] { apply_override(o, &c); }), std::string("--set ") + o + ": expected an");
  EXPECT_CONTAINS(error_of([&] { apply_override("train.lr=01.5", &c); }), "expected a finite number");
  // Zero itself, decimals below one and exponents are fine.
  EXPECT_NO_THROW(parse_config_text("train { steps: 0 lr: 0.5 weight_decay: 0 grad_clip: 1e-3 }", "f", &c));
  EXPECT_NO_THROW(apply_override("train.steps=0", &c));
  EXPECT_NO_THROW(apply_override("train.lr=0.05", &c));
  EXPECT_NO_THROW(apply_override("train.lr=5e-04", &c));
}

TEST(Config, EnumNamesAreAcceptedInAnyCaseInFiles) {
  pb::LoomConfig c;
  parse_config_text(
      "parallel {\n  layout: contiguous\n  softmax_method: AllGather linear_method: lasp2_allscan\n"
      "  backend: Mpi\n}\n",
      "f", &c);
  EXPECT_EQ(c.parallel().layout(), pb::CONTIGUOUS);
  EXPECT_EQ(c.parallel().softmax_method(), pb::ALLGATHER);
  EXPECT_EQ(c.parallel().linear_method(), pb::LASP2_ALLSCAN);
  EXPECT_EQ(c.parallel().backend(), pb::MPI);
  // Positions of later errors are unchanged by the rewrite.
  const auto e = error_of([&] { parse_config_text("parallel { layout: zigzag\n\tdp: x }", "f", &c); });
  EXPECT_CONTAINS(e, "f:2:");
  EXPECT_CONTAINS(e, "field parallel.dp");
  EXPECT_CONTAINS(error_of([&] { parse_config_text("parallel { layout: diagonal }", "f", &c); }), "diagonal");
  // Strings that look like enum names stay as they are.
  parse_config_text("train { device: 'cpu' } model { feature_map: \"elu\" }", "f", &c);
  EXPECT_EQ(c.model().feature_map(), "elu");
}

TEST(Config, AFieldGivenTwiceIsAnError) {
  pb::LoomConfig c;
  auto e = error_of([&] { parse_config_text("train {\n  steps: 1\n  steps: 2\n}\n", "f.pbtxt", &c); });
  EXPECT_CONTAINS(e, "f.pbtxt:3:3: field train.steps: given twice (first on line 2)");
  e = error_of([&] { parse_config_text("train { steps: 1 }\ntrain { seq_len: 8 }\n", "f.pbtxt", &c); });
  EXPECT_CONTAINS(e, "f.pbtxt:2:1: field train: given twice (first on line 1)");
  // The same name in different sections is two fields.
  EXPECT_NO_THROW(parse_config_text("model { window: 8 } train { steps: 3 } data { task: 'text' }", "f", &c));
}

TEST(Config, BackendMatchesTheDevice) {
  pb::LoomConfig c;
  EXPECT_EQ(c.parallel().backend(), pb::AUTO);
  apply_override("parallel.backend=nccl", &c);
  EXPECT_CONTAINS(error_of([&] { validate_config(c); }), "field parallel.backend = NCCL");
  apply_override("train.device=cuda", &c);
  EXPECT_NO_THROW(validate_config(c));
  apply_override("parallel.backend=mpi", &c);
  EXPECT_CONTAINS(error_of([&] { validate_config(c); }), "field parallel.backend = MPI");
  apply_override("parallel.backend=auto", &c);
  EXPECT_NO_THROW(validate_config(c));
}

TEST(Config, HeadParallelMethodsNameHeadsThatDoNotDivide) {
  pb::LoomConfig c;
  apply_override("model.pattern=AL", &c);
  apply_override("model.n_heads=6", &c);
  apply_override("model.d_model=48", &c);
  apply_override("parallel.softmax_method=usp", &c);
  apply_override("parallel.ulysses_degree=3", &c);
  apply_override("parallel.sp=6", &c);
  EXPECT_NO_THROW(validate_config(c));
  apply_override("parallel.ulysses_degree=4", &c);
  EXPECT_CONTAINS(error_of([&] { validate_config(c); }), "field parallel.ulysses_degree = 4: must divide parallel.sp = 6");
  apply_override("parallel.sp=8", &c);
  EXPECT_CONTAINS(error_of([&] { validate_config(c); }), "field model.n_heads = 6: parallel.softmax_method = USP");
  apply_override("parallel.softmax_method=ulysses", &c);
  EXPECT_CONTAINS(error_of([&] { validate_config(c); }),
                  "field parallel.ulysses_degree = 4: only parallel.softmax_method = USP uses it");
  apply_override("parallel.ulysses_degree=0", &c);
  EXPECT_CONTAINS(error_of([&] { validate_config(c); }), "field model.n_heads = 6: parallel.softmax_method = ULYSSES");
  apply_override("parallel.sp=3", &c);
  EXPECT_NO_THROW(validate_config(c));
  apply_override("parallel.linear_method=linear_ulysses", &c);
  EXPECT_NO_THROW(validate_config(c));
  apply_override("parallel.sp=4", &c);
  EXPECT_CONTAINS(error_of([&] { validate_config(c); }), "parallel.linear_method = LINEAR_ULYSSES");
}

TEST(Config, ValPathIsForTextData) {
  pb::LoomConfig c;
  apply_override("data.val_path=held-out.tok", &c);
  EXPECT_NO_THROW(validate_config(c));
  apply_override("data.task=mqar", &c);
  EXPECT_CONTAINS(error_of([&] { validate_config(c); }), "field data.val_path = 'held-out.tok'");
}

// ---- the environment ----

// Sets (or, with nullopt, unsets) an environment variable for one scope.
class ScopedEnvironment {
 public:
  ScopedEnvironment(const char* name, std::optional<std::string> value) : name_(name) {
    if (const char* old = std::getenv(name)) old_ = old;
    if (value)
      setenv(name, value->c_str(), 1);
    else
      unsetenv(name);
  }
  ~ScopedEnvironment() {
    if (old_)
      setenv(name_, old_->c_str(), 1);
    else
      unsetenv(name_);
  }

 private:
  const char* name_;
  std::optional<std::string> old_;
};

TEST(Config, EnvironmentIsOverTheFileAndUnderSet) {
  // A directory of this process's own: ranks and concurrent test runs must not share the file.
  const testing::ScratchDir dir("loom-config-env");
  const std::string path = dir.file("env.pbtxt");
  std::ofstream(path) << "parallel { comm_timeout_s: 30 threads_per_rank: 3 }\n";
  {
    ScopedEnvironment timeout("LOOM_COMM_TIMEOUT_S", std::nullopt), threads("LOOM_THREADS_PER_RANK", std::nullopt);
    EXPECT_EQ(read_config_sources(path, {}).parallel().comm_timeout_s(), 30);  // file over default
    EXPECT_EQ(read_config_sources("", {}).parallel().comm_timeout_s(), 600);
    EXPECT_EQ(default_comm_timeout(), std::chrono::milliseconds(600000));
  }
  {
    ScopedEnvironment timeout("LOOM_COMM_TIMEOUT_S", "45.5"), threads("LOOM_THREADS_PER_RANK", "2");
    const auto env = read_config_sources(path, {});  // environment over file
    EXPECT_EQ(env.parallel().comm_timeout_s(), 45.5);
    EXPECT_EQ(env.parallel().threads_per_rank(), 2);
    EXPECT_EQ(default_comm_timeout(), std::chrono::milliseconds(45500));
    const auto set = read_config_sources(path, {"parallel.comm_timeout_s=60", "parallel.threads_per_rank=0"});
    EXPECT_EQ(set.parallel().comm_timeout_s(), 60);  // --set over environment
    EXPECT_EQ(set.parallel().threads_per_rank(), 0);
    EXPECT_EQ(models::resolve_run_config(path, {}).parallel().comm_timeout_s(), 45.5);  // what loom-train runs
  }
  {
    ScopedEnvironment empty("LOOM_COMM_TIMEOUT_S", "");  // set to nothing: as if unset
    EXPECT_EQ(read_config_sources(path, {}).parallel().comm_timeout_s(), 30);
  }
}

TEST(Config, BadEnvironmentValuesNameTheVariableAndTheField) {
  auto error_with = [](const char* name, const char* value) {
    ScopedEnvironment env(name, value);
    return error_of([] { read_config_sources("", {}); });
  };
  EXPECT_CONTAINS(error_with("LOOM_COMM_TIMEOUT_S", "soon"),
                  "environment variable LOOM_COMM_TIMEOUT_S=soon (sets parallel.comm_timeout_s): expected a finite number");
  EXPECT_CONTAINS(error_with("LOOM_COMM_TIMEOUT_S", "0"),
                  "environment variable LOOM_COMM_TIMEOUT_S=0 (sets parallel.comm_timeout_s): must be >= 0.001");
  EXPECT_CONTAINS(error_with("LOOM_COMM_TIMEOUT_S", "inf"), "LOOM_COMM_TIMEOUT_S=inf");
  EXPECT_CONTAINS(error_with("LOOM_COMM_TIMEOUT_S", "1e9"), "must be <= 604800");
  EXPECT_CONTAINS(error_with("LOOM_THREADS_PER_RANK", "-2"),
                  "environment variable LOOM_THREADS_PER_RANK=-2 (sets parallel.threads_per_rank): must be >= 0");
  EXPECT_CONTAINS(error_with("LOOM_THREADS_PER_RANK", "04"), "LOOM_THREADS_PER_RANK=04");
  EXPECT_CONTAINS(error_with("LOOM_THREADS_PER_RANK", "many"), "expected an integer");
  {
    ScopedEnvironment env("LOOM_COMM_TIMEOUT_S", "-1");
    EXPECT_THROW(default_comm_timeout(), ConfigError);
  }
}

}  // namespace
}  // namespace loom
