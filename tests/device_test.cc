// Device independence of the operators: every sequence-parallel operator runs
// forward and backward with its inputs on the `meta` device. The meta device
// only computes shapes, and any tensor an operator creates on a hard-coded
// device (a CPU arange, mask, decay table or buffer) meets a meta tensor and
// fails: the CPU stand-in for "nothing assumes the CPU" on CUDA. A group of one
// rank is used because only then do collectives accept non-CPU tensors on the
// MPI backend (they are local copies).
//
// Modules are covered too: libtorch cannot move parameters from the CPU to
// meta (set_data refuses the change of tensor type), so the test builds each
// tiny preset directly on meta (HybridLM takes factory options).
#include <gtest/gtest.h>
#include <torch/utils.h>

#include <functional>
#include <torch/cuda.h>
#include <torch/library.h>
#include <torch/version.h>

#include "distributed_reference.h"
#include "loom/models/feature_maps.h"
#include "loom/models/hybrid_lm.h"
#include "loom/parallel/linear_attention/decay.h"
#include "loom/parallel/linear_attention/lasp.h"
#include "loom/parallel/short_conv.h"
#include "loom/parallel/softmax_attention/fused_attention.h"
#include "loom/parallel/softmax_attention/rotary.h"
#include "loom/parallel/softmax_attention/softmax_attention.h"
#include "loom/runtime/comm/comm_order.h"
#include "loom/runtime/comm/mpi_communicator.h"

#if TORCH_VERSION_MAJOR < 2
// libtorch 1.13 has no Meta kernels for a few operators that Loom uses (2.x
// has them all). These shape functions fill the gap for this test only: they
// compute output shapes, as every Meta kernel does.
namespace meta_shapes {

at::Tensor index_select(const at::Tensor& self, int64_t dim, const at::Tensor& index) {
  auto shape = self.sizes().vec();
  if (!shape.empty()) shape[at::maybe_wrap_dim(dim, self.dim())] = index.numel();
  return at::empty(shape, self.options());
}

at::Tensor& logical_and_out(const at::Tensor& self, const at::Tensor& other, at::Tensor& out) {
  out.resize_(at::infer_size(self.sizes(), other.sizes()));
  return out;
}

at::Tensor& unary_out(const at::Tensor& self, at::Tensor& out) {
  out.resize_(self.sizes());
  return out;
}

at::Tensor unary(const at::Tensor& self) { return at::empty_like(self); }

at::Tensor flip(const at::Tensor& self, at::IntArrayRef /*dims*/) { return at::empty_like(self); }

at::Tensor embedding_backward(const at::Tensor& grad_output, const at::Tensor& /*indices*/, c10::SymInt num_weights,
                              int64_t /*padding_idx*/, bool /*scale_grad_by_freq*/) {
  return at::empty({num_weights.expect_int(), grad_output.size(-1)}, grad_output.options());
}

at::Tensor where(const at::Tensor& condition, const at::Tensor& self, const at::Tensor& other) {
  const auto shape = at::infer_size(at::infer_size(condition.sizes(), self.sizes()), other.sizes());
  return at::empty(shape, self.options().dtype(at::promote_types(self.scalar_type(), other.scalar_type())));
}

std::tuple<at::Tensor, at::Tensor> log_sigmoid_forward(const at::Tensor& self) {
  return {at::empty_like(self), at::empty_like(self)};
}

at::Tensor log_sigmoid_backward(const at::Tensor& grad_output, const at::Tensor& /*self*/,
                                const at::Tensor& /*buffer*/) {
  return at::empty_like(grad_output);
}

at::Tensor convolution(const at::Tensor& input, const at::Tensor& weight, const c10::optional<at::Tensor>& /*bias*/,
                       at::IntArrayRef stride, at::IntArrayRef padding, at::IntArrayRef dilation, bool transposed,
                       at::IntArrayRef /*output_padding*/, int64_t /*groups*/) {
  TORCH_CHECK(!transposed, "meta convolution shim: transposed convolution not covered");
  std::vector<int64_t> shape{input.size(0), weight.size(0)};
  for (int64_t i = 2; i < input.dim(); ++i) {
    const int64_t j = i - 2;
    shape.push_back((input.size(i) + 2 * padding[j] - dilation[j] * (weight.size(i) - 1) - 1) / stride[j] + 1);
  }
  return at::empty(shape, input.options());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> convolution_backward(
    const at::Tensor& /*grad_output*/, const at::Tensor& input, const at::Tensor& weight, at::IntArrayRef /*stride*/,
    at::IntArrayRef /*padding*/, at::IntArrayRef /*dilation*/, bool /*transposed*/, at::IntArrayRef /*output_padding*/,
    int64_t /*groups*/, std::array<bool, 3> mask) {
  return {mask[0] ? at::empty_like(input) : at::Tensor(), mask[1] ? at::empty_like(weight) : at::Tensor(),
          mask[2] ? at::empty({weight.size(0)}, weight.options()) : at::Tensor()};
}

}  // namespace meta_shapes

TORCH_LIBRARY_IMPL(aten, Meta, m) {
  m.impl("index_select", TORCH_FN(meta_shapes::index_select));
  m.impl("logical_and.out", TORCH_FN(meta_shapes::logical_and_out));
  m.impl("logical_not.out", TORCH_FN(meta_shapes::unary_out));
  m.impl("relu", TORCH_FN(meta_shapes::unary));
  m.impl("abs.out", TORCH_FN(meta_shapes::unary_out));
  m.impl("where.self", TORCH_FN(meta_shapes::where));
  m.impl("flip", TORCH_FN(meta_shapes::flip));
  m.impl("log_sigmoid_forward", TORCH_FN(meta_shapes::log_sigmoid_forward));
  m.impl("log_sigmoid_backward", TORCH_FN(meta_shapes::log_sigmoid_backward));
  m.impl("embedding_dense_backward", TORCH_FN(meta_shapes::embedding_backward));
  m.impl("convolution_overrideable", TORCH_FN(meta_shapes::convolution));
  m.impl("convolution_backward_overrideable", TORCH_FN(meta_shapes::convolution_backward));
}
#endif

namespace loom {
namespace {

const at::Device kMeta("meta");

at::Tensor meta_leaf(at::IntArrayRef shape) {
  return at::empty(shape, at::TensorOptions().dtype(at::kFloat).device(kMeta)).requires_grad_(true);
}

CommPtr one_rank() {
  auto world = MpiCommunicator::world();
  return world->split(world->rank(), 0);
}

// The operators of Loom's models that lack a C++ Meta kernel in some libtorch: 1.13 gets the shims above;
// PyTorch 2.x wheels register these from Python (torch._meta_registrations), so a C++-only program on
// them cannot run the meta device. Returns the first missing one, or "" when all run.
std::string missing_meta_kernel() {
  const auto meta = at::TensorOptions().device(kMeta);
  const std::vector<std::pair<std::string, std::function<void()>>> probes = {
      {"index_select", [&] { at::index_select(at::empty({3, 2}, meta), 0, at::zeros({2}, meta.dtype(at::kLong))); }},
      {"logical_and", [&] { at::logical_and(at::empty({2}, meta.dtype(at::kBool)), at::empty({2}, meta.dtype(at::kBool))); }},
      {"conv1d", [&] { at::conv1d(at::empty({1, 2, 5}, meta), at::empty({2, 1, 3}, meta), at::Tensor(), at::IntArrayRef{1}, at::IntArrayRef{0}, at::IntArrayRef{1}, 2); }},
  };
  for (const auto& [name, probe] : probes) {
    try {
      probe();
    } catch (const c10::Error&) {
      return name;
    }
  }
  return "";
}

#define SKIP_WITHOUT_META_KERNELS()                                                                         \
  if (const std::string missing = missing_meta_kernel(); !missing.empty())                                \
  GTEST_SKIP() << "this libtorch has no C++ Meta kernel for " << missing                                  \
               << " (PyTorch 2.x registers it from Python); the meta-device tests run on libtorch 1.13 (CI)"

void expect_meta_gradients(const at::Tensor& out, const std::vector<at::Tensor>& leaves, const std::string& what) {
  EXPECT_TRUE(out.device().is_meta()) << what;
  out.sum().backward();
  for (size_t i = 0; i < leaves.size(); ++i) {
    ASSERT_TRUE(leaves[i].grad().defined()) << what << ": input " << i << " has no gradient";
    EXPECT_TRUE(leaves[i].grad().device().is_meta()) << what << ": input " << i;
    EXPECT_EQ(leaves[i].grad().sizes(), leaves[i].sizes()) << what << ": input " << i;
  }
}

TEST(DeviceAgnostic, LinearAttentionRunsOnTheMetaDevice) {
  SKIP_WITHOUT_META_KERNELS();
  const CommPtr comm = one_rank();
  const int64_t n = 37;  // not a multiple of the block: the ragged tail too
  for (auto method : {linear_attention::LinearAttentionMethod::kLasp2,
                      linear_attention::LinearAttentionMethod::kLasp2AllScan,
                      linear_attention::LinearAttentionMethod::kLasp1})
    for (auto kind : {LayoutKind::kContiguous, LayoutKind::kZigzag})
      for (bool decay : {false, true}) {
        linear_attention::LinearAttentionOptions options;
        options.block_size = 8;
        options.normalize = true;
        if (decay) options.decay = linear_attention::default_decay(2);
        const SequenceLayout layout(kind, n, 1);
        at::Tensor q = meta_leaf({1, 2, layout.local_len(), 4}), k = meta_leaf({1, 2, layout.local_len(), 4}),
                   v = meta_leaf({1, 2, layout.local_len(), 3});
        const at::Tensor out =
            linear_attention::sequence_parallel_linear_attention(q, k, v, layout, comm, method, options);
        expect_meta_gradients(out, {q, k, v},
                              std::string(linear_attention::method_name(method)) + " " + layout_kind_name(kind));
      }
}

TEST(DeviceAgnostic, SoftmaxAttentionRunsOnTheMetaDevice) {
  SKIP_WITHOUT_META_KERNELS();
  const CommPtr comm = one_rank();
  const SequenceLayout layout(LayoutKind::kZigzag, 40, 1);
  using softmax_attention::SoftmaxMethod;
  for (auto method : {SoftmaxMethod::kLocal, SoftmaxMethod::kRing, SoftmaxMethod::kAllGather})
    for (int64_t window : {0, 5}) {
      softmax_attention::AttentionSpec spec;
      spec.block = 16;
      spec.window = window;
      at::Tensor q = meta_leaf({1, 4, 40, 8}), k = meta_leaf({1, 2, 40, 8}), v = meta_leaf({1, 2, 40, 8});
      const at::Tensor positions = layout.global_positions(0);
      const at::Tensor qr = softmax_attention::apply_rotary(q, positions, 10000.0);
      const at::Tensor kr = softmax_attention::apply_rotary(k, positions, 10000.0);
      auto [out, lse] = softmax_attention::attention_with_lse(qr, kr, v, layout, comm, method, spec);
      EXPECT_TRUE(lse.device().is_meta());
      expect_meta_gradients(out, {q, k, v}, std::string(method_name(method)) + " window " + std::to_string(window));
    }
}

TEST(DeviceAgnostic, ShortConvolutionAndFeatureMapsRunOnTheMetaDevice) {
  SKIP_WITHOUT_META_KERNELS();
  const CommPtr comm = one_rank();
  const SequenceLayout layout(LayoutKind::kContiguous, 12, 1);
  at::Tensor x = meta_leaf({2, 12, 6}), w = meta_leaf({6, 3}), b = meta_leaf({6});
  expect_meta_gradients(causal_depthwise_conv(x, w, b, layout, comm), {x, w, b}, "short conv");
  for (auto kind : {models::FeatureMapKind::kElu, models::FeatureMapKind::kRelu, models::FeatureMapKind::kTaylor,
                    models::FeatureMapKind::kHedgehog}) {
    models::ParameterScope on_meta(at::TensorOptions().device(kMeta));  // Hedgehog's weights
    models::FeatureMap phi(kind, 2, 4, 6);
    at::Tensor in = meta_leaf({1, 2, 5, 4});
    expect_meta_gradients(phi(in), {in}, models::feature_map_name(kind));
  }
}

class DeviceAgnosticModel : public ::testing::TestWithParam<std::string> {};

TEST_P(DeviceAgnosticModel, PresetRunsForwardAndBackwardOnTheMetaDevice) {
  SKIP_WITHOUT_META_KERNELS();
  const CommPtr comm = one_rank();
  pb::ModelConfig user;
  user.set_preset(GetParam());
  models::HybridLM model(models::resolve_model_config(user), at::TensorOptions().device(kMeta));
  for (const auto& p : model->named_parameters()) ASSERT_TRUE(p.value().device().is_meta()) << p.key();
  const int64_t n = 48;
  const models::SequenceContext ctx =
      models::make_context(pb::ParallelConfig(), SequenceLayout(LayoutKind::kContiguous, n, 1), comm);
  const at::Tensor tokens = at::zeros({2, n}, at::TensorOptions().dtype(at::kLong).device(kMeta));
  const at::Tensor logits = model(tokens, ctx);
  EXPECT_EQ(logits.sizes(), (std::vector<int64_t>{2, n, model->config().vocab_size()}));
  std::vector<at::Tensor> params;
  for (const auto& p : model->parameters()) params.push_back(p);
  expect_meta_gradients(logits, params, GetParam());
}

INSTANTIATE_TEST_SUITE_P(TinyPresets, DeviceAgnosticModel,
                         ::testing::ValuesIn(loom::testing::tiny_presets()),
                         loom::testing::preset_test_name);

}  // namespace
}  // namespace loom

// ---- on a GPU: the same operators and models on CUDA against the CPU ----
// Skipped where no CUDA device is visible (CI); launch/device-check.sh runs
// them on the GPU machine. float64 on both sides: agreement to 1e-9.
namespace loom {
namespace {

bool cuda_visible() { return torch::cuda::is_available(); }

::testing::AssertionResult close_to_cpu(const at::Tensor& cuda, const at::Tensor& cpu, const std::string& what) {
  const at::Tensor a = cuda.to(at::kCPU);
  const double scale = std::max(cpu.abs().max().item<double>(), 1e-3);
  const double err = (a - cpu).abs().max().item<double>() / scale;
  if (err <= 1e-9) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << what << ": CUDA differs from CPU by " << err << " (relative)";
}

// Runs `op` on CPU and CUDA copies of `inputs` (float64) and compares outputs
// and input gradients.
void expect_cuda_matches_cpu(const std::vector<at::Tensor>& inputs,
                             const std::function<at::Tensor(const std::vector<at::Tensor>&)>& op,
                             const std::string& what) {
  std::vector<at::Tensor> cpu, gpu;
  for (const auto& t : inputs) {
    cpu.push_back(t.detach().clone().requires_grad_(true));
    gpu.push_back(t.detach().to(at::kCUDA).requires_grad_(true));
  }
  // Each graph's backward before the next forward: communicating nodes chain through CommOrder's token,
  // so a second forward before the first backward would link the GPU graph to the CPU graph's nodes.
  const at::Tensor out_cpu = op(cpu);
  const at::Tensor g = at::randn(out_cpu.sizes(), at::kDouble);
  out_cpu.backward(g);
  CommOrder::reset();
  const at::Tensor out_gpu = op(gpu);
  ASSERT_TRUE(out_gpu.is_cuda()) << what;
  EXPECT_TRUE(close_to_cpu(out_gpu, out_cpu, what + " output"));
  out_gpu.backward(g.to(at::kCUDA));
  for (size_t i = 0; i < inputs.size(); ++i)
    EXPECT_TRUE(close_to_cpu(gpu[i].grad(), cpu[i].grad(), what + " grad " + std::to_string(i)));
}

TEST(OnCuda, OperatorsMatchTheCpu) {
  if (!cuda_visible()) GTEST_SKIP() << "no CUDA device visible";
  const CommPtr comm = one_rank();
  const SequenceLayout layout(LayoutKind::kZigzag, 100, 1);
  auto r = [](at::IntArrayRef s) { return at::randn(s, at::kDouble); };
  linear_attention::LinearAttentionOptions lin;
  lin.block_size = 16;
  lin.normalize = true;
  lin.decay = linear_attention::default_decay(2);
  expect_cuda_matches_cpu({r({1, 2, 100, 8}).abs(), r({1, 2, 100, 8}).abs(), r({1, 2, 100, 8})}, [&](const auto& x) {
    return linear_attention::sequence_parallel_linear_attention(x[0], x[1], x[2], layout, comm,
                                                                linear_attention::LinearAttentionMethod::kLasp2, lin);
  }, "LASP-2");
  for (int64_t window : {0, 7}) {
    softmax_attention::AttentionSpec spec;
    spec.block = 32;
    spec.window = window;
    expect_cuda_matches_cpu({r({1, 4, 100, 8}), r({1, 2, 100, 8}), r({1, 2, 100, 8})}, [&](const auto& x) {
      return softmax_attention::attention(x[0], x[1], x[2], layout, comm, softmax_attention::SoftmaxMethod::kRing,
                                          spec);
    }, "softmax window " + std::to_string(window));
  }
  expect_cuda_matches_cpu({r({2, 100, 6}), r({6, 3}), r({6})}, [&](const auto& x) {
    return causal_depthwise_conv(x[0], x[1], x[2], layout, comm);
  }, "short conv");
}

TEST_P(DeviceAgnosticModel, PresetOnCudaMatchesTheCpu) {
  if (!cuda_visible()) GTEST_SKIP() << "no CUDA device visible";
  const CommPtr comm = one_rank();
  pb::ModelConfig user;
  user.set_preset(GetParam());
  const auto config = models::resolve_model_config(user);
  torch::manual_seed(3);
  models::HybridLM cpu(config);
  models::HybridLM gpu(config);
  cpu->set_precision(at::kDouble);
  gpu->set_precision(at::kDouble);
  {
    torch::NoGradGuard no_grad;
    auto src = cpu->parameters(), dst = gpu->parameters();
    for (size_t i = 0; i < src.size(); ++i) dst[i].copy_(src[i]);
  }
  gpu->to(at::kCUDA);
  const int64_t n = 48;
  const models::SequenceContext ctx =
      models::make_context(pb::ParallelConfig(), SequenceLayout(LayoutKind::kContiguous, n, 1), comm);
  at::Generator gen = at::detail::createCPUGenerator(8);
  const at::Tensor tokens = at::randint(0, config.vocab_size(), {2, n}, gen, at::kLong);
  const at::Tensor out_cpu = cpu(tokens, ctx), out_gpu = gpu(tokens.to(at::kCUDA), ctx);
  EXPECT_TRUE(close_to_cpu(out_gpu, out_cpu, GetParam() + " logits"));
  out_cpu.pow(2).sum().backward();
  out_gpu.pow(2).sum().backward();
  auto pc = cpu->named_parameters(), pg = gpu->named_parameters();
  for (size_t i = 0; i < pc.size(); ++i)
    EXPECT_TRUE(close_to_cpu(pg[i].value().grad(), pc[i].value().grad(), GetParam() + " grad " + pc[i].key()));
}

// ---- libtorch's fused flash attention against the blockwise kernel (its fallback) ----

// Puts the fused path's switch back as it was when a test ends.
class FusedAttentionSwitch {
 public:
  FusedAttentionSwitch() : was_enabled_(softmax_attention::fused_attention_enabled()) {}
  ~FusedAttentionSwitch() { softmax_attention::set_fused_attention_enabled(was_enabled_); }

 private:
  bool was_enabled_;
};

// max |a - b| / max |b|, in float64 on the CPU.
double relative_error(const at::Tensor& a, const at::Tensor& b) {
  const at::Tensor x = a.to(at::kCPU).to(at::kDouble), y = b.to(at::kCPU).to(at::kDouble);
  return ((x - y).abs().max() / y.abs().max().clamp_min(1e-12)).item<double>();
}

// Fused (bf16/fp16 products, P rounded to the input dtype) against the blockwise kernel (float32 products of
// the same rounded inputs): a few units of the input dtype's rounding. A wrong mask, scale, LSE or GQA
// reduction is off by O(1).
double fused_tolerance(at::ScalarType dtype) { return dtype == at::kBFloat16 ? 4e-2 : 1e-2; }

at::Device cuda_device() { return at::Device(at::kCUDA, 0); }

#define SKIP_WITHOUT_FUSED_ATTENTION()                                                                       \
  if (!cuda_visible()) GTEST_SKIP() << "no CUDA device visible";                                           \
  if (!softmax_attention::fused_attention_supported(cuda_device()))                                        \
  GTEST_SKIP() << "no fused attention here: needs LOOM_FUSED_ATTENTION in a CUDA build against libtorch >= 2.1 " \
                  "and a GPU of compute capability >= 8.0"

// One chunk pair, forward and backward, fused against the fallback: the causal diagonal and a full past
// block (the two masks the fused path takes), MHA and GQA, bf16 and fp16; and pairs it must decline
// (a window inside the block, documents) leave its counters alone.
TEST(OnCuda, FusedAttentionPairMatchesTheBlockwiseKernel) {
  SKIP_WITHOUT_FUSED_ATTENTION();
  using namespace softmax_attention;
  FusedAttentionSwitch restore;
  struct Case {
    const char* name;
    int64_t q_start, lq, k_start, lk, window;
    bool documents, fused;
  };
  const Case cases[] = {{"causal diagonal", 256, 200, 256, 200, 0, false, true},
                        {"full past block", 512, 136, 0, 256, 0, false, true},
                        {"past block inside the window", 512, 64, 448, 64, 200, false, true},
                        {"diagonal with a window inside it", 0, 128, 0, 128, 32, false, false},
                        {"diagonal with documents", 0, 128, 0, 128, 0, true, false}};
  torch::manual_seed(11);
  for (auto dtype : {at::kBFloat16, at::kHalf})
    for (auto [hq, hkv] : {std::pair<int64_t, int64_t>{4, 4}, {8, 2}})
      for (const Case& c : cases) {
        const std::string what = std::string(c.name) + " " + c10::toString(dtype) + " Hq=" + std::to_string(hq) +
                                 " Hkv=" + std::to_string(hkv);
        const auto opts = at::TensorOptions().dtype(dtype).device(cuda_device());
        const auto f32 = at::TensorOptions().dtype(at::kFloat).device(cuda_device());
        const at::Tensor q = at::randn({2, hq, c.lq, 64}, f32).to(dtype);
        const at::Tensor k = at::randn({2, hkv, c.lk, 64}, f32).to(dtype);
        const at::Tensor v = at::randn({2, hkv, c.lk, 64}, f32).to(dtype);
        // Two documents in the block, the second from its middle on (every row still sees a key).
        const at::Tensor positions = at::arange(c.q_start, c.q_start + c.lq, f32.dtype(at::kLong));
        const int64_t middle = c.q_start + c.lq / 2;
        const at::Tensor doc_row = positions.ge(middle).to(at::kLong) * (middle - c.q_start) + c.q_start;
        const at::Tensor docs = c.documents ? doc_row.expand({2, c.lq}).contiguous() : at::Tensor();
        AttentionSpec spec;
        spec.block = 64;
        spec.window = c.window;
        set_fused_attention_enabled(false);
        const Partial ref = attend_pair(q, c.q_start, k, v, c.k_start, spec, docs);
        set_fused_attention_enabled(true);
        const FusedAttentionCounts before = fused_attention_counts();
        const Partial fused = attend_pair(q, c.q_start, k, v, c.k_start, spec, docs);
        ASSERT_EQ(fused_attention_counts().forward, before.forward + (c.fused ? 1 : 0)) << what;
        EXPECT_EQ(fused.out.scalar_type(), at::kFloat) << what;
        EXPECT_EQ(fused.lse.sizes(), ref.lse.sizes()) << what;
        EXPECT_LE(relative_error(fused.out, ref.out), fused_tolerance(dtype)) << what << " out";
        EXPECT_LE(relative_error(fused.lse, ref.lse), 1e-3) << what << " lse";

        // The pair as the whole attention: its own out and LSE are the final ones.
        const at::Tensor dout = at::randn(q.sizes(), f32).to(dtype);
        const at::Tensor delta = (dout.to(at::kFloat) * ref.out).sum(-1);
        auto gradients = [&](bool use_fused) {
          set_fused_attention_enabled(use_fused);
          at::Tensor dq = at::zeros(q.sizes(), f32), dk = at::zeros(k.sizes(), f32), dv = at::zeros(v.sizes(), f32);
          attend_pair_backward(q, c.q_start, k, v, c.k_start, spec, ref.lse, dout, delta, dq, dk, dv, docs, ref.out);
          return std::vector<at::Tensor>{dq, dk, dv};
        };
        const auto g_ref = gradients(false);
        const FusedAttentionCounts before_backward = fused_attention_counts();
        const auto g_fused = gradients(true);
        ASSERT_EQ(fused_attention_counts().backward, before_backward.backward + (c.fused ? 1 : 0)) << what;
        const char* names[] = {"dq", "dk", "dv"};
        for (size_t i = 0; i < 3; ++i)
          EXPECT_LE(relative_error(g_fused[i], g_ref[i]), fused_tolerance(dtype)) << what << " " << names[i];
      }
}

// Whole operators on one rank, forward and backward through autograd, fused against the fallback: ring and
// all-gather on the zigzag layout (two chunks: causal diagonals and a full past block, merged across pairs,
// so the fused backward gets the merged out and LSE) and local attention (one causal block), with GQA.
TEST(OnCuda, FusedAttentionOperatorsMatchTheFallback) {
  SKIP_WITHOUT_FUSED_ATTENTION();
  using namespace softmax_attention;
  FusedAttentionSwitch restore;
  const CommPtr comm = one_rank();
  const int64_t n = 512;
  torch::manual_seed(12);
  for (auto dtype : {at::kBFloat16, at::kHalf})
    for (auto method : {SoftmaxMethod::kRing, SoftmaxMethod::kAllGather, SoftmaxMethod::kLocal}) {
      const std::string what = std::string(method_name(method)) + " " + c10::toString(dtype);
      const SequenceLayout layout(method == SoftmaxMethod::kLocal ? LayoutKind::kContiguous : LayoutKind::kZigzag, n,
                                  1);
      const auto f32 = at::TensorOptions().dtype(at::kFloat).device(cuda_device());
      const at::Tensor q0 = at::randn({2, 8, n, 128}, f32).to(dtype), k0 = at::randn({2, 2, n, 128}, f32).to(dtype),
                       v0 = at::randn({2, 2, n, 128}, f32).to(dtype);
      const at::Tensor g = at::randn({2, 8, n, 128}, f32).to(dtype);
      AttentionSpec spec;
      spec.block = 128;
      auto run = [&](bool use_fused) {
        set_fused_attention_enabled(use_fused);
        at::Tensor q = q0.clone().requires_grad_(true), k = k0.clone().requires_grad_(true),
                   v = v0.clone().requires_grad_(true);
        auto [out, lse] = attention_with_lse(q, k, v, layout, comm, method, spec);
        out.backward(g);
        CommOrder::reset();
        return std::vector<at::Tensor>{out.detach(), lse, q.grad(), k.grad(), v.grad()};
      };
      const auto ref = run(false);
      const FusedAttentionCounts before = fused_attention_counts();
      const auto fused = run(true);
      const FusedAttentionCounts after = fused_attention_counts();
      // Zigzag at one rank: chunk pairs (0,0), (1,0), (1,1); contiguous: one pair.
      const int64_t pairs = method == SoftmaxMethod::kLocal ? 1 : 3;
      EXPECT_EQ(after.forward - before.forward, pairs) << what;
      EXPECT_EQ(after.backward - before.backward, pairs) << what;
      const char* names[] = {"out", "lse", "dq", "dk", "dv"};
      for (size_t i = 0; i < ref.size(); ++i) {
        ASSERT_TRUE(fused[i].defined() && ref[i].defined()) << what << " " << names[i];
        EXPECT_LE(relative_error(fused[i], ref[i]), i == 1 ? 1e-3 : fused_tolerance(dtype)) << what << " " << names[i];
      }
    }
}

// Off CUDA (the CPU here, CI) the fused path declines every pair: the blockwise kernel's results exactly, and
// the counters stay where they were, whatever the switch says.
TEST(DeviceAgnostic, FusedAttentionDeclinesPairsOffCuda) {
  using namespace softmax_attention;
  FusedAttentionSwitch restore;
  EXPECT_FALSE(fused_attention_supported(at::Device(at::kCPU)));
  torch::manual_seed(13);
  const at::Tensor q = at::randn({1, 4, 32, 16}).to(at::kBFloat16);
  const at::Tensor k = at::randn({1, 2, 32, 16}).to(at::kBFloat16), v = at::randn({1, 2, 32, 16}).to(at::kBFloat16);
  AttentionSpec spec;
  spec.block = 8;
  auto run = [&](bool use_fused) {
    set_fused_attention_enabled(use_fused);
    EXPECT_EQ(fused_attention_enabled(), use_fused && fused_attention_compiled());
    const Partial p = attend_pair(q, 0, k, v, 0, spec);
    const at::Tensor dout = at::ones(q.sizes(), q.options());
    const at::Tensor delta = (dout.to(at::kFloat) * p.out).sum(-1);
    at::Tensor dq = at::zeros(q.sizes(), at::kFloat), dk = at::zeros(k.sizes(), at::kFloat),
               dv = at::zeros(v.sizes(), at::kFloat);
    attend_pair_backward(q, 0, k, v, 0, spec, p.lse, dout, delta, dq, dk, dv, {}, p.out);
    return std::vector<at::Tensor>{p.out, p.lse, dq, dk, dv};
  };
  const auto ref = run(false);
  const FusedAttentionCounts before = fused_attention_counts();
  const auto again = run(true);
  EXPECT_EQ(fused_attention_counts().forward, before.forward);
  EXPECT_EQ(fused_attention_counts().backward, before.backward);
  for (size_t i = 0; i < ref.size(); ++i) EXPECT_TRUE(at::equal(again[i], ref[i])) << i;
}

}  // namespace
}  // namespace loom
