"""A method's settings as one value: :class:`MethodConfig`, the options of ``masks`` and ``sparsify``.

``masks(model, ...)`` and ``sparsify(model, ...)`` build a ``MethodConfig``
from their named arguments (same names, same defaults) and hand it to
``planning.plan`` (``planning.py``), which validates it (:meth:`MethodConfig.checked`) and reads
each field where it is used: ``density`` and ``distribution`` in
``planning._score_and_select`` (per-layer densities, ``select.layer_densities``),
``block_size`` in ``targets.find_targets`` and in every ``select`` call,
``trainable``/``freeze`` in ``planning._choose_frozen``.

Example:
    >>> cfg = MethodConfig(method="magnitude", density=0.25, block_size=16, seed=0)
    >>> sparsekern.methods.plan(model, cfg).masks.keys()  # what masks(model, ...) returns
    >>> cfg.checked().block_size
    (16, 16)
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from sparsekern.layout import normalize_block_size
from sparsekern.methods.blocks import REDUCTIONS
from sparsekern.methods.select import GRANULARITIES, check_fraction, layer_densities

__all__ = ["ARGS_DOC", "DATA_METHODS", "FREEZE", "ITERATIONS", "METHODS", "MethodConfig"]

METHODS = ("random", "magnitude", "snip", "grasp", "synflow", "force")
# Methods whose scores need data batches.
DATA_METHODS = ("snip", "grasp", "force")
# Default scoring rounds of the iterative methods (MethodConfig.iterations=None).
ITERATIONS = {"synflow": 100, "force": 10}
FREEZE = ("random", "freezenet")

# The fields' documentation, shared by MethodConfig and the Args of masks()/sparsify() (which add ``model``).
ARGS_DOC = """
        method: one of ``METHODS``: ``"random"``, ``"magnitude"``, ``"snip"``,
            ``"grasp"``, ``"synflow"``, ``"force"``.
        density: fraction of weights kept over the sparsified layers.
        trainable: fraction of the kept weights that stay trainable; the rest
            are frozen at their current values.
        block_size: int or ``(bm, bk)``, each in {16, 32, 64, 128}; ``bm`` runs
            over output features (a ``Conv1D``'s masks are ``(in, out)``, like its
            weight, so its blocks are ``(bk, bm)`` there).
        distribution: ``"uniform"`` (every layer at ``density``), ``"erk"``
            (Erdős–Rényi-kernel) or ``"global"`` (one ranking over all layers).
        granularity: ``"block"`` (pooled scores, whole blocks: the kernels skip
            them) or ``"element"`` (the published behaviour, exact counts).
        data: iterable of ``(inputs, targets)`` batches for ``snip``, ``grasp``,
            ``force`` and ``freeze="freezenet"`` (``synflow`` takes its shape).
        loss_fn: ``loss_fn(outputs, targets)``; default ``F.cross_entropy``.
        exclude: layer names to leave dense.
        exclude_first, exclude_last: leave the first / last candidate layer dense.
        reduce: block pooling, ``"l1"``, ``"l2"`` or ``"max"`` (GraSP's signed
            scores are always summed).
        layers: names of the layers to consider (default: all candidates).
        seed: makes ``random`` scores, random freezing and dropout during scoring
            reproducible; ``None`` draws one from torch's global RNG.
        freeze: how the trainable share is chosen: ``"random"`` or
            ``"freezenet"`` (the highest SNIP saliency ``|g * w|`` stays trainable).
        freeze_layers: names of layers frozen entirely.
        iterations: rounds of ``synflow`` (default 100) and ``force`` (default 10).
        example_input: a tensor of the model's input shape for ``synflow``.
        temperature: GraSP's logit temperature (200 as published).
        min_blocks: layers with fewer blocks stay dense."""


@dataclass(frozen=True)
class MethodConfig:
    """The settings of one pruning method run: the options of ``masks`` and ``sparsify`` (same names and defaults).

    A frozen value: derive variants with ``dataclasses.replace`` (``imp`` does,
    one density per round). Built as given; :meth:`checked` validates it and
    normalizes ``density``, ``trainable`` and ``block_size``.

    Attributes:{fields}
    """

    method: str = "magnitude"
    density: float = 0.1
    trainable: float = 1.0
    block_size: object = 32
    distribution: str = "uniform"
    granularity: str = "block"
    data: object = None
    loss_fn: object = None
    exclude: object = ()
    exclude_first: bool = False
    exclude_last: bool = False
    reduce: str = "l1"
    layers: object = None
    seed: int | None = None
    freeze: str = "random"
    freeze_layers: object = ()
    iterations: int | None = None
    example_input: object = None
    temperature: float = 200.0
    min_blocks: int = 4

    def checked(self) -> MethodConfig:
        """This config validated, with ``density``/``trainable`` as floats and ``block_size`` as ``(bm, bk)``.

        Raises:
            ValueError: an unknown method, granularity, reduction, freeze mode or
                distribution; a fraction outside ``[0, 1]``; a bad block size.
        """
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {METHODS}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if self.reduce not in REDUCTIONS:
            raise ValueError(f"reduce must be one of {REDUCTIONS}, got {self.reduce!r}")
        if self.freeze not in FREEZE:
            raise ValueError(f"freeze must be one of {FREEZE}, got {self.freeze!r}")
        layer_densities({}, 0.0, self.distribution)  # validates the name
        return replace(
            self,
            density=check_fraction(self.density, "density"),
            trainable=check_fraction(self.trainable, "trainable"),
            block_size=normalize_block_size(self.block_size),
        )


if MethodConfig.__doc__:  # None under python -OO
    MethodConfig.__doc__ = MethodConfig.__doc__.format(fields=ARGS_DOC)
