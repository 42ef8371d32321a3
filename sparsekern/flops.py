"""FLOP and memory accounting for models holding sparse layers.

``report(model, example_input)`` runs one forward pass with hooks to learn how
many tokens each linear or conv layer sees (a conv's tokens are its output
positions ``N * Ho * Wo``), then counts, per layer and in total:

* FLOPs of the forward pass, the input gradient and the weight gradient at
  three levels: ``dense`` (the layer as a dense ``nn.Linear``/``nn.Conv2d``), ``element``
  (only kept elements, trainable ones for the weight gradient: the figure
  papers report) and ``block`` (the blocks sparsekern's kernels compute);
* bytes of parameters, gradients and optimizer state, and of frozen values
  (``weight_frozen``), against the dense layer.

A FLOP is a multiply or an add (2 per multiply-accumulate). The input gradient
of a layer whose input does not require grad (usually the first) is counted as
0 at every level, since autograd never computes it. The weight gradient of a
dense layer whose weight does not require grad is 0 as well.

A conv layer's ``block`` FLOPs include the padding channels of its blocks
(``Cin`` is rounded up to the block inside each filter tap, see
``sparsekern/convview.py``), so a 3-channel stem can exceed its dense count.

Known limits: only ``nn.Linear``, ``transformers``' ``Conv1D``, ``nn.Conv2d``
(``groups=1``) and the sparse layers are counted; other modules (attention, norms, pooling) are left out of
the totals.

The result is a :class:`~sparsekern.reports.Report` (``FlopReport`` is its old name): one
``LayerRecord`` per counted layer, with ``tokens``, ``flops[pass][level]`` and ``memory``.

Example:
    >>> rep = sparsekern.report(model, torch.randn(32, 1024))
    >>> print(rep.table())
    >>> rep.total().flops["forward"]["block"] / rep.total().flops["forward"]["dense"]
"""

from __future__ import annotations

from torch import nn

from sparsekern.nn.conv import SparseConv2d
from sparsekern.nn.hf import conv1d_features, is_conv1d
from sparsekern.nn.linear import SparseLinear
from sparsekern.nn.sparse_weight import BlockSparseWeight
from sparsekern.reports import FLOP_COLUMNS, LayerRecord, Report
from sparsekern.reports import LEVELS as LEVELS
from sparsekern.reports import PASSES as PASSES
from sparsekern.reports import FlopReport as FlopReport

__all__ = ["FlopReport", "LEVELS", "OPTIMIZER_STATES", "PASSES", "report"]

# Optimizer state tensors kept per trainable element.
OPTIMIZER_STATES = {"sgd": 0, "sgd_momentum": 1, "adam": 2, "adamw": 2}


COUNTED = (nn.Linear, nn.Conv2d, SparseLinear, SparseConv2d)  # and transformers' Conv1D (is_conv1d)


def _counted(mod: nn.Module) -> bool:
    return isinstance(mod, COUNTED) or is_conv1d(mod)


def _fan(mod: nn.Module) -> tuple[int, int]:
    """``(outputs, fan_in)``: the dense GEMM a layer is, per token."""
    if is_conv1d(mod):
        n_in, n_out = conv1d_features(mod)
        return n_out, n_in
    if isinstance(mod, (nn.Linear, SparseLinear)):
        return mod.out_features, mod.in_features
    kh, kw = mod.kernel_size
    return mod.out_channels, mod.in_channels * kh * kw


def _tokens(mod: nn.Module, x, y) -> int:
    if isinstance(mod, (nn.Linear, SparseLinear)) or is_conv1d(mod):
        return x.numel() // x.shape[-1] if x.dim() else 0
    return y.numel() // mod.out_channels


def _kind_and_shape(mod: nn.Module) -> tuple[str, tuple[int, ...]]:
    """The layer's kind and its weight's shape, from its sizes (a sparse layer's weight is a computed view)."""
    n_out, fan_in = _fan(mod)
    if is_conv1d(mod):
        return "conv1d", (fan_in, n_out)
    if isinstance(mod, (nn.Linear, SparseLinear)):
        return "linear", (n_out, fan_in)
    return "conv2d", (n_out, mod.in_channels, *mod.kernel_size)


def _layer_flops(mod: nn.Module, tokens: int, input_grad: bool) -> dict:
    """``{pass: {level: FLOPs}}`` of one layer over ``tokens``."""
    n_out, fan_in = _fan(mod)
    dense = 2 * tokens * n_out * fan_in
    if isinstance(mod, BlockSparseWeight):
        out = mod.layout.flops(tokens)
        for p in PASSES:  # the layout's own dense count is its matrix view's (padded for conv): use the layer's
            out[p]["dense"] = dense
        if not mod.weight_train.requires_grad:
            out["weight_grad"].update(element=0, block=0)
    else:
        wgrad = dense if mod.weight.requires_grad else 0
        out = {p: dict.fromkeys(LEVELS, dense) for p in ("forward", "input_grad")}
        out["weight_grad"] = dict.fromkeys(LEVELS, wgrad)
    if not input_grad:
        out["input_grad"] = dict.fromkeys(LEVELS, 0)
    return out


def _layer_memory(mod: nn.Module, states: int) -> dict:
    trainable = sum(p.numel() * p.element_size() for p in mod.parameters(recurse=False) if p.requires_grad)
    params = sum(p.numel() * p.element_size() for p in mod.parameters(recurse=False))
    sparse = isinstance(mod, BlockSparseWeight)
    frozen = mod.weight_frozen.numel() * mod.weight_frozen.element_size() if sparse else 0
    elem = (mod.weight_train if sparse else mod.weight).element_size()
    n_out, fan_in = _fan(mod)
    dense_params = (n_out * fan_in + n_out * (mod.bias is not None)) * elem
    return {
        "params": params,
        "frozen": frozen,
        "grads": trainable,
        "optimizer": states * trainable,
        "dense_total": dense_params * (2 + states),
    }


def report(model: nn.Module, example_input, optimizer: str = "adamw") -> Report:
    """Count FLOPs and memory of ``model``'s linear and conv layers for one training step on ``example_input``.

    Args:
        model: any module; its ``nn.Linear``, ``Conv1D`` (``transformers``), ``nn.Conv2d``,
            ``SparseLinear`` and ``SparseConv2d`` submodules are counted.
        example_input: a tensor or a tuple of positional arguments for ``model``.
        optimizer: ``"sgd"``, ``"sgd_momentum"``, ``"adam"`` or ``"adamw"``: how
            many state tensors each trainable element carries.

    Returns:
        A :class:`~sparsekern.reports.Report`: ``rep[name].flops[pass][level]`` and
        ``rep.total().flops[pass][level]`` hold FLOPs, ``.memory`` bytes, ``.tokens`` the rows seen.

    Example:
        >>> rep = report(nn.Sequential(SparseLinear(64, 64, block_size=16)), torch.randn(8, 64))
        >>> rep.total().flops["forward"]["block"]
        65536
    """
    if optimizer not in OPTIMIZER_STATES:
        raise ValueError(f"optimizer must be one of {sorted(OPTIMIZER_STATES)}, got {optimizer!r}")
    states = OPTIMIZER_STATES[optimizer]
    seen: dict[str, tuple[nn.Module, int, bool]] = {}
    handles = []

    def hook(name):
        def record(mod, args, output):
            x = args[0]
            prev = seen.get(name, (mod, 0, False))
            seen[name] = (mod, prev[1] + _tokens(mod, x, output), prev[2] or x.requires_grad)

        return record

    for name, mod in model.named_modules():
        if _counted(mod):
            handles.append(mod.register_forward_hook(hook(name)))
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    try:
        model(*args)
    finally:
        for h in handles:
            h.remove()

    rep = Report(columns=FLOP_COLUMNS)
    for name, (mod, tokens, input_grad) in seen.items():
        kind, shape = _kind_and_shape(mod)
        sparse = isinstance(mod, BlockSparseWeight)
        rep.add(
            LayerRecord(
                name=name,
                kind=kind,
                shape=shape,
                sparse=sparse,
                block_size=tuple(mod.layout.block_size) if sparse else None,
                tokens=tokens,
                flops=_layer_flops(mod, tokens, input_grad),
                memory=_layer_memory(mod, states),
            )
        )
    return rep
