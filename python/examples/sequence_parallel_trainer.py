"""A plain PyTorch language model with Loom's sequence-parallel operators inside.

Launch (two processes, Gloo on the CPU; PYTHONPATH holds the built `loom` module):

    PYTHONPATH=build/python python3 -m torch.distributed.run --standalone --nproc_per_node 2 \
        --redirects 2 --tee 2 \
        python/examples/sequence_parallel_trainer.py --steps 3 --check

(--redirects 2 --tee 2 works around Debian's torch 1.13 launcher under Python
3.11, which cannot parse its own default "--redirects 0"; newer torch needs
nothing of the sort, and the flags do no harm there.)

Each process holds its shard of every sequence (loom.SequenceLayout, zigzag),
and the model's three mixers call Loom: LASP-2 linear attention with a decay,
ring softmax attention, and Gated DeltaNet. Everything else is ordinary
PyTorch (nn.Module, autograd, an SGD step); the gradients of the replicated
parameters are summed over the group with torch.distributed, as data-parallel
training would.

With --check, every rank also runs the same model on the whole sequence in
one process with pure-PyTorch reference mixers (the O(N^2) definitions, no
Loom), in float64, and compares the loss at every step, the gathered logits
and the summed gradients: each must agree within --tolerance (1e-9). Exit 0
when they do, 1 otherwise.
"""
import argparse
import math
import sys

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import loom


# ---- mixers: Loom across the group, or the single-process reference ----

class LoomOps:
    """Loom's operators on this rank's shard."""

    def __init__(self, layout, group):
        self.layout, self.group = layout, group

    def linear_attention(self, q, k, v, decay):
        return loom.lasp2_linear_attention(q, k, v, self.layout, self.group, method="lasp2", decay=decay,
                                           block_size=8)

    def softmax_attention(self, q, k, v):
        return loom.attention(q, k, v, self.layout, self.group, method="ring", block=8)

    def gated_delta(self, q, k, v, beta, log_alpha):
        return loom.gated_delta(q, k, v, beta, log_alpha, self.layout, self.group, method="lasp2", block_size=8)


class ReferenceOps:
    """The definitions on the whole sequence, in plain PyTorch."""

    def linear_attention(self, q, k, v, decay):
        n = q.shape[2]
        i = torch.arange(n)
        distance = (i[:, None] - i[None, :]).to(q.dtype)
        weights = torch.where(distance >= 0, decay[:, None, None] ** distance.clamp(min=0), torch.zeros((), dtype=q.dtype))
        return torch.matmul(torch.matmul(q, k.transpose(-1, -2)) * weights, v)

    def softmax_attention(self, q, k, v):
        n, d = q.shape[2], q.shape[3]
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(d)
        future = torch.triu(torch.ones(n, n, dtype=torch.bool), diagonal=1)
        return torch.matmul(scores.masked_fill(future, float("-inf")).softmax(-1), v)

    def gated_delta(self, q, k, v, beta, log_alpha):
        b, h, n, dk = q.shape
        state = torch.zeros(b, h, dk, v.shape[3], dtype=q.dtype)
        eye = torch.eye(dk, dtype=q.dtype)
        outs = []
        for t in range(n):
            kt, vt, qt = k[:, :, t], v[:, :, t], q[:, :, t]
            bt, at = beta[:, :, t, None, None], log_alpha[:, :, t, None, None].exp()
            transition = at * (eye - bt * kt[..., :, None] * kt[..., None, :])
            state = torch.matmul(transition, state) + bt * kt[..., :, None] * vt[..., None, :]
            outs.append(torch.matmul(state.transpose(-1, -2), qt[..., None])[..., 0])
        return torch.stack(outs, dim=2)


# ---- the model: nothing Loom-specific but the ops it is given ----

class RMSNorm(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class Mixer(nn.Module):
    def __init__(self, kind, dim, heads):
        super().__init__()
        self.kind, self.heads, self.head_dim = kind, heads, dim // heads
        self.norm = RMSNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.out = nn.Linear(dim, dim, bias=False)
        if kind == "linear":
            # A fixed decay per head (RetNet / Lightning Attention style): Loom's
            # decay is a constant of the layer, not a trained parameter.
            self.register_buffer("decay", torch.sigmoid(torch.linspace(1.0, 3.0, heads)))
        if kind == "delta":
            self.gates = nn.Linear(dim, 2 * heads)

    def split_heads(self, x):  # [B, n, D] -> [B, H, n, d]
        b, n, _ = x.shape
        return x.view(b, n, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x, ops):
        h = self.norm(x)
        q, k, v = (self.split_heads(t) for t in self.qkv(h).chunk(3, dim=-1))
        if self.kind == "linear":
            q, k = F.elu(q) + 1, F.elu(k) + 1  # a positive feature map
            y = ops.linear_attention(q, k, v, self.decay)
        elif self.kind == "softmax":
            y = ops.softmax_attention(q, k, v)
        else:
            k = F.normalize(k, dim=-1)
            beta_logit, alpha_logit = self.gates(h).transpose(1, 2).chunk(2, dim=1)  # [B, H, n] each
            y = ops.gated_delta(q, k, v, torch.sigmoid(beta_logit), F.logsigmoid(alpha_logit))
        b, _, n, _ = y.shape
        return x + self.out(y.transpose(1, 2).reshape(b, n, -1))


class TinyLM(nn.Module):
    def __init__(self, vocab, dim, heads):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.mixers = nn.ModuleList([Mixer(kind, dim, heads) for kind in ("linear", "softmax", "delta")])
        self.norm = RMSNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens, ops):
        x = self.embed(tokens)
        for mixer in self.mixers:
            x = mixer(x, ops)
        return self.head(self.norm(x))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=32)
    parser.add_argument("--dim", type=int, default=16)
    parser.add_argument("--heads", type=int, default=2)
    parser.add_argument("--layout", default="zigzag", choices=["zigzag", "contiguous"])
    parser.add_argument("--lr", type=float, default=0.5)
    parser.add_argument("--check", action="store_true", help="compare with the single-process reference")
    parser.add_argument("--tolerance", type=float, default=1e-9)
    args = parser.parse_args()

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    group = dist.group.WORLD
    torch.set_default_dtype(torch.float64)
    torch.manual_seed(0)  # the same parameters and data on every rank
    model = TinyLM(args.vocab, args.dim, args.heads)
    reference = TinyLM(args.vocab, args.dim, args.heads)
    reference.load_state_dict(model.state_dict())
    tokens = torch.randint(args.vocab, (args.batch, args.seq_len + 1))
    inputs, labels = tokens[:, :-1], tokens[:, 1:]

    layout = loom.SequenceLayout(args.layout, args.seq_len, world)
    local_inputs = layout.shard(inputs, rank, dim=1)
    local_labels = layout.shard(labels, rank, dim=1)
    ops = LoomOps(layout, group)
    if rank == 0:
        print(f"{world} ranks, {layout}, model {sum(p.numel() for p in model.parameters())} parameters (float64)")

    worst = {"loss": 0.0, "logits": 0.0, "gradients": 0.0}
    for step in range(args.steps):
        model.zero_grad()
        logits = model(local_inputs, ops)  # [B, n_local, vocab]
        # The mean over every token of the group: each rank's sum over its
        # tokens, divided by the global count, summed by the all-reduce.
        loss = F.cross_entropy(logits.reshape(-1, args.vocab), local_labels.reshape(-1),
                               reduction="sum") / labels.numel()
        loss.backward()
        for p in model.parameters():
            dist.all_reduce(p.grad)
        global_loss = loss.detach().clone()
        dist.all_reduce(global_loss)
        line = f"step {step} loss {global_loss.item():.12f}"

        if args.check:
            reference.zero_grad()
            ref_logits = reference(inputs, ReferenceOps())
            ref_loss = F.cross_entropy(ref_logits.reshape(-1, args.vocab), labels.reshape(-1))
            ref_loss.backward()
            gathered = [torch.empty_like(logits) for _ in range(world)]
            dist.all_gather(gathered, logits.detach())
            worst["loss"] = max(worst["loss"], abs(global_loss.item() - ref_loss.item()))
            worst["logits"] = max(worst["logits"], (layout.unshard(gathered, dim=1) - ref_logits).abs().max().item())
            for (name, p), q in zip(model.named_parameters(), reference.parameters()):
                worst["gradients"] = max(worst["gradients"], (p.grad - q.grad).abs().max().item())
            line += f" (reference {ref_loss.item():.12f})"
        if rank == 0:
            print(line, flush=True)

        with torch.no_grad():
            for p in model.parameters():
                p -= args.lr * p.grad
            for q in reference.parameters():
                if q.grad is not None:
                    q -= args.lr * q.grad

    status = 0
    if rank == 0:
        stats = loom.comm_stats(group)
        moved = ", ".join(f"{op} {s['calls']} calls {s['bytes_received']} B received" for op, s in stats.items())
        print(f"loom traffic on rank 0: {moved}")
    if args.check:
        ok = all(value <= args.tolerance for value in worst.values())
        if rank == 0:
            print("max |difference| against the single-process reference: "
                  f"loss {worst['loss']:.3g}, logits {worst['logits']:.3g}, gradients {worst['gradients']:.3g} "
                  f"(tolerance {args.tolerance:g}): {'OK' if ok else 'MISMATCH'}")
        status = 0 if ok else 1
        flag = torch.tensor([status])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        status = int(flag.item())
    dist.destroy_process_group()
    return status


if __name__ == "__main__":
    sys.exit(main())
