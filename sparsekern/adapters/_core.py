"""Shared machinery of the adapters: choose the masks, build the sparse layers, swap them in, report.

Every adapter finds its masked layers (:class:`MaskedLayer`: a dense layer, its effective weight
and bias, and an element mask) and hands them to :func:`convert_targets`, which

1. picks the mask to build: ``granularity="exact"`` keeps the element mask as
   it is (every block holding a kept element is computed, outputs and
   gradients are unchanged); ``granularity="block"`` pools ``|W * mask|`` per
   block and keeps the best ``round(density * n_blocks)`` whole blocks, so the
   layer keeps its element density and the kernels skip the other blocks;
2. builds every sparse layer (``SparseLinear.from_dense``, or the conv layer's)
   from a plain copy of the dense layer, before touching the model;
3. swaps them in only when all were built (nothing changes on failure), through the methods'
   ``targets.replace_module``, so a module registered under several names stays one module;
4. reports, per layer, a :class:`~sparsekern.reports.LayerRecord` of the layer built (its
   ``mask_density``, ``granularity`` and densities) whose ``choices`` hold what both
   granularities would compute (``layout.flops``, the passes of ``sparsekern.reports.PASSES``).

Tied weights (a layer whose Parameter another module holds, as an ``lm_head`` tied to the word
embeddings) are refused with a ValueError naming the tie (:func:`check_untied`), before anything
changes: a sparse layer would silently untie them.

What stays the adapters' own, and why: a :class:`MaskedLayer` carries the source's weight, mask and
bias (a method's ``targets.Target`` carries only a shape and a skip reason, since the method makes
its masks itself); :func:`replacement_class` looks through torch.ao parametrizations
(``type_before_parametrizations``), where ``targets.sparse_class`` takes a parametrized layer for a
subclass and leaves it dense; and the report compares both granularities for masks that were given.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import skip_init
from torch.nn.utils.parametrize import type_before_parametrizations

import sparsekern.nn as sknn
from sparsekern.layout import BlockLayout, normalize_block_size
from sparsekern.methods.blocks import REDUCTIONS, block_grid, expand_blocks, keep_top_blocks, pool_blocks, to_matrix
from sparsekern.methods.targets import replace_module, tie_reason, tied_parameters
from sparsekern.reports import CONVERSION_COLUMNS, LayerRecord, Report
from sparsekern.reports import ConversionReport as ConversionReport

__all__ = ["ConversionReport", "GRANULARITIES", "MaskedLayer", "check_untied", "convert_targets", "replacement_class"]

# Not methods.select.GRANULARITIES ("block", "element"): an adapter's masks are given, so its choice is
# between keeping them exactly and re-scoring them into whole blocks.
GRANULARITIES = ("exact", "block")


@dataclass
class MaskedLayer:
    """One dense layer to convert: effective (masked) ``weight`` and ``bias``, and the bool element ``mask``."""

    name: str
    module: nn.Module
    weight: torch.Tensor
    mask: torch.Tensor
    bias: torch.Tensor | None
    requires_grad: bool = True


def _unsupported_reason(module: nn.Module) -> str | None:
    kind = type_before_parametrizations(module)
    if kind is nn.Linear:
        return None
    if kind is nn.Conv2d:
        if module.groups != 1 or module.padding_mode != "zeros":
            return f"groups={module.groups}, padding_mode={module.padding_mode!r}"
        return None
    # Subclasses (e.g. MultiheadAttention's out_proj) are used through their weight by their owner.
    return kind.__name__


def replacement_class(module: nn.Module):
    """The sparse layer class that replaces ``module`` (exactly an ``nn.Linear``/``nn.Conv2d``), or ``None``."""
    if _unsupported_reason(module) is not None:
        return None
    return sknn.SparseLinear if type_before_parametrizations(module) is nn.Linear else sknn.SparseConv2d


def check_supported(targets: list[MaskedLayer]) -> None:
    bad = [f"{t.name or '<model>'} ({_unsupported_reason(t.module)})" for t in targets if _unsupported_reason(t.module)]
    if bad:
        raise TypeError(f"no sparse layer replaces these masked modules: {', '.join(bad)}")


def check_untied(model: nn.Module, layers) -> None:
    """A ValueError naming every ``(name, module)`` of ``layers`` whose parameters another module shares.

    A tied weight (an ``lm_head`` holding the word embeddings' Parameter, as Hugging Face models tie them)
    cannot become a sparse layer: the sparse layer holds its own value stores, so the embedding would
    keep training a weight the head no longer reads. The adapters refuse such layers rather than untie
    them; the tie rule is the methods' (``targets.tie_reason``), which leaves them dense.
    """
    tied = tied_parameters(model)
    ties = [f"{name}: {why}" for name, mod in layers if name and (why := tie_reason(tied, name, mod)) is not None]
    if ties:
        raise ValueError(
            f"tied weights, so nothing was converted: {'; '.join(ties)}. Leave these layers out of the masks "
            "(from_checkpoint: name the others in modules=)"
        )


def check_options(granularity: str, block_size, reduce: str) -> tuple[int, int]:
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if reduce not in REDUCTIONS:
        raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
    return normalize_block_size(block_size)


def block_mask(weight: torch.Tensor, mask: torch.Tensor, block_size, reduce: str = "l1") -> torch.Tensor:
    """Whole blocks of highest pooled ``|W * mask|`` at ``mask``'s element density (weight-shaped bool)."""
    rb, cb = block_grid(weight.shape, block_size)
    density = float(mask.float().mean()) if mask.numel() else 0.0
    n_keep = round(density * rb * cb)
    if density > 0:
        n_keep = max(n_keep, 1)
    scores = pool_blocks(torch.where(mask, weight, 0), block_size, reduce)
    return expand_blocks(keep_top_blocks(scores, n_keep), tuple(weight.shape), block_size)


def _choice(mask: torch.Tensor, block_size, name: str, kind: str) -> LayerRecord:
    """What the kernels would compute for ``mask``: the record of its layout."""
    layout = BlockLayout.from_masks(to_matrix(mask, block_size[1], fill=False), block_size=block_size)
    return LayerRecord.from_layout(layout, name, kind, tuple(mask.shape))


def _plain_copy(module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """A hook-free, parametrization-free dense copy of ``module`` holding ``weight`` and ``bias``."""
    factory = {"device": weight.device, "dtype": weight.dtype}
    if type_before_parametrizations(module) is nn.Linear:
        out = skip_init(nn.Linear, module.in_features, module.out_features, bias=bias is not None, **factory)
    else:
        out = skip_init(
            nn.Conv2d,
            module.in_channels,
            module.out_channels,
            module.kernel_size,
            stride=module.stride,
            padding=module.padding,
            dilation=module.dilation,
            groups=module.groups,
            bias=bias is not None,
            padding_mode=module.padding_mode,
            **factory,
        )
    with torch.no_grad():
        out.weight.copy_(weight)
        if bias is not None:
            out.bias.copy_(bias)
    return out


def convert_targets(
    model: nn.Module, targets: list[MaskedLayer], granularity: str, block_size, reduce: str
) -> tuple[nn.Module, Report]:
    """Build a sparse layer for every target, then swap them all into ``model``.

    Returns:
        ``(model, report)``; ``model`` is the same object unless a target is
        the model itself. ``report[name]`` is the record of the layer built (``mask_density``:
        kept elements of the given mask; ``granularity``: the choice applied) and
        ``report[name].choices[g]`` what granularity ``g`` computes; ``report.table()`` compares them.
    """
    block_size = check_options(granularity, block_size, reduce)
    check_supported(targets)
    check_untied(model, [(t.name, t.module) for t in targets])
    report = Report(columns=CONVERSION_COLUMNS)
    built = []
    for t in targets:
        if tuple(t.mask.shape) != tuple(t.weight.shape):
            raise ValueError(f"mask for {t.name!r} has shape {tuple(t.mask.shape)}, weight {tuple(t.weight.shape)}")
        exact = t.mask.to(device=t.weight.device, dtype=torch.bool)
        blocky = block_mask(t.weight, exact, block_size, reduce)
        chosen = exact if granularity == "exact" else blocky
        new = replacement_class(t.module).from_dense(
            _plain_copy(t.module, t.weight, t.bias), mask=chosen, block_size=block_size
        )
        new.train(t.module.training)
        if not t.requires_grad:
            for p in new.parameters():
                p.requires_grad_(False)
        built.append((t.name, new))
        kind = "linear" if isinstance(new, sknn.SparseLinear) else "conv2d"
        shape = tuple(t.weight.shape)
        choices = {
            "exact": _choice(exact, block_size, t.name, kind),
            "block": _choice(blocky, block_size, t.name, kind),
        }
        report.add(
            LayerRecord.from_layout(
                new.layout,
                t.name,
                kind,
                shape,
                mask_density=float(exact.float().mean()),
                granularity=granularity,
                choices=choices,
            )
        )
    # Nothing below can fail: the model changes only once every layer was built. The swap is the methods'
    # (targets.replace_module: a module registered under several names is replaced at all of them); only
    # a target that is the model itself has no parent to swap it in.
    for name, new in built:
        if name:
            replace_module(model, name, new)
        else:
            model = new
    return model, report
