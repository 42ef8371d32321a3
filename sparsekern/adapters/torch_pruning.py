"""Adapters for torch's own pruning: ``torch.nn.utils.prune`` and ``torch.ao.pruning``.

Both keep a dense weight and multiply it by a mask on every forward, so a
pruned model computes as much as the dense one. These adapters replace each
masked ``nn.Linear`` (and ``nn.Conv2d``, by ``SparseConv2d``) by a
sparse layer holding the same effective weight; the replaced modules, with
their pruning hooks, ``weight_orig``/``weight_mask`` and parametrizations, are
dropped from the model. Other forward hooks on a replaced module are not
carried over.

Known limits: a pruned bias is folded in (its pruned entries are zero but stay
trainable); after ``from_torch_ao`` the sparsifier still refers to the old
modules, so do not step it again.
"""

from __future__ import annotations

from torch import nn
from torch.nn.utils import parametrize

from sparsekern.adapters._core import MaskedLayer, convert_targets
from sparsekern.nn.foreign_masks import dense_weight_and_mask
from sparsekern.reports import Report

__all__ = ["from_torch_prune", "from_torch_ao"]


def _target(name: str, module: nn.Module) -> MaskedLayer | None:
    weight, mask = dense_weight_and_mask(module, "weight")
    if mask is None:
        return None
    bias = None
    if getattr(module, "bias", None) is not None or hasattr(module, "bias_orig"):
        bias = dense_weight_and_mask(module, "bias")[0]
    orig = getattr(module, "weight_orig", None)
    if orig is None and parametrize.is_parametrized(module, "weight"):
        orig = module.parametrizations.weight.original
    return MaskedLayer(name, module, weight, mask, bias, requires_grad=bool(getattr(orig, "requires_grad", True)))


def from_torch_prune(
    model: nn.Module, granularity: str = "exact", block_size=32, reduce: str = "l1"
) -> tuple[nn.Module, Report]:
    """Replace every layer pruned with ``torch.nn.utils.prune`` by a sparse layer, in place.

    Args:
        model: a model whose layers carry ``weight_orig``, ``weight_mask`` and
            a pruning forward pre-hook.
        granularity: ``"exact"`` keeps the element masks (same outputs and
            gradients); ``"block"`` keeps whole blocks of highest pooled
            magnitude at each layer's density (see ``adapters._core``).
        block_size: int or ``(bm, bk)`` of the sparse layers.
        reduce: block pooling for ``"block"``: ``"l1"``, ``"l2"`` or ``"max"``.

    Returns:
        ``(model, report)``: the model (the same object, unless the model is
        itself a pruned layer) and a :class:`~sparsekern.reports.Report` (old name
        ``ConversionReport``): ``report[name].mask_density``, ``.granularity`` and
        ``.choices["exact" | "block"].flops_saved[pass]``.

    Raises:
        TypeError: a pruned module that no sparse layer replaces.
        ValueError: bad options; the model is then unchanged.

    Example:
        >>> prune.l1_unstructured(model.fc, "weight", amount=0.9)
        >>> model, rep = from_torch_prune(model, granularity="block", block_size=32)
        >>> print(rep.table())
    """
    targets = []
    for name, mod in model.named_modules():
        if hasattr(mod, "weight_orig") and hasattr(mod, "weight_mask"):
            targets.append(_target(name, mod))
    return convert_targets(model, targets, granularity, block_size, reduce)


def from_torch_ao(
    model: nn.Module, granularity: str = "exact", block_size=32, reduce: str = "l1"
) -> tuple[nn.Module, Report]:
    """Replace every layer with a ``torch.ao.pruning`` mask parametrization by a sparse layer, in place.

    Works on a model prepared and stepped by a sparsifier (``FakeSparsity`` or
    any weight parametrization with a ``.mask``), without calling
    ``sparsifier.convert``. Arguments, return value and errors as for
    :func:`from_torch_prune`.

    Example:
        >>> sparsifier = WeightNormSparsifier(sparsity_level=0.9, sparse_block_shape=(1, 4))
        >>> sparsifier.prepare(model, config=[{"tensor_fqn": "fc.weight"}])
        >>> sparsifier.step()
        >>> model, rep = from_torch_ao(model, granularity="block", block_size=32)
    """
    targets = []
    for name, mod in model.named_modules():
        if parametrize.is_parametrized(mod, "weight") and any(
            hasattr(p, "mask") for p in mod.parametrizations["weight"]
        ):
            targets.append(_target(name, mod))
    return convert_targets(model, targets, granularity, block_size, reduce)
