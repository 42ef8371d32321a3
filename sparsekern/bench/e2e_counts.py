"""GEMM FLOP and roofline counts of the end-to-end suite's training steps (``e2e.py`` reports them).

Import path: ``sparsekern.bench.e2e_counts``. What is counted is in ``e2e.py``'s module docstring.
"""

from __future__ import annotations

import torch
from torch import nn

from sparsekern import SparseLinear
from sparsekern.bench import roofline
from sparsekern.reports import PASSES


def gemm_layers(model: nn.Module, x: torch.Tensor) -> list[dict]:
    """Each linear/conv layer's name, activation sizes and whether its input gradient is computed.

    One untimed forward with hooks, autograd on (so each input's ``requires_grad``
    says whether autograd computes its gradient). Sparsifying keeps names and
    activation sizes, so the dense model's records serve every provider.
    """
    seen: list[dict] = []

    def hook(name):
        def record(mod, args, out):
            weight_elems = _weight_elems(mod)
            seen.append(
                {
                    "name": name,
                    "in_elems": args[0].numel(),
                    "out_elems": out.numel(),
                    "input_grad": args[0].requires_grad,
                    "weight_elems": weight_elems,
                    "dense_flops": 2.0 * out.numel() * (weight_elems // _out_features(mod)),
                }
            )

        return record

    handles = [
        m.register_forward_hook(hook(name))
        for name, m in model.named_modules()
        if isinstance(m, (nn.Linear, nn.Conv2d, SparseLinear)) or hasattr(m, "layout")
    ]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return seen


def gemm_costs(model: nn.Module, layers: list[dict], elem_bytes: int) -> dict[str, roofline.Cost]:
    """Roofline costs per mode of one training step of ``model`` (see the module docstring).

    ``layers`` come from :func:`gemm_layers` (of this model or its dense original);
    a layer with a ``layout`` (sparsekern) computes its block fraction per pass,
    any other layer everything.
    """
    passes = {p: roofline.Cost() for p in PASSES}
    for rec in layers:
        try:
            fractions = _fractions(model.get_submodule(rec["name"]))
        except AttributeError:  # a sparsifier that renamed the layer: count it dense
            fractions = dict.fromkeys(PASSES, 1.0)
        for p in PASSES:
            if p == "input_grad" and not rec["input_grad"]:
                continue  # autograd never computes it (the network's first layer)
            passes[p] = passes[p] + roofline.layer_pass(
                rec["dense_flops"], rec["in_elems"], rec["out_elems"], rec["weight_elems"], fractions[p], elem_bytes
            )
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return roofline.mode_costs(passes, roofline.adamw(trainable, elem_bytes))


def _out_features(mod: nn.Module) -> int:
    for attr in ("out_features", "out_channels"):
        if hasattr(mod, attr):
            return getattr(mod, attr)
    raise TypeError(f"cannot count {type(mod).__name__}")


def _weight_elems(mod: nn.Module) -> int:
    if isinstance(mod, (nn.Linear, SparseLinear)):
        return mod.out_features * mod.in_features
    if hasattr(mod, "kernel_size"):
        kh, kw = mod.kernel_size
        return mod.out_channels * (mod.in_channels // getattr(mod, "groups", 1)) * kh * kw
    return mod.weight.numel()


def _fractions(mod: nn.Module) -> dict[str, float]:
    layout = getattr(mod, "layout", None)
    if layout is None or not hasattr(layout, "flops"):
        return dict.fromkeys(PASSES, 1.0)
    f = layout.flops(1)
    return {p: f[p]["block"] / max(1, f[p]["dense"]) for p in PASSES}
