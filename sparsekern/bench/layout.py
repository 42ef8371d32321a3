"""Layout suite: what building and changing a block layout costs, next to the training it serves.

Cases, all with provider ``sparsekern``:

* ``build``: ``BlockLayout.from_masks(mask, frozen_mask, block)`` on a block-aware
  random mask (``sparsekern.testing.random_block_mask``) of an ``N x N`` weight,
  for every size, block size and block density of the config, once without a
  frozen mask and once with a random half of the kept blocks frozen (the linear
  suite's freezing case). The masks already sit on the device; the timed call is
  the build alone. ``shape`` is ``N x N`` (out x in), ``dtype`` is ``bool`` (the
  masks'), ``frozen_fraction`` the share of kept blocks that are frozen.
* ``set_masks``: ``SparseLinear.set_masks(new_mask, optimizer=AdamW)`` on one
  layer (default 4096x4096, 64x64 blocks, block density 0.1) whose AdamW has
  taken steps, so ``exp_avg``/``exp_avg_sq`` exist and are remapped. Each call
  alternates between two independent random masks of the same density, so
  nearly every kept block changes: the dearest update of that density.
  ``shape`` is ``out x in``.
* ``train_step``: one training step of the same layer (zero grads, forward,
  backward, ``AdamW.step``), ``shape`` ``tokens x out x in`` as in the linear
  suite; ``flop_fraction`` is the GEMM FLOP share of forward + backward.

The figure of interest is ``set_masks`` against the 100 training steps that a
dynamic-sparse-training schedule typically runs between two mask updates:
``set_masks p50 / (100 x train_step p50)``. The 100 steps are not run: one
step is timed (a few repeats) and its median multiplied by 100. The ratio is
printed and stored in the ``note`` of the ``set_masks`` row; the project's
target is at most 2%.
"""

from __future__ import annotations

import gc
import itertools
import math
from dataclasses import dataclass
from types import SimpleNamespace

import torch

from sparsekern import SparseLinear
from sparsekern.bench.common import dtype_name, markdown_table, progress, row_base, time_fn
from sparsekern.bench.providers import flop_fractions, half_frozen_mask
from sparsekern.layout import BlockLayout
from sparsekern.testing import random_block_mask

MODES = ("build", "set_masks", "train_step")
#: Training steps one mask update is weighed against.
STEPS_PER_UPDATE = 100
#: The project's target for ``set_masks / (STEPS_PER_UPDATE steps)``, in percent.
TARGET_PERCENT = 2.0


@dataclass
class SuiteConfig:
    """What one run of the suite measures."""

    # build cases: N x N weights
    sizes: tuple[int, ...]
    blocks: tuple[int, ...]
    densities: tuple[float, ...]
    # mask-update case: one features x features layer
    features: int
    update_block: int
    update_density: float
    tokens: int
    dtype: torch.dtype
    # untimed + timed calls of every case, except builds of weights of at least
    # ``large_elements`` elements, which take ``large_warmup`` + ``large_repeats``
    warmup: int
    repeats: int
    large_elements: int = 1 << 28
    large_warmup: int = 0
    large_repeats: int = 3
    seed: int = 0

    @property
    def shape(self) -> str:
        """The training case's ``tokens x out x in``."""
        return f"{self.tokens}x{self.features}x{self.features}"

    def build_timing(self, size: int) -> tuple[int, int]:
        """``(warmup, repeats)`` of a build of a ``size x size`` weight."""
        if size * size >= self.large_elements:
            return self.large_warmup, self.large_repeats
        return self.warmup, self.repeats


def default_config(device: torch.device, dtype: torch.dtype | None = None, quick: bool = False) -> SuiteConfig:
    """The suite's configuration (the same on every device; ``dtype`` defaults to fp32).

    * default: builds of 4096x4096 and 16384x16384 weights, blocks 32/64,
      densities 0.1/0.5, with and without frozen blocks (1 warmup + 5 timed
      calls; 16384x16384: 0 + 3, one frozen build there takes about 2 s on
      2 CPU cores); the update case on a 4096x4096 layer, 64x64 blocks,
      density 0.1, 2048 tokens. About 40 s on an idle 2-core CPU.
    * ``quick``: 512x512, block 32 and density 0.5 for builds; a 512x512 layer
      with 16 tokens for the update case (for tests).
    """
    dtype = dtype or torch.float32
    if quick:
        return SuiteConfig((512,), (32,), (0.5,), 512, 64, 0.1, 16, dtype, warmup=1, repeats=3)
    return SuiteConfig((4096, 16384), (32, 64), (0.1, 0.5), 4096, 64, 0.1, 2048, dtype, warmup=1, repeats=5)


def describe(cfg: SuiteConfig) -> str:
    """The run's configuration in one sentence, for the printed header."""
    sizes = ", ".join(f"{n}x{n}" for n in cfg.sizes)
    timing = ", ".join(f"{n}x{n}: {w} warmup + {r} timed" for n in cfg.sizes for w, r in [cfg.build_timing(n)])
    return (
        f"build: weights {sizes}, blocks {'/'.join(map(str, cfg.blocks))}, "
        f"densities {'/'.join(f'{d:g}' for d in cfg.densities)} ({timing}); "
        f"set_masks and train_step: {cfg.features}x{cfg.features} layer, {cfg.update_block}x{cfg.update_block} "
        f"blocks, density {cfg.update_density:g}, {cfg.tokens} tokens, {dtype_name(cfg.dtype)}, AdamW "
        f"({cfg.warmup} warmup + {cfg.repeats} timed calls each)"
    )


# ------------------------------------------------------------------ cases
def frozen_half(mask: torch.Tensor, layout: BlockLayout, generator: torch.Generator) -> torch.Tensor:
    """A frozen mask over a random half of the kept blocks of ``layout`` (built from ``mask``).

    The shared ``half_frozen_mask`` (``providers.py``), fed the mask directly instead of a layer's
    (a layer would materialise it again from the layout).
    """
    return half_frozen_mask(SimpleNamespace(layout=layout, mask=mask), generator)


def make_update_case(cfg: SuiteConfig, device: torch.device):
    """``(layer, optimizer, x, dy, masks)`` of the mask-update case.

    ``masks`` are two independent random block masks of ``cfg.update_density``;
    the layer starts on ``masks[0]`` and its AdamW has taken one step.
    """
    gen = torch.Generator().manual_seed(cfg.seed)
    n = cfg.features
    masks = [random_block_mask((n, n), cfg.update_block, cfg.update_density, generator=gen).to(device) for _ in "ab"]
    torch.manual_seed(cfg.seed)
    layer = SparseLinear(n, n, block_size=cfg.update_block, mask=masks[0], device=device, dtype=cfg.dtype)
    opt = torch.optim.AdamW(layer.parameters(), lr=1e-3)
    x = torch.randn(cfg.tokens, n, device=device, dtype=cfg.dtype).requires_grad_(True)
    dy = torch.randn(cfg.tokens, n, device=device, dtype=cfg.dtype)
    training_step(layer, opt, x, dy)  # the optimizer state exists from here on
    return layer, opt, x, dy, masks


def training_step(layer: SparseLinear, opt: torch.optim.Optimizer, x: torch.Tensor, dy: torch.Tensor) -> None:
    """Zero the gradients, forward, backward with ``dy``, optimizer step."""
    opt.zero_grad(set_to_none=True)
    x.grad = None
    layer(x).backward(dy)
    opt.step()


# --------------------------------------------------------------------- run
def run(cfg: SuiteConfig, device: torch.device, env: dict[str, object]) -> list[dict[str, object]]:
    """Measure the build cases, then the mask-update case; return long-format rows."""
    common = row_base(env)
    rows: list[dict[str, object]] = []

    def add(mode, stats, *, shape, block, density, dtype, warmup, repeats, **extra):
        row = {
            **common,
            "dtype": dtype,
            "block": block,
            "density": density,
            "shape": shape,
            "provider": "sparsekern",
            "mode": mode,
            **stats,
            "flop_fraction": math.nan,
            "tokens": None,
            "frozen_fraction": 0.0,
            "warmup": warmup,
            "repeats": repeats,
            "note": "",
        }
        row.update(extra)
        rows.append(row)
        return row

    progress(f"layout suite on {env['device']}")
    gen = torch.Generator().manual_seed(cfg.seed)
    for size in cfg.sizes:
        warmup, repeats = cfg.build_timing(size)
        timing = {"device": device, "warmup": warmup, "repeats": repeats}
        for block in cfg.blocks:
            for density in cfg.densities:
                mask = random_block_mask((size, size), block, density, generator=gen).to(device)
                built: list[BlockLayout | None] = [None]

                def build(frozen, mask=mask, block=block, built=built):
                    built[0] = BlockLayout.from_masks(mask, frozen, block)

                stats = time_fn(build, setup=lambda: (None,), **timing)
                case = {"shape": f"{size}x{size}", "block": block, "density": density, "dtype": "bool"}
                add("build", stats, warmup=warmup, repeats=repeats, **case)
                frozen = frozen_half(mask, built[0], gen)
                plain_ms = stats["p50"]
                stats = time_fn(build, setup=lambda f=frozen: (f,), **timing)
                lay = built[0]
                share = 1.0 - lay.n_train / max(1, lay.nnz_blocks)
                add("build", stats, warmup=warmup, repeats=repeats, frozen_fraction=share, **case)
                progress(
                    f"  build {size}x{size} block={block:<3} density={density:<4} p50 ms: "
                    f"{plain_ms:.2f}, half frozen {stats['p50']:.2f}"
                )
                del mask, frozen, built, lay, build
                gc.collect()

    layer, opt, x, dy, masks = make_update_case(cfg, device)
    timing = {"device": device, "warmup": cfg.warmup, "repeats": cfg.repeats}
    n = cfg.features
    case = {
        "block": cfg.update_block,
        "density": cfg.update_density,
        "dtype": dtype_name(cfg.dtype),
        "warmup": cfg.warmup,
        "repeats": cfg.repeats,
    }
    step = time_fn(lambda: training_step(layer, opt, x, dy), **timing)
    fraction = flop_fractions(layer, cfg.tokens)["step"]
    step_row = add("train_step", step, shape=cfg.shape, tokens=cfg.tokens, flop_fraction=fraction, **case)

    new_masks = itertools.cycle([masks[1], masks[0]])  # the layer is on masks[0]: every call changes it
    upd = time_fn(lambda m: layer.set_masks(m, optimizer=opt), setup=lambda: (next(new_masks),), **timing)
    ratio = update_ratio(upd["p50"], step["p50"])
    note = f"{100 * ratio:.2f}% of {STEPS_PER_UPDATE} train steps ({STEPS_PER_UPDATE} x train_step p50)"
    add("set_masks", upd, shape=f"{n}x{n}", note=note, **case)
    progress(
        f"  train_step p50 {step_row['p50']:.2f} ms, set_masks p50 {upd['p50']:.2f} ms: "
        f"{100 * ratio:.2f}% of {STEPS_PER_UPDATE} steps"
    )
    return rows


def update_ratio(set_masks_ms: float, step_ms: float) -> float:
    """``set_masks / (STEPS_PER_UPDATE x one training step)`` (a fraction, not percent)."""
    if not step_ms or math.isnan(step_ms) or math.isnan(set_masks_ms):
        return math.nan
    return set_masks_ms / (STEPS_PER_UPDATE * step_ms)


# ------------------------------------------------------------------ tables
def _fmt_ms(v: float) -> str:
    if v is None or math.isnan(v):
        return "—"
    return f"{v:.3f}" if v < 1 else f"{v:.0f}" if v >= 1000 else f"{v:.1f}" if v >= 100 else f"{v:.2f}"


def _spread(r: dict[str, object]) -> str:
    return f"{_fmt_ms(r['p20'])}–{_fmt_ms(r['p80'])}"


def _find(rows, mode):
    return next((r for r in rows if r["mode"] == mode), None)


def tables(rows: list[dict[str, object]]) -> str:
    """Markdown: the build table, then the mask-update table."""
    text = ""
    builds = [r for r in rows if r["mode"] == "build"]
    if builds:
        head = ["weight", "block", "density", "frozen blocks", "build p50 ms", "p20–p80 ms", "timed"]
        body = [
            [
                r["shape"],
                r["block"],
                f"{r['density']:g}",
                f"{r['frozen_fraction']:.2f}",
                _fmt_ms(r["p50"]),
                _spread(r),
                r["repeats"],
            ]
            for r in builds
        ]
        text += "`BlockLayout.from_masks` on block-aware random masks (frozen blocks: share of kept blocks frozen):"
        text += "\n\n" + markdown_table(head, body, align="lrrrrrr")

    step, upd = _find(rows, "train_step"), _find(rows, "set_masks")
    if step and upd:
        ratio = update_ratio(upd["p50"], step["p50"])
        head = ["mode", "shape", "block", "density", "p50 ms", "p20–p80 ms"]
        body = [
            ["set_masks (AdamW state remapped)", upd["shape"], upd["block"], f"{upd['density']:g}"]
            + [_fmt_ms(upd["p50"]), _spread(upd)],
            ["train_step (one step: fwd + bwd + AdamW)", step["shape"], step["block"], f"{step['density']:g}"]
            + [_fmt_ms(step["p50"]), _spread(step)],
            [f"{STEPS_PER_UPDATE} train steps = {STEPS_PER_UPDATE} x train_step p50 (not run)", step["shape"]]
            + [step["block"], f"{step['density']:g}", _fmt_ms(STEPS_PER_UPDATE * step["p50"]), "—"],
            [f"set_masks / {STEPS_PER_UPDATE} train steps", "", "", "", f"{100 * ratio:.2f}%", "—"],
        ]
        if text:
            text += "\n\n"
        text += f"Mask update against training ({upd['dtype']}; set_masks alternates between two random masks):"
        text += "\n\n" + markdown_table(head, body, align="llrrrr")
    return text


def headline(rows: list[dict[str, object]]) -> str | None:
    """The mask-update figure, when this run measured it (stated, never judged)."""
    step, upd = _find(rows, "train_step"), _find(rows, "set_masks")
    if not (step and upd):
        return None
    ratio = update_ratio(upd["p50"], step["p50"])
    return (
        f"Headline: set_masks with AdamW costs {100 * ratio:.2f}% of {STEPS_PER_UPDATE} training steps "
        f"({upd['shape']}, {upd['block']}x{upd['block']} blocks, density {upd['density']:g}, "
        f"{step['tokens']} tokens; target <= {TARGET_PERCENT:g}%)."
    )
