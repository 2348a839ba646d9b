// Config parsing, overrides and validation: every error names the field.
#include <gtest/gtest.h>

#include "loom/runtime/core/config.h"
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

}  // namespace
}  // namespace loom
