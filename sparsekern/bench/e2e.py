"""End-to-end suite: full training steps of small networks, dense against masked-dense against sparsekern.

Why one file of this size (about 570 lines): one suite, whose models, masks, timing, FLOP and
roofline counts and tables serve it alone; the peers and shared helpers are in ``providers.py``,
timing in ``common.py``.

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
granularity="block", ...)`` when the package has it (it decides which layers
are worth converting and keeps the rest dense); else ``|W|`` pooled per block
(``sparsekern.methods.blocks.pool_blocks``), the top ``round(density x blocks)``
blocks kept (``keep_top_blocks``) and expanded back (``expand_blocks``) for
every linear and conv layer whose output and input (matrix view) dimensions
are at least one block. The masked peer prunes exactly the sparse model's
masks (``layer.mask``).

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

import copy
import gc
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

import sparsekern
from sparsekern import SparseLinear
from sparsekern.bench import roofline
from sparsekern.bench.common import Laps, autotune_session, dtype_name, markdown_table, progress, row_base, time_phases
from sparsekern.flops import PASSES
from sparsekern.methods.blocks import block_grid, expand_blocks, keep_top_blocks, pool_blocks

MODELS = ("mlp", "cnn", "transformer")
MODES = ("forward", "backward", "optimizer", "step")
ROOFLINE_MODES = MODES
CONV_MISSING = "conv layers stay dense: SparseConv2d not available"


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
        f"{cfg.warmup} warmup + {cfg.repeats} timed steps; masks: {mask_method()}"
    )


# ------------------------------------------------------------------ models
class BasicBlock(nn.Module):
    """conv3x3 -> BN -> ReLU -> conv3x3 -> BN, plus the shortcut (1x1 strided conv + BN on a shape change), ReLU."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.shortcut(x))


class ResNetish(nn.Module):
    """A 3x3 stem, one basic block per entry of ``channels`` (stride 2 from the second on), pool, classifier."""

    def __init__(self, channels: tuple[int, ...], classes: int):
        super().__init__()
        c0 = channels[0]
        self.stem = nn.Sequential(nn.Conv2d(3, c0, 3, 1, 1, bias=False), nn.BatchNorm2d(c0), nn.ReLU())
        blocks, c_in = [], channels[0]
        for i, c in enumerate(channels):
            blocks.append(BasicBlock(c_in, c, 1 if i == 0 else 2))
            c_in = c
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(c_in, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


class TransformerMLP(nn.Module):
    """``x + fc2(GELU(fc1(LayerNorm(x))))`` with ``fc1: d -> 4d``, ``fc2: 4d -> d``."""

    def __init__(self, d: int):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, 4 * d)
        self.fc2 = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.fc2(F.gelu(self.fc1(self.norm(x))))


def build(name: str, cfg: SuiteConfig, device: torch.device):
    """``(model, x, target, loss_fn, shape text)`` of one model, seeded."""
    torch.manual_seed(cfg.seed)
    kw = {"device": device, "dtype": cfg.dtype}
    if name == "mlp":
        d = cfg.mlp_dims
        layers: list[nn.Module] = []
        for i in range(len(d) - 1):
            layers += [nn.Linear(d[i], d[i + 1]), nn.ReLU()]
        model = nn.Sequential(*layers[:-1])
        x, target = torch.randn(cfg.tokens, d[0], **kw), torch.randn(cfg.tokens, d[-1], **kw)
        return model.to(**kw), x, target, F.mse_loss, f"{cfg.tokens}x{'-'.join(map(str, d))}"
    if name == "cnn":
        model = ResNetish(cfg.cnn_channels, cfg.classes)
        x = torch.randn(cfg.batch, 3, cfg.image, cfg.image, **kw)
        target = torch.randint(0, cfg.classes, (cfg.batch,), device=device)
        shape = f"{cfg.batch}x3x{cfg.image}x{cfg.image}/{'-'.join(map(str, cfg.cnn_channels))}"
        return model.to(**kw), x, target, F.cross_entropy, shape
    if name == "transformer":
        model = TransformerMLP(cfg.d_model)
        x, target = torch.randn(cfg.tokens, cfg.d_model, **kw), torch.randn(cfg.tokens, cfg.d_model, **kw)
        return model.to(**kw), x, target, F.mse_loss, f"{cfg.tokens}x{cfg.d_model}-{4 * cfg.d_model}-{cfg.d_model}"
    raise ValueError(f"unknown model {name!r}; choose from {MODELS}")


# ------------------------------------------------------------ sparsifying
def mask_method() -> str:
    if hasattr(sparsekern, "sparsify"):
        return (
            'sparsekern.sparsify(method="magnitude", granularity="block"), the same density in every layer it '
            "converts; the masked peer uses the same masks"
        )
    return "block magnitude, layer by layer (pool_blocks on |W|, keep_top_blocks, expand_blocks)"


def conv_supported() -> bool:
    return hasattr(sparsekern.nn, "SparseConv2d")


def targets(model: nn.Module, block: int) -> dict[str, nn.Module]:
    """The linear and conv layers to sparsify: both matrix-view dimensions at least one block."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            n, k = mod.out_features, mod.in_features
        elif isinstance(mod, nn.Conv2d) and mod.groups == 1:
            n, k = mod.out_channels, mod.in_channels  # a block spans bk input channels at one filter tap
        else:
            continue
        if n >= block and k >= block:
            out[name] = mod
    return out


def block_masks(model: nn.Module, density: float, block: int) -> dict[str, torch.Tensor]:
    """Weight-shaped bool masks keeping the top ``round(density x blocks)`` blocks of ``|W|`` per layer."""
    masks = {}
    for name, mod in targets(model, block).items():
        w = mod.weight.detach()
        rb, cb = block_grid(tuple(w.shape), block)
        keep = keep_top_blocks(pool_blocks(w.abs(), block), round(density * rb * cb))
        masks[name] = expand_blocks(keep, tuple(w.shape), block).to(w.device)
    return masks


class _Mask(nn.Module):
    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w * self.mask


def masked_model(model: nn.Module, masks: dict[str, torch.Tensor]) -> nn.Module:
    """A copy of ``model`` whose masked weights are parametrized as ``weight * mask`` (what pruning libraries do)."""
    out = copy.deepcopy(model)
    mods = dict(out.named_modules())
    for name, mask in masks.items():
        parametrize.register_parametrization(mods[name], "weight", _Mask(mask.to(mods[name].weight.dtype)))
    return out


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def sparse_model(model: nn.Module, density: float, block: int):
    """``(copy with sparsekern layers, note)``; ``note`` says why layers that should be sparse stayed dense.

    With ``sparsekern.sparsify`` (magnitude, block granularity, the same density
    in every layer) when the package has it; if that call fails, or without it,
    from :func:`block_masks` with ``SparseLinear.from_dense`` (and
    ``SparseConv2d.from_dense`` when it exists).
    """
    if hasattr(sparsekern, "sparsify"):
        out = copy.deepcopy(model)
        try:
            sparsekern.sparsify(out, method="magnitude", density=density, granularity="block", block_size=block)
        except Exception as exc:  # fall back to this suite's own masks, and say so
            progress(f"  sparsekern.sparsify failed ({type(exc).__name__}: {exc}); using the block-magnitude masks")
        else:
            return out, ""
    out = copy.deepcopy(model)
    mods = dict(out.named_modules())
    note = ""
    for name, mask in block_masks(model, density, block).items():
        mod = mods[name]
        if isinstance(mod, nn.Linear):
            _replace(out, name, SparseLinear.from_dense(mod, mask=mask, block_size=block))
        elif not conv_supported():
            note = CONV_MISSING
        else:
            try:
                _replace(out, name, sparsekern.nn.SparseConv2d.from_dense(mod, mask=mask, block_size=block))
            except Exception as exc:  # keep the layer dense and say why
                note = f"conv layers stay dense: SparseConv2d.from_dense failed ({type(exc).__name__}: {exc})"[:200]
    return out, note


def sparse_masks(sparse: nn.Module) -> dict[str, torch.Tensor]:
    """Weight-shaped masks of the sparse layers of ``sparse``, by module name (for the masked peer)."""
    return {name: m.mask for name, m in sparse.named_modules() if hasattr(m, "layout") and hasattr(m, "mask")}


# ---------------------------------------------------------------- counting
def gemm_layers(model: nn.Module, x: torch.Tensor) -> list[dict]:
    """Each linear/conv layer's name, activation sizes and whether its input gradient is computed.

    One untimed forward with hooks, autograd on (so each input's ``requires_grad``
    says whether autograd computes its gradient). Sparsifying keeps names and
    activation sizes, so the dense model's records serve every provider.
    """
    seen: list[dict] = []

    def hook(name):
        def record(mod, args, out):
            weight_elems = _weight_elems(mod)
            seen.append(
                {
                    "name": name,
                    "in_elems": args[0].numel(),
                    "out_elems": out.numel(),
                    "input_grad": args[0].requires_grad,
                    "weight_elems": weight_elems,
                    "dense_flops": 2.0 * out.numel() * (weight_elems // _out_features(mod)),
                }
            )

        return record

    handles = [
        m.register_forward_hook(hook(name))
        for name, m in model.named_modules()
        if isinstance(m, (nn.Linear, nn.Conv2d, SparseLinear)) or hasattr(m, "layout")
    ]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return seen


def gemm_costs(model: nn.Module, layers: list[dict], elem_bytes: int) -> dict[str, roofline.Cost]:
    """Roofline costs per mode of one training step of ``model`` (see the module docstring).

    ``layers`` come from :func:`gemm_layers` (of this model or its dense original);
    a layer with a ``layout`` (sparsekern) computes its block fraction per pass,
    any other layer everything.
    """
    passes = {p: roofline.Cost() for p in PASSES}
    for rec in layers:
        try:
            fractions = _fractions(model.get_submodule(rec["name"]))
        except AttributeError:  # a sparsifier that renamed the layer: count it dense
            fractions = dict.fromkeys(PASSES, 1.0)
        for p in PASSES:
            if p == "input_grad" and not rec["input_grad"]:
                continue  # autograd never computes it (the network's first layer)
            passes[p] = passes[p] + roofline.layer_pass(
                rec["dense_flops"], rec["in_elems"], rec["out_elems"], rec["weight_elems"], fractions[p], elem_bytes
            )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return roofline.mode_costs(passes, roofline.adamw(trainable, elem_bytes))


def _out_features(mod: nn.Module) -> int:
    for attr in ("out_features", "out_channels"):
        if hasattr(mod, attr):
            return getattr(mod, attr)
    raise TypeError(f"cannot count {type(mod).__name__}")


def _weight_elems(mod: nn.Module) -> int:
    if isinstance(mod, (nn.Linear, SparseLinear)):
        return mod.out_features * mod.in_features
    if hasattr(mod, "kernel_size"):
        kh, kw = mod.kernel_size
        return mod.out_channels * (mod.in_channels // getattr(mod, "groups", 1)) * kh * kw
    return mod.weight.numel()


def _fractions(mod: nn.Module) -> dict[str, float]:
    layout = getattr(mod, "layout", None)
    if layout is None or not hasattr(layout, "flops"):
        return dict.fromkeys(PASSES, 1.0)
    f = layout.flops(1)
    return {p: f[p]["block"] / max(1, f[p]["dense"]) for p in PASSES}


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
    progress(f"e2e suite on {env['device']}: {', '.join(cfg.models)}; masks: {mask_method()}")
    if "cnn" in cfg.models and not conv_supported():
        progress(f"  cnn: {CONV_MISSING}")

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
                # Nothing became sparse (the CNN without SparseConv2d): timing the dense model again says nothing.
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
def _fmt_ms(v) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "—"
    return f"{v:.3f}" if v < 1 else f"{v:.1f}" if v >= 100 else f"{v:.2f}"


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
            + [_fmt_ms(got[m]["p50"]) if got[m] else "—" for m in MODES]
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
    """Lines the printed report ends with: how the masks were made, whether conv layers could be sparse."""
    lines = [f"Masks: {mask_method()}."]
    if "cnn" in cfg.models and not conv_supported():
        lines.append(f"CNN: {CONV_MISSING} in this checkout; its sparsekern rows are empty.")
    return lines
