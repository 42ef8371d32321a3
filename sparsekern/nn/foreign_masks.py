"""Read a dense module's weight and the mask another pruning library attached to it.

``dense_weight_and_mask(module)`` understands three forms:

=================================  ======================================  ===========================
form                               where the values and mask live          returned weight
=================================  ======================================  ===========================
``torch.nn.utils.prune``           ``weight_orig`` Parameter, ``weight_    ``weight_orig`` where the
                                   mask`` buffer, a forward pre-hook       mask keeps it, else 0
``torch.ao`` parametrizations      ``parametrizations.weight.original``;   the parametrized weight
(``FakeSparsity`` and the like)    every parametrization with a ``.mask``  (every parametrization
                                   (all such masks are combined with AND)  applied)
a plain module                     ``weight``; no mask                     ``weight``
=================================  ======================================  ===========================

The weight comes back detached, with the module's device and dtype; the mask
is ``bool`` and weight-shaped, or ``None``. Nothing on the module is changed.
``from_dense`` of the sparse layers calls this so that torch.ao's
``sparsifier.convert(model, mapping={nn.Linear: SparseLinear})`` and pruned
modules keep their exact masks (kept weights that happen to be zero stay kept).

Example:
    >>> lin = torch.nn.utils.prune.random_unstructured(nn.Linear(8, 4), "weight", amount=0.5)
    >>> w, mask = dense_weight_and_mask(lin)
    >>> int(mask.sum())
    16
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize

__all__ = ["dense_weight_and_mask", "has_foreign_mask", "nonzero_mask"]


def nonzero_mask(mask: torch.Tensor, shape, what: str, of: str = "the weight") -> torch.Tensor:
    """A foreign mask as bool, nonzero = kept: torch prune's, torch.ao's and the mask files' convention.

    Unlike ``layout.as_bool_mask`` (sparsekern's own masks, which must hold exactly 0 and 1), any
    nonzero value counts as kept, as the libraries that wrote these masks read them; NaN is refused. Used here and by
    ``sparsekern.adapters`` (mask dicts and files).

    Args:
        mask: the mask; it must be a tensor of ``shape``.
        shape: the shape of the tensor it masks.
        what: how errors name the mask; ``of``: how they name the tensor it masks.

    Example:
        >>> nonzero_mask(torch.tensor([0.0, 0.5]), (2,), "weight_mask").tolist()
        [False, True]
    """
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{what} must be a tensor, got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{what} has shape {tuple(mask.shape)}, but {of} has shape {tuple(shape)}")
    mask = mask.detach()
    # NaN != 0 is True: read as is, a NaN entry would silently count as kept.
    if mask.is_floating_point() or mask.is_complex():
        bad = int(torch.isnan(mask).sum())
        if bad:
            raise ValueError(f"{what} holds {bad} NaN entries: neither kept nor pruned, so nothing was converted")
    return mask != 0


def has_foreign_mask(module: nn.Module, name: str = "weight") -> bool:
    """Whether ``module`` carries a torch prune or a torch.ao parametrization mask on ``name``."""
    pruned = hasattr(module, name + "_orig") and hasattr(module, name + "_mask")
    return pruned or parametrize.is_parametrized(module, name)


def dense_weight_and_mask(module: nn.Module, name: str = "weight") -> tuple[torch.Tensor, torch.Tensor | None]:
    """The detached effective weight of ``module`` and its foreign mask (``None`` when it has none).

    Args:
        module: an ``nn.Linear``/``nn.Conv2d`` (or any module with ``name``),
            possibly pruned by ``torch.nn.utils.prune`` or parametrized by
            ``torch.ao.pruning``.
        name: the parameter name, ``"weight"``.

    Returns:
        ``(weight, mask)``: ``weight`` detached and weight-shaped, zero where the
        mask prunes; ``mask`` a bool tensor of the same shape, or ``None``.

    Raises:
        ValueError: a mask whose shape differs from the weight's.
    """
    if hasattr(module, name + "_orig") and hasattr(module, name + "_mask"):
        orig = getattr(module, name + "_orig").detach()
        mask = nonzero_mask(getattr(module, name + "_mask"), orig.shape, f"{name}_mask")
        return torch.where(mask, orig, torch.zeros((), dtype=orig.dtype, device=orig.device)), mask
    if parametrize.is_parametrized(module, name):
        plist = module.parametrizations[name]
        with torch.no_grad():
            weight = getattr(module, name).detach().clone()
        mask = None
        for p in plist:
            if hasattr(p, "mask"):
                m = nonzero_mask(p.mask, weight.shape, f"parametrization {type(p).__name__}.mask")
                mask = m if mask is None else mask & m
        if mask is not None:
            weight = torch.where(mask, weight, torch.zeros((), dtype=weight.dtype, device=weight.device))
        return weight, mask
    return getattr(module, name).detach(), None
