"""What the benchmark suites time besides sparsekern, and the helpers they share.

Peers of a ``SparseLinear`` step (see ``linear.py`` for how each is timed):
``MaskedLinear`` (``F.linear(x, w * mask, b)``, as pruning libraries run it),
torch's BSR path (``bsr_forward``; on CUDA ``bsr_step`` with ``bsr_dense_mm``
and ``sampled_addmm``) and stanford-stk (``StkLinear``, when installed); the
``time_*`` functions time them and turn "torch or stk cannot do this here" into
an ``unavailable: ...`` note and NaN stats instead of an error.

Shared by the suites: ``train_step`` (one forward + backward, lapped),
``half_frozen_mask`` (the freezing cases), ``flop_fractions`` (computed-block
FLOPs over dense per mode) and ``write_tuned`` (merges ``--tune`` results into
``kernels/tuned/<device>.json``).
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from sparsekern import SparseLinear
from sparsekern.bench.common import Laps, progress, time_fn, time_phases

__all__ = [
    "PROVIDERS",
    "STK_BLOCK",
    "TRAIN_MODES",
    "MaskedLinear",
    "StkLinear",
    "bsr_forward",
    "bsr_step",
    "flop_fractions",
    "half_frozen_mask",
    "stk_status",
    "time_bsr",
    "time_bsr_step",
    "time_stk",
    "train_step",
    "write_tuned",
]

PROVIDERS = ("dense", "masked", "sparsekern", "torch_bsr", "stk")
#: The only block size stk supports, and what every dimension must divide by.
STK_BLOCK = 128
TRAIN_MODES = ("forward", "backward", "step")


class MaskedLinear(nn.Module):
    """Dense compute on ``weight * mask`` every step, as pruning libraries run it."""

    def __init__(self, base: nn.Linear, mask: torch.Tensor):
        super().__init__()
        self.weight = base.weight
        self.bias = base.bias
        self.register_buffer("mask", mask.to(base.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.mask, self.bias)


def half_frozen_mask(layer: SparseLinear, generator: torch.Generator) -> torch.Tensor:
    """A frozen mask covering a random half of ``layer``'s kept blocks."""
    lay = layer.layout
    (n, k), (bm, bk) = lay.shape, lay.block_size
    kept = (lay.block_code > 0).flatten().nonzero().squeeze(1).cpu()
    pick = kept[torch.randperm(kept.numel(), generator=generator)[: kept.numel() // 2]]
    grid = torch.zeros(lay.block_code.numel(), dtype=torch.bool)
    grid[pick] = True
    dense = grid.view(lay.grid).repeat_interleave(bm, 0).repeat_interleave(bk, 1)[:n, :k]
    return dense.to(lay.device) & layer.mask


def bsr_forward(base: nn.Linear, mask: torch.Tensor, block: int):
    """A forward-only callable ``x -> y`` on a BSR copy of ``base.weight * mask``.

    Raises whatever torch raises when BSR is not supported for this device/dtype.
    """
    with torch.no_grad():
        wb = (base.weight * mask).to_sparse_bsr((block, block))
        bias = base.bias.detach() if base.bias is not None else None
    if base.weight.device.type == "cuda":
        from torch.sparse._triton_ops import bsr_dense_mm

        def fwd(x):
            y = bsr_dense_mm(wb, x.t()).t()
            return y if bias is None else y + bias

    else:

        def fwd(x):
            y = torch.sparse.mm(wb, x.t()).t()
            return y if bias is None else y + bias

    return fwd


class StkLinear(nn.Module):
    """``base`` with weight ``base.weight * mask`` as a stanford-stk block-sparse matrix (128x128 blocks).

    Forward ``y = dsd(W, x^T)^T + b``; stk's autograd computes ``dW`` with
    ``sdd`` on ``W``'s topology and ``dx`` with ``dsd`` on ``W^T``. Raises
    ``ImportError`` without stk and whatever stk raises for unsupported cases.
    """

    def __init__(self, base: nn.Linear, mask: torch.Tensor, block: int = STK_BLOCK):
        super().__init__()
        import stk

        self._stk = stk
        with torch.no_grad():
            # Kept blocks of random weights are never all zero, so to_sparse keeps exactly the mask's blocks.
            matrix = stk.ops.to_sparse(base.weight * mask.to(base.weight.dtype), block)
        self.matrix = matrix.requires_grad_(True)
        self.bias = base.bias

    def clear_grads(self) -> None:
        self.matrix.data.grad = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self._stk.ops.dsd(self.matrix, x.t()).t()
        return y if self.bias is None else y + self.bias


def stk_status() -> str | None:
    """``None`` when ``import stk`` works, else the one line the run prints."""
    try:
        import stk  # noqa: F401
    except Exception as exc:  # ImportError, or a broken install: either way there is no peer
        return f"stk (stanford-stk) is absent ({type(exc).__name__}): no stk numbers in this run"
    return None


def train_step(module: nn.Module, x: torch.Tensor, dy: torch.Tensor, laps: Laps, weight_grad_only: bool = False):
    """One forward + backward; laps ``forward``/``backward`` (or only ``weight_grad``)."""
    for p in module.parameters():
        p.grad = None
    if isinstance(module, StkLinear):
        module.clear_grads()
    x.grad = None
    laps.start()
    y = module(x)
    if weight_grad_only:
        laps.start()  # the forward is setup here, not measured
        y.backward(dy)
        laps.lap("weight_grad")
    else:
        laps.lap("forward")
        y.backward(dy)
        laps.lap("backward")


def flop_fractions(layer: SparseLinear, tokens: int) -> dict[str, float]:
    """Computed-block FLOPs over dense FLOPs, per mode."""
    f = layer.layout.flops(tokens)
    fwd, dx, dw = (f[p]["block"] for p in ("forward", "input_grad", "weight_grad"))
    dense = f["forward"]["dense"]
    return {
        "forward": fwd / dense,
        "backward": (dx + dw) / (2 * dense),
        "step": (fwd + dx + dw) / (3 * dense),
        "weight_grad": dw / dense,
    }


def time_bsr(base: nn.Linear, mask: torch.Tensor, block: int, x: torch.Tensor, timing: dict):
    """``(stats, note)`` for the torch BSR forward; NaN stats and an ``unavailable: ...`` note when it fails."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "BSR support is in beta", untuned-GPU warnings
            fwd = bsr_forward(base, mask, block)
            with torch.no_grad():
                fwd(x)  # fail here, not inside the timing loop
                return time_fn(lambda: fwd(x), **timing), ""
    except Exception as exc:  # any failure means "torch cannot do this here"
        first = str(exc).splitlines()[0][:120] if str(exc) else ""
        note = f"unavailable: {type(exc).__name__}: {first}"
        progress(f"  torch_bsr {note}")
        return {"p20": math.nan, "p50": math.nan, "p80": math.nan}, note


def bsr_step(base: nn.Linear, mask: torch.Tensor, block: int):
    """CUDA only: ``step(x, dy, laps)`` running forward and backward with ``torch.sparse._triton_ops``.

    ``W`` and ``W^T`` are BSR copies of ``base.weight * mask`` (built once, as a
    layout would be). Forward ``y = bsr_dense_mm(W, x^T)^T + b``; backward
    ``dx = bsr_dense_mm(W^T, dy^T)^T``, ``dW = sampled_addmm(W, dy^T, x)`` (dy^T x
    on W's blocks only), ``db = dy.sum(0)``.
    """
    from torch.sparse._triton_ops import bsr_dense_mm, sampled_addmm

    with torch.no_grad():
        w = base.weight * mask
        wb = w.to_sparse_bsr((block, block))
        wtb = w.t().contiguous().to_sparse_bsr((block, block))
        bias = base.bias.detach() if base.bias is not None else None

    def step(x, dy, laps):
        with torch.no_grad():
            laps.start()
            y = bsr_dense_mm(wb, x.t()).t()
            if bias is not None:
                y = y + bias
            laps.lap("forward")
            bsr_dense_mm(wtb, dy.t()).t()
            sampled_addmm(wb, dy.t(), x, beta=0.0)
            dy.sum(0)
            laps.lap("backward")

    return step


def time_bsr_step(base: nn.Linear, mask: torch.Tensor, block: int, x: torch.Tensor, dy: torch.Tensor, timing: dict):
    """Stats of the CUDA BSR training step, or ``None`` when torch cannot run it (the caller times the forward)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "BSR support is in beta", untuned-GPU warnings
            step = bsr_step(base, mask, block)
            step(x, dy, Laps(x.device))  # fail here, not inside the timing loop
            return time_phases(lambda laps: step(x, dy, laps), **timing)
    except Exception as exc:  # the backward ops are beta: fall back to the forward alone
        first = str(exc).splitlines()[0][:120] if str(exc) else ""
        progress(f"  torch_bsr backward unavailable ({type(exc).__name__}: {first}): forward only")
        return None


def time_stk(base: nn.Linear, mask: torch.Tensor, block: int, x: torch.Tensor, dy: torch.Tensor, timing: dict):
    """``(stats, note)`` of stk's training step; NaN stats and an ``unavailable: ...`` note when stk fails."""
    try:
        layer = StkLinear(base, mask, block)
        layer(x).backward(dy)  # fail here, not inside the timing loop
        return time_phases(lambda laps: train_step(layer, x, dy, laps), **timing), ""
    except Exception as exc:  # any failure means "stk cannot do this here"
        first = str(exc).splitlines()[0][:120] if str(exc) else ""
        note = f"unavailable: {type(exc).__name__}: {first}"
        progress(f"  stk {note}")
        nan = {"p20": math.nan, "p50": math.nan, "p80": math.nan}
        return {m: dict(nan) for m in TRAIN_MODES}, note


def write_tuned(records: dict[str, dict]) -> list[str]:
    """Merge ``records`` into ``kernels/tuned/<device>.json`` files; return the paths written."""
    import json

    from sparsekern.kernels import configs as kcfg

    written = []
    for name, recs in records.items():
        path = kcfg.tuned_path(name)
        old = json.loads(path.read_text()) if path.exists() else {}
        merged = {**old, **recs}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(dict(sorted(merged.items())), indent=1) + "\n")
        kcfg.load_tuned.cache_clear()
        written.append(f"{path} ({len(recs)} tuned, {len(merged)} total)")
    return written
