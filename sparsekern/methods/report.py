"""What :func:`~sparsekern.methods.api.sparsify` reports: :class:`LayerReport` per layer, :class:`SparsifyReport`.

FLOPs per pass (``sparsekern.flops.PASSES``) come from the sparse layer's
``layout.flops(1)``; a layer left dense counts at density 1 (its weight
gradient at 0 when it is frozen). ``sparsekern.report`` (``flops.py``) counts a
whole model's FLOPs and memory on an input; this report describes one
``sparsify`` call.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from sparsekern.flops import LEVELS, PASSES
from sparsekern.methods.targets import Target

__all__ = ["LayerReport", "SparsifyReport", "layer_report"]


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


def layer_report(t: Target, mod: nn.Module, reason: str | None, note: str | None = None) -> LayerReport:
    """The :class:`LayerReport` of target ``t`` after conversion: ``mod`` is the module now at ``t.name``.

    Args:
        t: the target (``Target.shape`` is the weight shape it had).
        mod: the module now in the model (sparse when ``reason`` is ``None``).
        reason: why the layer stayed dense, or ``None`` when it was converted.
        note: what else happened to a converted layer (e.g. re-blocked).

    Returns:
        A :class:`LayerReport`; FLOPs per input row (per output position for convolutions).

    Example:
        >>> SparsifyReport({t.name: layer_report(t, model.get_submodule(t.name), t.skip) for t in p.targets})
    """
    kind = "conv2d" if len(t.shape) == 4 else "conv1d" if t.transposed else "linear"
    if reason is None and t.transposed:
        conv1d = f"transformers Conv1D, now a SparseLinear {t.shape[1]}x{t.shape[0]} (out x in)"
        note = conv1d if note is None else f"{conv1d}; {note}"
    numel = math.prod(t.shape)
    if reason is None:
        lay = mod.layout
        counts = lay.element_counts()
        f = lay.flops(1)
        # A conv matrix view pads input channels up to the block: dense counts real weights only.
        for p in PASSES:
            f[p]["dense"] = 2 * numel
        element_density = counts["kept"] / max(1, numel)
        trainable_fraction = counts["trainable"] / max(1, counts["kept"])
        block_fraction, trainable_block_fraction = lay.block_density, lay.trainable_block_fraction
        saved = {p: 1 - f[p]["block"] / f[p]["dense"] if f[p]["dense"] else 0.0 for p in PASSES}
    else:
        per_row = 2 * numel
        wgrad = per_row if mod.weight.requires_grad else 0
        f = {p: dict.fromkeys(LEVELS, per_row) for p in ("forward", "input_grad")}
        f["weight_grad"] = {"dense": per_row, "element": wgrad, "block": wgrad}
        element_density, trainable_fraction = 1.0, float(wgrad > 0)
        block_fraction, trainable_block_fraction = 1.0, float(wgrad > 0)
        saved = {p: 1 - f[p]["block"] / f[p]["dense"] for p in PASSES}
        note = None  # notes describe converted layers only
    return LayerReport(
        name=t.name,
        kind=kind,
        shape=t.shape,
        sparse=reason is None,
        reason=reason,
        element_density=element_density,
        trainable_fraction=trainable_fraction,
        block_fraction=block_fraction,
        trainable_block_fraction=trainable_block_fraction,
        flops_per_token=f,
        flops_saved=saved,
        note=note,
    )
