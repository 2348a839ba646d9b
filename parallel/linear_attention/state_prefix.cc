#include "loom/parallel/linear_attention/state_prefix.h"

#include <algorithm>
#include <cctype>

#include "loom/runtime/core/error.h"

namespace loom::linear_attention {

const char* method_name(LinearAttentionMethod method) {
  switch (method) {
    case LinearAttentionMethod::kLasp2: return "lasp2";
    case LinearAttentionMethod::kLasp2AllScan: return "lasp2_allscan";
    case LinearAttentionMethod::kLasp1: return "lasp1";
    case LinearAttentionMethod::kUlysses: return "ulysses";
  }
  return "?";
}

LinearAttentionMethod parse_method(const std::string& name) {
  std::string lower(name);
  std::transform(lower.begin(), lower.end(), lower.begin(), [](unsigned char c) { return std::tolower(c); });
  if (lower == "lasp2") return LinearAttentionMethod::kLasp2;
  if (lower == "lasp2_allscan") return LinearAttentionMethod::kLasp2AllScan;
  if (lower == "lasp1") return LinearAttentionMethod::kLasp1;
  if (lower == "ulysses") return LinearAttentionMethod::kUlysses;
  throw ConfigError("linear attention method '" + name + "': allowed values are lasp2, lasp2_allscan, lasp1, ulysses");
}

namespace {

// Decay across a chunk, [H] (every chunk alike) or [B, H] (per row, with
// documents), viewed against a [B, H, d_k, d_v] state.
at::Tensor as_state_factor(const at::Tensor& a) {
  return a.dim() == 1 ? a.view({1, -1, 1, 1}) : a.view({a.size(0), a.size(1), 1, 1});
}

// The decays of a rank's chunks: shared [H], or [chunks_per_rank, B, H].
struct ChunkDecays {
  at::Tensor a;
  bool per_chunk() const { return a.dim() == 3; }
  // Decay across local chunk i.
  at::Tensor of(int64_t i) const { return per_chunk() ? a[i] : a; }
};

// ---- kLasp2: one AllGather ----
class AllGatherPrefix final : public StatePrefix {
 public:
  AllGatherPrefix(const SequenceLayout& layout, CommPtr comm, at::Tensor a, PrefixDirection direction)
      : layout_(layout), comm_(std::move(comm)), a_{std::move(a)}, order_(sequence_order(layout, direction)) {}

  void start(const at::Tensor& local) override {
    local_ = local.contiguous();
    const int64_t cpr = local_.size(0);
    // Per-chunk decays (documents) travel with the states: B x H more
    // numbers per chunk, still independent of N.
    const at::Tensor payload =
        a_.per_chunk() ? at::cat({local_.reshape({cpr, -1}), a_.a.to(local_.options()).reshape({cpr, -1})}, 1)
                       : local_;
    auto shape = payload.sizes().vec();
    shape[0] *= comm_->size();
    gathered_ = at::empty(shape, payload.options());
    work_ = comm_->all_gather(gathered_, payload.contiguous());
  }

  at::Tensor finish() override {
    work_->wait();
    const int W = comm_->size(), me = comm_->rank(), cpr = layout_.chunks_per_rank();
    const int64_t state_numel = local_[0].numel();
    const std::vector<int64_t> state_shape = local_[0].sizes().vec();
    std::vector<at::Tensor> by_chunk(layout_.num_chunks()), decay_of(layout_.num_chunks());
    for (int q = 0; q < W; ++q) {
      const auto owned = layout_.chunks_of(q);
      for (int i = 0; i < cpr; ++i) {
        const at::Tensor row = gathered_[q * cpr + i];
        if (a_.per_chunk()) {
          by_chunk[owned[i]] = row.narrow(0, 0, state_numel).view(state_shape);
          decay_of[owned[i]] = row.narrow(0, state_numel, a_.a[0].numel()).view(a_.a.sizes().slice(1));
        } else {
          by_chunk[owned[i]] = row;
          decay_of[owned[i]] = a_.a;
        }
      }
    }
    at::Tensor out = at::empty_like(local_);
    at::Tensor running = at::zeros_like(local_[0]);
    int remaining = cpr;
    for (int64_t c : order_) {
      if (layout_.owner_of(c) == me) {
        out[layout_.local_index_of(c)].copy_(running);
        if (--remaining == 0) break;
      }
      running = running * as_state_factor(decay_of[c]) + by_chunk[c];
    }
    gathered_.reset();
    return out;
  }

 private:
  SequenceLayout layout_;
  CommPtr comm_;
  ChunkDecays a_;
  std::vector<int64_t> order_;
  at::Tensor local_, gathered_;
  WorkPtr work_;
};

// ---- kLasp2AllScan: exclusive scans with the monoid as a user operation ----


// Element layout in a flat buffer: [a (H, or B*H with documents) | S (B*H*d_k*d_v)],
// repeated `parts` times.
struct Packing {
  std::vector<int64_t> a_shape;      // [H] or [B, H]
  std::vector<int64_t> state_shape;  // [B, H, d_k, d_v]
  int64_t a_numel() const { return a_shape.size() == 1 ? a_shape[0] : a_shape[0] * a_shape[1]; }
  int64_t state_numel() const { return state_shape[0] * state_shape[1] * state_shape[2] * state_shape[3]; }
  int64_t part_numel() const { return a_numel() + state_numel(); }
  at::Tensor a(const at::Tensor& flat, int part) const {
    return flat.narrow(0, part * part_numel(), a_numel()).view(a_shape);
  }
  at::Tensor s(const at::Tensor& flat, int part) const {
    return flat.narrow(0, part * part_numel() + a_numel(), state_numel()).view(state_shape);
  }
};

// later := left (+) right with (a1, S1) (+) (a2, S2) = (a1 a2, a2 S1 + S2),
// where each side is a (a, S) view pair; `left`/`right` may alias `out`.
void compose_into(const at::Tensor& a_left, const at::Tensor& s_left, const at::Tensor& a_right,
                  const at::Tensor& s_right, at::Tensor a_out, at::Tensor s_out) {
  at::Tensor s_new = s_left * as_state_factor(a_right) + s_right;
  at::Tensor a_new = a_left * a_right;
  s_out.copy_(s_new);
  a_out.copy_(a_new);
}

ScanOp affine_scan_op(const Packing& p) {
  ScanOp op;
  op.name = "linear_attention_state";
  // Scan order = sequence order: earlier is on the left.
  op.combine = [p](const at::Tensor& earlier, at::Tensor& later) {
    compose_into(p.a(earlier, 0), p.s(earlier, 0), p.a(later, 0), p.s(later, 0), p.a(later, 0), p.s(later, 0));
  };
  op.identity = [p](at::Tensor& out) {
    out.zero_();
    p.a(out, 0).fill_(1);
  };
  return op;
}

// Pairs for the zigzag layout, scanned over ranks in reverse order: part 0 (a
// first-half chunk) composes with earlier (higher-rank) parts on its right,
// part 1 (a second-half chunk) with earlier parts on its left.
ScanOp zigzag_pair_scan_op(const Packing& p) {
  ScanOp op;
  op.name = "linear_attention_state_pair";
  op.combine = [p](const at::Tensor& earlier, at::Tensor& later) {
    compose_into(p.a(later, 0), p.s(later, 0), p.a(earlier, 0), p.s(earlier, 0), p.a(later, 0), p.s(later, 0));
    compose_into(p.a(earlier, 1), p.s(earlier, 1), p.a(later, 1), p.s(later, 1), p.a(later, 1), p.s(later, 1));
  };
  op.identity = [p](at::Tensor& out) {
    out.zero_();
    p.a(out, 0).fill_(1);
    p.a(out, 1).fill_(1);
  };
  return op;
}

class AllScanPrefix final : public StatePrefix {
 public:
  AllScanPrefix(const SequenceLayout& layout, CommPtr comm, at::Tensor a, PrefixDirection direction)
      : layout_(layout), comm_(std::move(comm)), a_{std::move(a)}, direction_(direction) {}

  void start(const at::Tensor& local) override {
    packing_ = Packing{a_.of(0).sizes().vec(), local[0].sizes().vec()};
    local_ = local.contiguous();
    const auto opts = local_.options();
    if (layout_.kind() == LayoutKind::kContiguous) {
      // Forward runs over ranks in order; backward over the reversed ranks.
      scan_comm_ = direction_ == PrefixDirection::kForward ? comm_ : comm_->reversed();
      element_ = pack({0}, opts);
      scanned_ = at::empty_like(element_);
      works_ = {scan_comm_->exscan(scanned_, element_, affine_scan_op(packing_))};
      return;
    }
    // Zigzag: the sequence lists "first" chunks in rank order, then "second"
    // chunks in reverse rank order. Forward: first = chunk r, second = chunk
    // 2W-1-r; backward reads the sequence from the end: first = chunk 2W-1-r,
    // second = chunk r. Same ranks, same communicators either way.
    const int first = direction_ == PrefixDirection::kForward ? 0 : 1;
    element_ = pack({first}, opts);
    pair_ = pack({first, 1 - first}, opts);
    scanned_ = at::empty_like(element_);
    scanned_pair_ = at::empty_like(pair_);
    works_ = {comm_->exscan(scanned_, element_, affine_scan_op(packing_)),
              comm_->reversed()->exscan(scanned_pair_, pair_, zigzag_pair_scan_op(packing_))};
  }

  at::Tensor finish() override {
    wait_all(works_);
    at::Tensor out = at::empty_like(local_);
    if (layout_.kind() == LayoutKind::kContiguous) {
      out[0].copy_(packing_.s(scanned_, 0));
      return out;
    }
    const int first = direction_ == PrefixDirection::kForward ? 0 : 1;
    // prefix(first_r)  = E, the composition of the first chunks of lower ranks
    // prefix(second_r) = E (+) first_r (+) [first chunks of higher ranks]
    //                      (+) [second chunks of higher ranks]
    out[first].copy_(packing_.s(scanned_, 0));
    at::Tensor acc = scanned_.clone();
    const at::Tensor own = pack({first}, local_.options());
    auto fold = [&](const at::Tensor& a_r, const at::Tensor& s_r) {
      compose_into(packing_.a(acc, 0), packing_.s(acc, 0), a_r, s_r, packing_.a(acc, 0), packing_.s(acc, 0));
    };
    fold(packing_.a(own, 0), packing_.s(own, 0));
    fold(packing_.a(scanned_pair_, 0), packing_.s(scanned_pair_, 0));
    fold(packing_.a(scanned_pair_, 1), packing_.s(scanned_pair_, 1));
    out[1 - first].copy_(packing_.s(acc, 0));
    return out;
  }

 private:
  // [a | S] of the given local chunks, one part each.
  at::Tensor pack(const std::vector<int>& chunks, const at::TensorOptions& opts) const {
    std::vector<at::Tensor> parts;
    for (int i : chunks) {
      parts.push_back(a_.of(i).to(opts).reshape({-1}));
      parts.push_back(local_[i].reshape({-1}));
    }
    return at::cat(parts).to(opts);
  }

  SequenceLayout layout_;
  CommPtr comm_, scan_comm_;
  ChunkDecays a_;
  PrefixDirection direction_;
  Packing packing_{};
  at::Tensor local_, element_, pair_, scanned_, scanned_pair_;
  std::vector<WorkPtr> works_;
};

// ---- kLasp1: the prefix passed chunk to chunk ----
class ChainPrefix final : public StatePrefix {
 public:
  ChainPrefix(const SequenceLayout& layout, CommPtr comm, at::Tensor a, PrefixDirection direction)
      : layout_(layout), comm_(std::move(comm)), a_{std::move(a)}, order_(sequence_order(layout, direction)) {}

  void start(const at::Tensor& local) override { local_ = local.contiguous(); }

  at::Tensor finish() override {
    return chain_exclusive_prefix(layout_, *comm_, order_, local_, [this](int li, const at::Tensor& prefix) {
      return prefix * as_state_factor(a_.of(li)) + local_[li];
    });
  }

 private:
  SequenceLayout layout_;
  CommPtr comm_;
  ChunkDecays a_;
  std::vector<int64_t> order_;
  at::Tensor local_;
};

}  // namespace

std::vector<int64_t> sequence_order(const SequenceLayout& layout, PrefixDirection direction) {
  std::vector<int64_t> order(layout.num_chunks());
  for (int64_t i = 0; i < layout.num_chunks(); ++i)
    order[i] = direction == PrefixDirection::kForward ? i : layout.num_chunks() - 1 - i;
  return order;
}

at::Tensor chain_exclusive_prefix(const SequenceLayout& layout, Communicator& comm, const std::vector<int64_t>& order,
                                  const at::Tensor& local,
                                  const std::function<at::Tensor(int li, const at::Tensor& prefix)>& leaving) {
  const int me = comm.rank();
  const int64_t n = static_cast<int64_t>(order.size());
  at::Tensor out = at::empty_like(local);
  std::vector<WorkPtr> sends;
  at::Tensor carried;  // prefix handed from my previous chunk in the sequence
  for (int64_t i = 0; i < n; ++i) {
    const int64_t c = order[i];
    if (layout.owner_of(c) != me) continue;
    at::Tensor prefix;
    if (i == 0) {
      prefix = at::zeros_like(local[0]);
    } else if (layout.owner_of(order[i - 1]) == me) {
      prefix = carried;
    } else {
      prefix = at::empty_like(local[0]);
      comm.irecv(prefix, layout.owner_of(order[i - 1]), static_cast<int>(i))->wait();
    }
    const int li = layout.local_index_of(c);
    out[li].copy_(prefix);
    at::Tensor next = leaving(li, prefix).contiguous();
    if (i + 1 < n) {
      const int dst = layout.owner_of(order[i + 1]);
      if (dst == me)
        carried = next;
      else
        sends.push_back(comm.isend(next, dst, static_cast<int>(i + 1)));
    }
  }
  wait_all(sends);
  return out;
}

std::unique_ptr<StatePrefix> make_state_prefix(LinearAttentionMethod method, const SequenceLayout& layout,
                                               const CommPtr& comm, const at::Tensor& chunk_decay,
                                               PrefixDirection direction) {
  TORCH_CHECK(comm && comm->size() == layout.world_size(), "linear attention: communicator has ",
              comm ? comm->size() : 0, " ranks, the layout ", layout.world_size());
  TORCH_CHECK(chunk_decay.dim() == 1 || (chunk_decay.dim() == 3 && chunk_decay.size(0) == layout.chunks_per_rank()),
              "linear attention: chunk decay must be [H] or [chunks_per_rank, B, H], got ", chunk_decay.sizes());
  switch (method) {
    case LinearAttentionMethod::kLasp2:
      return std::make_unique<AllGatherPrefix>(layout, comm, chunk_decay, direction);
    case LinearAttentionMethod::kLasp2AllScan:
      return std::make_unique<AllScanPrefix>(layout, comm, chunk_decay, direction);
    case LinearAttentionMethod::kLasp1:
      return std::make_unique<ChainPrefix>(layout, comm, chunk_decay, direction);
    case LinearAttentionMethod::kUlysses: break;
  }
  TORCH_CHECK(false, "linear attention method ", method_name(method),
              " exchanges tokens, not states: it has no state prefix (the operators dispatch it first)");
}

}  // namespace loom::linear_attention

