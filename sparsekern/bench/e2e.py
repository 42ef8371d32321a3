"""End-to-end suite: full training steps of small networks, dense against masked-dense against sparsekern.

The networks and the providers' copies are in ``e2e_models.py``, the FLOP and roofline counts in
``e2e_counts.py``, timing in ``common.py``; this file holds the suite (its config, the run, the tables,
tuning).

Models (``model`` column; ``shape`` describes its size):

* ``mlp``: ``Linear(d0, d1) -> ReLU -> Linear(d1, d2) -> ReLU -> Linear(d2, d3)``
  over ``tokens`` rows, MSE loss (CPU default 1024-4096-4096-1024, 1024 tokens).
* ``cnn``: a ResNet-style network: a 3x3 stem, then per stage a basic block
  (3x3 conv, BatchNorm, ReLU, 3x3 conv, BatchNorm, identity or strided 1x1
  shortcut, ReLU), global average pool, a linear classifier; cross-entropy.
* ``transformer``: a transformer MLP block,
  ``x + Linear(4d, d)(GELU(Linear(d, 4d)(LayerNorm(x))))``, MSE loss.

Providers at every density (dense once per model):

* ``dense``: the model as is.
* ``masked``: what pruning libraries do: each sparsified weight is
  parametrized as ``weight * mask`` (``torch.nn.utils.parametrize``), so the
  forward multiplies by the mask and the weight's gradient is masked; all
  GEMMs stay dense.
* ``sparsekern``: sparsified linear layers become ``SparseLinear`` (and conv
  layers ``SparseConv2d`` when ``sparsekern.nn`` has it; otherwise they stay
  dense, and the rows say so).

Sparsification is one-shot magnitude pruning in blocks, the same density in
every layer: ``sparsekern.sparsify(model, method="magnitude",
granularity="block", ...)`` (it decides which layers are worth converting and
keeps the rest dense). The masked peer prunes exactly the sparse model's
masks (``layer.mask``); when no layer was converted, the top ``round(density x
blocks)`` blocks of ``|W|`` of every linear and conv layer at least one block
wide (``e2e_models.block_masks``).

Modes: ``forward`` (including the loss), ``backward``, ``optimizer``
(``AdamW.step``) and ``step``, their sum per step; the gradients are set to
``None`` before each step, outside the timing. ``flop_fraction`` is the
GEMM FLOPs (linear and conv layers) a provider computes in a step over the
dense model's; ``flops``/``bytes`` feed the roofline floor
(``sparsekern/bench/roofline.py``): per layer and pass the computed blocks' FLOPs, the
two activations and the computed weight blocks, plus AdamW's 7 x trainable
elements of bytes; norms, activations and the loss are left out.
"""

from __future__ import annotations

import gc
import math
from dataclasses import dataclass

import torch

from sparsekern.bench.common import (
    Laps,
    autotune_session,
    dtype_name,
    fmt_ms,
    markdown_table,
    progress,
    row_base,
    time_phases,
)
from sparsekern.bench.e2e_counts import gemm_costs, gemm_layers
from sparsekern.bench.e2e_models import (
    MASK_METHOD,
    MODELS,
    block_masks,
    build,
    masked_model,
    sparse_masks,
    sparse_model,
)

# The suite's public names: cli.py reads the suite protocol, tests and bench/ the model helpers.
__all__ = [
    "MODELS",
    "MODES",
    "ROOFLINE_MODES",
    "SuiteConfig",
    "build",
    "default_config",
    "footnotes",
    "gemm_costs",
    "gemm_layers",
    "headline",
    "masked_model",
    "run",
    "sparse_masks",
    "sparse_model",
    "tables",
    "tune",
    "write_tuned",
]

MODES = ("forward", "backward", "optimizer", "step")
ROOFLINE_MODES = MODES


@dataclass
class SuiteConfig:
    """What one run of the suite measures."""

    models: tuple[str, ...]
    mlp_dims: tuple[int, ...]
    tokens: int
    cnn_channels: tuple[int, ...]
    image: int
    batch: int
    d_model: int
    densities: tuple[float, ...]
    block: int
    dtype: torch.dtype
    warmup: int
    repeats: int
    classes: int = 10
    seed: int = 0

    @property
    def shape(self) -> str:
        return f"{self.tokens} tokens"


def default_config(device: torch.device, dtype: torch.dtype | None = None, quick: bool = False) -> SuiteConfig:
    """The suite's configuration for a device.

    * CPU: fp32; MLP 1024-4096-4096-1024 and transformer block d=1024 over 1024
      tokens; CNN channels 64/128 on 16 images of 32x32; 64x64 blocks;
      densities 1/0.5/0.25/0.1; 1 warmup + 3 timed steps. About 60 s on an
      idle 2-core CPU (dense steps there: MLP 0.9 s, CNN 0.33 s, transformer
      block 0.27 s; the masked peer costs a dense step at every density).
    * CUDA: bf16; MLP 2048-8192-8192-2048 and transformer d=2048 over 8192
      tokens; CNN channels 128/256 on 64 images of 32x32; 3 warmup + 10 timed.
    * ``quick``: tiny networks (MLP 128-256-256-128, 64 tokens; CNN 32/64
      channels on 4 images of 8x8), 32x32 blocks, density 0.5 (for tests).
    """
    cuda = device.type == "cuda"
    if dtype is None:
        dtype = torch.bfloat16 if cuda else torch.float32
    densities = (1.0, 0.5, 0.25, 0.1)
    if quick:
        return SuiteConfig(MODELS, (128, 256, 256, 128), 64, (32, 64), 8, 4, 128, (0.5,), 32, dtype, 1, 2)
    if cuda:
        mlp = (2048, 8192, 8192, 2048)
        return SuiteConfig(MODELS, mlp, 8192, (128, 256), 32, 64, 2048, densities, 64, dtype, 3, 10)
    return SuiteConfig(MODELS, (1024, 4096, 4096, 1024), 1024, (64, 128), 32, 16, 1024, densities, 64, dtype, 1, 3)


def describe(cfg: SuiteConfig) -> str:
    """The run's configuration in one sentence, for the printed header."""
    parts = []
    if "mlp" in cfg.models:
        parts.append(f"mlp {'-'.join(map(str, cfg.mlp_dims))} over {cfg.tokens} tokens")
    if "cnn" in cfg.models:
        parts.append(f"cnn channels {'/'.join(map(str, cfg.cnn_channels))} on {cfg.batch}x3x{cfg.image}x{cfg.image}")
    if "transformer" in cfg.models:
        parts.append(f"transformer MLP block d={cfg.d_model} over {cfg.tokens} tokens")
    return (
        "training steps (forward + loss, backward, AdamW): " + "; ".join(parts) + f"; {cfg.block}x{cfg.block} "
        f"blocks, densities {'/'.join(f'{d:g}' for d in cfg.densities)}, {dtype_name(cfg.dtype)}, "
        f"{cfg.warmup} warmup + {cfg.repeats} timed steps; masks: {MASK_METHOD}"
    )


# --------------------------------------------------------------------- run
def train_step(model, opt, x, target, loss_fn, laps: Laps) -> None:
    """Zero grads (untimed), then forward + loss, backward and AdamW, each a lap."""
    opt.zero_grad(set_to_none=True)
    laps.start()
    loss = loss_fn(model(x), target)
    laps.lap("forward")
    loss.backward()
    laps.lap("backward")
    opt.step()
    laps.lap("optimizer")


def run(cfg: SuiteConfig, device: torch.device, env: dict[str, object]) -> list[dict[str, object]]:
    """Measure every model, provider and density; return long-format rows."""
    common = row_base(env, dtype=dtype_name(cfg.dtype), warmup=cfg.warmup, repeats=cfg.repeats)
    elem = torch.empty((), dtype=cfg.dtype).element_size()
    timing = {"device": device, "warmup": cfg.warmup, "repeats": cfg.repeats}
    rows: list[dict[str, object]] = []
    progress(f"e2e suite on {env['device']}: {', '.join(cfg.models)}; masks: {MASK_METHOD}")

    for name in cfg.models:
        base, x, target, loss_fn, shape = build(name, cfg, device)
        tokens = x.shape[0] if x.dim() == 2 else None
        layers = gemm_layers(base, x)
        dense_flops = gemm_costs(base, layers, elem)["step"].flops

        def add(provider, density, stats, costs, note="", name=name, shape=shape, tokens=tokens, dense=dense_flops):
            frac = costs["step"].flops / dense if costs and dense else math.nan
            for mode, st in stats.items():
                rows.append(
                    {
                        **common,
                        "block": "" if provider == "dense" else cfg.block,
                        "density": density,
                        "shape": shape,
                        "provider": provider,
                        "mode": mode,
                        **st,
                        "flop_fraction": frac,
                        "tokens": tokens,
                        "frozen_fraction": 0.0,
                        "model": name,
                        "flops": costs[mode].flops if costs else None,
                        "bytes": costs[mode].bytes if costs else None,
                        "note": note,
                    }
                )
            st = stats.get("step")
            if st and not math.isnan(st["p50"]):
                progress(f"  {name:<11} {provider:<10} density={density:<5} step p50 {st['p50']:.2f} ms")

        stats = _time_model(base, x, target, loss_fn, timing)
        add("dense", 1.0, stats, gemm_costs(base, layers, elem))
        for density in cfg.densities:
            sparse, note = sparse_model(base, density, cfg.block)
            # The masked peer prunes exactly what the sparse model prunes.
            masks = sparse_masks(sparse) or block_masks(base, density, cfg.block)
            masked = masked_model(base, masks)
            stats = _time_model(masked, x, target, loss_fn, timing)
            add("masked", density, stats, gemm_costs(masked, layers, elem))
            del masked
            if not any(hasattr(m, "layout") for m in sparse.modules()):
                # Nothing became sparse (sparsify failed or kept every layer dense): timing it again says nothing.
                why = note or "no layer was sparsified"
            else:
                why = None
                try:
                    stats = _time_model(sparse, x, target, loss_fn, timing)
                except Exception as exc:  # e.g. a layer kind without kernels on this device: keep the other rows
                    why = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}"
                    progress(f"  {name} sparsekern density={density} failed: {why}")
                else:
                    add("sparsekern", density, stats, gemm_costs(sparse, layers, elem), note=note)
            if why is not None:
                nan = {"p20": math.nan, "p50": math.nan, "p80": math.nan}
                add("sparsekern", density, {m: dict(nan) for m in MODES}, None, note=f"unavailable: {why}")
            del sparse, masks
            gc.collect()
        del base
        gc.collect()
    return rows


def _time_model(model, x, target, loss_fn, timing) -> dict[str, dict[str, float]]:
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return time_phases(lambda laps: train_step(model, opt, x, target, loss_fn, laps), **timing)


# ------------------------------------------------------------------ tuning
def tune(cfg: SuiteConfig, device: torch.device) -> dict[str, dict]:
    """Autotune the kernels for the suite's sparse models (density 0.5), ignoring stored configs.

    One training step per model makes ``kernels/bsmm.py`` benchmark its candidates
    for this suite's token counts; returns ``configs.tuned_records()``.
    """
    with autotune_session() as records:
        for name in cfg.models:
            progress(f"tuning e2e {name} ({dtype_name(cfg.dtype)}, {cfg.block}x{cfg.block} blocks)")
            base, x, target, loss_fn, _ = build(name, cfg, device)
            sparse, _ = sparse_model(base, 0.5, cfg.block)
            try:
                loss_fn(sparse(x), target).backward()
                torch.cuda.synchronize(device)
            except Exception as exc:  # the run reports it per row; tuning goes on with the other models
                progress(f"  tuning e2e {name} failed: {type(exc).__name__}: {exc}")
    return records()


def write_tuned(records: dict[str, dict]) -> list[str]:
    from sparsekern.bench.providers import write_tuned as write

    return write(records)


# ------------------------------------------------------------------ tables
def tables(rows: list[dict[str, object]]) -> str:
    """Markdown: per model, provider and density, each mode's p50 and the step's speedup over dense."""
    by = {(r["model"], r["provider"], r["density"], r["mode"]): r for r in rows}
    keys = []
    for r in rows:
        k = (r["model"], r["provider"], r["density"])
        if k not in keys:
            keys.append(k)
    head = ["model", "density", "provider", *(f"{m} ms" for m in MODES), "step speedup", "FLOP fraction", "note"]
    body = []
    for model, provider, density in keys:
        got = {m: by.get((model, provider, density, m)) for m in MODES}
        dense = by.get((model, "dense", 1.0, "step"))
        step = got["step"]
        speed = "—"
        if step and dense and not math.isnan(step["p50"]) and step["p50"] > 0:
            speed = f"{dense['p50'] / step['p50']:.2f}x"
        frac = step["flop_fraction"] if step else math.nan
        note = (step or {}).get("note", "")
        body.append(
            [model, f"{density:g}", provider]
            + [fmt_ms(got[m]["p50"]) if got[m] else "—" for m in MODES]
            + [speed, "—" if math.isnan(frac) else f"{frac:.3f}", note]
        )
    text = markdown_table(head, body, align="lrl" + "r" * (len(MODES) + 2) + "l")
    text += "\n\nTimes are p50 ms of a training step's phases (forward includes the loss; optimizer is AdamW.step); "
    text += "speedup = dense step / provider step; FLOP fraction = GEMM FLOPs computed / the dense model's."
    return text


def headline(rows: list[dict[str, object]]) -> str | None:
    """The MLP step at density 0.1 against dense, when measured (stated, never judged)."""
    by = {(r["model"], r["provider"], r["density"], r["mode"]): r["p50"] for r in rows}
    dense, sk = by.get(("mlp", "dense", 1.0, "step")), by.get(("mlp", "sparsekern", 0.1, "step"))
    if not dense or not sk or math.isnan(sk):
        return None
    masked = by.get(("mlp", "masked", 0.1, "step"))
    text = f"Headline: MLP training step at density 0.1: sparsekern {dense / sk:.2f}x dense"
    if masked and not math.isnan(masked):
        text += f", masked-dense {dense / masked:.2f}x"
    return text + " (CPU target: >= 3x)."


def footnotes(cfg: SuiteConfig, device: torch.device) -> list[str]:
    """Lines the printed report ends with: how the masks were made."""
    return [f"Masks: {MASK_METHOD}."]
