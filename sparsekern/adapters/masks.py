"""Adapters for masks kept outside the model, and for checkpoints whose zeros are the mask.

Mask containers understood by :func:`from_mask_dict`:

==========================================  ==========================================
form                                        used by
==========================================  ==========================================
``{module_name: {"weight": mask}}``         NNI (``torch.save``-d mask files too)
``{param_name: mask}`` (``"fc.weight"``)    sparse_learning's ``Masking.masks``
a list of masks                             rigl-torch's ``backward_masks``: one per
                                            ``nn.Linear``/``nn.Conv2d`` in
                                            ``model.modules()`` order
==========================================  ==========================================

A mask is any tensor of the weight's shape; nonzero means kept. A ``"bias"``
mask zeroes the pruned bias entries (the bias stays dense and trainable).
A file path is read with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import os

import torch
from torch import nn

from sparsekern.adapters._core import (
    MaskedLayer,
    check_options,
    check_untied,
    convert_targets,
    replacement_class,
)
from sparsekern.methods.select import check_fraction
from sparsekern.nn.foreign_masks import dense_weight_and_mask, nonzero_mask
from sparsekern.reports import Report

__all__ = ["from_checkpoint", "from_mask_dict"]


def _load(obj):
    if isinstance(obj, (str, os.PathLike)):
        return torch.load(obj, map_location="cpu", weights_only=True)
    return obj


def _shape(t) -> torch.Size | None:
    return t.shape if isinstance(t, torch.Tensor) else None


def _normalise(model: nn.Module, masks) -> dict[str, dict[str, torch.Tensor]]:
    """Any accepted container as ``{module_name: {"weight": mask, ["bias": mask]}}``."""
    if isinstance(masks, (list, tuple)):
        layers = [name for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
        if len(masks) != len(layers):
            raise ValueError(
                f"got {len(masks)} masks, but the model has {len(layers)} nn.Linear/nn.Conv2d layers to align them with"
            )
        return {name: {"weight": m} for name, m in zip(layers, masks, strict=True)}
    if not isinstance(masks, dict):
        raise TypeError(f"masks must be a dict, a list or a path, got {type(masks).__name__}")
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, val in masks.items():
        if isinstance(val, dict):
            out.setdefault(key, {}).update(val)
        else:
            module_name, _, param = key.rpartition(".")
            out.setdefault(module_name, {})[param] = val
    return out


def from_mask_dict(
    model: nn.Module, masks, granularity: str = "exact", block_size=32, reduce: str = "l1"
) -> tuple[nn.Module, Report]:
    """Replace the layers named in ``masks`` by sparse layers cut to those masks, in place.

    Args:
        model: the dense model the masks belong to.
        masks: a mask container (see the module docstring) or a path to one.
        granularity, block_size, reduce: as for ``from_torch_prune``.

    Returns:
        ``(model, report)``.

    Raises:
        ValueError: unknown module names, masks on parameters other than
            ``weight``/``bias``, shape mismatches; the model is then unchanged.

    Example:
        >>> torch.save({"fc1": {"weight": mask}}, "masks.pth")  # an NNI mask file
        >>> model, rep = from_mask_dict(model, "masks.pth", granularity="block", block_size=32)
    """
    check_options(granularity, block_size, reduce)
    per_module = _normalise(model, _load(masks))
    modules = dict(model.named_modules())
    unknown = sorted(name for name in per_module if name not in modules)
    if unknown:
        raise ValueError(f"masks name modules the model does not have: {unknown}")
    targets = []
    for name, entry in per_module.items():
        mod = modules[name]
        other = sorted(set(entry) - {"weight", "bias"})
        if other or "weight" not in entry:
            raise ValueError(f"masks for {name!r} must hold a 'weight' mask and optionally 'bias', got {sorted(entry)}")
        weight, own = dense_weight_and_mask(mod, "weight")
        mask = nonzero_mask(entry["weight"], weight.shape, f"mask for {name}.weight", "the weight").to(weight.device)
        if own is not None:
            mask = mask & own
        bias = None
        if getattr(mod, "bias", None) is not None:
            bias = dense_weight_and_mask(mod, "bias")[0]
            if "bias" in entry:
                keep = nonzero_mask(entry["bias"], bias.shape, f"mask for {name}.bias", "the bias").to(bias.device)
                bias = torch.where(keep, bias, 0)
        targets.append(MaskedLayer(name, mod, torch.where(mask, weight, 0), mask, bias))
    return convert_targets(model, targets, granularity, block_size, reduce)


def from_checkpoint(
    model: nn.Module,
    state_dict,
    granularity: str = "exact",
    block_size=32,
    reduce: str = "l1",
    min_sparsity: float = 0.5,
    modules=None,
) -> tuple[nn.Module, Report]:
    """Load a dense checkpoint and turn its pruned layers (zeros in the weight) into sparse layers.

    Args:
        model: the dense model the checkpoint was saved from.
        state_dict: a state dict or a path to one (a dict wrapping it under
            ``"state_dict"`` or ``"model"`` is unwrapped).
        granularity, block_size, reduce: as for ``from_torch_prune``.
        min_sparsity: convert every ``nn.Linear`` and ``nn.Conv2d`` (groups
            1, zero padding) whose weight has at least this fraction of zeros.
            Ignored when ``modules`` is given.
        modules: names of the layers to convert, whatever their sparsity.

    Returns:
        ``(model, report)``.

    Raises:
        ValueError: missing or unexpected keys, shape mismatches, unknown or
            unsupported ``modules``, ``min_sparsity`` outside ``[0, 1]``; the
            model is then unchanged.

    Example:
        >>> model, rep = from_checkpoint(model, "pruned.pt", granularity="block", block_size=64)
    """
    check_options(granularity, block_size, reduce)
    min_sparsity = check_fraction(min_sparsity, "min_sparsity")
    sd = _load(state_dict)
    for key in ("state_dict", "model"):
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise TypeError(f"state_dict must be a dict or a path to one, got {type(sd).__name__}")
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(sd)), sorted(set(sd) - set(expected))
    wrong = [
        f"{k}: {_shape(sd[k])} vs {tuple(v.shape)}" for k, v in expected.items() if k in sd and _shape(sd[k]) != v.shape
    ]
    if missing or unexpected or wrong:
        raise ValueError(
            f"checkpoint does not fit the model: missing {missing}, unexpected {unexpected}, shape {wrong}"
        )
    named = dict(model.named_modules())
    if modules is not None:
        unknown = sorted(n for n in modules if n not in named)
        unsupported = sorted(n for n in modules if n in named and replacement_class(named[n]) is None)
        if unknown or unsupported:
            raise ValueError(f"modules: unknown {unknown}, not a supported layer type {unsupported}")

    def chosen(name: str, mod: nn.Module, weight) -> bool:
        if replacement_class(mod) is None or (modules is not None and name not in modules):
            return False
        if modules is not None:
            return True
        mask = weight != 0
        return not (mask.all() or 1.0 - float(mask.float().mean()) < min_sparsity)

    # Tied layers are refused before the checkpoint is loaded, so that the model is unchanged then too; the
    # checkpoint's tensor of the weight says whether the layer would be converted. (convert_targets checks
    # again, after loading, for a layer whose weight has another key: a parametrized one.)
    saved = {n: sd.get(f"{n}.weight" if n else "weight") for n in named}
    check_untied(
        model, [(n, m) for n, m in named.items() if isinstance(saved[n], torch.Tensor) and chosen(n, m, saved[n])]
    )
    model.load_state_dict(sd)
    targets = []
    for name, mod in named.items():
        weight = mod.weight.detach() if replacement_class(mod) is not None else None
        if weight is None or not chosen(name, mod, weight):
            continue
        mask = weight != 0
        bias = None if mod.bias is None else mod.bias.detach()
        targets.append(MaskedLayer(name, mod, weight, mask, bias, requires_grad=mod.weight.requires_grad))
    return convert_targets(model, targets, granularity, block_size, reduce)
