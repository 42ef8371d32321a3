"""The pruning-facing API: ``masks`` computes, ``apply_masks`` converts, ``sparsify`` does both and reports.

Every method yields, per layer, a ``(mask, frozen_mask)`` pair of weight-shaped
bool tensors (``frozen_mask`` inside ``mask``): pruned where ``mask`` is False,
frozen at the current value where ``frozen_mask`` is True, trainable elsewhere.

Pipeline of :func:`masks`:

1. pick the layers (``targets.find_targets``: names, exclusions, too-small rule);
2. score them on the dense model (``scores.py``; iterative methods re-score
   ``iterations`` times on an exponential density schedule ``d ** (t / T)``);
3. keep the top elements or blocks per layer (``uniform``/``erk`` densities)
   or over all layers (``global``), see ``select.py``;
4. choose the frozen part: whole layers (``freeze_layers``), then among the kept
   weights keep ``trainable`` of them trainable, at random or by SNIP saliency
   (``freeze="freezenet"``); with ``granularity="block"`` whole blocks are
   frozen, so they skip the weight-gradient GEMM.

Known limits: data-driven scores need the model's layers dense (score first,
then convert).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from sparsekern.layout import BlockLayout, normalize_block_size
from sparsekern.methods import scores as S
from sparsekern.methods.blocks import REDUCTIONS, block_grid, from_matrix, pool_blocks, to_matrix
from sparsekern.methods.select import GRANULARITIES, check_fraction, layer_densities, select
from sparsekern.methods.targets import (
    Target,
    current_masks,
    find_targets,
    replace_module,
    sparse_class,
    tie_reason,
    tied_parameters,
)

__all__ = ["METHODS", "FREEZE", "LayerReport", "SparsifyReport", "apply_masks", "masks", "reblock", "sparsify"]

METHODS = ("random", "magnitude", "snip", "grasp", "synflow", "force")
DATA_METHODS = ("snip", "grasp", "force")
ITERATIONS = {"synflow": 100, "force": 10}
FREEZE = ("random", "freezenet")


@dataclass
class _Plan:
    targets: list[Target]
    masks: dict[str, tuple[torch.Tensor, torch.Tensor]]
    frozen_dense: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Spec:
    """The options of :func:`masks` / :func:`sparsify` (same names, same defaults), validated by ``_plan``."""

    method: str = "magnitude"
    density: float = 0.1
    trainable: float = 1.0
    block_size: object = 32
    distribution: str = "uniform"
    granularity: str = "block"
    data: object = None
    loss_fn: object = None
    exclude: object = ()
    exclude_first: bool = False
    exclude_last: bool = False
    reduce: str = "l1"
    layers: object = None
    seed: int | None = None
    freeze: str = "random"
    freeze_layers: object = ()
    iterations: int | None = None
    example_input: object = None
    temperature: float = 200.0
    min_blocks: int = 4


def _spec(args: dict) -> _Spec:
    """A :class:`_Spec` from a public function's ``locals()`` (everything but ``model``)."""
    return _Spec(**{k: v for k, v in args.items() if k != "model"})


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


def _score_and_select(model, active, spec: _Spec, seed: int, opts: dict):
    """Pruning masks of the ``active`` targets."""
    method, density, granularity, block_size = spec.method, spec.density, spec.granularity, spec.block_size
    distribution, reduce = spec.distribution, spec.reduce
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
        return select(S.grasp_scores(model, active, *opts["batches"], spec.temperature), target, signed=True, **kw)
    n_iter = spec.iterations or ITERATIONS[method]
    if isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < 1:
        raise ValueError(f"iterations must be a positive int, got {n_iter!r}")
    cur = {t.name: torch.ones(t.shape, dtype=torch.bool, device=t.module.weight.device) for t in active}
    for it in range(1, n_iter + 1):
        if method == "synflow":
            sc = S.synflow_scores(model, active, cur, _example_input(spec.example_input, spec.data))
            # float64 scores of deep nets can exceed float32: one common scale keeps every ranking.
            top = max((float(s.max()) for s in sc.values()), default=0.0)
            sc = {n: (s / top if top > 0 and math.isfinite(top) else s).float() for n, s in sc.items()}
        else:
            sc = S.force_scores(model, active, *opts["batches"], cur)
        cur = select(sc, at(it / n_iter), **kw)
    return cur


def _choose_frozen(model, active, kept, spec: _Spec, seed: int, opts: dict):
    """Frozen masks: among each layer's kept weights, all but a ``trainable`` share (by blocks for "block")."""
    trainable, freeze, granularity, block_size = spec.trainable, spec.freeze, spec.granularity, spec.block_size
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
    kw = {"granularity": granularity, "block_size": blocks, "reduce": spec.reduce, "prior": kept}
    if spec.distribution == "global" and freeze == "freezenet":
        total_kept, total = (sum(v) for v in zip(*sizes.values(), strict=True))
        train = select(saliency, trainable * total_kept / max(1, total), globally=True, **kw)
    else:
        train = select(saliency, {n: trainable * k / max(1, tot) for n, (k, tot) in sizes.items()}, **kw)
    return {n: kept[n] & ~train[n] for n in kept}


def _plan(model: nn.Module, spec: _Spec, prior: dict[str, torch.Tensor] | None = None) -> _Plan:
    """Validate ``spec``, pick the layers, compute their masks; ``model`` is left unchanged."""
    if spec.method not in METHODS:
        raise ValueError(f"unknown method {spec.method!r}; choose one of {METHODS}")
    if spec.granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {spec.granularity!r}")
    if spec.reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {REDUCTIONS}, got {spec.reduce!r}")
    if spec.freeze not in FREEZE:
        raise ValueError(f"freeze must be one of {FREEZE}, got {spec.freeze!r}")
    layer_densities({}, 0.0, spec.distribution)  # validates the name
    spec = replace(
        spec,
        density=check_fraction(spec.density, "density"),
        trainable=check_fraction(spec.trainable, "trainable"),
        block_size=normalize_block_size(spec.block_size),
    )
    seed = _draw_seed(spec.seed)
    targets = find_targets(
        model, spec.block_size, spec.layers, spec.exclude, spec.exclude_first, spec.exclude_last, spec.min_blocks
    )
    names = {t.name for t in targets}
    if isinstance(spec.freeze_layers, str):
        raise TypeError(f"freeze_layers must be a list of layer names, got the string {spec.freeze_layers!r}")
    unknown = [n for n in spec.freeze_layers if n not in names]
    if unknown:
        raise ValueError(f"freeze_layers names unknown layer(s) {unknown}; candidate layers are {sorted(names)}")
    active = [t for t in targets if t.skip is None]
    opts = {}
    if prior is not None:
        opts["prior"] = {t.name: prior[t.name] for t in active}
    freezenet = spec.freeze == "freezenet" and spec.trainable < 1.0
    if spec.method in DATA_METHODS or freezenet:
        opts["batches"] = _batches(spec.data, spec.loss_fn, spec.method if spec.method in DATA_METHODS else "freezenet")
    if spec.method == "synflow":
        _example_input(spec.example_input, spec.data)  # fail before any scoring
    with _rng(model, seed):
        kept = _score_and_select(model, active, spec, seed, opts)
        frozen = _choose_frozen(model, active, kept, spec, seed, opts)
    for n in spec.freeze_layers:
        if n in kept:
            frozen[n] = kept[n].clone()
    frozen_dense = [t.name for t in targets if t.skip is not None and t.name in spec.freeze_layers]
    return _Plan(targets, {t.name: (kept[t.name], frozen[t.name]) for t in active}, frozen_dense)


_DOC_ARGS = """
        model: the model; its ``nn.Linear``, ``nn.Conv2d`` and ``transformers``
            ``Conv1D`` layers (and sparse ones) are candidates.
        method: one of ``METHODS``: ``"random"``, ``"magnitude"``, ``"snip"``,
            ``"grasp"``, ``"synflow"``, ``"force"``.
        density: fraction of weights kept over the sparsified layers.
        trainable: fraction of the kept weights that stay trainable; the rest
            are frozen at their current values.
        block_size: int or ``(bm, bk)``, each in {16, 32, 64, 128}; ``bm`` runs
            over output features (a ``Conv1D``'s masks are ``(in, out)``, like its
            weight, so its blocks are ``(bk, bm)`` there).
        distribution: ``"uniform"`` (every layer at ``density``), ``"erk"``
            (Erdős–Rényi-kernel) or ``"global"`` (one ranking over all layers).
        granularity: ``"block"`` (pooled scores, whole blocks: the kernels skip
            them) or ``"element"`` (the published behaviour, exact counts).
        data: iterable of ``(inputs, targets)`` batches for ``snip``, ``grasp``,
            ``force`` and ``freeze="freezenet"`` (``synflow`` takes its shape).
        loss_fn: ``loss_fn(outputs, targets)``; default ``F.cross_entropy``.
        exclude: layer names to leave dense.
        exclude_first, exclude_last: leave the first / last candidate layer dense.
        reduce: block pooling, ``"l1"``, ``"l2"`` or ``"max"`` (GraSP's signed
            scores are always summed).
        layers: names of the layers to consider (default: all candidates).
        seed: makes ``random`` scores, random freezing and dropout during scoring
            reproducible; ``None`` draws one from torch's global RNG.
        freeze: how the trainable share is chosen: ``"random"`` or
            ``"freezenet"`` (the highest SNIP saliency ``|g * w|`` stays trainable).
        freeze_layers: names of layers frozen entirely.
        iterations: rounds of ``synflow`` (default 100) and ``force`` (default 10).
        example_input: a tensor of the model's input shape for ``synflow``.
        temperature: GraSP's logit temperature (200 as published).
        min_blocks: layers with fewer blocks stay dense."""


def masks(
    model: nn.Module,
    method: str = "magnitude",
    density: float = 0.1,
    trainable: float = 1.0,
    *,
    block_size=32,
    distribution: str = "uniform",
    granularity: str = "block",
    data=None,
    loss_fn=None,
    exclude=(),
    exclude_first: bool = False,
    exclude_last: bool = False,
    reduce: str = "l1",
    layers=None,
    seed: int | None = None,
    freeze: str = "random",
    freeze_layers=(),
    iterations: int | None = None,
    example_input: torch.Tensor | None = None,
    temperature: float = 200.0,
    min_blocks: int = 4,
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Compute ``(mask, frozen_mask)`` per layer without changing ``model``.

    Args:{args}

    Returns:
        ``{{layer_name: (mask, frozen_mask)}}`` for every layer that would be
        sparsified (layers left dense are absent); bool, weight-shaped,
        ``frozen_mask`` inside ``mask``.

    Raises:
        ValueError: unknown method, distribution, granularity or layer name; a
            density outside ``[0, 1]``; a data-driven method without data.

    Example:
        >>> model = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10))
        >>> m = masks(model, "magnitude", density=0.25, block_size=16, seed=0)
        >>> mask, frozen = m["0"]
        >>> float(mask.float().mean())
        0.25
    """
    return _plan(model, _spec(locals())).masks


if masks.__doc__:  # None under python -OO
    masks.__doc__ = masks.__doc__.format(args=_DOC_ARGS)


def apply_masks(
    model: nn.Module,
    layer_masks: dict[str, tuple[torch.Tensor, torch.Tensor | None]],
    block_size=None,
    optimizer: torch.optim.Optimizer | None = None,
) -> nn.Module:
    """Put masks on ``model``'s layers: dense layers are replaced, sparse ones get ``set_masks`` or are re-blocked.

    All masks are checked (and every new module built) before any layer
    changes, so a failure leaves the model as it was.

    Re-blocking: a sparse layer whose block size differs from an explicit
    ``block_size`` is rebuilt at the new size from its effective dense weight
    (``to_dense()``) and the given masks, as a fresh conversion would be. The
    new layer keeps the old ``bias`` Parameter, ``requires_grad`` and training
    mode; forward hooks on the old module are not carried over. Its
    ``weight_train`` is a new Parameter: the ``optimizer``, when given, gets it
    in the old one's place with its state moved element by element, as
    ``set_masks`` does.

    Args:
        model: the model, changed in place.
        layer_masks: ``{name: (mask, frozen_mask)}`` as :func:`masks` returns;
            ``frozen_mask`` may be ``None``. Weight-shaped: a ``Conv1D``'s masks
            are ``(in, out)``, its weight's own orientation.
        block_size: int or ``(bm, bk)``: every named layer ends with this block
            size (sparse layers of another size are re-blocked). ``None`` (the
            default): 32 for dense layers; sparse layers keep theirs.
        optimizer: follows the layers that change in place (``set_masks``) or
            are re-blocked. Layers converted from dense get new Parameters that
            no optimizer holds yet: build it after converting.

    Returns:
        ``model``.

    Raises:
        ValueError: an unknown layer name; a mask of the wrong shape or an
            invalid mask pair; a layer that cannot be converted; a dense layer
            whose weight is tied to another module's (converting it would break
            the tie).

    Example:
        >>> apply_masks(model, masks(model, "magnitude", 0.2, block_size=16), block_size=16)
    """
    modules = dict(model.named_modules())
    unknown = [n for n in layer_masks if n not in modules]
    if unknown:
        raise ValueError(f"masks name unknown layer(s) {unknown}; the model has {sorted(n for n in modules if n)}")
    new_size = None if block_size is None else normalize_block_size(block_size)
    tied = tied_parameters(model)
    new_modules, updates, moves = {}, {}, []
    for name, (mask, frozen) in layer_masks.items():
        mod = modules[name]
        if current_masks(mod) is not None and new_size in (None, tuple(mod.block_size)):
            w = mod.weight
            if tuple(mask.shape) != tuple(w.shape):
                raise ValueError(f"mask for {name} has shape {tuple(mask.shape)}, weight is {tuple(w.shape)}")
            BlockLayout.from_masks(
                _matrix(mask, mod.block_size), None if frozen is None else _matrix(frozen, mod.block_size),
                mod.block_size,
            )  # fmt: skip
            updates[name] = (mask, frozen)
            continue
        if current_masks(mod) is not None:
            new = reblock(mod, mask, frozen, new_size)
            if optimizer is not None:
                moves.append(_optimizer_move(optimizer, mod, new))
            new_modules[name] = new
            continue
        cls = sparse_class(mod)
        if cls is None:
            raise ValueError(f"layer {name} is a {type(mod).__name__}, which this sparsekern version cannot convert")
        tie = tie_reason(tied, name, mod)
        if tie is not None:
            raise ValueError(f"layer {name} cannot be converted: {tie}")
        new_modules[name] = cls.from_dense(mod, mask=mask, frozen_mask=frozen, block_size=new_size or 32)
    # Nothing above changed the model; below, nothing can fail.
    for name, new in new_modules.items():
        replace_module(model, name, new)
    for move in moves:
        move()
    for name, (mask, frozen) in updates.items():
        modules[name].set_masks(mask, frozen_mask=frozen, optimizer=optimizer)
    return model


def reblock(layer: nn.Module, mask: torch.Tensor | None = None, frozen_mask=None, block_size=32) -> nn.Module:
    """A new sparse layer like ``layer`` at another ``block_size``: same effective weight, the given masks.

    The old layer is not changed. The result is built by ``from_dense`` on
    ``layer.to_dense()`` and shares ``layer``'s ``bias`` Parameter; its
    ``weight_train`` keeps ``layer``'s ``requires_grad`` and it keeps the
    training mode. Element-level masks survive any re-blocking: a layout holds
    element-level state, so blocks that the new size cuts across become mixed.

    Args:
        layer: a ``SparseLinear`` or ``SparseConv2d``.
        mask: weight-shaped bool; default ``layer.mask`` (the same kept weights, new blocks).
        frozen_mask: weight-shaped bool; default: ``layer.frozen_mask`` when ``mask``
            is defaulted too, else nothing frozen (as for ``set_masks``).
        block_size: int or ``(bm, bk)``.

    Returns:
        The new layer (put it in the model with ``targets.replace_module``).

    Raises:
        TypeError: ``layer`` is not a sparse layer.
        ValueError: a bad block size or masks.

    Example:
        >>> new = reblock(model.fc, block_size=16)
        >>> torch.equal(new.weight, model.fc.weight) and torch.equal(new.mask, model.fc.mask)
        True
    """
    if current_masks(layer) is None:
        raise TypeError(f"reblock expects a sparse layer (SparseLinear, SparseConv2d), got {type(layer).__name__}")
    if mask is None:
        mask = layer.mask
        if frozen_mask is None:
            frozen_mask = layer.frozen_mask
    new = type(layer).from_dense(layer.to_dense(), mask=mask, frozen_mask=frozen_mask, block_size=block_size)
    new.weight_train.requires_grad_(layer.weight_train.requires_grad)
    if layer.bias is not None:
        new.bias = layer.bias  # the same Parameter: optimizers and hooks holding it stay valid
    return new.train(layer.training)


def _optimizer_move(optimizer: torch.optim.Optimizer, old: nn.Module, new: nn.Module):
    """Compute now (it may fail) how ``optimizer`` follows ``old.weight_train`` to ``new.weight_train``; return a
    closure that applies it (it cannot fail)."""
    param, fresh = old.weight_train, new.weight_train
    moved = {}
    with torch.no_grad():
        for key, val in optimizer.state.get(param, {}).items():
            if isinstance(val, torch.Tensor) and val.shape == param.shape:
                dense = old.layout.to_dense(val, torch.zeros_like(old.weight_frozen, dtype=val.dtype))
                dense = to_matrix(from_matrix(dense, old.weight_shape), new.block_size[1])
                moved[key] = new.layout.split_values(dense)[0]

    def apply() -> None:
        for group in optimizer.param_groups:
            group["params"] = [fresh if p is param else p for p in group["params"]]
        state = optimizer.state.pop(param, None)
        if state is not None:
            optimizer.state[fresh] = {**state, **moved}

    return apply


def _matrix(m: torch.Tensor, block_size) -> torch.Tensor:
    return to_matrix(m.bool(), normalize_block_size(block_size)[1], False)


# ------------------------------------------------------------------ reports
PASSES = ("forward", "input_grad", "weight_grad")


@dataclass
class LayerReport:
    """What :func:`sparsify` did to one layer.

    Attributes:
        name, kind, shape: the layer's name, ``"linear"``, ``"conv1d"`` (``transformers``' ``Conv1D``,
            converted to a ``SparseLinear``; ``shape`` is its weight's ``(in, out)``) or ``"conv2d"``,
            and the weight shape it had.
        sparse: True when it was converted; else ``reason`` says why not.
        element_density: kept weights over all weights.
        trainable_fraction: trainable weights over kept weights.
        block_fraction: computed blocks over all blocks (1 for dense layers).
        trainable_block_fraction: blocks that get a weight gradient over all blocks.
        flops_per_token: ``{pass: {"dense", "element", "block"}}`` per input row
            (per output position for convolutions), from ``layout.flops(1)``.
        flops_saved: ``{pass: fraction}`` of the dense FLOPs the kernels skip.
        note: what else happened to a converted layer (a ``Conv1D`` converted, a
            sparse layer re-blocked to a new block size), or ``None``.
    """

    name: str
    kind: str
    shape: tuple[int, ...]
    sparse: bool
    reason: str | None
    element_density: float
    trainable_fraction: float
    block_fraction: float
    trainable_block_fraction: float
    flops_per_token: dict[str, dict[str, int]]
    flops_saved: dict[str, float]
    note: str | None = None


@dataclass
class SparsifyReport:
    """Per-layer :class:`LayerReport` s, indexable by layer name; ``table()`` prints them."""

    layers: dict[str, LayerReport]

    def __getitem__(self, name: str) -> LayerReport:
        return self.layers[name]

    def __iter__(self):
        return iter(self.layers.values())

    def __len__(self) -> int:
        return len(self.layers)

    def __contains__(self, name) -> bool:
        return name in self.layers

    @property
    def sparse_layers(self) -> list[str]:
        return [n for n, r in self.layers.items() if r.sparse]

    def total(self) -> dict[str, float]:
        """Element density, trainable fraction and per-pass FLOPs saved over all reported layers.

        Every layer in the report counts, weighted by its weight's size: the
        converted ones at their densities and those left dense (too small,
        excluded, tied) at density 1, so the figures describe the candidate
        layers of the whole model, not one of them.
        """
        numel = {n: math.prod(r.shape) for n, r in self.layers.items()}
        kept = sum(r.element_density * numel[n] for n, r in self.layers.items())
        train = sum(r.element_density * r.trainable_fraction * numel[n] for n, r in self.layers.items())
        out = {"element_density": kept / max(1, sum(numel.values())), "trainable_fraction": train / max(1e-12, kept)}
        for p in PASSES:
            dense = sum(r.flops_per_token[p]["dense"] for r in self)
            block = sum(r.flops_per_token[p]["block"] for r in self)
            out[f"{p}_flops_saved"] = 1 - block / dense if dense else 0.0
        return out

    def table(self) -> str:
        """A markdown table, one row per layer and a total row."""
        lines = [
            "| layer | shape | sparse | density | trainable | blocks | fwd saved | dX saved | dW saved | note |",
            "|" + "---|" * 10,
        ]
        for r in self:
            s = r.flops_saved
            lines.append(
                f"| {r.name} | {'x'.join(map(str, r.shape))} | {'yes' if r.sparse else 'no'} "
                f"| {r.element_density:.3f} | {r.trainable_fraction:.3f} | {r.block_fraction:.3f} "
                f"| {s['forward']:.3f} | {s['input_grad']:.3f} | {s['weight_grad']:.3f} | {r.reason or r.note or ''} |"
            )
        t = self.total()
        lines.append(
            f"| total | | | {t['element_density']:.3f} | {t['trainable_fraction']:.3f} | "
            f"| {t['forward_flops_saved']:.3f} | {t['input_grad_flops_saved']:.3f} "
            f"| {t['weight_grad_flops_saved']:.3f} | |"
        )
        return "\n".join(lines)


def _layer_report(t: Target, mod: nn.Module, reason: str | None, note: str | None = None) -> LayerReport:
    kind = "conv2d" if len(t.shape) == 4 else "conv1d" if t.transposed else "linear"
    if reason is None and t.transposed:
        conv1d = f"transformers Conv1D, now a SparseLinear {t.shape[1]}x{t.shape[0]} (out x in)"
        note = conv1d if note is None else f"{conv1d}; {note}"
    if reason is None:
        lay = mod.layout
        counts = lay.element_counts()
        f = lay.flops(1)
        # A conv matrix view pads input channels up to the block: dense counts real weights only.
        for p in PASSES:
            f[p]["dense"] = 2 * math.prod(t.shape)
        return LayerReport(
            name=t.name,
            kind=kind,
            shape=t.shape,
            sparse=True,
            reason=None,
            element_density=counts["kept"] / max(1, math.prod(t.shape)),
            trainable_fraction=counts["trainable"] / max(1, counts["kept"]),
            block_fraction=lay.block_density,
            trainable_block_fraction=lay.trainable_block_fraction,
            flops_per_token=f,
            flops_saved={p: 1 - f[p]["block"] / f[p]["dense"] if f[p]["dense"] else 0.0 for p in PASSES},
            note=note,
        )
    per_row = 2 * math.prod(t.shape)
    wgrad = per_row if mod.weight.requires_grad else 0
    f = {p: dict.fromkeys(("dense", "element", "block"), per_row) for p in ("forward", "input_grad")}
    f["weight_grad"] = {"dense": per_row, "element": wgrad, "block": wgrad}
    return LayerReport(
        name=t.name,
        kind=kind,
        shape=t.shape,
        sparse=False,
        reason=reason,
        element_density=1.0,
        trainable_fraction=float(wgrad > 0),
        block_fraction=1.0,
        trainable_block_fraction=float(wgrad > 0),
        flops_per_token=f,
        flops_saved={p: 1 - f[p]["block"] / f[p]["dense"] for p in PASSES},
    )


def sparsify(
    model: nn.Module,
    method: str = "magnitude",
    density: float = 0.1,
    trainable: float = 1.0,
    block_size=32,
    distribution: str = "uniform",
    granularity: str = "block",
    data=None,
    loss_fn=None,
    exclude=(),
    exclude_first: bool = False,
    exclude_last: bool = False,
    reduce: str = "l1",
    layers=None,
    seed: int | None = None,
    *,
    freeze: str = "random",
    freeze_layers=(),
    iterations: int | None = None,
    example_input: torch.Tensor | None = None,
    temperature: float = 200.0,
    min_blocks: int = 4,
) -> SparsifyReport:
    """Prune and freeze ``model`` in place: its layers become ``SparseLinear`` (``SparseConv2d``) modules.

    Masks are computed on the dense model (see :func:`masks`), then every
    chosen layer is replaced by ``from_dense(layer, mask=, frozen_mask=,
    block_size=)``. Nothing changes when any step fails. Layers too small to
    gain, excluded, tied to another module's weight (GPT-2's ``lm_head``), or
    of a kind this version cannot convert stay dense, and the report says why.

    Hugging Face models: ``transformers``' ``Conv1D`` layers (GPT-2) become
    ``SparseLinear`` (in the ``nn.Linear`` orientation), and tied weights stay
    tied, so ``model.tie_weights()`` keeps working.

    Running it again on a sparse model re-scores its sparse layers; those of
    another ``block_size`` are re-blocked (rebuilt at the new size from their
    effective weight, see :func:`reblock`) and the report's ``note`` says so.

    Args:{args}

    Returns:
        A :class:`SparsifyReport`: ``report[name]`` is a :class:`LayerReport`
        (densities, computed-block fraction, FLOPs saved per pass),
        ``report.table()`` a markdown table.

    Raises:
        ValueError: unknown method, distribution, granularity or layer name; a
            density outside ``[0, 1]``; a data-driven method without data.

    Example:
        >>> model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
        >>> rep = sparsekern.sparsify(model, "snip", density=0.2, block_size=32, data=[(x, y)], exclude_last=True)
        >>> print(rep.table())
    """
    plan = _plan(model, _spec(locals()))
    new_size = normalize_block_size(block_size)
    notes = {
        t.name: f"re-blocked from {t.module.block_size[0]}x{t.module.block_size[1]} to {new_size[0]}x{new_size[1]}"
        for t in plan.targets
        if t.name in plan.masks and current_masks(t.module) is not None and tuple(t.module.block_size) != new_size
    }
    apply_masks(model, plan.masks, new_size)
    for name in plan.frozen_dense:
        model.get_submodule(name).weight.requires_grad_(False)
    modules = dict(model.named_modules())
    return SparsifyReport({t.name: _layer_report(t, modules[t.name], t.skip, notes.get(t.name)) for t in plan.targets})


if sparsify.__doc__:
    sparsify.__doc__ = sparsify.__doc__.format(args=_DOC_ARGS)
