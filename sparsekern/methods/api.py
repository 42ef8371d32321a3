"""The pruning-facing verbs: ``masks`` computes, ``apply_masks`` converts, ``sparsify`` does both and reports.

Every method yields, per layer, a ``(mask, frozen_mask)`` pair of weight-shaped
bool tensors (``frozen_mask`` inside ``mask``): pruned where ``mask`` is False,
frozen at the current value where ``frozen_mask`` is True, trainable elsewhere.

``masks`` and ``sparsify`` take a method's settings as named arguments, build a
:class:`~sparsekern.methods.config.MethodConfig` from them and pass it to
:func:`~sparsekern.methods.planning.plan` (``planning.py``: pick the layers, score,
select, freeze); ``apply_masks`` swaps the layers all-or-nothing; the report
types live in ``report.py``.

Known limits: data-driven scores need the model's layers dense (score first,
then convert).
"""

from __future__ import annotations

import torch
from torch import nn

from sparsekern.layout import BlockLayout, normalize_block_size
from sparsekern.methods.blocks import from_matrix, to_matrix
from sparsekern.methods.config import ARGS_DOC, FREEZE, METHODS, MethodConfig
from sparsekern.methods.planning import plan
from sparsekern.methods.report import layer_report, sparsify_report
from sparsekern.methods.targets import (
    current_masks,
    parametrized_reason,
    replace_module,
    sparse_class,
    tie_reason,
    tied_parameters,
)
from sparsekern.reports import LayerReport as LayerReport
from sparsekern.reports import Report
from sparsekern.reports import SparsifyReport as SparsifyReport

__all__ = [
    "FREEZE",
    "METHODS",
    "LayerReport",
    "MethodConfig",
    "SparsifyReport",
    "apply_masks",
    "masks",
    "reblock",
    "sparsify",
]

_DOC_ARGS = (
    """
        model: the model; its ``nn.Linear``, ``nn.Conv2d`` and ``transformers``
            ``Conv1D`` layers (and sparse ones) are candidates."""
    + ARGS_DOC
)


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
    config = MethodConfig(
        method=method,
        density=density,
        trainable=trainable,
        block_size=block_size,
        distribution=distribution,
        granularity=granularity,
        data=data,
        loss_fn=loss_fn,
        exclude=exclude,
        exclude_first=exclude_first,
        exclude_last=exclude_last,
        reduce=reduce,
        layers=layers,
        seed=seed,
        freeze=freeze,
        freeze_layers=freeze_layers,
        iterations=iterations,
        example_input=example_input,
        temperature=temperature,
        min_blocks=min_blocks,
    )
    return plan(model, config).masks


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
            why = parametrized_reason(mod) or f"a {type(mod).__name__}, which this sparsekern version cannot convert"
            raise ValueError(f"layer {name} is {why}")
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
) -> Report:
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
        A :class:`~sparsekern.reports.Report` (old name ``SparsifyReport``): ``report[name]`` is a
        :class:`~sparsekern.reports.LayerRecord` (densities, computed-block fraction,
        ``flops_per_token[pass][level]``, ``flops_saved[pass]``), ``report.total()`` the same over
        all reported layers, ``report.table()`` a markdown table.

    Raises:
        ValueError: unknown method, distribution, granularity or layer name; a
            density outside ``[0, 1]``; a data-driven method without data.

    Example:
        >>> model = nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
        >>> rep = sparsekern.sparsify(model, "snip", density=0.2, block_size=32, data=[(x, y)], exclude_last=True)
        >>> print(rep.table())
    """
    config = MethodConfig(
        method=method,
        density=density,
        trainable=trainable,
        block_size=block_size,
        distribution=distribution,
        granularity=granularity,
        data=data,
        loss_fn=loss_fn,
        exclude=exclude,
        exclude_first=exclude_first,
        exclude_last=exclude_last,
        reduce=reduce,
        layers=layers,
        seed=seed,
        freeze=freeze,
        freeze_layers=freeze_layers,
        iterations=iterations,
        example_input=example_input,
        temperature=temperature,
        min_blocks=min_blocks,
    )
    chosen = plan(model, config)
    new_size = normalize_block_size(block_size)
    notes = {
        t.name: f"re-blocked from {t.module.block_size[0]}x{t.module.block_size[1]} to {new_size[0]}x{new_size[1]}"
        for t in chosen.targets
        if t.name in chosen.masks and current_masks(t.module) is not None and tuple(t.module.block_size) != new_size
    }
    apply_masks(model, chosen.masks, new_size)
    for name in chosen.frozen_dense:
        model.get_submodule(name).weight.requires_grad_(False)
    modules = dict(model.named_modules())
    return sparsify_report(layer_report(t, modules[t.name], t.skip, notes.get(t.name)) for t in chosen.targets)


if sparsify.__doc__:
    sparsify.__doc__ = sparsify.__doc__.format(args=_DOC_ARGS)
