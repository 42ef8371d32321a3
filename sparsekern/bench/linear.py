"""Linear suite: one ``SparseLinear`` training step against the ways people run pruned layers today.

The peers and the helpers other suites share live in ``providers.py``; this file holds the suite
(its config, the run, the tables, tuning).

Providers, timed in the same run on the same weight, input and ``dy``:

* ``dense``: ``nn.Linear``, the baseline every speedup is measured against.
  It is timed once per shape (the row without a block, the weight-gradient
  table's baseline) and again for every (block, density) case, its steps
  taken in turn with ``masked`` and ``sparsekern``; a case's ratios divide by
  its own dense row, so the machine's drift between cases cancels.
* ``masked``: ``F.linear(x, w * mask, b)`` each step, what mask libraries
  (``torch.nn.utils.prune`` and the like) do; it computes everything.
* ``sparsekern``: ``SparseLinear.from_dense(base, mask=mask, block_size=block)``.
* ``sparsekern_frozen`` (freezing case only): the same mask with a random half
  of the kept blocks frozen.
* ``torch_bsr``: no autograd, on a ``torch.sparse`` BSR weight. CPU: forward
  only (``torch.sparse.mm``). CUDA: forward ``bsr_dense_mm(W, x^T)``, backward
  ``dx^T = bsr_dense_mm(W^T, dy^T)`` (a BSR copy of the transpose, built once)
  and ``dW = sampled_addmm(W, dy^T, x)`` on W's blocks, plus ``db``, from
  ``torch.sparse._triton_ops`` (forward only if the backward fails). Recorded
  as ``unavailable`` when torch cannot run it. The CPU default skips it at
  density 1.0 (pure overhead there, about 20 s of the run).
* ``stk``: stanford-stk (``import stk``), GPU only, 128x128 blocks and
  ``tokens``, ``out`` and ``in`` divisible by 128 (what stk supports): the
  weight as an ``stk.Matrix`` of the kept blocks, forward ``y^T = dsd(W, x^T)``,
  whose backward is stk's own: ``dW = sdd(dy^T, x)`` on the weight's topology
  and ``dx^T = dsd(W^T, dy^T)``. Without stk the run says so in one line.

Modes: ``forward`` and ``backward`` (dX, dW and db) are the two phases of one
timed training step, ``step`` their sum per step (``x`` requires grad, as in
the middle of a network). ``weight_grad`` (freezing case) is the backward with
``x`` not requiring grad, so only dW and db are computed.

Masks are block-aware random masks with exactly ``round(density * blocks)``
kept blocks (``sparsekern.testing.random_block_mask``); ``masked``,
``sparsekern`` and ``torch_bsr`` share one mask per (block, density).
``flop_fraction`` counts the FLOPs of the blocks a provider computes
(``BlockLayout.flops``) against dense; ``masked`` and ``dense`` compute 1.0.
``flops``/``bytes`` are the same blocks' work per mode for the roofline floor
(``sparsekern/bench/roofline.py``; bias ignored), filled on every row.
"""

from __future__ import annotations

import copy
import gc
import math
from dataclasses import dataclass

import torch
from torch import nn

from sparsekern import SparseLinear
from sparsekern.bench import roofline
from sparsekern.bench.common import (
    autotune_session,
    dtype_name,
    progress,
    row_base,
    time_phases,
    time_phases_interleaved,
)
from sparsekern.bench.linear_tables import headline as headline  # the suite protocol (cli.py): suite.headline
from sparsekern.bench.linear_tables import tables as tables  # the suite protocol (cli.py): suite.tables
from sparsekern.bench.providers import (
    STK_BLOCK,
    MaskedLinear,
    flop_fractions,
    half_frozen_mask,
    stk_status,
    time_bsr,
    time_bsr_step,
    time_stk,
    train_step,
)
from sparsekern.bench.providers import write_tuned as write_tuned  # the suite protocol (cli.py): suite.write_tuned
from sparsekern.testing import random_block_mask


@dataclass
class SuiteConfig:
    """What one run of the suite measures."""

    out_features: int
    in_features: int
    tokens: int
    dtype: torch.dtype
    blocks: tuple[int, ...]
    densities: tuple[float, ...]
    warmup: int
    repeats: int
    # (block, density) cases measured once more with half the kept blocks frozen.
    freeze: tuple[tuple[int, float], ...] = ()
    # torch_bsr at density 1.0 only measures BSR overhead (about 4x dense on the CPU, ~20 s of the run).
    bsr_at_full_density: bool = True
    # l1_unstructured amounts measured as element masks (converted with granularity="exact"): the
    # masked provider is torch's prune hook, the sparsekern provider what from_torch_prune makes of it.
    unstructured: tuple[float, ...] = ()
    seed: int = 0

    @property
    def shape(self) -> str:
        return f"{self.tokens}x{self.out_features}x{self.in_features}"


def default_config(device: torch.device, dtype: torch.dtype | None = None, quick: bool = False) -> SuiteConfig:
    """The suite's configuration for a device.

    * CPU: fp32, 4096x4096 weight, 2048 tokens, blocks 32/64; 1 warmup + 3 timed
      steps (a dense step is about 1.2 s on 2 cores, so the run stays under 3 min).
    * CUDA: bf16, 4096x4096 weight, 16384 tokens, blocks 32/64/128; the first
      warmup step of each block size also autotunes the kernels.
    * ``quick``: 256x256, 64 tokens, one block and density (for tests).
    """
    cuda = device.type == "cuda"
    if dtype is None:
        dtype = torch.bfloat16 if cuda else torch.float32
    densities = (1.0, 0.5, 0.25, 0.1)
    if quick:
        return SuiteConfig(256, 256, 64, dtype, (32,), (0.5,), warmup=1, repeats=3, freeze=((32, 0.5),))
    if cuda:
        blocks = (32, 64, 128)
        return SuiteConfig(
            4096, 4096, 16384, dtype, blocks, densities, warmup=3, repeats=20, freeze=tuple((b, 0.5) for b in blocks)
        )
    cpu = SuiteConfig(4096, 4096, 2048, dtype, (32, 64), densities, warmup=1, repeats=3, freeze=((64, 0.5),))
    cpu.bsr_at_full_density = False
    cpu.unstructured = (0.9, 0.95)
    return cpu


# ---------------------------------------------------------------- providers


def stk_supported(cfg: SuiteConfig, device: torch.device, block: int) -> bool:
    """stk runs on CUDA with 128x128 blocks and every dimension divisible by 128."""
    dims = (cfg.tokens, cfg.out_features, cfg.in_features)
    return device.type == "cuda" and block == STK_BLOCK and all(d % STK_BLOCK == 0 for d in dims)


def make_base(cfg: SuiteConfig, device: torch.device) -> tuple[nn.Linear, torch.Tensor, torch.Tensor]:
    """The shared dense layer, input and output gradient of one shape."""
    torch.manual_seed(cfg.seed)
    base = nn.Linear(cfg.in_features, cfg.out_features, device=device, dtype=cfg.dtype)
    x = torch.randn(cfg.tokens, cfg.in_features, device=device, dtype=cfg.dtype)
    dy = torch.randn(cfg.tokens, cfg.out_features, device=device, dtype=cfg.dtype)
    return base, x, dy


# ------------------------------------------------------------------- FLOPs


def pass_fractions(layer: SparseLinear | None) -> dict[str, float]:
    """Computed-block FLOPs over dense per pass (forward, input_grad, weight_grad); all 1 for ``None`` (dense)."""
    if layer is None:
        return dict.fromkeys(("forward", "input_grad", "weight_grad"), 1.0)
    f = layer.layout.flops(1)
    return {p: f[p]["block"] / max(1, f[p]["dense"]) for p in ("forward", "input_grad", "weight_grad")}


def mode_costs(cfg: SuiteConfig, passes: dict[str, float]) -> dict[str, roofline.Cost]:
    """The roofline cost of every mode (``sparsekern/bench/roofline.py``).

    ``forward``/``backward``/``step`` have ``x`` requiring grad (dX computed);
    ``weight_grad`` is dW alone.
    """
    elem = torch.empty((), dtype=cfg.dtype).element_size()
    per_pass = roofline.linear_step(cfg.tokens, cfg.out_features, cfg.in_features, passes, elem)
    return roofline.mode_costs(per_pass)


# --------------------------------------------------------------------- run
def run(cfg: SuiteConfig, device: torch.device, env: dict[str, object]) -> list[dict[str, object]]:
    """Measure every provider and mode; return long-format rows."""
    base, x0, dy = make_base(cfg, device)
    x = x0.detach().requires_grad_(True)
    gen = torch.Generator().manual_seed(cfg.seed)
    common = row_base(
        env, dtype=dtype_name(cfg.dtype), shape=cfg.shape, tokens=cfg.tokens, warmup=cfg.warmup, repeats=cfg.repeats
    )
    rows: list[dict[str, object]] = []
    timing = {"device": device, "warmup": cfg.warmup, "repeats": cfg.repeats}
    wgrad_blocks = {b for b, _ in cfg.freeze}

    def add(provider, block, density, stats, fractions, frozen=0.0, note="", passes=None):
        costs = mode_costs(cfg, passes or pass_fractions(None))
        for mode, st in stats.items():
            rows.append(
                {
                    **common,
                    "block": block,
                    "density": density,
                    "provider": provider,
                    "mode": mode,
                    **st,
                    "flop_fraction": fractions.get(mode, math.nan) if isinstance(fractions, dict) else fractions,
                    "frozen_fraction": frozen,
                    "flops": costs[mode].flops,
                    "bytes": costs[mode].bytes,
                    "note": note,
                }
            )
        if stats:
            summary = ", ".join(f"{m} {st['p50']:.2f}" for m, st in stats.items())
            progress(f"  {provider:<18} block={block or '-':<4} density={density:<5} p50 ms: {summary}")

    progress(f"linear suite on {env['device']}: shape {cfg.shape} (tokens x out x in), {dtype_name(cfg.dtype)}")
    stk_missing = stk_status()
    if stk_missing:
        progress(stk_missing)
    # One dense measurement per shape up front: the baseline of the weight-gradient table. Each case
    # below times dense again, interleaved with its providers, for its own ratios.
    stats = time_phases(lambda laps: train_step(base, x, dy, laps), **timing)
    if wgrad_blocks:
        stats.update(time_phases(lambda laps: train_step(base, x0, dy, laps, True), total=None, **timing))
    add("dense", "", 1.0, stats, 1.0)

    for block in cfg.blocks:
        for density in cfg.densities:
            mask = random_block_mask((cfg.out_features, cfg.in_features), block, density, generator=gen).to(device)
            masked = MaskedLinear(base, mask)
            layer = SparseLinear.from_dense(base, mask=mask, block_size=block)
            fractions = flop_fractions(layer, cfg.tokens)
            # Dense, masked and sparsekern take their steps in turn, so each case has its own dense
            # measurement from the same stretch of time (this machine's speed drifts by 10-30%).
            both = time_phases_interleaved(
                {name: (lambda laps, m=m: train_step(m, x, dy, laps)) for name, m in
                 (("dense", base), ("masked", masked), ("sparsekern", layer))},
                **timing,
            )  # fmt: skip
            add("dense", block, density, both["dense"], 1.0)
            add("masked", block, density, both["masked"], 1.0)
            del masked
            stats = both["sparsekern"]
            freeze_here = (block, density) in cfg.freeze
            if freeze_here:
                stats.update(time_phases(lambda laps, m=layer: train_step(m, x0, dy, laps, True), total=None, **timing))
            add("sparsekern", block, density, stats, fractions, passes=pass_fractions(layer))

            if freeze_here:
                frozen = SparseLinear.from_dense(
                    base, mask=mask, frozen_mask=half_frozen_mask(layer, gen), block_size=block
                )
                share = 1.0 - frozen.layout.n_train / max(1, frozen.layout.nnz_blocks)
                stats = time_phases(lambda laps, m=frozen: train_step(m, x, dy, laps), **timing)
                stats.update(
                    time_phases(lambda laps, m=frozen: train_step(m, x0, dy, laps, True), total=None, **timing)
                )
                add(
                    "sparsekern_frozen",
                    block,
                    density,
                    stats,
                    flop_fractions(frozen, cfg.tokens),
                    frozen=share,
                    passes=pass_fractions(frozen),
                )
                del frozen

            if density < 1.0 or cfg.bsr_at_full_density:
                stats = time_bsr_step(base, mask, block, x0, dy, timing) if device.type == "cuda" else None
                if stats is not None:
                    add("torch_bsr", block, density, stats, fractions, passes=pass_fractions(layer))
                else:
                    st, note = time_bsr(base, mask, block, x0, timing)
                    add(
                        "torch_bsr",
                        block,
                        density,
                        {"forward": st},
                        {"forward": fractions["forward"]},
                        note=note,
                        passes=pass_fractions(layer),
                    )
            if stk_missing is None and stk_supported(cfg, device, block):
                stats, note = time_stk(base, mask, block, x, dy, timing)
                add("stk", block, density, stats, fractions, note=note, passes=pass_fractions(layer))
            del layer, mask
            gc.collect()
    for amount in cfg.unstructured:
        masked, layer = unstructured_layers(base, amount)
        both = time_phases_interleaved(
            {name: (lambda laps, m=m: train_step(m, x, dy, laps)) for name, m in
             (("dense", base), ("masked", masked), ("sparsekern", layer))},
            **timing,
        )  # fmt: skip
        density = round(1.0 - amount, 4)  # block "elem": an element mask (see ELEMENT_ROWS)
        add("dense", "elem", density, both["dense"], 1.0)
        add("masked", "elem", density, both["masked"], 1.0)
        add("sparsekern", "elem", density, both["sparsekern"], density)
        del masked, layer
        gc.collect()
    return rows


def unstructured_layers(base: nn.Linear, amount: float) -> tuple[nn.Module, nn.Module]:
    """``(masked, sparse)``: copies of ``base`` pruned by ``l1_unstructured(amount)`` (torch's hook), and
    that pruned layer converted by ``from_torch_prune(..., granularity="exact")`` (exact math)."""
    from torch.nn.utils import prune

    from sparsekern.adapters import from_torch_prune

    masked, holder = copy.deepcopy(base), nn.Sequential(copy.deepcopy(base))
    for layer in (masked, holder[0]):
        prune.l1_unstructured(layer, "weight", amount=amount)
    holder, _ = from_torch_prune(holder, granularity="exact", block_size=32)
    return masked, holder[0]


def footnotes(cfg: SuiteConfig, device: torch.device) -> list[str]:
    """Lines the printed report ends with: whether stk took part."""
    missing = stk_status()
    if missing:
        return [missing + "."]
    if not any(stk_supported(cfg, device, b) for b in cfg.blocks):
        return ["stk is installed but no case of this run suits it (CUDA, 128x128 blocks, dims divisible by 128)."]
    return []


# ------------------------------------------------------------------ tuning
def tune(cfg: SuiteConfig, device: torch.device) -> dict[str, dict]:
    """Autotune the kernels for every block size of ``cfg`` (ignoring stored configs).

    Runs one forward + backward per block size at density 0.5 with the suite's
    token count, which makes ``kernels/bsmm.py`` benchmark its candidates for
    the forward, input-gradient and weight-gradient kernels. Returns
    ``configs.tuned_records()``; the suite run afterwards uses these configs.
    """
    base, x0, dy = make_base(cfg, device)
    x = x0.detach().requires_grad_(True)
    gen = torch.Generator().manual_seed(cfg.seed)
    with autotune_session() as records:
        for block in cfg.blocks:
            progress(f"tuning block {block} ({dtype_name(cfg.dtype)}, {cfg.tokens} tokens)")
            mask = random_block_mask((cfg.out_features, cfg.in_features), block, 0.5, generator=gen).to(device)
            layer = SparseLinear.from_dense(base, mask=mask, block_size=block)
            layer(x).backward(dy)
            torch.cuda.synchronize(device)
    return records()
