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

Example:
    >>> rep = sparsekern.report(model, torch.randn(32, 1024))
    >>> print(rep.table())
    >>> rep.total["block"]["forward"] / rep.total["dense"]["forward"]
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from sparsekern.nn.conv import SparseConv2d
from sparsekern.nn.hf import conv1d_features, is_conv1d
from sparsekern.nn.linear import SparseLinear
from sparsekern.nn.sparse_weight import BlockSparseWeight

__all__ = ["FlopReport", "LEVELS", "OPTIMIZER_STATES", "PASSES", "report"]

PASSES = ("forward", "input_grad", "weight_grad")
LEVELS = ("dense", "element", "block")
# Optimizer state tensors kept per trainable element.
OPTIMIZER_STATES = {"sgd": 0, "sgd_momentum": 1, "adam": 2, "adamw": 2}


@dataclass
class FlopReport:
    """Per-layer and total counts; see the module docstring for the definitions."""

    layers: list[dict] = field(default_factory=list)
    total: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"layers": self.layers, "total": self.total}

    def table(self) -> str:
        """A markdown table: FLOP fractions of each pass (block and element) and memory."""
        head = (
            "| layer | tokens | fwd block | fwd element | dX block | dW block | dW element "
            "| params MB | grads MB | optim MB | dense params+grads+optim MB |"
        )
        lines = [head, "|" + "---|" * 11]
        for row in [*self.layers, {"name": "total", "tokens": "", **self.total}]:
            f = row["flops"] if "flops" in row else row

            def frac(level, p, f=f):
                dense = f["dense"][p]
                return f"{f[level][p] / dense:.3f}" if dense else "-"

            mem = row["memory"]
            mb = 1 / 2**20
            lines.append(
                f"| {row['name']} | {row['tokens']} | {frac('block', 'forward')} | {frac('element', 'forward')} "
                f"| {frac('block', 'input_grad')} | {frac('block', 'weight_grad')} | {frac('element', 'weight_grad')} "
                f"| {mem['params'] * mb:.2f} | {mem['grads'] * mb:.2f} | {mem['optimizer'] * mb:.2f} "
                f"| {mem['dense_total'] * mb:.2f} |"
            )
        return "\n".join(lines)


def _zero() -> dict:
    return {level: dict.fromkeys(PASSES, 0) for level in LEVELS}


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


def _layer_flops(mod: nn.Module, tokens: int, input_grad: bool) -> dict:
    n_out, fan_in = _fan(mod)
    dense = 2 * tokens * n_out * fan_in
    if isinstance(mod, BlockSparseWeight):
        f = mod.layout.flops(tokens)
        out = {level: {p: f[p][level] for p in PASSES} for level in LEVELS}
        # The layout's own dense count is its matrix view's (padded for conv): use the layer's.
        out["dense"] = dict.fromkeys(PASSES, dense)
        if not mod.weight_train.requires_grad:
            for level in ("element", "block"):
                out[level]["weight_grad"] = 0
    else:
        wgrad = dense if mod.weight.requires_grad else 0
        out = {level: {"forward": dense, "input_grad": dense, "weight_grad": wgrad} for level in LEVELS}
    if not input_grad:
        for level in LEVELS:
            out[level]["input_grad"] = 0
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


def report(model: nn.Module, example_input, optimizer: str = "adamw") -> FlopReport:
    """Count FLOPs and memory of ``model``'s linear and conv layers for one training step on ``example_input``.

    Args:
        model: any module; its ``nn.Linear``, ``Conv1D`` (``transformers``), ``nn.Conv2d``,
            ``SparseLinear`` and ``SparseConv2d`` submodules are counted.
        example_input: a tensor or a tuple of positional arguments for ``model``.
        optimizer: ``"sgd"``, ``"sgd_momentum"``, ``"adam"`` or ``"adamw"``: how
            many state tensors each trainable element carries.

    Returns:
        A :class:`FlopReport`. ``rep.layers[i]["flops"][level][pass]`` and
        ``rep.total[level][pass]`` hold FLOPs; ``["memory"]`` holds bytes.

    Example:
        >>> rep = report(nn.Sequential(SparseLinear(64, 64, block_size=16)), torch.randn(8, 64))
        >>> rep.total["block"]["forward"]
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

    rep = FlopReport()
    total_flops = _zero()
    total_mem = dict.fromkeys(("params", "frozen", "grads", "optimizer", "dense_total"), 0)
    for name, (mod, tokens, input_grad) in seen.items():
        flops = _layer_flops(mod, tokens, input_grad)
        mem = _layer_memory(mod, states)
        rep.layers.append({"name": name, "tokens": tokens, "flops": flops, "memory": mem})
        for level in LEVELS:
            for p in PASSES:
                total_flops[level][p] += flops[level][p]
        for key in total_mem:
            total_mem[key] += mem[key]
    rep.total = {**total_flops, "memory": total_mem}
    return rep
