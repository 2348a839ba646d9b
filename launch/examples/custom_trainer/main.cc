// A custom trainer: a model of its own (embedding -> sequence-parallel linear
// attention -> head), synthetic data of its own, and a step hook, driven by
// loom::Trainer. Run: mpirun -np 2 ./custom_trainer  (exits 1 unless it learns)
#include <loom/parallel/linear_attention/lasp.h>
#include <loom/runtime/train/job.h>
#include <loom/runtime/train/trainer.h>
#include <torch/nn/module.h>
#include <torch/nn/modules/embedding.h>
#include <torch/nn/modules/linear.h>
#include <torch/utils.h>

#include <iostream>

// Predict the next token of a repeating pattern; needs attention to the past.
struct TinyModel : torch::nn::Module {
  torch::nn::Embedding embed{nullptr};
  torch::nn::Linear q{nullptr}, k{nullptr}, v{nullptr}, head{nullptr};
  TinyModel() {
    embed = register_module("embed", torch::nn::Embedding(16, 32));
    q = register_module("q", torch::nn::Linear(32, 32));
    k = register_module("k", torch::nn::Linear(32, 32));
    v = register_module("v", torch::nn::Linear(32, 32));
    head = register_module("head", torch::nn::Linear(32, 16));
  }
  at::Tensor forward(const at::Tensor& tokens, const loom::SequenceLayout& layout, const loom::CommPtr& sp) {
    const at::Tensor x = embed(tokens);
    auto heads = [](const at::Tensor& t) { return at::elu(t.reshape({t.size(0), t.size(1), 2, 16}).transpose(1, 2)) + 1; };
    loom::linear_attention::LinearAttentionOptions opt;
    opt.normalize = true;
    const at::Tensor vv = v(x).reshape({x.size(0), x.size(1), 2, 16}).transpose(1, 2);
    const at::Tensor a = loom::linear_attention::sequence_parallel_linear_attention(
        heads(q(x)), heads(k(x)), vv, layout, sp, loom::linear_attention::LinearAttentionMethod::kLasp2, opt);
    return head(x + a.transpose(1, 2).reshape({x.size(0), x.size(1), 32}));
  }
};

int main(int argc, char** argv) {
  loom::MpiEnvironment mpi(&argc, &argv);
  loom::pb::LoomConfig config;
  config.mutable_train()->set_steps(60);
  config.mutable_train()->set_seq_len(64);
  config.mutable_train()->set_batch_size(4);
  config.mutable_train()->set_lr(1e-2);
  config.mutable_train()->set_log_interval(20);
  config.mutable_train()->set_eval_interval(0);
  config.mutable_train()->set_checkpoint_dir("custom-trainer-checkpoints");
  loom::validate_config(config);
  loom::Job job(config);
  torch::manual_seed(0);
  auto model = std::make_shared<TinyModel>();
  // Data: period-5 sequences with a random phase, the same on every sp rank.
  auto data = [](int64_t first, int64_t n) {
    at::Tensor seq = (at::arange(65, at::kLong).unsqueeze(0) + at::arange(first, first + n, at::kLong).unsqueeze(1)) % 5;
    return loom::Batch{seq.narrow(1, 0, 64).contiguous(), seq.narrow(1, 1, 64).contiguous()};
  };
  auto loss = [](torch::nn::Module& m, const loom::Batch& local, const loom::SequenceLayout& layout,
                 const loom::CommPtr& sp) {
    const at::Tensor logits = static_cast<TinyModel&>(m).forward(local.inputs, layout, sp);
    return at::nll_loss(at::log_softmax(logits.reshape({-1, 16}), -1), local.labels.reshape({-1}), {},
                        at::Reduction::Sum, -100);
  };
  double first_loss = -1;
  loom::Trainer::Hooks hooks;
  hooks.on_step = [&](const loom::StepMetrics& m) {
    if (first_loss < 0) first_loss = m.loss;
  };
  loom::Trainer trainer(job.config(), job.mesh(), model, loss, data, data, hooks);
  const auto result = trainer.fit();
  const bool learned = result.validation_loss < 0.5 * first_loss;
  if (job.world()->rank() == 0)
    std::cout << "custom trainer: loss " << first_loss << " -> validation " << result.validation_loss
              << (learned ? " (learned)" : " (DID NOT LEARN)") << std::endl;
  return learned ? 0 : 1;
}
