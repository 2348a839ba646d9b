// loom-bench's sweep parser (named errors) and cost model arithmetic.
#include <gtest/gtest.h>

#include "benchmarks/cost_model.h"
#include "benchmarks/sweep.h"
#include "loom/runtime/core/config.h"
#include "loom/runtime/core/error.h"

namespace loom::bench {
namespace {

pb::BenchSweep parse(const std::string& text) {
  pb::BenchSweep s;
  parse_text_message(text, "sweep.pbtxt", &s);
  return s;
}

void expect_error(const std::string& text, const std::string& fragment, int ranks = 4) {
  try {
    validate_sweep(parse(text), ranks, "sweep.pbtxt");
    FAIL() << "accepted: " << text;
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find(fragment), std::string::npos) << e.what();
  }
}

const std::string kGood = "methods: ['lasp2'] subjects: ['linear_layer'] seq_lens: [64] ";

TEST(BenchSweep, ValidSweepPasses) { EXPECT_NO_THROW(validate_sweep(parse(kGood), 2, "s")); }

TEST(BenchSweep, BadSweepsGiveNamedErrors) {
  expect_error("methods: ['lasp3'] subjects: ['linear_layer'] seq_lens: [64]", "methods = 'lasp3': allowed values are lasp2");
  expect_error("methods: ['lasp2'] subjects: ['mlp'] seq_lens: [64]", "subjects = 'mlp'");
  expect_error("subjects: ['linear_layer'] seq_lens: [64]", "methods: at least one");
  expect_error(kGood + "world_sizes: [8]", "world_sizes = 8: must be in [1, 4]");
  expect_error(kGood + "dtype: 'int8'", "dtype = 'int8'");
  expect_error(kGood + "reps: 0", "reps = 0");
  expect_error("methods: ['lasp2'] subjects: ['linear_layer'] seq_lens: [1]", "seq_lens = 1");
  expect_error(kGood + "clusters { name: 'x' latency_s: 1e-6 bandwidth_bytes_per_s: 1e9 }", "compute_flops must be > 0");
  expect_error(kGood + "limit_methods: ['lasp2']", "memory_cap_bytes");
  expect_error(kGood + "clusters { name: 'x' latency_s: 1e-6 bandwidth_bytes_per_s: 1e9 compute_flops: 1e12 }",
               "projection_world_sizes");
  try {
    parse("methods: ['lasp2']\nbogus_field: 3\n");
    FAIL();
  } catch (const ConfigError& e) {
    EXPECT_NE(std::string(e.what()).find("sweep.pbtxt:2"), std::string::npos) << e.what();
    EXPECT_NE(std::string(e.what()).find("bogus_field"), std::string::npos) << e.what();
  }
}

TEST(BenchCostModel, BytesFormulasFollowTheReferences) {
  Shape s;
  s.batch = 1, s.heads = 4, s.kv_heads = 2, s.head_dim = 8, s.element_bytes = 4;
  // LASP-2: (W-1) B H dk dv b, independent of N.
  EXPECT_EQ(forward_bytes_formula(Subject::kLinearLayer, Method::kLasp2, s, 1024, 4), 3 * 4 * 8 * 8 * 4);
  EXPECT_EQ(forward_bytes_formula(Subject::kLinearLayer, Method::kLasp2, s, 4096, 4), 3 * 4 * 8 * 8 * 4);
  // Ring / all-gather: (W-1)/W 2 N H_kv d b.
  EXPECT_EQ(forward_bytes_formula(Subject::kSoftmaxLayer, Method::kRingContiguous, s, 1024, 4), 3 * 2 * 256 * 2 * 8 * 4);
  EXPECT_EQ(forward_bytes_formula(Subject::kSoftmaxLayer, Method::kAllGather, s, 1024, 4), 3 * 2 * 256 * 2 * 8 * 4);
  EXPECT_EQ(forward_bytes_formula(Subject::kSoftmaxLayer, Method::kRingZigzag, s, 2048, 4),
            2 * forward_bytes_formula(Subject::kSoftmaxLayer, Method::kRingContiguous, s, 1024, 4));
  EXPECT_EQ(forward_bytes_formula(Subject::kLinearLayer, Method::kNone, s, 1024, 4), 0);
}

TEST(BenchCostModel, CommunicationAndWorkArithmetic) {
  Shape s;
  s.batch = 1, s.heads = 2, s.kv_heads = 2, s.head_dim = 4, s.element_bytes = 4;
  const Network net{1e-5, 1e8};
  // LASP-2 at W=4: 2 x 3 messages of B H d d b = 128 bytes.
  EXPECT_DOUBLE_EQ(comm_seconds(Subject::kLinearLayer, Method::kLasp2, s, 64, 4, net), 6 * (1e-5 + 128 / 1e8));
  // LASP-2 all-scan: 2 ceil(log2 W) messages.
  EXPECT_DOUBLE_EQ(comm_seconds(Subject::kLinearLayer, Method::kLasp2AllScan, s, 64, 8, net), 6 * (1e-5 + 128 / 1e8));
  // Ring: 3 (W-1) messages of one K,V chunk (2 x 16 tokens x 2 heads x 4 x 4 bytes = 1024).
  EXPECT_DOUBLE_EQ(comm_seconds(Subject::kSoftmaxLayer, Method::kRingContiguous, s, 64, 4, net), 9 * (1e-5 + 1024 / 1e8));
  // Work: contiguous ring's last rank sees N c - c^2/2 pairs; zigzag N^2/(2W).
  EXPECT_DOUBLE_EQ(work_units(Subject::kSoftmaxLayer, Method::kRingContiguous, 1000, 4).second, (1000.0 * 250 - 250.0 * 125) / 1e6);
  EXPECT_DOUBLE_EQ(work_units(Subject::kSoftmaxLayer, Method::kRingZigzag, 1000, 4).second, 1000.0 * 1000 / 8 / 1e6);
  // Oversubscribed (2 ranks at once): the whole work over 2.
  EXPECT_DOUBLE_EQ(work_units(Subject::kSoftmaxLayer, Method::kRingZigzag, 1000, 4, 2).second, 1000.0 * 1000 / 4 / 1e6);
  EXPECT_DOUBLE_EQ(work_units(Subject::kLinearLayer, Method::kLasp2, 1000, 4, 2).first, 500.0);
}

TEST(BenchCostModel, CalibrationRecoversKnownCoefficients) {
  Shape s;
  const Network net{2e-6, 5e9};
  CostModel truth_free(s, net);
  std::vector<Observation> obs;
  // Synthetic times: 0.001 + 3e-6 per token + 0.02 per 1e6 pairs + the model's own comm.
  for (auto m : {Method::kRingContiguous, Method::kRingZigzag, Method::kAllGather})
    for (int64_t n : {1024, 2048, 4096, 8192}) {
      const auto [x1, x2] = work_units(Subject::kSoftmaxLayer, m, n, 4);
      obs.push_back({Subject::kSoftmaxLayer, m, 4, n,
                     0.001 + 3e-6 * x1 + 0.02 * x2 + comm_seconds(Subject::kSoftmaxLayer, m, s, n, 4, net)});
    }
  truth_free.calibrate(obs);
  const auto [c, a, b] = truth_free.fit(Subject::kSoftmaxLayer, 4).coef;
  EXPECT_EQ(truth_free.fit(Subject::kSoftmaxLayer, 4).exponent, 1.0);
  EXPECT_NEAR(c, 0.001, 1e-9);
  EXPECT_NEAR(a, 3e-6, 1e-12);
  EXPECT_NEAR(b, 0.02, 1e-9);
  for (const auto& o : obs) EXPECT_NEAR(truth_free.predict(o.subject, o.method, o.n_tokens, 4) / o.measured_s, 1.0, 1e-9);
  EXPECT_THROW(truth_free.fit(Subject::kLinearLayer, 4), LoomError);
}

TEST(BenchCostModel, CalibrationFindsASuperlinearTokenExponent) {
  Shape s;
  const Network net{2e-6, 5e9};
  CostModel model(s, net);
  std::vector<Observation> obs;
  for (auto m : {Method::kLasp2, Method::kLasp1})
    for (int64_t n : {2048, 4096, 8192, 16384}) {
      const double x1 = work_units(Subject::kLinearLayer, m, n, 2).first;
      obs.push_back({Subject::kLinearLayer, m, 2, n,
                     1e-7 * std::pow(x1, 1.2) + comm_seconds(Subject::kLinearLayer, m, s, n, 2, net)});
    }
  model.calibrate(obs);
  EXPECT_NEAR(model.fit(Subject::kLinearLayer, 2).exponent, 1.2, 1e-9);
  for (const auto& o : obs) EXPECT_NEAR(model.predict(o.subject, o.method, o.n_tokens, 2) / o.measured_s, 1.0, 1e-6);
}

TEST(BenchCostModel, ProjectionOrdersTheMethods) {
  pb::ClusterConstants c;
  c.set_latency_s(5e-6);
  c.set_bandwidth_bytes_per_s(25e9);
  c.set_compute_flops(150e12);
  ProjectedModel m;
  m.params_non_embedding = 1'000'000'000;
  const Projection l2 = project(Method::kLasp2, m, c, 2 << 20, 64), l1 = project(Method::kLasp1, m, c, 2 << 20, 64),
                   ring = project(Method::kRingZigzag, m, c, 2 << 20, 64);
  EXPECT_DOUBLE_EQ(l2.compute_s, l1.compute_s);
  EXPECT_LE(l2.seconds, l1.seconds);
  EXPECT_LT(l1.seconds, ring.seconds);
}

}  // namespace
}  // namespace loom::bench
