#include "loom/parallel/gated_delta/affine_prefix.h"

#include <vector>

namespace loom::gated_delta {
namespace {
using linear_attention::chain_exclusive_prefix;
using linear_attention::sequence_order;

// One map (A, B) in a flat buffer: [A (B*H*d_k*d_k) | B (B*H*d_k*d_v)], `parts` times.
struct Packing {
  std::vector<int64_t> map_shape;     // [B, H, d_k, d_k]
  std::vector<int64_t> offset_shape;  // [B, H, d_k, d_v]
  int64_t map_numel() const { return map_shape[0] * map_shape[1] * map_shape[2] * map_shape[3]; }
  int64_t offset_numel() const { return offset_shape[0] * offset_shape[1] * offset_shape[2] * offset_shape[3]; }
  int64_t part_numel() const { return map_numel() + offset_numel(); }
  at::Tensor map(const at::Tensor& flat, int part) const {
    return flat.narrow(-1, part * part_numel(), map_numel()).view(map_shape);
  }
  at::Tensor offset(const at::Tensor& flat, int part) const {
    return flat.narrow(-1, part * part_numel() + map_numel(), offset_numel()).view(offset_shape);
  }
};

// (A_out, B_out) := (A_l, B_l) then (A_r, B_r) = (A_r A_l, A_r B_l + B_r);
// the outputs may alias either side.
void compose_into(const at::Tensor& a_left, const at::Tensor& b_left, const at::Tensor& a_right,
                  const at::Tensor& b_right, at::Tensor a_out, at::Tensor b_out) {
  const at::Tensor b_new = at::matmul(a_right, b_left) + b_right;
  const at::Tensor a_new = at::matmul(a_right, a_left);
  b_out.copy_(b_new);
  a_out.copy_(a_new);
}

void write_identity(const Packing& p, at::Tensor& out, int parts) {
  out.zero_();
  const int64_t dk = p.map_shape[2];
  for (int part = 0; part < parts; ++part) p.map(out, part).copy_(at::eye(dk, out.options()).expand(p.map_shape));
}

// ---- kLasp2: one AllGather ----
class AllGatherPrefix final : public AffinePrefix {
 public:
  AllGatherPrefix(const SequenceLayout& layout, CommPtr comm, PrefixDirection direction)
      : layout_(layout), comm_(std::move(comm)), order_(sequence_order(layout, direction)) {}

  void start(const at::Tensor& maps, const at::Tensor& offsets) override {
    const int64_t cpr = maps.size(0);
    packing_ = Packing{maps[0].sizes().vec(), offsets[0].sizes().vec()};
    offset_options_ = offsets.options();
    const at::Tensor payload = at::cat({maps.reshape({cpr, -1}), offsets.reshape({cpr, -1})}, 1).contiguous();
    gathered_ = at::empty({comm_->size() * cpr, payload.size(1)}, payload.options());
    work_ = comm_->all_gather(gathered_, payload);
  }

  at::Tensor finish() override {
    work_->wait();
    const int W = comm_->size(), me = comm_->rank(), cpr = layout_.chunks_per_rank();
    std::vector<at::Tensor> row_of(layout_.num_chunks());
    for (int q = 0; q < W; ++q) {
      const auto owned = layout_.chunks_of(q);
      for (int i = 0; i < cpr; ++i) row_of[owned[i]] = gathered_[q * cpr + i];
    }
    std::vector<int64_t> out_shape{cpr};
    for (int64_t s : packing_.offset_shape) out_shape.push_back(s);
    at::Tensor out = at::empty(out_shape, offset_options_);
    at::Tensor running = at::zeros(packing_.offset_shape, offset_options_);
    int remaining = cpr;
    for (int64_t c : order_) {
      if (layout_.owner_of(c) == me) {
        out[layout_.local_index_of(c)].copy_(running);
        if (--remaining == 0) break;
      }
      running = at::matmul(packing_.map(row_of[c], 0), running) + packing_.offset(row_of[c], 0);
    }
    gathered_.reset();
    return out;
  }

 private:
  SequenceLayout layout_;
  CommPtr comm_;
  std::vector<int64_t> order_;
  Packing packing_{};
  at::TensorOptions offset_options_;
  at::Tensor gathered_;
  WorkPtr work_;
};

// ---- kLasp2AllScan: exclusive scans with the composition as a user operation ----
ScanOp affine_scan_op(const Packing& p) {
  ScanOp op;
  op.name = "gated_delta_affine_map";
  // Scan order = sequence order: the earlier map acts first.
  op.combine = [p](const at::Tensor& earlier, at::Tensor& later) {
    compose_into(p.map(earlier, 0), p.offset(earlier, 0), p.map(later, 0), p.offset(later, 0), p.map(later, 0),
                 p.offset(later, 0));
  };
  op.identity = [p](at::Tensor& out) { write_identity(p, out, 1); };
  return op;
}

// Pairs for the zigzag layout, scanned over ranks in reverse order: part 0 (a
// first-half chunk) composes with earlier (higher-rank) parts after it, part 1
// (a second-half chunk) with earlier parts before it.
ScanOp zigzag_pair_scan_op(const Packing& p) {
  ScanOp op;
  op.name = "gated_delta_affine_map_pair";
  op.combine = [p](const at::Tensor& earlier, at::Tensor& later) {
    compose_into(p.map(later, 0), p.offset(later, 0), p.map(earlier, 0), p.offset(earlier, 0), p.map(later, 0),
                 p.offset(later, 0));
    compose_into(p.map(earlier, 1), p.offset(earlier, 1), p.map(later, 1), p.offset(later, 1), p.map(later, 1),
                 p.offset(later, 1));
  };
  op.identity = [p](at::Tensor& out) { write_identity(p, out, 2); };
  return op;
}

class AllScanPrefix final : public AffinePrefix {
 public:
  AllScanPrefix(const SequenceLayout& layout, CommPtr comm, PrefixDirection direction)
      : layout_(layout), comm_(std::move(comm)), direction_(direction) {}

  void start(const at::Tensor& maps, const at::Tensor& offsets) override {
    packing_ = Packing{maps[0].sizes().vec(), offsets[0].sizes().vec()};
    maps_ = maps.contiguous();
    offsets_ = offsets.contiguous();
    if (layout_.kind() == LayoutKind::kContiguous) {
      // Forward runs over ranks in order; backward over the reversed ranks.
      const CommPtr scan_comm = direction_ == PrefixDirection::kForward ? comm_ : comm_->reversed();
      element_ = pack({0});
      scanned_ = at::empty_like(element_);
      works_ = {scan_comm->exscan(scanned_, element_, affine_scan_op(packing_))};
      return;
    }
    // Zigzag: the sequence lists "first" chunks in rank order, then "second"
    // chunks in reverse rank order. Forward: first = local chunk 0; backward
    // reads the sequence from the end: first = local chunk 1.
    const int first = direction_ == PrefixDirection::kForward ? 0 : 1;
    element_ = pack({first});
    pair_ = pack({first, 1 - first});
    scanned_ = at::empty_like(element_);
    scanned_pair_ = at::empty_like(pair_);
    works_ = {comm_->exscan(scanned_, element_, affine_scan_op(packing_)),
              comm_->reversed()->exscan(scanned_pair_, pair_, zigzag_pair_scan_op(packing_))};
  }

  at::Tensor finish() override {
    wait_all(works_);
    at::Tensor out = at::empty_like(offsets_);
    if (layout_.kind() == LayoutKind::kContiguous) {
      out[0].copy_(packing_.offset(scanned_, 0));
      return out;
    }
    const int first = direction_ == PrefixDirection::kForward ? 0 : 1;
    // prefix(first_r)  = E, the composition of the first chunks of lower ranks;
    // prefix(second_r) = E, first_r, the first chunks of higher ranks, then
    //                    the second chunks of higher ranks.
    out[first].copy_(packing_.offset(scanned_, 0));
    at::Tensor acc = scanned_.clone();
    const at::Tensor own = pack({first});
    auto then = [&](const at::Tensor& a, const at::Tensor& b) {
      compose_into(packing_.map(acc, 0), packing_.offset(acc, 0), a, b, packing_.map(acc, 0), packing_.offset(acc, 0));
    };
    then(packing_.map(own, 0), packing_.offset(own, 0));
    then(packing_.map(scanned_pair_, 0), packing_.offset(scanned_pair_, 0));
    then(packing_.map(scanned_pair_, 1), packing_.offset(scanned_pair_, 1));
    out[1 - first].copy_(packing_.offset(acc, 0));
    return out;
  }

 private:
  // [A | B] of the given local chunks, one part each.
  at::Tensor pack(const std::vector<int>& chunks) const {
    std::vector<at::Tensor> parts;
    for (int i : chunks) {
      parts.push_back(maps_[i].reshape({-1}));
      parts.push_back(offsets_[i].reshape({-1}));
    }
    return at::cat(parts);
  }

  SequenceLayout layout_;
  CommPtr comm_;
  PrefixDirection direction_;
  Packing packing_{};
  at::Tensor maps_, offsets_, element_, pair_, scanned_, scanned_pair_;
  std::vector<WorkPtr> works_;
};

// ---- kLasp1: the state passed chunk to chunk ----
class ChainPrefix final : public AffinePrefix {
 public:
  ChainPrefix(const SequenceLayout& layout, CommPtr comm, PrefixDirection direction)
      : layout_(layout), comm_(std::move(comm)), order_(sequence_order(layout, direction)) {}

  void start(const at::Tensor& maps, const at::Tensor& offsets) override {
    maps_ = maps.contiguous();
    offsets_ = offsets.contiguous();
  }

  at::Tensor finish() override {
    return chain_exclusive_prefix(layout_, *comm_, order_, offsets_, [this](int li, const at::Tensor& prefix) {
      return at::matmul(maps_[li], prefix) + offsets_[li];
    });
  }

 private:
  SequenceLayout layout_;
  CommPtr comm_;
  std::vector<int64_t> order_;
  at::Tensor maps_, offsets_;
};

}  // namespace

std::unique_ptr<AffinePrefix> make_affine_prefix(LinearAttentionMethod method, const SequenceLayout& layout,
                                                 const CommPtr& comm, PrefixDirection direction) {
  TORCH_CHECK(comm && comm->size() == layout.world_size(), "gated delta rule: communicator has ",
              comm ? comm->size() : 0, " ranks, the layout ", layout.world_size());
  switch (method) {
    case LinearAttentionMethod::kLasp2: return std::make_unique<AllGatherPrefix>(layout, comm, direction);
    case LinearAttentionMethod::kLasp2AllScan: return std::make_unique<AllScanPrefix>(layout, comm, direction);
    case LinearAttentionMethod::kLasp1: return std::make_unique<ChainPrefix>(layout, comm, direction);
    case LinearAttentionMethod::kUlysses: break;
  }
  TORCH_CHECK(false, "sequence-parallel method ", method_name(method),
              " exchanges tokens, not states: it has no affine prefix (the operators dispatch it first)");
}

}  // namespace loom::gated_delta
