#include "loom/parallel/softmax_attention/ring_pass.h"

namespace loom::softmax_attention {

void ring_forward(const CommPtr& ring, const at::Tensor& kv,
                  const std::function<void(int src, const at::Tensor& kv_block)>& visit) {
  const int R = ring ? ring->size() : 1, g = ring ? ring->rank() : 0;
  at::Tensor current = kv;
  for (int step = 0; step < R; ++step) {
    at::Tensor incoming;
    WorkPtr recv, send;
    if (step + 1 < R) {  // post the next transfer before computing on this block
      incoming = at::empty_like(current);
      recv = ring->irecv(incoming, (g - 1 + R) % R, step);
      send = ring->isend(current, (g + 1) % R, step);
    }
    visit((g - step + R) % R, current);
    if (step + 1 < R) {
      recv->wait();
      send->wait();
      current = incoming;
    }
  }
}

at::Tensor ring_backward(const CommPtr& ring, const at::Tensor& kv, at::Tensor dkv,
                         const std::function<void(int src, const at::Tensor& kv_block, at::Tensor& dkv_block)>& visit) {
  const int R = ring ? ring->size() : 1, g = ring ? ring->rank() : 0;
  at::Tensor current = kv;
  for (int step = 0; step < R; ++step) {
    at::Tensor next_kv;
    WorkPtr recv_kv, send_kv;
    if (step + 1 < R) {  // K,V do not change: send them on before computing
      next_kv = at::empty_like(current);
      recv_kv = ring->irecv(next_kv, (g - 1 + R) % R, 2 * step);
      send_kv = ring->isend(current, (g + 1) % R, 2 * step);
    }
    visit((g - step + R) % R, current, dkv);
    // dK,dV of the block move on with it; after R-1 hops they sit one rank
    // short of the owner, and a last hop brings them home.
    if (R > 1) {
      at::Tensor next_dkv = at::empty_like(dkv);
      auto recv_d = ring->irecv(next_dkv, (g - 1 + R) % R, 2 * step + 1);
      auto send_d = ring->isend(dkv, (g + 1) % R, 2 * step + 1);
      recv_d->wait();
      send_d->wait();
      dkv = next_dkv;
    }
    if (step + 1 < R) {
      recv_kv->wait();
      send_kv->wait();
      current = next_kv;
    }
  }
  return dkv;
}

}  // namespace loom::softmax_attention
