"""Planning: a model and a :class:`~sparsekern.methods.config.MethodConfig` in, per-layer masks out.

:func:`plan` runs the pipeline that ``masks``, ``sparsify`` and ``imp`` share:

1. validate the config (``MethodConfig.checked``) and draw the seed;
2. pick the layers (``targets.find_targets``: names, exclusions, too-small rule);
3. score them on the dense model (``scores.py``; iterative methods re-score
   ``iterations`` times on an exponential density schedule ``d ** (t / T)``) and
   keep the top elements or blocks per layer or over all layers (``select.py``);
4. choose the frozen part (``freeze_layers``, then ``trainable`` of the kept
   weights stay trainable, at random or by SNIP saliency).

Nothing here changes the model; ``api.apply_masks`` does.

Known limits: data-driven scores need the model's layers dense (score first,
then convert).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from sparsekern.methods import scores as S
from sparsekern.methods.blocks import block_grid, pool_blocks
from sparsekern.methods.config import DATA_METHODS, ITERATIONS, MethodConfig
from sparsekern.methods.select import layer_densities, select
from sparsekern.methods.targets import Target, find_targets

__all__ = ["Plan", "plan"]


@dataclass
class Plan:
    """What :func:`plan` chose, before anything changes.

    Attributes:
        targets: every candidate layer (``Target.skip`` says why one stays dense).
        masks: ``{name: (mask, frozen_mask)}`` of the layers to sparsify, weight-shaped bool.
        frozen_dense: layers left dense that ``freeze_layers`` names (their weight gets frozen).
    """

    targets: list[Target]
    masks: dict[str, tuple[torch.Tensor, torch.Tensor]]
    frozen_dense: list[str] = field(default_factory=list)


def _draw_seed(seed: int | None) -> int:
    if seed is None:
        return int(torch.randint(0, 2**62, ()))
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"seed must be an int or None, got {seed!r}")
    return seed


@contextlib.contextmanager
def _rng(model: nn.Module, seed: int):
    """Seed torch's RNG for the block (dropout during scoring) and restore the caller's RNG after."""
    devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def _batches(data, loss_fn, method: str):
    if data is None:
        raise ValueError(f"method {method!r} needs data: an iterable of (inputs, targets) batches")
    batches = list(data)
    if not batches:
        raise ValueError(f"method {method!r} got an empty data iterable")
    for b in batches:
        if not (isinstance(b, (tuple, list)) and len(b) == 2):
            raise ValueError(f"data must yield (inputs, targets) pairs, got {type(b).__name__}")
    return batches, (F.cross_entropy if loss_fn is None else loss_fn)


def _example_input(example_input, data):
    if example_input is not None:
        return example_input
    if data is not None:
        for inputs, _ in data:
            if isinstance(inputs, torch.Tensor):
                return inputs
            break
    raise ValueError("method 'synflow' needs example_input (a tensor of the input shape) or data to take it from")


def _score_and_select(model, active, config: MethodConfig, seed: int, opts: dict):
    """Pruning masks of the ``active`` targets."""
    method, density, granularity, block_size = config.method, config.density, config.granularity, config.block_size
    distribution, reduce = config.distribution, config.reduce
    shapes = {t.name: t.shape for t in active}
    per_layer = layer_densities(shapes, density, distribution)
    globally = per_layer is None
    blocks = {t.name: t.block(block_size) for t in active}  # a Conv1D's (in, out) scores take (bk, bm)
    kw = {"globally": globally, "granularity": granularity, "block_size": blocks, "reduce": reduce}
    kw["prior"] = opts.get("prior")

    def at(frac: float):
        return density**frac if globally else {n: d**frac for n, d in per_layer.items()}

    target = density if globally else per_layer
    if method == "random":
        return select(S.random_scores(active, seed), target, **kw)
    if method == "magnitude":
        return select(S.magnitude_scores(active), target, **kw)
    if method == "snip":
        opts["snip"] = S.snip_scores(model, active, *opts["batches"])  # FreezeNet reuses them
        return select(opts["snip"], target, **kw)
    if method == "grasp":
        return select(S.grasp_scores(model, active, *opts["batches"], config.temperature), target, signed=True, **kw)
    n_iter = config.iterations or ITERATIONS[method]
    if isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < 1:
        raise ValueError(f"iterations must be a positive int, got {n_iter!r}")
    cur = {t.name: torch.ones(t.shape, dtype=torch.bool, device=t.module.weight.device) for t in active}
    for it in range(1, n_iter + 1):
        if method == "synflow":
            sc = S.synflow_scores(model, active, cur, _example_input(config.example_input, config.data))
            # float64 scores of deep nets can exceed float32: one common scale keeps every ranking.
            top = max((float(s.max()) for s in sc.values()), default=0.0)
            sc = {n: (s / top if top > 0 and math.isfinite(top) else s).float() for n, s in sc.items()}
        else:
            sc = S.force_scores(model, active, *opts["batches"], cur)
        cur = select(sc, at(it / n_iter), **kw)
    return cur


def _choose_frozen(model, active, kept, config: MethodConfig, seed: int, opts: dict):
    """Frozen masks: among each layer's kept weights, all but a ``trainable`` share (by blocks for "block")."""
    trainable, freeze, granularity, block_size = config.trainable, config.freeze, config.granularity, config.block_size
    if trainable >= 1.0 or not active:
        return {t.name: torch.zeros_like(kept[t.name]) for t in active}
    if freeze == "freezenet":
        saliency = opts["snip"] if "snip" in opts else S.snip_scores(model, active, *opts["batches"])
    else:
        saliency = S.random_scores(active, seed + 1)
    blocks = {t.name: t.block(block_size) for t in active}

    def size(n):
        if granularity == "block":
            return int((pool_blocks(kept[n].float(), blocks[n], "max") > 0).sum()), math.prod(
                block_grid(kept[n].shape, blocks[n])
            )
        return int(kept[n].sum()), kept[n].numel()

    sizes = {t.name: size(t.name) for t in active}
    kw = {"granularity": granularity, "block_size": blocks, "reduce": config.reduce, "prior": kept}
    if config.distribution == "global" and freeze == "freezenet":
        total_kept, total = (sum(v) for v in zip(*sizes.values(), strict=True))
        train = select(saliency, trainable * total_kept / max(1, total), globally=True, **kw)
    else:
        train = select(saliency, {n: trainable * k / max(1, tot) for n, (k, tot) in sizes.items()}, **kw)
    return {n: kept[n] & ~train[n] for n in kept}


def plan(model: nn.Module, config: MethodConfig, prior: dict[str, torch.Tensor] | None = None) -> Plan:
    """Validate ``config``, pick the layers and compute their masks; ``model`` is left unchanged.

    The one planning step behind ``masks``, ``sparsify`` and ``imp``.

    Args:
        model: the model whose candidate layers are scored.
        config: the method's settings.
        prior: ``{layer: mask}``: weights outside it are never kept (``imp``
            nests each round's masks in the last round's); default none.

    Returns:
        A :class:`Plan`.

    Raises:
        ValueError: as :meth:`MethodConfig.checked`; an unknown layer name in
            ``freeze_layers``; a data-driven method without data.
        TypeError: ``freeze_layers`` is a string.

    Example:
        >>> p = plan(model, MethodConfig(density=0.25, block_size=16, seed=0))
        >>> mask, frozen = p.masks["0"]
    """
    config = config.checked()
    seed = _draw_seed(config.seed)
    targets = find_targets(
        model,
        config.block_size,
        config.layers,
        config.exclude,
        config.exclude_first,
        config.exclude_last,
        config.min_blocks,
    )
    names = {t.name for t in targets}
    if isinstance(config.freeze_layers, str):
        raise TypeError(f"freeze_layers must be a list of layer names, got the string {config.freeze_layers!r}")
    unknown = [n for n in config.freeze_layers if n not in names]
    if unknown:
        raise ValueError(f"freeze_layers names unknown layer(s) {unknown}; candidate layers are {sorted(names)}")
    active = [t for t in targets if t.skip is None]
    opts = {}
    if prior is not None:
        opts["prior"] = {t.name: prior[t.name] for t in active}
    freezenet = config.freeze == "freezenet" and config.trainable < 1.0
    if config.method in DATA_METHODS or freezenet:
        opts["batches"] = _batches(
            config.data, config.loss_fn, config.method if config.method in DATA_METHODS else "freezenet"
        )
    if config.method == "synflow":
        _example_input(config.example_input, config.data)  # fail before any scoring
    with _rng(model, seed):
        kept = _score_and_select(model, active, config, seed, opts)
        frozen = _choose_frozen(model, active, kept, config, seed, opts)
    for n in config.freeze_layers:
        if n in kept:
            frozen[n] = kept[n].clone()
    frozen_dense = [t.name for t in targets if t.skip is not None and t.name in config.freeze_layers]
    return Plan(targets, {t.name: (kept[t.name], frozen[t.name]) for t in active}, frozen_dense)
