// MQAR and S-NIAH generators and the accuracy metric.
#include <gtest/gtest.h>

#include <map>
#include <set>

#include "loom/runtime/core/error.h"
#include "loom/runtime/data/synthetic_tasks.h"

namespace loom {
namespace {

TEST(SyntheticTasks, MqarPairsAndQueries) {
  const int64_t L = 128, pairs = 8, V = 512;
  const Batch b = mqar_batch(10, 4, L, pairs, V, 3);
  for (int64_t e = 0; e < 4; ++e) {
    std::map<int64_t, int64_t> value_of;
    std::set<int64_t> keys;
    for (int64_t i = 0; i < pairs; ++i) {
      const int64_t k = b.inputs[e][2 * i].item<int64_t>(), v = b.inputs[e][2 * i + 1].item<int64_t>();
      EXPECT_TRUE(k >= 1 && k < V / 2) << k;
      EXPECT_TRUE(v >= V / 2 && v < V) << v;
      EXPECT_TRUE(keys.insert(k).second) << "key " << k << " repeated";
      value_of[k] = v;
    }
    int64_t queries = 0;
    for (int64_t p = 0; p < L; ++p) {
      const int64_t label = b.labels[e][p].item<int64_t>();
      if (label == -100) continue;
      ++queries;
      EXPECT_GE(p, 2 * pairs);
      EXPECT_EQ(label, value_of.at(b.inputs[e][p].item<int64_t>()));
    }
    EXPECT_EQ(queries, pairs);
  }
  // A pure function of the sample index.
  EXPECT_TRUE(at::equal(mqar_batch(11, 1, L, pairs, V, 3).inputs[0], b.inputs[1]));
  EXPECT_THROW(mqar_batch(0, 1, 16, 8, V, 3), ConfigError);
}

TEST(SyntheticTasks, SniahLabelsTheFiveDigits) {
  const Batch b = sniah_batch(0, 2, 256, 5);
  for (int64_t e = 0; e < 2; ++e) {
    std::string text;
    for (int64_t i = 0; i < 256; ++i) text += static_cast<char>(b.inputs[e][i].item<int64_t>());
    const std::string key = text.substr(256 - 5);
    EXPECT_NE(text.find("The pass key is " + key + ". Remember it."), std::string::npos) << text;
    for (int64_t d = 0; d < 5; ++d) EXPECT_EQ(b.labels[e][256 - 6 + d].item<int64_t>(), key[d]);
    EXPECT_EQ(b.labels[e].ne(-100).sum().item<int64_t>(), 5);
  }
}

TEST(SyntheticTasks, AccuracyCountsPositionsAndGroups) {
  at::Tensor labels = at::full({1, 6}, -100, at::kLong);
  labels[0][1] = 2;
  labels[0][2] = 3;
  labels[0][4] = 1;
  at::Tensor logits = at::zeros({1, 6, 4});
  logits[0][1][2] = 1;  // right
  logits[0][2][0] = 1;  // wrong
  logits[0][4][1] = 1;  // right
  EXPECT_EQ(labelled_accuracy(logits, labels), std::make_pair(int64_t(2), int64_t(3)));
  EXPECT_EQ(labelled_accuracy(logits, labels, 3), std::make_pair(int64_t(0), int64_t(1)));
}

}  // namespace
}  // namespace loom
