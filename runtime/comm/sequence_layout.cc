#include "loom/runtime/comm/sequence_layout.h"

#include <algorithm>
#include <cctype>
#include <sstream>

#include "loom/runtime/core/error.h"

namespace loom {

const char* layout_kind_name(LayoutKind kind) { return kind == LayoutKind::kZigzag ? "zigzag" : "contiguous"; }

LayoutKind parse_layout_kind(const std::string& name) {
  std::string lower(name);
  std::transform(lower.begin(), lower.end(), lower.begin(), [](unsigned char c) { return std::tolower(c); });
  if (lower == "contiguous") return LayoutKind::kContiguous;
  if (lower == "zigzag") return LayoutKind::kZigzag;
  throw ConfigError("sequence layout '" + name + "': allowed values are contiguous, zigzag");
}

SequenceLayout::SequenceLayout(LayoutKind kind, int64_t global_len, int world_size, PadPolicy pad)
    : kind_(kind), global_len_(global_len), world_size_(world_size) {
  TORCH_CHECK(world_size >= 1, "SequenceLayout: world size must be >= 1, got ", world_size);
  TORCH_CHECK(global_len >= 1, "SequenceLayout: sequence length must be >= 1, got ", global_len);
  num_chunks_ = static_cast<int64_t>(world_size) * chunks_per_rank();
  chunk_len_ = (global_len + num_chunks_ - 1) / num_chunks_;
  if (pad == PadPolicy::kReject && global_len % num_chunks_ != 0) {
    std::ostringstream msg;
    msg << "sequence length " << global_len << " does not divide into the " << num_chunks_ << " chunks of the "
        << layout_kind_name(kind) << " layout over " << world_size
        << " ranks, and this operator cannot mask padding; use a length that is a multiple of " << num_chunks_;
    throw ConfigError(msg.str());
  }
}

std::vector<int64_t> SequenceLayout::chunks_of(int rank) const {
  TORCH_CHECK(rank >= 0 && rank < world_size_, "SequenceLayout: rank ", rank, " outside world of size ", world_size_);
  if (kind_ == LayoutKind::kContiguous) return {rank};
  return {rank, 2 * static_cast<int64_t>(world_size_) - 1 - rank};
}

int SequenceLayout::owner_of(int64_t chunk) const {
  TORCH_CHECK(chunk >= 0 && chunk < num_chunks_, "SequenceLayout: chunk ", chunk, " outside [0, ", num_chunks_, ")");
  if (kind_ == LayoutKind::kContiguous || chunk < world_size_) return static_cast<int>(chunk);
  return static_cast<int>(2 * world_size_ - 1 - chunk);
}

int SequenceLayout::local_index_of(int64_t chunk) const {
  TORCH_CHECK(chunk >= 0 && chunk < num_chunks_, "SequenceLayout: chunk ", chunk, " outside [0, ", num_chunks_, ")");
  return (kind_ == LayoutKind::kZigzag && chunk >= world_size_) ? 1 : 0;
}

at::Tensor SequenceLayout::global_positions(int rank) const {
  std::vector<at::Tensor> parts;
  for (int64_t c : chunks_of(rank)) parts.push_back(at::arange(chunk_start(c), chunk_start(c) + chunk_len_, at::kLong));
  return at::cat(parts);
}

at::Tensor SequenceLayout::valid_mask(int rank) const { return global_positions(rank).lt(global_len_); }

at::Tensor SequenceLayout::shard(const at::Tensor& global, int rank, int64_t dim, double pad_value) const {
  dim = at::maybe_wrap_dim(dim, global.dim());
  const int64_t n = global.size(dim);
  TORCH_CHECK(n == global_len_ || n == padded_len(), "SequenceLayout::shard: dimension ", dim, " has ", n,
              " tokens, the layout expects ", global_len_, " (or ", padded_len(), " padded)");
  at::Tensor padded = global;
  if (n < padded_len()) {
    auto pad_shape = global.sizes().vec();
    pad_shape[dim] = padded_len() - n;
    padded = at::cat({global, at::full(pad_shape, pad_value, global.options())}, dim);
  }
  std::vector<at::Tensor> parts;
  for (int64_t c : chunks_of(rank)) parts.push_back(padded.narrow(dim, chunk_start(c), chunk_len_));
  return parts.size() == 1 ? parts[0] : at::cat(parts, dim);
}

at::Tensor SequenceLayout::unshard(const std::vector<at::Tensor>& locals, int64_t dim) const {
  TORCH_CHECK(static_cast<int>(locals.size()) == world_size_, "SequenceLayout::unshard: got ", locals.size(),
              " local tensors for ", world_size_, " ranks");
  std::vector<at::Tensor> chunks(num_chunks_);
  for (int r = 0; r < world_size_; ++r) {
    const int64_t d = at::maybe_wrap_dim(dim, locals[r].dim());
    TORCH_CHECK(locals[r].size(d) == local_len(), "SequenceLayout::unshard: rank ", r, " has ", locals[r].size(d),
                " tokens, expected ", local_len());
    const auto owned = chunks_of(r);
    for (size_t i = 0; i < owned.size(); ++i)
      chunks[owned[i]] = locals[r].narrow(d, static_cast<int64_t>(i) * chunk_len_, chunk_len_);
  }
  const int64_t d = at::maybe_wrap_dim(dim, locals[0].dim());
  return at::cat(chunks, d).narrow(d, 0, global_len_);
}

at::Tensor SequenceLayout::gather(const at::Tensor& local, Communicator& comm, int64_t dim) const {
  TORCH_CHECK(comm.size() == world_size_, "SequenceLayout::gather: communicator has ", comm.size(),
              " ranks, the layout ", world_size_);
  const int64_t d = at::maybe_wrap_dim(dim, local.dim());
  const at::Tensor moved = local.movedim(d, 0).contiguous();
  auto out_shape = moved.sizes().vec();
  out_shape[0] *= world_size_;
  at::Tensor all = at::empty(out_shape, moved.options());
  comm.all_gather(all, moved)->wait();
  std::vector<at::Tensor> locals;
  for (int r = 0; r < world_size_; ++r) locals.push_back(all.narrow(0, r * moved.size(0), moved.size(0)).movedim(0, d));
  return unshard(locals, d);
}

std::string SequenceLayout::describe() const {
  std::ostringstream out;
  out << layout_kind_name(kind_) << " layout: N=" << global_len_ << " over " << world_size_ << " ranks, "
      << num_chunks_ << " chunks of " << chunk_len_ << " tokens";
  if (padding() > 0) out << " (" << padding() << " padding)";
  return out.str();
}

}  // namespace loom
