"""What :func:`~sparsekern.methods.api.sparsify` (and :func:`~sparsekern.methods.lottery.imp`) report.

The report is a :class:`sparsekern.reports.Report` (old names ``SparsifyReport``, and
``LayerReport`` for its records, kept as aliases); :func:`layer_report` fills one record.
FLOPs per pass (``sparsekern.reports.PASSES``) come from the sparse layer's
``layout.flops(1)``; a layer left dense counts at density 1 (its weight gradient at 0 when
it is frozen). ``sparsekern.report`` (``flops.py``) counts a whole model's FLOPs and memory
on an input; this report describes one ``sparsify`` call.
"""

from __future__ import annotations

import math

from torch import nn

from sparsekern.methods.targets import Target
from sparsekern.reports import LEVELS, SPARSIFY_COLUMNS, LayerRecord, Report
from sparsekern.reports import LayerReport as LayerReport
from sparsekern.reports import SparsifyReport as SparsifyReport

__all__ = ["LayerReport", "SparsifyReport", "layer_report", "sparsify_report"]


def layer_report(t: Target, mod: nn.Module, reason: str | None, note: str | None = None) -> LayerRecord:
    """The :class:`~sparsekern.reports.LayerRecord` of target ``t`` after conversion (``mod`` is now at ``t.name``).

    Args:
        t: the target (``Target.shape`` is the weight shape it had).
        mod: the module now in the model (sparse when ``reason`` is ``None``).
        reason: why the layer stayed dense, or ``None`` when it was converted.
        note: what else happened to a converted layer (e.g. re-blocked).

    Returns:
        A record with the densities and ``flops_per_token`` (per input row, per output position
        for convolutions) filled.

    Example:
        >>> sparsify_report([layer_report(t, model.get_submodule(t.name), t.skip) for t in p.targets])
    """
    kind = "conv2d" if len(t.shape) == 4 else "conv1d" if t.transposed else "linear"
    if reason is None:
        if t.transposed:
            conv1d = f"transformers Conv1D, now a SparseLinear {t.shape[1]}x{t.shape[0]} (out x in)"
            note = conv1d if note is None else f"{conv1d}; {note}"
        return LayerRecord.from_layout(mod.layout, t.name, kind, t.shape, reason=None, note=note)
    per_row = 2 * math.prod(t.shape)
    wgrad = per_row if mod.weight.requires_grad else 0
    f = {p: dict.fromkeys(LEVELS, per_row) for p in ("forward", "input_grad")}
    f["weight_grad"] = {"dense": per_row, "element": wgrad, "block": wgrad}
    return LayerRecord(
        name=t.name,
        kind=kind,
        shape=t.shape,
        sparse=False,
        reason=reason,
        note=None,  # notes describe converted layers only
        element_density=1.0,
        trainable_fraction=float(wgrad > 0),
        block_fraction=1.0,
        trainable_block_fraction=float(wgrad > 0),
        flops_per_token=f,
    )


def sparsify_report(records) -> Report:
    """A :class:`~sparsekern.reports.Report` of ``records`` (from :func:`layer_report`) with ``sparsify``'s columns."""
    return Report(records, columns=SPARSIFY_COLUMNS)
