"""Training steps of a linear layer under a foreign unstructured mask on the CPU: dense, masked dense, sparsekern.

Run from the repository root: ``python bench/unstructured_cpu.py`` (defaults: 4096x4096 weight,
2048 tokens, fp32 (``--dtype bfloat16`` for bf16 layers and activations),
``torch.nn.utils.prune.l1_unstructured`` at amounts 0.5 0.7 0.8 0.9 0.95).

Providers, timed interleaved (one step of each in turn, ``--reps`` rounds; medians reported):

* ``dense``: ``nn.Linear``;
* ``masked``: the same layer pruned with ``l1_unstructured`` (torch's hook computes ``W * mask``
  every forward; the gradient reaches ``weight_orig``);
* ``sparse``: that pruned layer converted with ``from_torch_prune(..., granularity="exact")``,
  on the route ``bsmm_cpu.path`` picks as shipped;
* ``csr`` / ``no-csr``: the same sparse layer with the element-sparse route forced on / off
  (``bsmm_cpu.CSR_CROSSOVER`` and ``CSR_FILL`` patched around its steps): what the route
  thresholds are measured from.

``--fills F ...`` adds cases of whole blocks at block density ``--blocks`` (default 0.3), each
element of them kept with probability ``F``: there ``no-csr`` is the native block kernels, and
``csr`` against it measures ``CSR_FILL``.

A step is forward plus backward of ``y`` against a fixed random ``dy``, with the input requiring
its gradient: all three passes (y, dx, dW) and the bias gradient. ``--split`` adds the sparse
layer's forward and backward laps. The load average (``os.getloadavg``) is printed before and
after, because this 2-core machine is shared.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time

import torch
from torch import nn
from torch.nn.utils import prune

from sparsekern.adapters import from_torch_prune
from sparsekern.kernels import bsmm_cpu, csr_cpu
from sparsekern.kernels.meta import Meta
from sparsekern.testing import random_block_mask


@contextlib.contextmanager
def csr_route(on: bool | None):
    """Force the element-sparse route on (``True``) or off (``False``); ``None`` leaves it as shipped."""
    if on is None:
        yield
        return
    saved = bsmm_cpu.CSR_CROSSOVER, bsmm_cpu.CSR_FILL
    bsmm_cpu.CSR_CROSSOVER, bsmm_cpu.CSR_FILL = (1.0, 1.0) if on else (-1.0, -1.0)
    try:
        yield
    finally:
        bsmm_cpu.CSR_CROSSOVER, bsmm_cpu.CSR_FILL = saved


def step(module: nn.Module, x: torch.Tensor, dy: torch.Tensor) -> tuple[float, float]:
    """One training step's ``(forward, backward)`` seconds; gradients are cleared first, untimed."""
    module.zero_grad(set_to_none=True)
    x.grad = None
    t0 = time.perf_counter()
    y = module(x)
    t1 = time.perf_counter()
    y.backward(dy)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def layers(n: int, k: int, block: int, amount: float | None = None, mask: torch.Tensor | None = None):
    """``(dense, masked, sparse)`` sharing one weight: pruned by ``l1_unstructured(amount)``, or by ``mask``."""
    dense = nn.Linear(k, n)
    masked, holder = nn.Linear(k, n), nn.Sequential(nn.Linear(k, n))
    for layer in (masked, holder[0]):
        layer.load_state_dict(dense.state_dict())
        if mask is None:
            prune.l1_unstructured(layer, "weight", amount=amount)
        else:
            prune.custom_from_mask(layer, "weight", mask)
    holder, _ = from_torch_prune(holder, granularity="exact", block_size=block)
    return dense, masked, holder[0]


def cases(args):
    """``(label, dense, masked, sparse)`` per measured case, built one at a time."""
    for amount in args.amounts:
        yield (f"amount {amount}", *layers(args.n, args.k, args.block, amount=amount))
    for fill in args.fills:
        # Whole blocks at density --blocks, each element of them then kept with probability `fill`.
        mask = random_block_mask((args.n, args.k), args.block, args.blocks, element_density=fill)
        yield (f"blocks {args.blocks} fill {fill}", *layers(args.n, args.k, args.block, mask=mask))


def run(args) -> None:
    torch.manual_seed(0)
    print(f"load average before: {os.getloadavg()}; torch {torch.__version__}, threads {torch.get_num_threads()}")
    shape = f"weight {args.n}x{args.k}, {args.tokens} tokens, {args.dtype}, block {args.block}"
    print(f"{shape}, {args.reps} interleaved rounds")
    dtype = getattr(torch, args.dtype)
    x = torch.randn(args.tokens, args.k).to(dtype).requires_grad_()
    dy = torch.randn(args.tokens, args.n).to(dtype)
    for label, *mods in cases(args):
        dense, masked, sparse = (m.to(dtype) for m in mods)
        meta = Meta(*sparse.layout.meta())
        providers = {
            "dense": (dense, None),
            "masked": (masked, None),
            "sparse": (sparse, None),
            "csr": (sparse, True),
            "no-csr": (sparse, False),
        }
        laps = {name: [] for name in providers}
        for mod, route in providers.values():  # warm-up: builds, caches, workspaces
            with csr_route(route):
                step(mod, x, dy)
        for _ in range(args.reps):
            for name, (mod, route) in providers.items():
                with csr_route(route):
                    laps[name].append(step(mod, x, dy))
        med = {name: statistics.median(f + b for f, b in v) for name, v in laps.items()}
        route = bsmm_cpu.path(meta, dtype)
        ratios = "  ".join(f"{name} {med['dense'] / med[name]:.2f}x" for name in providers)
        print(
            f"{label} (element density {csr_cpu.element_density(meta):.3f}, fill {csr_cpu.fill(meta):.3f}): "
            f"route {route!r}; step ms "
            + " ".join(f"{name} {1000 * t:.0f}" for name, t in med.items())
            + f"; dense/provider: {ratios}"
        )
        if args.split:
            for name in ("dense", "sparse", "csr"):
                fwd = statistics.median(f for f, _ in laps[name])
                bwd = statistics.median(b for _, b in laps[name])
                print(f"    {name}: forward {1000 * fwd:.0f} ms, backward {1000 * bwd:.0f} ms")
    print(f"load average after: {os.getloadavg()}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=4096, help="out_features")
    ap.add_argument("--k", type=int, default=4096, help="in_features")
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--block", type=int, default=32, help="block size of the converted layer")
    ap.add_argument("--amounts", type=float, nargs="*", default=[0.5, 0.7, 0.8, 0.9, 0.95])
    ap.add_argument("--fills", type=float, nargs="*", default=[], help="block masks with these element fills")
    ap.add_argument("--blocks", type=float, default=0.3, help="block density of the --fills cases")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--split", action="store_true", help="also print forward/backward laps")
    run(ap.parse_args())


if __name__ == "__main__":
    main()
