"""Conv suite: one ``SparseConv2d`` training step on ResNet-50 layers, against dense and masked dense.

Layers (``Cin -> Cout``, kernel, stride, input size), from ResNet-50:

* ``3x3 64->64 @56``: a stage-1 bottleneck conv;
* ``3x3 256->256 @14``: a stage-3 bottleneck conv (the issue's CPU target layer);
* ``1x1 1024->256 @14``: a stage-3 reduction;
* ``7x7 3->64 s2 @224``: the stem. With 3 input channels a block column holds
  3 real channels and ``bk - 3`` padding, so blocks cost up to ``bk / 3`` times
  the useful work; the FLOP fraction column shows it.

Providers, timed in turn (one step each, round after round) on the same weight,
input and ``dy``, so each density carries its own dense time from the same
stretch of time:
``dense`` (``nn.Conv2d``, cuDNN on GPU, oneDNN on CPU), ``masked``
(``F.conv2d(x, w * mask)`` each step, what mask libraries do) and
``sparsekern`` (``SparseConv2d.from_dense``). Modes as in the linear suite:
``forward``, ``backward`` (dX, dW, db) and ``step``.

Masks are random block masks of the weight's matrix view with exactly
``round(density * blocks)`` blocks (``sparsekern.methods.blocks``).
``flop_fraction`` is the computed blocks' FLOPs (padding channels included)
over the dense conv's FLOPs.
"""

from __future__ import annotations

import gc
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from sparsekern.bench import roofline
from sparsekern.bench.common import (
    autotune_session,
    dtype_name,
    fmt_ms,
    markdown_table,
    progress,
    row_base,
    time_phases_interleaved,
)
from sparsekern.methods.blocks import block_grid, expand_blocks
from sparsekern.nn import SparseConv2d

TRAIN_MODES = ("forward", "backward", "step")


@dataclass(frozen=True)
class ConvCase:
    name: str
    c_in: int
    c_out: int
    kernel: int
    stride: int
    size: int

    @property
    def padding(self) -> int:
        return self.kernel // 2


RESNET50 = (
    ConvCase("3x3 64->64 @56", 64, 64, 3, 1, 56),
    ConvCase("3x3 256->256 @14", 256, 256, 3, 1, 14),
    ConvCase("1x1 1024->256 @14", 1024, 256, 1, 1, 14),
    ConvCase("7x7 3->64 s2 @224", 3, 64, 7, 2, 224),
)


@dataclass
class SuiteConfig:
    cases: tuple[ConvCase, ...]
    batch: int
    dtype: torch.dtype
    blocks: tuple[int, ...]
    densities: tuple[float, ...]
    warmup: int
    repeats: int
    channels_last: bool
    seed: int = 0


def default_config(device: torch.device, dtype: torch.dtype | None = None, quick: bool = False) -> SuiteConfig:
    """CPU: fp32, batch 32, 32x32 blocks, NCHW, 5 timed steps (about 1 min). CUDA: bf16, batch 256, 64x64 blocks,
    channels_last.

    ``quick``: one small layer, batch 2 (for tests).
    """
    cuda = device.type == "cuda"
    if dtype is None:
        dtype = torch.bfloat16 if cuda else torch.float32
    densities = (1.0, 0.5, 0.25, 0.1)
    if quick:
        return SuiteConfig((ConvCase("3x3 32->32 @8", 32, 32, 3, 1, 8),), 2, dtype, (16,), (0.5,), 1, 2, cuda)
    if cuda:
        return SuiteConfig(RESNET50, 256, dtype, (64,), densities, warmup=3, repeats=10, channels_last=True)
    return SuiteConfig(RESNET50, 32, dtype, (32,), densities, warmup=1, repeats=5, channels_last=False)


def describe(cfg: SuiteConfig) -> str:
    fmt = "channels_last" if cfg.channels_last else "NCHW"
    return (
        f"ResNet-50 conv layers, batch {cfg.batch}, {dtype_name(cfg.dtype)}, {fmt} activations, "
        f"{cfg.warmup} warmup + {cfg.repeats} timed steps"
    )


class MaskedConv2d(nn.Module):
    """Dense compute on ``weight * mask`` every step, as pruning libraries run it."""

    def __init__(self, base: nn.Conv2d, mask: torch.Tensor):
        super().__init__()
        self.base = base
        self.register_buffer("mask", mask.to(base.weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.base
        return F.conv2d(x, b.weight * self.mask, b.bias, b.stride, b.padding, b.dilation)


def block_mask(shape, block: int, density: float, gen: torch.Generator) -> torch.Tensor:
    """A weight-shaped mask of exactly ``round(density * blocks)`` random blocks of the matrix view."""
    rb, cb = block_grid(shape, block)
    keep = torch.zeros(rb * cb, dtype=torch.bool)
    keep[torch.randperm(rb * cb, generator=gen)[: round(density * rb * cb)]] = True
    return expand_blocks(keep.view(rb, cb), shape, block)


def step(module: nn.Module, x: torch.Tensor, dy: torch.Tensor, laps) -> None:
    for p in module.parameters():
        p.grad = None
    x.grad = None
    laps.start()
    y = module(x)
    laps.lap("forward")
    y.backward(dy)
    laps.lap("backward")


def flop_fractions(layer: SparseConv2d, case: ConvCase, tokens: int) -> dict[str, float]:
    f = layer.layout.flops(tokens)
    dense = 2 * tokens * case.c_out * case.c_in * case.kernel**2
    fwd, dx, dw = (f[p]["block"] for p in ("forward", "input_grad", "weight_grad"))
    return {"forward": fwd / dense, "backward": (dx + dw) / (2 * dense), "step": (fwd + dx + dw) / (3 * dense)}


def pass_costs(layer: SparseConv2d | None, case: ConvCase, cfg: SuiteConfig, out: int) -> dict[str, roofline.Cost]:
    """Roofline cost of every mode (``sparsekern/bench/roofline.py``); ``layer=None`` is the dense layer."""
    tokens = cfg.batch * out * out
    dense = 2 * tokens * case.c_out * case.c_in * case.kernel**2
    if layer is None:
        frac = dict.fromkeys(("forward", "input_grad", "weight_grad"), 1.0)
    else:
        f = layer.layout.flops(tokens)
        frac = {p: f[p]["block"] / dense for p in ("forward", "input_grad", "weight_grad")}
    elem = torch.empty((), dtype=cfg.dtype).element_size()
    sizes = (cfg.batch * case.c_in * case.size**2, cfg.batch * case.c_out * out * out, dense // (2 * tokens))
    return roofline.mode_costs({p: roofline.layer_pass(dense, *sizes, f, elem) for p, f in frac.items()})


def run(cfg: SuiteConfig, device: torch.device, env: dict[str, object]) -> list[dict[str, object]]:
    gen = torch.Generator().manual_seed(cfg.seed)
    rows: list[dict[str, object]] = []
    progress(f"conv suite on {env['device']}: batch {cfg.batch}, {dtype_name(cfg.dtype)}")
    for case in cfg.cases:
        rows += run_case(case, cfg, device, env, gen)
        gc.collect()
    return rows


def run_case(case: ConvCase, cfg: SuiteConfig, device, env, gen: torch.Generator) -> list[dict[str, object]]:
    """Every provider, block size and density of one layer; long-format rows."""
    timing = {"device": device, "warmup": cfg.warmup, "repeats": cfg.repeats}
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    torch.manual_seed(cfg.seed)
    base = nn.Conv2d(case.c_in, case.c_out, case.kernel, case.stride, case.padding, device=device, dtype=cfg.dtype)
    base = base.to(memory_format=fmt)
    x = torch.randn(cfg.batch, case.c_in, case.size, case.size, device=device, dtype=cfg.dtype)
    x = x.contiguous(memory_format=fmt).requires_grad_(True)
    out = (case.size + 2 * case.padding - case.kernel) // case.stride + 1
    dy = torch.randn(cfg.batch, case.c_out, out, out, device=device, dtype=cfg.dtype).contiguous(memory_format=fmt)
    tokens = cfg.batch * out * out
    common = row_base(
        env,
        dtype=dtype_name(cfg.dtype),
        shape=f"{cfg.batch}x{case.c_in}x{case.size}x{case.size} -> {case.c_out}, k{case.kernel} s{case.stride}",
        layer=case.name,
        tokens=tokens,
        warmup=cfg.warmup,
        repeats=cfg.repeats,
        frozen_fraction=0.0,
        note="",
    )
    rows: list[dict[str, object]] = []

    def add(provider, block, density, stats, module, fractions):
        costs = pass_costs(module if isinstance(module, SparseConv2d) else None, case, cfg, out)
        for mode, st in stats.items():
            frac = fractions.get(mode, math.nan) if isinstance(fractions, dict) else fractions
            rows.append({**common, "block": block, "density": density, "provider": provider, "mode": mode, **st})
            rows[-1].update(flop_fraction=frac, flops=costs[mode].flops, bytes=costs[mode].bytes)
        summary = ", ".join(f"{m} {st['p50']:.2f}" for m, st in stats.items())
        progress(f"  {case.name:<20} {provider:<11} block={block or '-':<4} density={density:<5} p50 ms: {summary}")

    wshape = tuple(base.weight.shape)
    for block in cfg.blocks:
        for density in cfg.densities:
            mask = block_mask(wshape, block, density, gen).to(device)
            masked = MaskedConv2d(base, mask)
            layer = SparseConv2d.from_dense(base, mask=mask, block_size=block)
            # The three providers take their steps in turn, so each density has its own dense
            # measurement from the same stretch of time (this machine's speed drifts by 10-30%).
            stats = time_phases_interleaved(
                {name: (lambda laps, m=m: step(m, x, dy, laps)) for name, m in
                 (("dense", base), ("masked", masked), ("sparsekern", layer))},
                **timing,
            )  # fmt: skip
            add("dense", block, density, stats["dense"], base, 1.0)
            add("masked", block, density, stats["masked"], masked, 1.0)
            add("sparsekern", block, density, stats["sparsekern"], layer, flop_fractions(layer, case, tokens))
    return rows


def tables(rows: list[dict[str, object]]) -> str:
    """One markdown table: per layer, block and density, each provider's step time and speedups."""
    by = {(r["layer"], r["provider"], r["block"], r["density"], r["mode"]): r for r in rows}
    keys = []
    for r in rows:
        k = (r["layer"], r["provider"], r["block"], r["density"])
        if k not in keys:
            keys.append(k)
    head = ["layer", "block", "density", "provider", *(f"{m} ms" for m in TRAIN_MODES)]
    head += ["step vs dense", "step vs masked", "FLOP fraction"]
    body = []
    for layer, prov, block, density in keys:
        got = {m: by[(layer, prov, block, density, m)] for m in TRAIN_MODES}
        dense = by.get((layer, "dense", block, density, "step"))
        masked = by.get((layer, "masked", block, density, "step"))
        step_ms = got["step"]["p50"]
        vs_dense = dense["p50"] / step_ms if dense else math.nan
        vs_masked = masked["p50"] / step_ms if masked and prov == "sparsekern" else math.nan
        body.append(
            [layer, block or "—", f"{density:g}", prov]
            + [fmt_ms(got[m]["p50"]) for m in TRAIN_MODES]
            + [f"{vs_dense:.2f}x", "—" if math.isnan(vs_masked) else f"{vs_masked:.2f}x"]
            + [f"{got['step']['flop_fraction']:.3f}"]
        )
    text = markdown_table(head, body, align="lrrl" + "r" * (len(head) - 4))
    text += "\n\nTimes are p50 ms; each density's providers are timed in turn (dense, masked, sparsekern, ...), "
    text += "so every speedup divides two p50s from the same stretch of time; "
    text += "FLOP fraction = computed-block FLOPs of a full step / dense FLOPs (padding channels count)."
    return text


def headline(rows: list[dict[str, object]]) -> str | None:
    by = {(r["layer"], r["provider"], r["block"], r["density"], r["mode"]): r["p50"] for r in rows}
    layer = "3x3 256->256 @14"
    parts = []
    for (lay, prov, block, density, mode), ms in by.items():
        dense = by.get((lay, "dense", block, density, mode))
        if lay == layer and prov == "sparsekern" and mode == "step" and density in (0.1, 0.5) and dense:
            parts.append(f"{block}x{block} blocks, density {density:g}: {dense / ms:.2f}x dense")
    if not parts:
        return None
    return f"Headline, {layer}, SparseConv2d full step vs nn.Conv2d: " + "; ".join(parts) + "."


# ------------------------------------------------------------------ tuning
def tune(cfg: SuiteConfig, device: torch.device) -> dict[str, dict]:
    """Autotune the conv kernels for the suite's layers (density 0.5), ignoring stored configs.

    One training step per layer makes ``kernels/bsconv.py`` benchmark its
    candidates (through ``bsmm``'s config machinery) for this suite's shapes;
    returns ``configs.tuned_records()``, which holds the conv kinds too.
    """
    gen = torch.Generator().manual_seed(cfg.seed)
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    with autotune_session() as records:
        for case in cfg.cases:
            for block in cfg.blocks:
                progress(f"tuning conv {case.name} ({dtype_name(cfg.dtype)}, {block}x{block} blocks)")
                base = nn.Conv2d(case.c_in, case.c_out, case.kernel, case.stride, case.padding)
                base = base.to(device=device, dtype=cfg.dtype, memory_format=fmt)
                mask = block_mask(tuple(base.weight.shape), block, 0.5, gen).to(device)
                layer = SparseConv2d.from_dense(base, mask=mask, block_size=block)
                x = torch.randn(cfg.batch, case.c_in, case.size, case.size, device=device, dtype=cfg.dtype)
                x = x.contiguous(memory_format=fmt).requires_grad_(True)
                layer(x).float().square().mean().backward()
                torch.cuda.synchronize(device)
    return records()


def write_tuned(records: dict[str, dict]) -> list[str]:
    from sparsekern.bench.providers import write_tuned as write

    return write(records)
