"""The one report type: :class:`Report`, a :class:`LayerRecord` per layer, and ``PASSES``/``LEVELS``.

Three calls produce it, and each fills the fields that apply to it (the others stay ``None``):

========================================  ==========================================================
producer                                  fields
========================================  ==========================================================
``sparsekern.report`` (``flops.py``)      ``tokens``, ``flops``, ``memory`` (one training step)
``sparsify``, ``imp`` (``methods/``)      ``reason``, ``note``, densities, ``flops_per_token``
the adapters' ``from_*`` (``adapters/``)  densities, ``flops_per_token``, ``mask_density``,
                                          ``granularity``, ``choices`` (both granularities)
========================================  ==========================================================

FLOPs are always indexed ``[pass][level]``: ``PASSES`` are the three GEMMs of a layer's training
step, ``LEVELS`` what is counted (``dense``: the layer as a dense one; ``element``: kept elements,
trainable ones for the weight gradient; ``block``: the blocks the kernels compute), as
``BlockLayout.flops`` returns them. A FLOP is a multiply or an add (2 per multiply-accumulate).

This module imports nothing of the package, so that every layer above the layout may use it.

Example:
    >>> rep = sparsekern.sparsify(model, "magnitude", density=0.25, block_size=32)
    >>> rep["fc1"].flops_saved["forward"], rep.total().flops_saved["weight_grad"]
    >>> print(rep.table())
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from dataclasses import dataclass, field, fields

__all__ = [
    "COLUMNS",
    "CONVERSION_COLUMNS",
    "ConversionReport",
    "FLOP_COLUMNS",
    "FlopReport",
    "LEVELS",
    "LayerRecord",
    "LayerReport",
    "PASSES",
    "Report",
    "SPARSIFY_COLUMNS",
    "SparsifyReport",
    "sum_records",
]

PASSES = ("forward", "input_grad", "weight_grad")
LEVELS = ("dense", "element", "block")
SHORT = dict(zip(PASSES, ("fwd", "dX", "dW"), strict=True))  # column headers


@dataclass
class LayerRecord:
    """One layer of a :class:`Report`; a field that does not apply to the report's producer is ``None``.

    Attributes:
        name: the module's name in the model (``""`` for a model that is itself the layer).
        kind: ``"linear"``, ``"conv1d"`` (``transformers``' ``Conv1D``) or ``"conv2d"``.
        shape: the weight shape the layer had (a ``Conv1D``'s is ``(in, out)``).
        sparse: whether the layer is (now) a sparse layer; ``reason`` says why not, ``note`` what else
            happened to it (re-blocked, a ``Conv1D`` converted).
        block_size: ``(bm, bk)`` of a sparse layer.
        element_density: kept weights over all weights.
        trainable_fraction: trainable weights over kept weights.
        block_fraction: computed blocks over all blocks (1 for a dense layer).
        trainable_block_fraction: blocks that get a weight gradient over all blocks.
        flops_per_token: ``{pass: {level: FLOPs}}`` per input row (per output position for a conv).
        tokens: the rows (output positions) the layer saw on the example input.
        flops: ``{pass: {level: FLOPs}}`` over ``tokens``; an input gradient autograd never computes
            (the first layer's) counts 0.
        memory: bytes of ``params``, ``frozen`` values, ``grads``, ``optimizer`` state and the dense
            layer's params + grads + optimizer state (``dense_total``).
        mask_density: kept elements of a mask given to an adapter.
        granularity: the adapter's choice applied, ``"exact"`` or ``"block"``.
        choices: ``{granularity: LayerRecord}``: what each choice would compute, for comparison.
    """

    name: str
    kind: str | None = None
    shape: tuple[int, ...] | None = None
    sparse: bool | None = None
    reason: str | None = None
    note: str | None = None
    block_size: tuple[int, int] | None = None
    element_density: float | None = None
    trainable_fraction: float | None = None
    block_fraction: float | None = None
    trainable_block_fraction: float | None = None
    flops_per_token: dict[str, dict[str, int]] | None = None
    tokens: int | None = None
    flops: dict[str, dict[str, int]] | None = None
    memory: dict[str, int] | None = None
    mask_density: float | None = None
    granularity: str | None = None
    choices: dict[str, LayerRecord] | None = None

    @property
    def flops_saved(self) -> dict[str, float] | None:
        """``{pass: fraction}`` of the dense FLOPs the kernels skip, from ``flops`` (else ``flops_per_token``)."""
        f = self.flops if self.flops is not None else self.flops_per_token
        if f is None:
            return None
        return {p: 1 - f[p]["block"] / f[p]["dense"] if f[p]["dense"] else 0.0 for p in PASSES}

    def to_dict(self) -> dict:
        """Every field (``None`` included; ``choices`` as dicts) and ``flops_saved``, as plain data."""
        out = {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self) if f.name != "choices"}
        out["choices"] = None if self.choices is None else {g: r.to_dict() for g, r in self.choices.items()}
        out["flops_saved"] = self.flops_saved
        return out

    @classmethod
    def from_layout(cls, layout, name: str, kind: str, shape: tuple[int, ...], **fields_) -> LayerRecord:
        """The record of a sparse layer of ``layout`` (a ``BlockLayout``), weight ``shape``; ``fields_`` add to it.

        Dense FLOPs count the real weights, ``2 * prod(shape)`` per token: a conv's matrix view pads
        its input channels up to the block, and its own dense count includes them.

        Example:
            >>> LayerRecord.from_layout(layer.layout, "fc", "linear", (64, 32), note="re-blocked")
        """
        numel = math.prod(shape)
        counts = layout.element_counts()
        per_token = layout.flops(1)
        for p in PASSES:
            per_token[p]["dense"] = 2 * numel
        return cls(
            name=name,
            kind=kind,
            shape=tuple(shape),
            sparse=True,
            block_size=tuple(layout.block_size),
            element_density=counts["kept"] / max(1, numel),
            trainable_fraction=counts["trainable"] / max(1, counts["kept"]),
            block_fraction=layout.block_density,
            trainable_block_fraction=layout.trainable_block_fraction,
            flops_per_token=per_token,
            **fields_,
        )


def _add_nested(records: list[LayerRecord], attr: str) -> dict | None:
    """Sum ``{pass: {level: n}}`` (or flat ``{key: n}``) over the records that have ``attr``."""
    have = [getattr(r, attr) for r in records if getattr(r, attr) is not None]
    if not have:
        return None
    out = copy.deepcopy(have[0])
    for d in have[1:]:
        for k, v in d.items():
            if isinstance(v, dict):
                for kk, vv in v.items():
                    out[k][kk] += vv
            else:
                out[k] += v
    return out


def _mean(records: list[LayerRecord], attr: str, weights: list[float | None]) -> float | None:
    """Mean of ``attr`` over the records that have it and a weight; ``None`` when none has."""
    pairs = [(getattr(r, attr), w) for r, w in zip(records, weights, strict=True)]
    pairs = [(v, w) for v, w in pairs if v is not None and w is not None]
    if not pairs:
        return None
    return sum(v * w for v, w in pairs) / max(1e-12, sum(w for _, w in pairs))


def _common(values):
    """The one value all non-``None`` ``values`` share, else ``None``."""
    seen = {v for v in values if v is not None}
    return seen.pop() if len(seen) == 1 else None


def sum_records(name: str, records: Iterable[LayerRecord]) -> LayerRecord:
    """One record over ``records``: counts summed, fractions weighted by what they are fractions of.

    FLOPs, tokens and memory add up. Densities and block fractions are means weighted by each
    weight's size (the trainable fraction by kept weights), so a dense layer counts at density 1.
    ``block_size`` and ``granularity`` are kept when every record shares them; ``choices`` are summed
    per granularity; names, kinds, shapes, reasons and notes do not sum (``None``).
    """
    records = list(records)
    numel = [math.prod(r.shape) if r.shape is not None else None for r in records]
    kept = [
        None if n is None or r.element_density is None else r.element_density * n
        for r, n in zip(records, numel, strict=True)
    ]
    tokens = [r.tokens for r in records if r.tokens is not None]
    choices = None
    if any(r.choices for r in records):
        keys = dict.fromkeys(g for r in records for g in (r.choices or {}))
        choices = {g: sum_records(g, [r.choices[g] for r in records if r.choices and g in r.choices]) for g in keys}
    return LayerRecord(
        name=name,
        block_size=_common(r.block_size for r in records),
        element_density=_mean(records, "element_density", numel),
        trainable_fraction=_mean(records, "trainable_fraction", kept),
        block_fraction=_mean(records, "block_fraction", numel),
        trainable_block_fraction=_mean(records, "trainable_block_fraction", numel),
        flops_per_token=_add_nested(records, "flops_per_token"),
        tokens=sum(tokens) if tokens else None,
        flops=_add_nested(records, "flops"),
        memory=_add_nested(records, "memory"),
        mask_density=_mean(records, "mask_density", numel),
        granularity=_common(r.granularity for r in records),
        choices=choices,
    )


# ------------------------------------------------------------------ table columns
def _fmt(v, spec: str = ".3f") -> str | None:
    return None if v is None else format(v, spec)


def _fraction(p: str, level: str):
    """Computed FLOPs of ``level`` over dense, from ``flops`` (else ``flops_per_token``)."""

    def cell(r: LayerRecord) -> str | None:
        f = r.flops if r.flops is not None else r.flops_per_token
        return None if f is None or not f[p]["dense"] else f"{f[p][level] / f[p]['dense']:.3f}"

    return cell


def _saved(p: str, choice: str | None = None):
    def cell(r: LayerRecord) -> str | None:
        r = r if choice is None else (r.choices or {}).get(choice)
        s = None if r is None else r.flops_saved
        return None if s is None else f"{s[p]:.3f}"

    return cell


def _megabytes(key: str):
    return lambda r: None if r.memory is None else f"{r.memory[key] / 2**20:.2f}"


def _joined(v) -> str | None:
    return None if v is None else "x".join(map(str, v))


#: Every column ``Report.table`` knows: header -> the cell of a record (``None``: an empty cell).
COLUMNS = {
    "layer": lambda r: r.name,
    "kind": lambda r: r.kind,
    "shape": lambda r: _joined(r.shape),
    "sparse": lambda r: None if r.sparse is None else ("yes" if r.sparse else "no"),
    "block": lambda r: _joined(r.block_size),
    "tokens": lambda r: _fmt(r.tokens, "d"),
    "density": lambda r: _fmt(r.element_density),
    "trainable": lambda r: _fmt(r.trainable_fraction),
    "blocks": lambda r: _fmt(r.block_fraction),
    "trainable blocks": lambda r: _fmt(r.trainable_block_fraction),
    "mask density": lambda r: _fmt(r.mask_density),
    "applied": lambda r: r.granularity,
    **{f"{SHORT[p]} {level}": _fraction(p, level) for p in PASSES for level in ("block", "element")},
    **{f"{SHORT[p]} saved": _saved(p) for p in PASSES},
    **{f"{g} {SHORT[p]} saved": _saved(p, g) for g in ("exact", "block") for p in PASSES},
    "params MB": _megabytes("params"),
    "frozen MB": _megabytes("frozen"),
    "grads MB": _megabytes("grads"),
    "optim MB": _megabytes("optimizer"),
    "dense params+grads+optim MB": _megabytes("dense_total"),
    "note": lambda r: r.reason or r.note,
}
# Each producer's default columns (what its own table printed before the report types were one).
FLOP_COLUMNS = (
    "layer", "tokens", "fwd block", "fwd element", "dX block", "dW block", "dW element",
    "params MB", "grads MB", "optim MB", "dense params+grads+optim MB",
)  # fmt: skip
SPARSIFY_COLUMNS = (
    "layer", "shape", "sparse", "density", "trainable", "blocks", "fwd saved", "dX saved", "dW saved", "note",
)  # fmt: skip
CONVERSION_COLUMNS = (
    "layer", "shape", "mask density", "applied",
    *(f"{g} {SHORT[p]} saved" for g in ("exact", "block") for p in PASSES),
)  # fmt: skip


def _check_columns(columns) -> tuple[str, ...]:
    columns = tuple(columns)
    unknown = [c for c in columns if c not in COLUMNS]
    if unknown:
        raise ValueError(f"unknown report columns {unknown}; known: {list(COLUMNS)}")
    return columns


# ------------------------------------------------------------------ the report
@dataclass
class Report:
    """Per-layer :class:`LayerRecord` s, by layer name, in the order they were added.

    ``report[name]`` is a record (a ``KeyError`` names the layers there are), ``for r in report``
    walks the records, ``name in report`` and ``len(report)`` work as for a dict, ``total()`` sums
    them into one record and ``table()`` prints them.

    Args:
        layers: ``{name: record}`` or an iterable of records (their names must differ).
        columns: the default columns of :meth:`table` (names of ``COLUMNS``); ``None``: every
            column some layer has a value for.

    Example:
        >>> rep = Report([LayerRecord("fc", element_density=0.5, shape=(4, 4))], columns=("layer", "density"))
        >>> rep["fc"].element_density, rep.total().element_density
        (0.5, 0.5)
    """

    layers: dict[str, LayerRecord] = field(default_factory=dict)
    columns: tuple[str, ...] | None = None

    def __post_init__(self):
        given = self.layers.values() if isinstance(self.layers, dict) else self.layers
        self.layers = {}
        for r in given:
            self.add(r)
        if self.columns is not None:
            self.columns = _check_columns(self.columns)

    def add(self, record: LayerRecord) -> LayerRecord:
        """Append ``record``; a ``ValueError`` if the report already holds a layer of its name."""
        if not isinstance(record, LayerRecord):
            raise TypeError(f"a Report holds LayerRecords, got {type(record).__name__}")
        if record.name in self.layers:
            raise ValueError(f"the report already holds a layer named {record.name!r}")
        self.layers[record.name] = record
        return record

    def __getitem__(self, name: str) -> LayerRecord:
        if name not in self.layers:
            raise KeyError(f"no layer {name!r} in this report; its layers: {list(self.layers)}")
        return self.layers[name]

    def __iter__(self):
        return iter(self.layers.values())

    def __len__(self) -> int:
        return len(self.layers)

    def __contains__(self, name) -> bool:
        return name in self.layers

    @property
    def sparse_layers(self) -> list[str]:
        """Names of the layers that are sparse."""
        return [n for n, r in self.layers.items() if r.sparse]

    def total(self) -> LayerRecord:
        """A record named ``"total"`` over every layer (see :func:`sum_records` for what sums how)."""
        return sum_records("total", self)

    def table(self, columns=None) -> str:
        """A markdown table, one row per layer and a total row; cells that do not apply stay empty.

        Args:
            columns: names of ``COLUMNS``; by default the report's ``columns``, else every column
                some layer has a value for.

        Raises:
            ValueError: an unknown column name.
        """
        if columns is not None:
            columns = _check_columns(columns)
        else:
            columns = self.columns or tuple(c for c, cell in COLUMNS.items() if any(cell(r) is not None for r in self))
        lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        for r in [*self, self.total()]:
            cells = [COLUMNS[c](r) for c in columns]
            lines.append("| " + " | ".join("" if v is None else v for v in cells) + " |")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """``{"layers": {name: record dict}, "total": record dict}`` (see :meth:`LayerRecord.to_dict`)."""
        return {"layers": {n: r.to_dict() for n, r in self.layers.items()}, "total": self.total().to_dict()}


# The report types before they were one, kept so that code importing them goes on working.
FlopReport = SparsifyReport = ConversionReport = Report
LayerReport = LayerRecord
