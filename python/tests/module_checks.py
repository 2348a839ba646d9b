"""Checks of the `loom` module under torch.distributed.run (Gloo), any number of processes.

Every method of every operator against a pure-PyTorch reference on the whole
sequence (float64, outputs and input gradients within 1e-9), and Loom's typed
errors as Python exceptions with Loom's messages. Prints "module checks: N
passed" on rank 0 and exits 0, or names the failures and exits 1.
"""
import math
import sys

import torch
import torch.distributed as dist

import loom

TOLERANCE = 1e-9


def reference_linear(q, k, v, decay):
    n = q.shape[2]
    i = torch.arange(n)
    distance = (i[:, None] - i[None, :]).to(q.dtype)
    weights = torch.where(distance >= 0, decay[:, None, None] ** distance.clamp(min=0), torch.zeros((), dtype=q.dtype))
    return torch.matmul(torch.matmul(q, k.transpose(-1, -2)) * weights, v)


def reference_softmax(q, k, v, window=0):
    n, d = q.shape[2], q.shape[3]
    i = torch.arange(n)
    hidden = i[None, :] > i[:, None]
    if window > 0:
        hidden |= i[None, :] <= i[:, None] - window
    scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(d)
    return torch.matmul(scores.masked_fill(hidden, float("-inf")).softmax(-1), v)


def reference_delta(q, k, v, beta, log_alpha):
    b, h, n, dk = q.shape
    state = torch.zeros(b, h, dk, v.shape[3], dtype=q.dtype)
    eye = torch.eye(dk, dtype=q.dtype)
    outs = []
    for t in range(n):
        kt = k[:, :, t]
        bt, at = beta[:, :, t, None, None], log_alpha[:, :, t, None, None].exp()
        state = torch.matmul(at * (eye - bt * kt[..., :, None] * kt[..., None, :]), state) \
            + bt * kt[..., :, None] * v[:, :, t][..., None, :]
        outs.append(torch.matmul(state.transpose(-1, -2), q[:, :, t][..., None])[..., 0])
    return torch.stack(outs, dim=2)


class Checks:
    def __init__(self, rank, world, group):
        self.rank, self.world, self.group = rank, world, group
        self.passed, self.failed = 0, []

    def record(self, name, ok, detail=""):
        if ok:
            self.passed += 1
        else:
            self.failed.append(f"{name}: {detail}")

    def compare(self, name, layout, inputs, loom_fn, reference_fn):
        """inputs: whole-sequence tensors (sequence on dim 2), the same on every rank."""
        full = [t.clone().requires_grad_(True) for t in inputs]
        local = [layout.shard(t.detach(), self.rank, dim=2).requires_grad_(True) for t in inputs]
        expected = reference_fn(*full)
        out = loom_fn(*local)
        # A fixed random cotangent on the whole output, sharded like it.
        torch.manual_seed(7)
        cotangent = torch.randn_like(expected)
        (expected * cotangent).sum().backward()
        (out * layout.shard(cotangent, self.rank, dim=2)).sum().backward()
        gathered = [torch.empty_like(out) for _ in range(self.world)]
        dist.all_gather(gathered, out.detach().contiguous())
        error = (layout.unshard(gathered, dim=2) - expected.detach()).abs().max().item()
        for t_full, t_local in zip(full, local):
            grads = [torch.empty_like(t_local.grad) for _ in range(self.world)]
            dist.all_gather(grads, t_local.grad.contiguous())
            error = max(error, (layout.unshard(grads, dim=2) - t_full.grad).abs().max().item())
        self.record(name, error <= TOLERANCE, f"max |difference| {error:.3g} > {TOLERANCE:g}")

    def expect_error(self, name, exception_type, message, fn):
        try:
            fn()
        except exception_type as e:
            self.record(name, message in str(e), f"message {str(e)!r} lacks {message!r}")
            return
        except Exception as e:  # noqa: BLE001 - the wrong type is the failure being reported
            self.record(name, False, f"raised {type(e).__name__} instead of {exception_type.__name__}: {e}")
            return
        self.record(name, False, f"no {exception_type.__name__} raised")


def main():
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    group = dist.group.WORLD
    torch.set_default_dtype(torch.float64)
    checks = Checks(rank, world, group)
    torch.manual_seed(0)
    B, H, N, D = 2, 2, 48, 8

    for kind in ("zigzag", "contiguous"):
        layout = loom.SequenceLayout(kind, N, world)
        q, k, v = (torch.randn(B, H, N, D) * 0.5 for _ in range(3))
        pq, pk = q.abs(), k.abs()  # linear attention takes feature-mapped (positive) inputs
        decay = torch.tensor([0.9, 0.97])
        for method in ("lasp2", "lasp2_allscan", "lasp1"):
            checks.compare(f"linear {method} {kind}", layout, [pq, pk, v],
                           lambda a, b, c, m=method: loom.lasp2_linear_attention(a, b, c, layout, group, method=m,
                                                                                 decay=decay, block_size=8),
                           lambda a, b, c: reference_linear(a, b, c, decay))
        # Ulysses shards the heads over the group: only where they divide.
        for method in ("ring", "allgather") + (("ulysses",) if H % world == 0 else ()):
            checks.compare(f"softmax {method} {kind}", layout, [q, k, v],
                           lambda a, b, c, m=method: loom.attention(a, b, c, layout, group, method=m, block=8),
                           reference_softmax)
        checks.compare(f"softmax window {kind}", layout, [q, k, v],
                       lambda a, b, c: loom.attention(a, b, c, layout, group, method="ring", window=5, block=8),
                       lambda a, b, c: reference_softmax(a, b, c, window=5))
        kn = torch.nn.functional.normalize(k, dim=-1)
        beta = torch.rand(B, H, N) * 0.8 + 0.1
        log_alpha = -torch.rand(B, H, N) * 0.3
        for method in ("lasp2", "lasp2_allscan", "lasp1"):
            checks.compare(f"gated delta {method} {kind}", layout, [q, kn, v, beta, log_alpha],
                           lambda a, b, c, d, e, m=method: loom.gated_delta(a, b, c, d, e, layout, group, method=m,
                                                                            block_size=8),
                           reference_delta)

    # Loom's typed errors, with Loom's messages.
    layout = loom.SequenceLayout("zigzag", N, world)
    x = torch.ones(B, H, layout.local_len, D)
    checks.expect_error("bad method", loom.ConfigError,
                        "linear attention method 'lasp3': allowed values are lasp2, lasp2_allscan, lasp1",
                        lambda: loom.lasp2_linear_attention(x, x, x, layout, group, method="lasp3"))
    checks.expect_error("config error is a ValueError", ValueError, "allowed values are contiguous, zigzag",
                        lambda: loom.SequenceLayout("diagonal", N, world))
    checks.expect_error("layout of another group size", loom.ConfigError,
                        f"the layout is for {world + 1} ranks but the process group has {world}",
                        lambda: loom.attention(x, x, x, loom.SequenceLayout("zigzag", N, world + 1), group))
    checks.expect_error("offload is not for Python", loom.UnsupportedError, "method 'offload' needs Loom's memory",
                        lambda: loom.attention(x, x, x, layout, group, method="offload"))
    checks.record("error hierarchy", issubclass(loom.CommTimeout, loom.CommError)
                  and issubclass(loom.CommError, loom.LoomError) and issubclass(loom.LoomError, RuntimeError),
                  "loom.CommTimeout < CommError < LoomError < RuntimeError")
    stats = loom.comm_stats(group)
    checks.record("traffic counted", stats.get("all_gather", {}).get("calls", 0) > 0 or world == 1, str(stats))

    failed = torch.tensor([len(checks.failed)])
    dist.all_reduce(failed)
    for failure in checks.failed:
        print(f"[rank {rank}] FAILED {failure}", flush=True)
    if rank == 0:
        print(f"module checks: {checks.passed} passed, {int(failed.item())} failed across {world} ranks")
    dist.destroy_process_group()
    return 0 if failed.item() == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
