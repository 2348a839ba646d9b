// Mixed precision on the CPU: one training step of a tiny model in bf16
// (parameters and activations bf16, float32 master weights and moments,
// float32 LASP states, attention partials, Titans memory and loss) against the
// same step in float32, at sp = world size. Tolerances are bf16's: 8 bits of
// mantissa give ~4e-3 relative rounding per operation, and a step compounds a
// few dozen of them.
#include <gtest/gtest.h>

#include <cmath>

#include "distributed_reference.h"
#include "loom/models/hybrid_lm.h"
#include "loom/runtime/comm/comm_order.h"
#include "loom/runtime/comm/mpi_communicator.h"
#include "loom/runtime/train/optimizer.h"

namespace loom::models {
namespace {

constexpr double kLossRtol = 2e-2;      // relative error of the loss
constexpr double kGradRtol = 6e-2;      // ||g_bf16 - g_f32|| / ||g_f32|| per parameter

double relative_l2(const at::Tensor& actual, const at::Tensor& expected) {
  const at::Tensor a = actual.to(at::kDouble), e = expected.to(at::kDouble);
  return (a - e).norm().item<double>() / std::max(e.norm().item<double>(), 1e-12);
}

struct Step {
  double loss;
  NamedTensors params;  // after backward: .grad() set
};

Step loss_and_gradients(HybridLM& model, const at::Tensor& tokens, const SequenceContext& ctx, int64_t total) {
  const int r = ctx.comm->rank();
  const int64_t n = tokens.size(1) - 1;
  const at::Tensor input = ctx.layout.shard(tokens.narrow(1, 0, n), r, 1, 0);
  const at::Tensor labels = ctx.layout.shard(tokens.narrow(1, 1, n), r, 1, -100);
  model->zero_grad();
  const at::Tensor logits = model(input, ctx);
  const at::Tensor loss =
      at::nll_loss(at::log_softmax(logits.reshape({-1, logits.size(-1)}).to(at::kFloat), -1), labels.reshape({-1}),
                   {}, at::Reduction::Sum, -100) /
      static_cast<double>(total);
  EXPECT_EQ(loss.scalar_type(), at::kFloat) << "the loss must be float32";
  loss.backward();
  at::Tensor sum = loss.detach().to(at::kDouble).reshape({1});
  ctx.comm->all_reduce(sum)->wait();
  Step s{sum.item<double>(), {}};
  for (const auto& p : model->named_parameters()) s.params.emplace_back(p.key(), p.value());
  all_reduce_gradients(s.params, *ctx.comm);
  return s;
}

// Ranks hold 1 and then 2^-8 each: summed in bf16, every partial 1 + 2^-8 is a tie that rounds back to 1;
// summed in float32 and rounded once, 1 + (W-1) 2^-8 rounds to the nearest bf16. The reduced gradient must be
// the latter, on every rank, also for a parameter that has no gradient on any rank (zeros, bf16).
TEST(MixedPrecisionGradients, Bf16GradientsAreSummedInFloat32AndRoundedOnce) {
  auto comm = MpiCommunicator::world();
  const int W = comm->size();
  const auto bf16 = at::TensorOptions().dtype(at::kBFloat16);
  at::Tensor p = at::zeros({3}, bf16).requires_grad_(true), unused = at::zeros({2}, bf16).requires_grad_(true);
  p.mutable_grad() = at::full({3}, comm->rank() == 0 ? 1.0 : std::ldexp(1.0, -8), bf16);
  NamedTensors params{{"p", p}, {"unused", unused}};
  all_reduce_gradients(params, *comm);
  const at::Tensor expected = at::full({3}, 1.0 + (W - 1) * std::ldexp(1.0, -8), bf16.dtype(at::kFloat))
                                  .to(at::kBFloat16);
  EXPECT_EQ(p.grad().scalar_type(), at::kBFloat16);
  EXPECT_TRUE(at::equal(p.grad(), expected)) << p.grad() << " vs " << expected;
  ASSERT_TRUE(unused.grad().defined());
  EXPECT_EQ(unused.grad().scalar_type(), at::kBFloat16);
  EXPECT_TRUE(at::equal(unused.grad(), at::zeros({2}, bf16)));
}

class MixedPrecision : public ::testing::TestWithParam<std::string> {};

TEST_P(MixedPrecision, Bf16StepMatchesFloat32Step) {
  auto comm = MpiCommunicator::world();
  const int W = comm->size();
  pb::ModelConfig user;
  user.set_preset(GetParam());
  const pb::ModelConfig config = resolve_model_config(user);
  torch::manual_seed(5);
  HybridLM reference(config);
  torch::manual_seed(5);
  HybridLM mixed(config);
  mixed->set_precision(at::kBFloat16);

  const int64_t n = 24 * W;
  at::Generator gen = at::detail::createCPUGenerator(17);
  const at::Tensor tokens = at::randint(0, config.vocab_size(), {2, n + 1}, gen, at::kLong);
  const SequenceContext ctx{SequenceLayout(LayoutKind::kZigzag, n, W), comm};

  const CommStats before_ref = comm->stats();
  const Step ref = loss_and_gradients(reference, tokens, ctx, 2 * n);
  const CommStats ref_traffic = comm->stats() - before_ref;
  const CommStats before_bf16 = comm->stats();
  const Step got = loss_and_gradients(mixed, tokens, ctx, 2 * n);
  const CommStats bf16_traffic = comm->stats() - before_bf16;

  EXPECT_NEAR(got.loss / ref.loss, 1.0, kLossRtol) << "bf16 loss " << got.loss << " vs float32 " << ref.loss;
  for (size_t i = 0; i < ref.params.size(); ++i) {
    const auto& [name, p] = got.params[i];
    const bool titans_mixer = name.find("_mixer.") != std::string::npos &&
                              is_titans_mixer(config.pattern()[std::stoi(name.substr(5))]);
    EXPECT_EQ(p.scalar_type(), titans_mixer ? at::kFloat : at::kBFloat16) << name;
    ASSERT_TRUE(p.grad().defined()) << name;
    EXPECT_LE(relative_l2(p.grad(), ref.params[i].second.grad()), kGradRtol) << name;
  }
  if (config.pattern().find_first_of("AW") == std::string::npos && W > 1) {
    // Only linear attention and Titans cross ranks: their states travel in float32,
    // so the bf16 step moves exactly as many bytes as the float32 one.
    EXPECT_EQ(bf16_traffic[OpType::kAllGather].bytes_received, ref_traffic[OpType::kAllGather].bytes_received);
  }

  // One AdamW step: the update runs on float32 master weights, exactly as a
  // float32 AdamW would from the same (rounded) weights and gradients, and the
  // bf16 parameter is the master rounded once.
  NamedTensors shadow;
  for (const auto& [name, p] : got.params) {
    at::Tensor w = p.detach().to(at::kFloat).clone().requires_grad_(true);
    w.mutable_grad() = p.grad().to(at::kFloat);
    shadow.emplace_back(name, w);
  }
  AdamW got_opt(got.params, 0.1), shadow_opt(shadow, 0.1);
  got_opt.step(1e-3);
  shadow_opt.step(1e-3);
  std::map<std::string, at::Tensor> state;
  for (const auto& [name, t] : got_opt.state()) state[name] = t;
  for (size_t i = 0; i < got.params.size(); ++i) {
    const auto& [name, p] = got.params[i];
    const at::Tensor expected = shadow[i].second.detach();
    if (p.scalar_type() != at::kBFloat16) {
      EXPECT_TRUE(at::equal(p.detach(), expected)) << name;
      continue;
    }
    ASSERT_TRUE(state.count(name + "/master")) << name;
    const at::Tensor& master = state[name + "/master"];
    EXPECT_EQ(master.scalar_type(), at::kFloat) << name;
    EXPECT_EQ(state[name + "/exp_avg"].scalar_type(), at::kFloat) << name;
    EXPECT_TRUE(at::allclose(master, expected, 0, 0)) << name << ": master differs from a float32 AdamW step";
    EXPECT_TRUE(at::equal(p.detach(), master.to(at::kBFloat16))) << name << ": parameter is not the rounded master";
    // The update (lr 1e-3) is below bf16's resolution for weights near 1:
    // without the master it would be lost; with it, the master moved.
    EXPECT_FALSE(at::equal(master, p.detach().to(at::kFloat))) << name;
  }
}

INSTANTIATE_TEST_SUITE_P(TinyPresets, MixedPrecision,
                         ::testing::Values("tiny-based", "tiny-linear-llama", "tiny-linear-llama-hybrid",
                                           "tiny-titans-mag", "tiny-titans-mac"),
                         loom::testing::preset_test_name);

}  // namespace
}  // namespace loom::models
