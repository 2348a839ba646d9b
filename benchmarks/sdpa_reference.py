#!/usr/bin/env python3
"""PyTorch's fused causal attention (scaled_dot_product_attention: flash or memory-efficient kernel) at the
shape loom-device-bench times, so the device check prints the bar Loom's blockwise kernel is measured
against. FLOPs: the causal count, 4 B H N^2 d / 2 forward and 2.5x that backward (FlashAttention's
convention), the same count loom-device-bench uses."""
import argparse
import time

import torch

p = argparse.ArgumentParser()
p.add_argument("--batch", type=int, default=2)
p.add_argument("--heads", type=int, default=16)
p.add_argument("--seq", type=int, default=16384)
p.add_argument("--dim", type=int, default=128)
p.add_argument("--dtype", default="bfloat16")
p.add_argument("--reps", type=int, default=10)
a = p.parse_args()
dtype = getattr(torch, a.dtype)
torch.manual_seed(0)
q, k, v = (torch.randn(a.batch, a.heads, a.seq, a.dim, device="cuda", dtype=dtype, requires_grad=True)
           for _ in range(3))


def step():
    o = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    o.backward(torch.ones_like(o))


for _ in range(3):
    step()
torch.cuda.synchronize()
start = time.time()
for _ in range(a.reps):
    step()
torch.cuda.synchronize()
seconds = (time.time() - start) / a.reps
flops = 3.5 * 4 * a.batch * a.heads * a.seq * a.seq * a.dim / 2
print(f"torch scaled_dot_product_attention causal fwd+bwd ({a.dtype}) B={a.batch} H={a.heads} N={a.seq} "
      f"d={a.dim}: {flops / seconds / 1e12:.1f} TFLOP/s ({seconds * 1e3:.1f} ms per step)")
