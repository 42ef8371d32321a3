"""Fidelity suite: does each survey method keep its accuracy when sparsekern prunes by blocks?

A byte-level GPT (``sparsekern/bench/corpus.py``) is trained on the Python
stdlib's own source, once dense and once per method, granularity and
distribution, all from the same initial weights, on the same batches, for the
same number of steps:

* ``element``: the published, element-level masks, run as mask libraries run
  them: ``sparsify(..., granularity="element")`` leaves every 32x32 block mixed
  at density 0.1, so the layers compute the dense GEMMs on the masked weight;
* ``block``: the method's scores pooled per block (``granularity="block"``),
  whole blocks kept, on sparsekern's kernels.

Methods, each through the library's public API on the attention projections
and the MLP (embeddings and head stay dense): ``random``, ``magnitude``,
``snip``, ``grasp``, ``synflow``, ``force`` (:func:`sparsekern.sparsify`);
``imp`` (:func:`sparsekern.methods.imp`: two rounds, weight rewinding to step
``rewind_step``, ``imp_steps`` per round); ``set`` and ``rigl``
(:class:`sparsekern.methods.DSTScheduler` from a random mask); ``freezenet``
(SNIP masks, half the kept weights frozen by SNIP saliency).

Columns: validation bits per byte (cross-entropy / ln 2 on held-out files);
``gap``, the block run's relative validation loss over its element twin;
FLOPs computed per training step in each pass, counted by
:func:`sparsekern.report` over all linear layers (the computed blocks;
attention's own matmuls are left out), plus RigL's dense gradients on update
steps, amortised; wall ms per step (training only: evaluation, scoring and
mask search excluded; the ``setup_s`` column has those). The 1-minute load
average before each run goes into its row.

Remedies: after the main table, a block method whose gap exceeds
``cfg.gap_limit`` is run again with each of ``cfg.remedies`` (``l2``: L2 block
pooling; ``erk``; ``block16``: 16x16 blocks) while ``cfg.remedy_budget_s`` lasts.

Known limits: one seed; CPU timings depend on other work on the machine.
"""

from __future__ import annotations

import copy
import math
import os
import time
from dataclasses import dataclass, field, replace

import torch

import sparsekern
from sparsekern.bench.common import dtype_name, progress
from sparsekern.bench.corpus import ByteGPT, byte_loss, load_corpus, sparse_layer_names, train_batch, val_windows
from sparsekern.bench.fidelity_report import footnotes, headline, tables, write_extra
from sparsekern.methods import DSTScheduler, imp
from sparsekern.reports import PASSES

__all__ = [
    "METHODS",
    "RESULT_COLUMNS",
    "FidelityConfig",
    "RunSpec",
    "default_config",
    "describe",
    "flop_columns",
    "footnotes",
    "headline",
    "run",
    "select_methods",
    "tables",
    "write_extra",
]

PAI = ("random", "magnitude", "snip", "grasp", "synflow", "force")
METHODS = ("dense", *PAI, "imp", "set", "rigl", "freezenet")
RESULT_COLUMNS = [
    "device",
    "torch",
    "git_sha",
    "dtype",
    "date",
    "loadavg",
    "method",
    "distribution",
    "granularity",
    "block",
    "reduce",
    "density",
    "steps",
    "val_loss",
    "val_bpb",
    "gap",
    "fwd_gflop",
    "dx_gflop",
    "dw_gflop",
    "flop_fraction",
    "sparse_fwd_fraction",
    "sparse_dx_fraction",
    "sparse_dw_fraction",
    "sparse_kept_fraction",
    "sparse_trainable_fraction",
    "ms_per_step",
    "setup_s",
    "note",
]


@dataclass(frozen=True)
class RunSpec:
    """One training run of the table."""

    method: str
    granularity: str = "block"  # "element", "block", or "dense" for the dense row
    distribution: str = "uniform"
    reduce: str = "l1"
    block: int | None = None  # None: the config's

    @property
    def key(self) -> tuple:
        return (self.method, self.distribution, self.reduce, self.block)


@dataclass
class FidelityConfig:
    """What one run of the suite trains; see :func:`default_config`."""

    layers: int
    width: int
    context: int
    batch: int
    steps: int
    imp_steps: int
    block: int
    density: float
    specs: tuple[RunSpec, ...]
    train_bytes: int
    val_bytes: int
    eval_every: int
    curve_windows: int
    val_windows: int
    heads: int = 4
    lr: float = 3e-3
    warmup_steps: int = 20
    delta_t: int = 20
    drop_fraction: float = 0.3
    rewind_step: int = 10
    score_batches: int = 2
    seed: int = 0
    gap_limit: float = 0.03
    remedies: tuple[str, ...] = ("block16", "l2", "erk")
    remedy_budget_s: float = 0.0
    dtype: torch.dtype = torch.float32
    warmup: int = 0  # the CLI's --warmup/--repeats land here; every step is timed
    repeats: int = 0
    extra: dict = field(default_factory=dict)


def _pairs(methods, distribution="uniform") -> list[RunSpec]:
    return [RunSpec(m, g, distribution) for m in methods for g in ("element", "block")]


def default_config(device: torch.device, dtype: torch.dtype | None = None, quick: bool = False) -> FidelityConfig:
    """The suite's configuration.

    * full: 2 layers, width 256, context 64, batch 16, 200 steps (IMP: 100 per
      round), 32x32 blocks, density 0.1; every method at uniform density, SNIP
      and RigL also at ERK; remedies within 15 minutes. About 45 minutes on a loaded
      2-core CPU (load average 4: about 0.4 s per masked-dense step).
    * ``quick`` (tests, seconds): 1 layer, width 128, context 32, 6 steps of
      dense, magnitude and RigL on 200 kB of the corpus.
    """
    if dtype not in (None, torch.float32):
        raise ValueError("the fidelity suite trains in float32")
    if quick:
        specs = (RunSpec("dense", "dense"), *_pairs(("magnitude", "rigl")))
        return FidelityConfig(
            1, 128, 32, 8, 6, 3, 32, 0.1, specs, 200_000, 20_000, 3, 8, 16, warmup_steps=2, delta_t=2, rewind_step=1
        )
    specs = (
        RunSpec("dense", "dense"),
        *_pairs(PAI),
        *_pairs(("snip",), "erk"),
        *_pairs(("imp", "set", "rigl")),
        *_pairs(("rigl",), "erk"),
        *_pairs(("freezenet",)),
    )
    return FidelityConfig(
        2, 256, 64, 16, 200, 100, 32, 0.1, specs, 8_000_000, 800_000, 25, 32, 256, remedy_budget_s=900.0
    )


def select_methods(cfg: FidelityConfig, methods: list[str]) -> FidelityConfig:
    """``cfg`` with only the runs of ``methods`` (``--methods``); unknown names are an error."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown fidelity method(s) {unknown}; choose from {METHODS}")
    return replace(cfg, specs=tuple(s for s in cfg.specs if s.method in methods))


def describe(cfg: FidelityConfig) -> str:
    return (
        f"byte-level GPT, {cfg.layers} layers, width {cfg.width}, {cfg.heads} heads, context {cfg.context}, "
        f"batch {cfg.batch}; {cfg.steps} AdamW steps (lr {cfg.lr:g}, {cfg.warmup_steps} warmup, cosine), IMP "
        f"{cfg.imp_steps} per round; density {cfg.density:g}, {cfg.block}x{cfg.block} blocks; "
        f"{cfg.extra.get('corpus', 'stdlib source')}; {dtype_name(cfg.dtype)}, seed {cfg.seed}"
    )


# ---------------------------------------------------------------- training
@dataclass
class Trained:
    curve: list[tuple[float, int, float]]  # (train seconds, step, val loss)
    train_s: float
    steps: int


def _lr(cfg: FidelityConfig, step: int, total: int) -> float:
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    frac = (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, frac))))


@torch.no_grad()
def evaluate(model, windows) -> float:
    model.eval()
    x, y = windows
    loss = sum(float(byte_loss(model(xb), yb)) * len(xb) for xb, yb in zip(x.split(64), y.split(64), strict=True))
    model.train()
    return loss / len(x)


def train(model, cfg, data, steps, start=0, on_opt=None, on_step=None) -> Trained:
    """AdamW (no weight decay: frozen and pruned weights must not move) from step ``start`` to ``steps``."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.0)
    if on_opt is not None:
        on_opt(opt)
    gen = torch.Generator().manual_seed(cfg.seed + 1000)  # the same batches in every run
    for _ in range(start):
        train_batch(data.train, cfg.batch, cfg.context, gen)
    curve, elapsed = [], 0.0
    for step in range(start, steps):
        if on_step is not None:
            on_step(step)
        if step % cfg.eval_every == 0:
            curve.append((elapsed, step, evaluate(model, cfg.extra["curve_val"])))
        x, y = train_batch(data.train, cfg.batch, cfg.context, gen)
        t0 = time.perf_counter()
        for g in opt.param_groups:
            g["lr"] = _lr(cfg, step, steps)
        opt.zero_grad(set_to_none=True)
        byte_loss(model(x), y).backward()
        opt.step()
        elapsed += time.perf_counter() - t0
    curve.append((elapsed, steps, evaluate(model, cfg.extra["curve_val"])))
    return Trained(curve, elapsed, steps - start)


def _method_kwargs(cfg, spec, model, data) -> dict:
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    batches = [train_batch(data.train, cfg.batch, cfg.context, gen) for _ in range(cfg.score_batches)]
    return {
        "density": cfg.density,
        "block_size": spec.block or cfg.block,
        "distribution": spec.distribution,
        "granularity": spec.granularity,
        "reduce": spec.reduce,
        "layers": sparse_layer_names(model),
        "seed": cfg.seed,
        "data": batches,
        "loss_fn": byte_loss,
        "example_input": torch.zeros(1, cfg.context, cfg.width),  # SynFlow: ones in place of the embeddings
    }


def run_one(cfg: FidelityConfig, spec: RunSpec, base: ByteGPT, data) -> tuple[ByteGPT, Trained, float, dict]:
    """Build ``spec``'s model from ``base``'s weights, train it; returns model, training, setup seconds, info."""
    model = copy.deepcopy(base)
    info: dict = {}
    t0 = time.perf_counter()
    if spec.method == "dense":
        return model, train(model, cfg, data, cfg.steps), 0.0, info
    kw = _method_kwargs(cfg, spec, model, data)
    if spec.method == "imp":
        rounds, total = 2, cfg.imp_steps
        timed: list[Trained] = []

        def train_fn(m, r):
            on_step = (lambda s: r.checkpoint() if s == r.rewind_step else None) if r.round == 0 else None
            timed.append(train(m, cfg, data, total, start=r.start_step, on_step=on_step))

        imp(
            model,
            train_fn,
            rounds,
            1 - cfg.density ** (1 / rounds),
            rewind="weights",
            rewind_step=cfg.rewind_step,
            block_size=kw["block_size"],
            granularity=spec.granularity,
            distribution=spec.distribution,
            reduce=spec.reduce,
            layers=kw["layers"],
        )
        setup = time.perf_counter() - t0 - sum(t.train_s for t in timed)
        info["note"] = f"2 rounds x {total} steps, rewind to step {cfg.rewind_step}; last round shown"
        return model, timed[-1], setup, info
    sched: list[DSTScheduler] = []
    on_opt = None
    if spec.method in ("set", "rigl"):
        sparsekern.sparsify(model, method="random", **kw)

        def on_opt(opt):
            sched.append(
                DSTScheduler(
                    model,
                    opt,
                    method=spec.method,
                    delta_t=cfg.delta_t,
                    end_step=int(0.75 * cfg.steps),
                    drop_fraction=cfg.drop_fraction,
                    granularity=spec.granularity,
                    reduce=spec.reduce,
                    seed=cfg.seed,
                )
            )
    elif spec.method == "freezenet":
        sparsekern.sparsify(model, method="snip", trainable=0.5, freeze="freezenet", **kw)
    else:
        sparsekern.sparsify(model, method=spec.method, **kw)
    setup = time.perf_counter() - t0
    trained = train(model, cfg, data, cfg.steps, on_opt=on_opt)
    if sched:
        info["dense_grads"] = sched[0].dense_grad_count
    return model, trained, setup, info


# ------------------------------------------------------------------ counts
def flop_columns(cfg, model, info, steps) -> dict:
    """Computed FLOPs per step (GFLOP) per pass over all linear layers, and the sparse layers' fractions."""
    x = torch.zeros(cfg.batch, cfg.context, dtype=torch.long)
    rep = sparsekern.report(model, x)
    names = set(sparse_layer_names(model))
    sparse = [layer.flops for layer in rep if layer.name in names]
    total = rep.total().flops
    computed = {p: total[p]["block"] for p in PASSES}
    dense = {p: total[p]["dense"] for p in PASSES}
    if info.get("dense_grads"):  # RigL's dense gradients on update steps, spread over the run
        per_layer = sum(f["weight_grad"]["dense"] for f in sparse) / max(1, len(sparse))
        computed["weight_grad"] += info["dense_grads"] * per_layer / steps
    out = {f"{k}_gflop": computed[p] / 1e9 for k, p in zip(("fwd", "dx", "dw"), PASSES, strict=True)}
    out["flop_fraction"] = sum(computed.values()) / sum(dense.values())
    for k, p in zip(("fwd", "dx", "dw"), PASSES, strict=True):
        s_dense = sum(f[p]["dense"] for f in sparse)
        out[f"sparse_{k}_fraction"] = sum(f[p]["block"] for f in sparse) / s_dense
    s_dense = sum(f["forward"]["dense"] for f in sparse)
    out["sparse_kept_fraction"] = sum(f["forward"]["element"] for f in sparse) / s_dense
    out["sparse_trainable_fraction"] = sum(f["weight_grad"]["element"] for f in sparse) / s_dense
    return out


def row_of(cfg, env, spec, model, trained, setup, info) -> dict:
    val = evaluate(model, cfg.extra["final_val"])
    return {
        **{k: env[k] for k in ("device", "torch", "git_sha", "date")},
        "dtype": dtype_name(cfg.dtype),
        "loadavg": round(os.getloadavg()[0], 2),
        "method": spec.method,
        "distribution": spec.distribution if spec.method != "dense" else "",
        "granularity": spec.granularity,
        "block": spec.block or cfg.block,
        "reduce": spec.reduce,
        "density": 1.0 if spec.method == "dense" else cfg.density,
        "steps": trained.steps,
        "val_loss": val,
        "val_bpb": val / math.log(2),
        "ms_per_step": 1e3 * trained.train_s / max(1, trained.steps),
        "setup_s": setup,
        "note": info.get("note", ""),
        "curve": trained.curve,
        **flop_columns(cfg, model, info, trained.steps),
    }


def _measure(cfg, env, spec, base, data) -> dict:
    load = round(os.getloadavg()[0], 2)
    progress(f"fidelity: {spec.method} {spec.granularity} {spec.distribution} {spec.reduce} b{spec.block or cfg.block}")
    row = row_of(cfg, env, spec, *run_one(cfg, spec, base, data))
    row["loadavg"] = load
    progress(f"  val {row['val_bpb']:.4f} bits/byte, {row['ms_per_step']:.0f} ms/step, setup {row['setup_s']:.1f} s")
    return row


def _gaps(rows) -> None:
    element = {(r["method"], r["distribution"]): r["val_loss"] for r in rows if r["granularity"] == "element"}
    for r in rows:
        base = element.get((r["method"], r["distribution"]))
        r["gap"] = r["val_loss"] / base - 1 if r["granularity"] == "block" and base else math.nan


def remedy_spec(spec: RunSpec, remedy: str) -> RunSpec | None:
    """``spec`` changed by one remedy (``l2``, ``erk``, ``block16``), or None when it does not apply."""
    if remedy == "l2":
        return replace(spec, reduce="l2") if spec.reduce != "l2" else None
    if remedy == "erk":  # IMP takes uniform or global densities only
        return replace(spec, distribution="erk") if spec.distribution != "erk" and spec.method != "imp" else None
    if remedy == "block16":
        return replace(spec, block=16) if spec.block != 16 else None
    raise ValueError(f"unknown remedy {remedy!r}")


def run(cfg: FidelityConfig, device: torch.device, env: dict) -> list[dict]:
    if device.type != "cpu":
        progress("fidelity: runs on the CPU path of this machine's device as well; timings are that device's")
    data = load_corpus(cfg.train_bytes, cfg.val_bytes)
    cfg.extra["corpus"] = data.describe()
    cfg.extra["curve_val"] = val_windows(data.val, cfg.curve_windows, cfg.context)
    cfg.extra["final_val"] = val_windows(data.val, cfg.val_windows, cfg.context)
    progress(f"fidelity: {data.describe()}")
    torch.manual_seed(cfg.seed)
    base = ByteGPT(cfg.layers, cfg.width, cfg.context, cfg.heads)
    rows = [_measure(cfg, env, spec, base, data) for spec in cfg.specs]  # element, block back to back
    _gaps(rows)
    t_end = time.perf_counter() + cfg.remedy_budget_s
    missed = sorted(
        (r for r in rows if r["granularity"] == "block" and r["gap"] > cfg.gap_limit), key=lambda r: -r["gap"]
    )  # worst first, while the budget lasts
    for r in missed:
        for remedy in cfg.remedies:
            spec = remedy_spec(RunSpec(r["method"], "block", r["distribution"], r["reduce"], r["block"]), remedy)
            done = {
                (x["method"], x["distribution"], x["reduce"], x["block"]) for x in rows if x["granularity"] == "block"
            }
            if spec is None or spec.key in done or time.perf_counter() > t_end:
                continue
            if spec.distribution != r["distribution"] and not any(
                x["granularity"] == "element" and x["method"] == spec.method and x["distribution"] == spec.distribution
                for x in rows
            ):
                rows.append(_measure(cfg, env, replace(spec, granularity="element"), base, data))
            row = _measure(cfg, env, spec, base, data)
            row["note"] = (row["note"] + "; " if row["note"] else "") + f"remedy: {remedy}"
            rows.append(row)
    _gaps(rows)
    return rows
