#include "distributed_reference.h"

#include <ATen/CPUGeneratorImpl.h>

#include <sstream>

#include "loom/models/hybrid_lm.h"

namespace loom::testing {

std::vector<at::Tensor> reference_on_root(const CommPtr& comm, const std::vector<at::Tensor>& like,
                                          const std::function<std::vector<at::Tensor>()>& compute) {
  std::vector<at::Tensor> out;
  if (comm->rank() == 0) {
    for (const at::Tensor& t : compute()) out.push_back(t.detach().contiguous());
    TORCH_CHECK(out.size() == like.size(), "reference_on_root: compute returned ", out.size(), " tensors, like has ",
                like.size());
    for (size_t i = 0; i < out.size(); ++i)
      TORCH_CHECK(out[i].sizes() == like[i].sizes() && out[i].scalar_type() == like[i].scalar_type(),
                  "reference_on_root: tensor ", i, " is ", out[i].sizes(), " ", out[i].scalar_type(), ", like says ",
                  like[i].sizes(), " ", like[i].scalar_type());
  } else {
    for (const at::Tensor& t : like) out.push_back(at::empty(t.sizes(), t.options()));
  }
  for (at::Tensor& t : out) comm->broadcast(t, 0)->wait();
  return out;
}

at::Tensor seeded_randn(at::IntArrayRef sizes, uint64_t seed, at::ScalarType dtype) {
  at::Generator gen = at::detail::createCPUGenerator(seed);
  return at::randn(sizes, gen, at::TensorOptions().dtype(at::kDouble)).to(dtype);
}

::testing::AssertionResult tensors_close(const at::Tensor& actual, const at::Tensor& expected, double rtol,
                                         const std::string& what) {
  if (!actual.defined() || !expected.defined())
    return ::testing::AssertionFailure() << what << ": " << (actual.defined() ? "expected" : "actual")
                                         << " tensor is undefined";
  if (actual.sizes() != expected.sizes())
    return ::testing::AssertionFailure() << what << ": shape " << actual.sizes() << " != expected "
                                         << expected.sizes();
  const at::Tensor a = actual.detach().to(at::kDouble);
  const at::Tensor e = expected.detach().to(at::kDouble);
  if (a.numel() == 0) return ::testing::AssertionSuccess();
  // Relative to the reference's magnitude; the floor keeps an all-zero
  // reference (a gradient that vanishes exactly) from demanding exact zeros:
  // there the bound is rtol * 1e-3 in absolute terms.
  const double scale = std::max(e.abs().max().item<double>(), 1e-3);
  const at::Tensor diff = (a - e).abs();
  const double err = diff.max().item<double>() / scale;
  if (err <= rtol && !std::isnan(err)) return ::testing::AssertionSuccess();
  const int64_t worst = diff.reshape({-1}).argmax().item<int64_t>();
  std::ostringstream out;
  out << what << ": relative error " << err << " > " << rtol << " (worst at flat index " << worst << ": actual "
      << a.reshape({-1})[worst].item<double>() << ", expected " << e.reshape({-1})[worst].item<double>() << ")";
  return ::testing::AssertionFailure() << out.str();
}

ReferenceCheck& ReferenceCheck::same(const std::string& name, const at::Tensor& actual, const at::Tensor& expected) {
  ++checked_;
  auto r = tensors_close(actual, expected, rtol_, name);
  if (!r) failures_.push_back(r.message());
  return *this;
}

ReferenceCheck& ReferenceCheck::sharded(const std::string& name, const at::Tensor& actual_local,
                                        const at::Tensor& expected_global, const SequenceLayout& layout,
                                        int64_t dim) {
  const at::Tensor expected = layout.shard(expected_global.detach(), rank_, dim);
  // Padding positions carry no reference value: compare real tokens only.
  const int64_t d = at::maybe_wrap_dim(dim, expected.dim());
  const at::Tensor valid = layout.valid_mask(rank_).nonzero().reshape({-1});
  return same(name, actual_local.index_select(d, valid), expected.index_select(d, valid));
}

::testing::AssertionResult ReferenceCheck::verdict() const {
  if (checked_ == 0) return ::testing::AssertionFailure() << "ReferenceCheck compared nothing";
  if (failures_.empty()) return ::testing::AssertionSuccess();
  std::ostringstream out;
  out << "rank " << rank_ << ": " << failures_.size() << " of " << checked_ << " comparisons failed:";
  for (const auto& f : failures_) out << "\n  " << f;
  return ::testing::AssertionFailure() << out.str();
}

std::vector<int64_t> document_lengths(int64_t n, int64_t chunk, int pattern) {
  std::vector<int64_t> out;
  int64_t left = n;
  auto take = [&](int64_t len) {
    len = std::min(len, left);
    if (len > 0) out.push_back(len), left -= len;
  };
  switch (pattern) {
    case 0: break;
    case 1: take(1), take(1), take(1); break;
    case 2: while (left > chunk) take(chunk); break;
    case 3: take(chunk / 2 + 1), take(chunk + 1), take(2); break;
    case 4: take(3), take(1), take(2 * chunk - 1), take(5); break;
    default: ADD_FAILURE() << "document_lengths: no pattern " << pattern;
  }
  take(left);
  return out;
}

std::vector<std::string> tiny_presets() {
  std::vector<std::string> out;
  for (const auto& name : models::preset_names())
    if (name.rfind("tiny-", 0) == 0) out.push_back(name);
  return out;
}

std::string preset_test_name(const ::testing::TestParamInfo<std::string>& info) {
  std::string s = info.param;
  for (auto& ch : s)
    if (ch == '-') ch = '_';
  return s;
}

}  // namespace loom::testing
