"""Block RigL on scikit-learn's digits: a wide MLP at density 0.1 with partly frozen weights.

The hidden ``H x H`` layer of ``64 -> H -> H -> 10`` (first and last layers stay
dense, as in RigL) starts at density 0.1 with a quarter of its kept weights
frozen at their initial values, and is trained with RigL (``DSTScheduler``).
Four runs, the same data, seed and schedule:

* ``dense``: no sparsity (reference accuracy and time);
* ``masked dense, block RigL``: the way mask libraries train: ``nn.Linear``
  with ``weight * mask`` in the forward and the gradient masked to the
  trainable weights; all three GEMMs stay dense;
* ``sparsekern, block RigL``: ``SparseLinear`` with whole ``B x B`` blocks
  dropped and grown; pruned blocks are skipped by all three GEMMs and frozen
  blocks by the weight gradient;
* ``sparsekern, element RigL``: the published element-level RigL on
  ``SparseLinear``. No block is empty, so nothing is skipped: every block is
  mixed and the CPU path runs one dense GEMM on the merged weight, slower
  than ``nn.Linear`` because merging the mixed blocks costs more than the GEMM.

The table gives test accuracy, the FLOPs each pass skips over the whole
model (``sparsekern.report``, from the layouts) and the training wall time.

Run it on the CPU path (not Triton's interpreter, so leave
``SPARSEKERN_INTERPRET`` unset)::

    pip install -e '.[examples]'
    python examples/digits_rigl.py            # about 1-3 minutes on 2 cores
    python examples/digits_rigl.py --quick    # a smoke run

Measured on the project's 2-core CPU while other jobs ran (load average 2.7
to 4.4), three runs: test accuracy dense 96.9%, masked dense block RigL
97.8%, sparsekern block RigL 97.8% (the same masks and updates as the masked
run, hence the same accuracy), element RigL 97.6%; training wall time dense
12.4-22.2 s, masked dense block RigL 16.7-34.0 s, sparsekern block RigL
7.5-8.8 s, element RigL 37.5-81.0 s. Block RigL skips 87% / 90% / 90% of the
model's forward / input-gradient / weight-gradient FLOPs.
"""

from __future__ import annotations

import argparse
import os
import time

# Spin-waiting OpenMP threads slow the CPU path's many small GEMMs on a shared machine (see README).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import sparsekern  # noqa: E402
from sparsekern.methods.dst import DSTScheduler  # noqa: E402
from sparsekern.nn import SparseLinear  # noqa: E402
from sparsekern.testing import random_block_mask  # noqa: E402


def load_data(seed: int):
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)
    mean, std = x_tr.mean(0), x_tr.std(0) + 1e-3
    as_x = lambda a: torch.tensor((a - mean) / std, dtype=torch.float32)  # noqa: E731
    return as_x(x_tr), torch.tensor(y_tr), as_x(x_te), torch.tensor(y_te)


class MaskedLinear(nn.Linear):
    """``nn.Linear`` trained the way mask libraries do it: dense GEMMs, ``W * mask``, masked gradient.

    It has the ``set_masks``/``mask``/``frozen_mask``/``block_size`` protocol
    ``DSTScheduler`` drives, so both models run the same RigL.
    """

    def __init__(self, in_features, out_features, mask, frozen_mask, block_size):
        super().__init__(in_features, out_features)
        self.block_size = block_size
        self.register_buffer("mask", mask.clone())
        self.register_buffer("frozen_mask", frozen_mask.clone())
        self.weight.register_hook(lambda g: g * (self.mask & ~self.frozen_mask))

    def forward(self, x):
        return F.linear(x, self.weight * self.mask, self.bias)

    @torch.no_grad()
    def set_masks(self, mask, frozen_mask=None, optimizer=None):
        frozen_mask = torch.zeros_like(mask) if frozen_mask is None else frozen_mask
        stay = self.mask & mask
        self.weight.mul_(stay)  # grown weights start at zero, dropped ones are zeroed
        if optimizer is not None:
            keep = (self.mask & ~self.frozen_mask) & (mask & ~frozen_mask)
            for val in optimizer.state.get(self.weight, {}).values():
                if torch.is_tensor(val) and val.shape == self.weight.shape:
                    val.mul_(keep)
        self.mask.copy_(mask)
        self.frozen_mask.copy_(frozen_mask)
        return self


def initial_masks(kind: str, hidden: int, block: int, density: float, frozen_share: float, gen):
    """Random ``(mask, frozen_mask)`` of the hidden layer: whole blocks, or elements (same density)."""
    if kind == "element":
        mask = torch.rand(hidden, hidden, generator=gen) < density
        return mask, mask & (torch.rand(hidden, hidden, generator=gen) < frozen_share)
    mask = random_block_mask((hidden, hidden), block, density, generator=gen)
    frozen = random_block_mask((hidden, hidden), block, frozen_share, generator=gen)
    return mask, mask & frozen


def build(variant: str, args, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    h = args.hidden
    first, hidden, last = nn.Linear(64, h), nn.Linear(h, h), nn.Linear(h, 10)
    if variant != "dense":
        gen = torch.Generator().manual_seed(seed)
        kind = "element" if "element" in variant else "block"
        mask, frozen = initial_masks(kind, h, args.block, args.density, args.frozen, gen)
        with torch.no_grad():
            hidden.weight.mul_(args.density**-0.5)  # keep the activations' scale at low density
        if variant.startswith("masked"):
            sparse = MaskedLinear(h, h, mask, frozen, args.block)
            with torch.no_grad():
                sparse.weight.copy_(hidden.weight * mask)
                sparse.bias.copy_(hidden.bias)
            hidden = sparse
        else:
            hidden = SparseLinear.from_dense(hidden, mask=mask, frozen_mask=frozen, block_size=args.block)
    return nn.Sequential(first, nn.ReLU(), hidden, nn.ReLU(), last)


def train(variant: str, data, args) -> dict:
    x_tr, y_tr, x_te, y_te = data
    model = build(variant, args, args.seed)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    steps_per_epoch = -(-len(x_tr) // args.batch)
    total = args.epochs * steps_per_epoch
    sched = None
    if variant != "dense":
        granularity = "element" if "element" in variant else "block"
        sched = DSTScheduler(
            model, opt, method="rigl", delta_t=args.delta_t, end_step=int(0.75 * total),
            drop_fraction=0.3, granularity=granularity,
        )  # fmt: skip
    gen = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    for _ in range(args.epochs):
        order = torch.randperm(len(x_tr), generator=gen)
        for i in range(0, len(x_tr), args.batch):
            idx = order[i : i + args.batch]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x_tr[idx]), y_tr[idx]).backward()
            opt.step()
    wall = time.perf_counter() - start
    model.eval()
    with torch.no_grad():
        acc = (model(x_te).argmax(1) == y_te).float().mean().item()
    rep = sparsekern.report(model, x_tr[: args.batch].clone())
    saved = rep.total().flops_saved
    hidden = model[2]
    info = {"variant": variant, "acc": acc, "wall": wall, "steps": total, "saved": saved}
    if isinstance(hidden, SparseLinear):
        info["hidden"] = hidden.layout.summary()
    if sched is not None:
        info["dense_grads"] = sched.dense_grad_count
        sched.remove()
    return info


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--density", type=float, default=0.1)
    ap.add_argument("--frozen", type=float, default=0.25, help="share of the kept hidden weights frozen")
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--delta-t", type=int, default=20)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="a smoke run: width 512, 3 epochs")
    args = ap.parse_args()
    if args.quick:
        args.hidden, args.epochs, args.delta_t = 512, 3, 10
    if os.environ.get("SPARSEKERN_INTERPRET") == "1":
        print("warning: SPARSEKERN_INTERPRET=1 runs Triton's interpreter; timings mean nothing")
    data = load_data(args.seed)
    variants = ["dense", "masked dense, block RigL", "sparsekern, block RigL", "sparsekern, element RigL"]
    print(
        f"digits: {len(data[0])} train / {len(data[2])} test, MLP 64-{args.hidden}-{args.hidden}-10, "
        f"hidden density {args.density}, {args.block}x{args.block} blocks, {args.frozen:.0%} of kept frozen, "
        f"{args.epochs} epochs of batch {args.batch}, torch threads {torch.get_num_threads()}, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    rows = [train(v, data, args) for v in variants]
    print()
    print("| run | test acc | fwd FLOPs saved | dX FLOPs saved | dW FLOPs saved | train wall s | vs masked dense |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    ref = rows[1]["wall"]
    for r in rows:
        s = r["saved"]
        print(
            f"| {r['variant']} | {100 * r['acc']:.1f}% | {s['forward']:.1%} | {s['input_grad']:.1%} "
            f"| {s['weight_grad']:.1%} | {r['wall']:.1f} | {ref / r['wall']:.2f}x |"
        )
    print("\nFLOPs saved: whole model, one training step, computed blocks against dense (sparsekern.report).")
    for r in rows:
        if "hidden" in r:
            h = r["hidden"]
            print(
                f"{r['variant']}: hidden layer block density {h['block_density']:.3f}, computes "
                f"fwd {h['forward_flop_fraction']:.3f} / dX {h['input_grad_flop_fraction']:.3f} / "
                f"dW {h['weight_grad_flop_fraction']:.3f} of dense; {r['dense_grads']} dense dW for RigL"
            )


if __name__ == "__main__":
    main()
