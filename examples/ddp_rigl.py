"""Block RigL under DistributedDataParallel on the CPU: a byte-level model of the Python stdlib's source.

Run (2 processes, gloo, loopback only):

    torchrun --nproc_per_node 2 examples/ddp_rigl.py
    torchrun --nproc_per_node 2 examples/ddp_rigl.py --steps 200 --density 0.1

Each rank reads a different shard of the batches. The model embeds a window of
``--context`` bytes and predicts the next byte through a wide MLP whose two big
layers are ``SparseLinear`` at ``--density`` with ``--block`` blocks; RigL swaps
blocks every ``--delta-t`` steps. The scheduler averages the dense gradients
over the ranks before scoring and checks after every update that both ranks
hold the same layout (it raises otherwise). At the end the script checks that
both ranks hold identical parameters, and prints the loss on held-out files,
the step time and the same for the dense model trained alike in the same run.
"""

from __future__ import annotations

import argparse
import os
import sysconfig
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import sparsekern
from sparsekern.methods.dst import DSTScheduler


def corpus(limit: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The stdlib's ``.py`` files as bytes, split by file (every 10th file held out), ``limit`` bytes each."""
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))
    train, val = bytearray(), bytearray()
    for i, f in enumerate(files):
        (val if i % 10 == 0 else train).extend(f.read_bytes())
        if len(train) >= limit and len(val) >= limit // 10:
            break
    return torch.tensor(list(train[:limit]), dtype=torch.long), torch.tensor(list(val[: limit // 10]))


def windows(data: torch.Tensor, idx: torch.Tensor, context: int):
    offs = idx[:, None] + torch.arange(context + 1)
    chunk = data[offs]
    return chunk[:, :-1], chunk[:, -1]


class ByteMLP(nn.Module):
    def __init__(self, context: int, width: int, hidden: int):
        super().__init__()
        self.embed = nn.Embedding(256, width)
        self.up = nn.Linear(context * width, hidden)
        self.mid = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, 256)

    def forward(self, x):
        h = self.embed(x).flatten(1)
        return self.out(torch.relu(self.mid(torch.relu(self.up(h)))))


def run(args, sparse: bool, train_data, val_data) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(args.seed)  # the same init on every rank (DDP also broadcasts rank 0's)
    model = ByteMLP(args.context, args.width, args.hidden)
    if sparse:
        rep = sparsekern.sparsify(
            model, method="random", density=args.density, block_size=args.block, exclude_last=True, seed=args.seed
        )
        if rank == 0:
            print(rep.table())
    ddp = DDP(model)
    opt = torch.optim.AdamW(ddp.parameters(), lr=args.lr)
    sched = None
    if sparse:
        sched = DSTScheduler(ddp, opt, method="rigl", delta_t=args.delta_t, end_step=int(0.75 * args.steps), seed=0)
    gen = torch.Generator().manual_seed(args.seed)  # same stream everywhere; each rank takes its slice
    times, swapped = [], 0
    for _ in range(args.steps):
        idx = torch.randint(0, train_data.numel() - args.context - 1, (args.batch * world,), generator=gen)
        x, y = windows(train_data, idx.chunk(world)[rank], args.context)
        t0 = time.perf_counter()
        opt.zero_grad()
        nn.functional.cross_entropy(ddp(x), y).backward()
        opt.step()
        times.append(time.perf_counter() - t0)
        if sched is not None and sched.last_update and sched.last_update[0]["step"] == sched.step_count:
            swapped += sum(u["dropped"] for u in sched.last_update)
    with torch.no_grad():
        idx = torch.arange(0, val_data.numel() - args.context - 1, 7)[:4096]
        x, y = windows(val_data, idx, args.context)
        val = nn.functional.cross_entropy(model(x), y).item()
    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    seen = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(seen, flat)
    assert all(torch.equal(s, seen[0]) for s in seen), "ranks hold different parameters"
    times.sort()
    return {"val_loss": val, "step_ms": 1e3 * times[len(times) // 2], "swapped_blocks": swapped}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--batch", type=int, default=128, help="windows per rank and step")
    p.add_argument("--context", type=int, default=32)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--density", type=float, default=0.1)
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--delta-t", type=int, default=20)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--limit", type=int, default=4_000_000, help="training bytes read from the stdlib")
    args = p.parse_args()
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // int(os.environ.get("WORLD_SIZE", 1))))
    dist.init_process_group("gloo")
    train_data, val_data = corpus(args.limit)
    sparse = run(args, True, train_data, val_data)
    dense = run(args, False, train_data, val_data)
    if dist.get_rank() == 0:
        print(f"ranks: {dist.get_world_size()} (gloo), steps: {args.steps}, batch per rank: {args.batch}")
        print(
            f"block RigL, density {args.density}, {args.block}x{args.block} blocks: val loss "
            f"{sparse['val_loss']:.4f} nats/byte, step {sparse['step_ms']:.1f} ms (median), "
            f"{sparse['swapped_blocks']} blocks swapped, ranks identical"
        )
        print(f"dense:  val loss {dense['val_loss']:.4f} nats/byte, step {dense['step_ms']:.1f} ms (median)")
        print(f"step time dense / sparse: {dense['step_ms'] / sparse['step_ms']:.2f}x")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
