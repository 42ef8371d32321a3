"""Which layers a method works on, and how their weights are read and replaced.

A *target* is a ``nn.Linear`` or ``nn.Conv2d`` (dense, before conversion) or a
``SparseLinear``/``SparseConv2d`` (after conversion, e.g. in later rounds of IMP). Its weight is
read as a dense tensor (2-D linear, 4-D conv). Layers are chosen in
``named_modules()`` order; "first" and "last" mean the first and last of them.

A layer is *left dense* when sparse blocks could not pay off: a dimension of
its matrix view smaller than the block, or fewer than ``min_blocks`` blocks.
The reason is reported, never silently dropped.

Subclasses of ``nn.Linear``/``nn.Conv2d`` are left dense: their forward (or
their owner, as ``nn.MultiheadAttention`` does with ``out_proj.weight``) may
not go through the module's ``forward``.

Known limits: grouped convolutions and ``padding_mode`` other than
``'zeros'`` are left dense (``SparseConv2d`` does not support them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from sparsekern import nn as sknn
from sparsekern.layout import normalize_block_size
from sparsekern.methods.blocks import block_grid
from sparsekern.nn._base import BlockSparseWeight

__all__ = ["Target", "current_masks", "dense_weight", "find_targets", "replace_module", "sparse_class"]


@dataclass
class Target:
    """One layer a method may sparsify.

    Attributes:
        name: the module's name in ``model.named_modules()``.
        module: the module itself.
        shape: the weight's shape, ``(out, in)`` or ``(out, in, kh, kw)``.
        skip: ``None`` when the layer is sparsified, else why it stays dense.
    """

    name: str
    module: nn.Module
    shape: tuple[int, ...]
    skip: str | None = None


def _is_target(mod: nn.Module) -> bool:
    return isinstance(mod, (nn.Linear, nn.Conv2d, BlockSparseWeight))


def dense_weight(mod: nn.Module) -> torch.Tensor:
    """The layer's dense weight (effective ``W * mask`` for sparse modules), detached.

    Example:
        >>> dense_weight(nn.Linear(4, 3)).shape
        torch.Size([3, 4])
    """
    return mod.weight.detach()


def current_masks(mod: nn.Module) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(mask, frozen_mask)`` of a sparse module, ``None`` for a dense one.

    Example:
        >>> current_masks(nn.Linear(4, 3)) is None
        True
    """
    if isinstance(mod, BlockSparseWeight):
        return mod.mask, mod.frozen_mask
    return None


def sparse_class(mod: nn.Module):
    """The sparsekern module class that replaces ``mod``, or ``None`` (subclasses and other layers).

    Example:
        >>> sparse_class(nn.Linear(4, 3)).__name__
        'SparseLinear'
    """
    return {nn.Linear: sknn.SparseLinear, nn.Conv2d: sknn.SparseConv2d}.get(type(mod))


def find_targets(
    model: nn.Module,
    block_size,
    layers=None,
    exclude=(),
    exclude_first: bool = False,
    exclude_last: bool = False,
    min_blocks: int = 4,
) -> list[Target]:
    """Every candidate layer of ``model``, each marked with ``skip`` (``None`` = sparsify it).

    Args:
        model: the model to search.
        block_size: int or ``(bm, bk)``, used by the too-small rule.
        layers: names to consider (default: every linear and conv layer).
        exclude: names to leave dense.
        exclude_first, exclude_last: leave the first/last candidate dense.
        min_blocks: layers with fewer blocks than this stay dense.

    Returns:
        A list of :class:`Target` in module order.

    Raises:
        ValueError: a name in ``layers`` or ``exclude`` is not a linear or conv layer of ``model``.

    Example:
        >>> [t.name for t in find_targets(nn.Sequential(nn.Linear(64, 64)), 16)]
        ['0']
    """
    bm, bk = normalize_block_size(block_size)
    found = {name: mod for name, mod in model.named_modules() if _is_target(mod)}
    for arg, names in (("layers", layers or ()), ("exclude", exclude)):
        if isinstance(names, str):
            raise TypeError(f"{arg} must be a list of layer names, got the string {names!r}")
        unknown = [n for n in names if n not in found]
        if unknown:
            raise ValueError(f"{arg} names unknown layer(s) {unknown}; linear and conv layers are {sorted(found)}")
    names = list(found) if layers is None else [n for n in found if n in set(layers)]
    out = []
    for i, name in enumerate(names):
        mod = found[name]
        shape = tuple(mod.weight_shape if isinstance(mod, BlockSparseWeight) else mod.weight.shape)
        t = Target(name, mod, shape)
        rb, cb = block_grid(shape, (bm, bk))
        if name in exclude:
            t.skip = "excluded"
        elif exclude_first and i == 0:
            t.skip = "excluded (first layer)"
        elif exclude_last and i == len(names) - 1:
            t.skip = "excluded (last layer)"
        elif not isinstance(mod, BlockSparseWeight) and sparse_class(mod) is None:
            # e.g. MultiheadAttention's out_proj, whose weight is read directly, never through forward.
            t.skip = f"{type(mod).__name__} subclasses a torch layer; only nn.Linear and nn.Conv2d are converted"
        elif isinstance(mod, nn.Conv2d) and mod.groups != 1:
            t.skip = f"grouped convolution (groups={mod.groups}) is not supported"
        elif isinstance(mod, nn.Conv2d) and mod.padding_mode != "zeros":
            t.skip = f"padding_mode={mod.padding_mode!r} is not supported"
        elif shape[0] < bm or shape[1] < bk:  # out and in features (channels, for a conv)
            t.skip = f"weight {shape} is smaller than a {bm}x{bk} block"
        elif rb * cb < min_blocks:
            t.skip = f"only {rb * cb} block(s) of {bm}x{bk} (fewer than min_blocks={min_blocks})"
        out.append(t)
    return out


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, attr = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), attr


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put ``new`` where ``model``'s submodule ``name`` is; return the old module.

    Example:
        >>> old = replace_module(model, "encoder.fc1", SparseLinear.from_dense(model.encoder.fc1, mask))
    """
    parent, attr = _parent(model, name)
    old = getattr(parent, attr)
    setattr(parent, attr, new)
    return old
