// Helpers to check a distributed result against a single-rank reference.
//
// The regime (DESIGN.md §8): every rank builds the same global inputs from the
// same seed, computes the naive reference on the whole sequence in float64,
// then compares its own shard of the reference with what the distributed
// operator produced for that shard, for outputs and for gradients. Where the
// reference is costly (a token-by-token recurrence), rank 0 alone computes it
// and broadcasts it (reference_on_root): the same tensors, computed once.
#pragma once

#include <ATen/ATen.h>
#include <gtest/gtest.h>

#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "loom/runtime/comm/communicator.h"
#include "loom/runtime/comm/sequence_layout.h"

namespace loom::testing {

// The reference, computed once: `compute` runs on rank 0 of `comm` only and
// its tensors are broadcast to the other ranks, which pass `like`: tensors of
// the shapes and dtypes `compute` returns, in order (e.g. the inputs whose
// gradients it returns). At W ranks on fewer cores every rank would otherwise
// repeat the same single-rank work. Collective over `comm`.
std::vector<at::Tensor> reference_on_root(const CommPtr& comm, const std::vector<at::Tensor>& like,
                                          const std::function<std::vector<at::Tensor>()>& compute);

// Identical on every rank: a fresh generator seeded with `seed`.
at::Tensor seeded_randn(at::IntArrayRef sizes, uint64_t seed, at::ScalarType dtype = at::kDouble);

// max|actual - expected| / max(max|expected|, 1e-3) <= rtol, with a message
// naming `what`, the rank, the error and the location of the worst element.
::testing::AssertionResult tensors_close(const at::Tensor& actual, const at::Tensor& expected, double rtol,
                                         const std::string& what);

// Collects (name, actual, expected) pairs, outputs and gradients alike, and
// checks them all; expected values may be global tensors that are sharded by
// `layout` for this rank.
class ReferenceCheck {
 public:
  ReferenceCheck(int rank, double rtol) : rank_(rank), rtol_(rtol) {}
  // `actual` is already this rank's part: compared as is.
  ReferenceCheck& same(const std::string& name, const at::Tensor& actual, const at::Tensor& expected);
  // `expected_global` is the whole sequence: compared to this rank's shard of it.
  ReferenceCheck& sharded(const std::string& name, const at::Tensor& actual_local, const at::Tensor& expected_global,
                          const SequenceLayout& layout, int64_t dim = 1);
  ::testing::AssertionResult verdict() const;

 private:
  int rank_;
  double rtol_;
  std::vector<std::string> failures_;
  int checked_ = 0;
};

// Documents of a row of n tokens for the document tests (each list sums to n;
// `chunk` is the layout's chunk length). Pattern:
//   0  one document (the whole row);
//   1  documents of length 1 first, then one long document;
//   2  documents aligned with the chunks (each starts at a chunk's first
//      token and ends at its last), the remainder last;
//   3  a document across two chunks (ranks) between short ones;
//   4  a mix: 3, 1, 2 chunks - 1, 5, then the rest (spans every rank).
std::vector<int64_t> document_lengths(int64_t n, int64_t chunk, int pattern);
constexpr int kDocumentPatterns = 5;

// The tiny model presets (every built-in preset named tiny-*), and a
// GoogleTest-safe name for a preset parameter ("tiny-based" -> "tiny_based").
std::vector<std::string> tiny_presets();
std::string preset_test_name(const ::testing::TestParamInfo<std::string>& info);

}  // namespace loom::testing
