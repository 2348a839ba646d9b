#include "loom/runtime/train/optimizer.h"

#include <cmath>
#include <unordered_map>

#include "loom/runtime/core/dtypes.h"
#include "loom/runtime/core/error.h"

namespace loom {

AdamW::AdamW(NamedTensors params, double weight_decay, double beta1, double beta2, double eps)
    : params_(std::move(params)), weight_decay_(weight_decay), beta1_(beta1), beta2_(beta2), eps_(eps) {
  for (const auto& [name, p] : params_) {
    // Parameters kept in bf16/fp16 get a float32 master copy that the update
    // applies to; moments are float32 at least.
    const bool reduced = is_reduced_precision(p.scalar_type());
    master_.push_back(reduced ? p.detach().to(at::kFloat, /*non_blocking=*/false, /*copy=*/true) : at::Tensor());
    const at::Tensor& like = reduced ? master_.back() : p;
    exp_avg_.push_back(at::zeros_like(like, at::MemoryFormat::Contiguous));
    exp_avg_sq_.push_back(at::zeros_like(like, at::MemoryFormat::Contiguous));
  }
}

void AdamW::step(double lr) {
  at::NoGradGuard no_grad;
  ++steps_;
  const double bc1 = 1.0 - std::pow(beta1_, static_cast<double>(steps_));
  const double bc2 = 1.0 - std::pow(beta2_, static_cast<double>(steps_));
  for (size_t i = 0; i < params_.size(); ++i) {
    const at::Tensor& param = params_[i].second;
    if (!param.grad().defined()) continue;
    const bool has_master = master_[i].defined();
    at::Tensor p = has_master ? master_[i] : param;
    const at::Tensor g = has_master ? param.grad().to(at::kFloat) : param.grad();
    if (p.dim() >= 2 && weight_decay_ > 0) p.mul_(1.0 - lr * weight_decay_);  // decoupled decay
    exp_avg_[i].mul_(beta1_).add_(g, 1.0 - beta1_);
    exp_avg_sq_[i].mul_(beta2_).addcmul_(g, g, 1.0 - beta2_);
    const at::Tensor denom = (exp_avg_sq_[i] / bc2).sqrt_().add_(eps_);
    p.addcdiv_(exp_avg_[i], denom, -lr / bc1);
    if (has_master) param.copy_(p);  // rounded once, from the float32 master
  }
}

NamedTensors AdamW::state() const {
  NamedTensors s;
  for (size_t i = 0; i < params_.size(); ++i) {
    s.emplace_back(params_[i].first + "/exp_avg", exp_avg_[i]);
    s.emplace_back(params_[i].first + "/exp_avg_sq", exp_avg_sq_[i]);
    if (master_[i].defined()) s.emplace_back(params_[i].first + "/master", master_[i]);
  }
  s.emplace_back("adamw/steps", at::tensor({steps_}, at::kLong));
  return s;
}

void AdamW::restart(const NamedTensors& masters) {
  at::NoGradGuard no_grad;
  std::unordered_map<std::string, at::Tensor> by_name(masters.begin(), masters.end());
  for (size_t i = 0; i < params_.size(); ++i) {
    exp_avg_[i].zero_();
    exp_avg_sq_[i].zero_();
    if (!master_[i].defined()) continue;
    auto it = by_name.find(params_[i].first + "/master");
    if (it != by_name.end() && it->second.sizes() == master_[i].sizes()) {
      master_[i].copy_(it->second);
      params_[i].second.copy_(master_[i]);
    } else {
      master_[i].copy_(params_[i].second);
    }
  }
  steps_ = 0;
}

void AdamW::load_state(const NamedTensors& state) {
  std::unordered_map<std::string, at::Tensor> by_name(state.begin(), state.end());
  auto take = [&](const std::string& name, at::Tensor& dst) {
    auto it = by_name.find(name);
    if (it == by_name.end()) throw LoomError("checkpoint has no optimizer state '" + name + "'");
    TORCH_CHECK(it->second.sizes() == dst.sizes(), "checkpoint optimizer state '", name, "' has shape ",
                it->second.sizes(), ", expected ", dst.sizes());
    dst.copy_(it->second);
  };
  for (size_t i = 0; i < params_.size(); ++i) {
    take(params_[i].first + "/exp_avg", exp_avg_[i]);
    take(params_[i].first + "/exp_avg_sq", exp_avg_sq_[i]);
    if (master_[i].defined()) {
      take(params_[i].first + "/master", master_[i]);
      at::NoGradGuard no_grad;
      params_[i].second.copy_(master_[i]);
    }
  }
  auto it = by_name.find("adamw/steps");
  if (it == by_name.end()) throw LoomError("checkpoint has no optimizer step count");
  steps_ = it->second.item<int64_t>();
}

double learning_rate(const pb::TrainConfig& t, int64_t step) {
  const double peak = t.lr(), floor = t.lr() * t.min_lr_ratio();
  if (t.warmup_steps() > 0 && step < t.warmup_steps())
    return peak * static_cast<double>(step + 1) / static_cast<double>(t.warmup_steps());
  const double span = std::max<double>(1.0, static_cast<double>(t.steps() - t.warmup_steps()));
  const double progress = std::min(1.0, static_cast<double>(step - t.warmup_steps()) / span);
  return floor + 0.5 * (peak - floor) * (1.0 + std::cos(M_PI * progress));
}

void all_reduce_gradients(const NamedTensors& params, Communicator& comm, int64_t bucket_bytes) {
  at::NoGradGuard no_grad;
  struct Bucket {
    std::vector<at::Tensor> params;
    at::Tensor flat;
    WorkPtr work;
  };
  std::vector<Bucket> buckets;
  Bucket current;
  int64_t current_bytes = 0;
  auto flush = [&] {
    if (current.params.empty()) return;
    // bf16/fp16 gradients are summed in float32 and rounded once, when copied back: a reduction in the
    // parameter's dtype would round at every step of the reduction tree.
    const auto sum_type = is_reduced_precision(current.params[0].scalar_type()) ? at::kFloat
                                                                                : current.params[0].scalar_type();
    std::vector<at::Tensor> grads;
    for (auto& p : current.params)
      grads.push_back(p.grad().defined() ? p.grad().reshape({-1}).to(sum_type)
                                         : at::zeros({p.numel()}, p.options().dtype(sum_type)));
    current.flat = at::cat(grads);
    current.work = comm.all_reduce(current.flat);
    buckets.push_back(std::move(current));
    current = Bucket();
    current_bytes = 0;
  };
  for (const auto& [name, p] : params) {
    if (!current.params.empty() && (current.params[0].scalar_type() != p.scalar_type() ||
                                    current_bytes + static_cast<int64_t>(p.nbytes()) > bucket_bytes))
      flush();
    current.params.push_back(p);
    current_bytes += static_cast<int64_t>(p.nbytes());
  }
  flush();
  for (auto& b : buckets) {
    b.work->wait();
    int64_t offset = 0;
    for (auto& p : b.params) {
      const at::Tensor g = b.flat.narrow(0, offset, p.numel()).view(p.sizes());
      if (p.grad().defined())
        p.mutable_grad().copy_(g);
      else
        p.mutable_grad() = g.to(p.scalar_type(), /*non_blocking=*/false, /*copy=*/true);
      offset += p.numel();
    }
  }
}

double clip_gradients(const NamedTensors& params, double max_norm) {
  at::NoGradGuard no_grad;
  std::vector<at::Tensor> grads;
  for (const auto& [name, p] : params)
    if (p.grad().defined()) grads.push_back(p.grad());
  if (grads.empty()) return 0;
  // One fused norm per gradient (a single kernel launch for all of them on
  // CUDA), combined in float64; the scale stays on the device, so clipping
  // waits for nothing. The only host synchronisation is the returned value.
  const std::vector<at::Tensor> norms = at::_foreach_norm(grads, 2);
  const at::Tensor total = at::stack(norms).to(at::kDouble).pow(2).sum().sqrt();
  if (max_norm > 0) {
    // min(1, max_norm / norm); a non-finite norm leaves the gradients as they
    // are (the trainer stops on the non-finite parameters or loss instead).
    at::Tensor scale = (max_norm / (total + 1e-12)).clamp_max(1.0);
    scale = at::where(at::isfinite(total), scale, at::ones_like(scale));
    for (auto& g : grads) g.mul_(scale.to(g.scalar_type()));
  }
  return total.item<double>();
}

}  // namespace loom
